"""Embedding without Ray: sources, the Embedder callable, fetch/decode errors, the store's resume rules, GPU decode.

The helpers that build a tiny model and a survey with broken files are in ``helpers.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import (
    BROKEN,
    IMAGE_SIZE,
    TAR_GOOD,
    clustered,
    good_keys,
    make_model,
    photo_bytes,
    survey_files,
    tar_bytes,
    write_files,
    write_partitions,
)
from helpers import chunk as _chunk

from whale_dist import cli, embed, images, storage
from whale_dist.embed import pipeline as embed_pipeline
from whale_dist.embed import sources as embed_sources
from whale_dist.embed import store as embed_store


@pytest.fixture(scope="module")
def model_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("model") / "model.pt")
    make_model(url)
    return url


def test_list_archive_keys_members_and_bytes(tmp_path):
    files = survey_files()
    write_files(str(tmp_path), files)
    work, ignored = embed_sources.list_archive(str(tmp_path))
    assert set(work["image_key"]) == good_keys() | set(BROKEN)
    assert list(work["image_key"]) == sorted(work["image_key"])
    assert ignored == 1  # README.txt; the tar's .json sidecar is not a photo either and is not listed
    member = work.set_index("image_key").loc["shard-000.tar/m/t_000.jpg"]
    assert member["url"].endswith("shard-000.tar#m/t_000.jpg")
    data = embed_sources.read_item(member["url"], int(member["offset"]), int(member["length"]))
    assert data == embed_sources.read_image_bytes(member["url"])
    assert images.decode_image(data).shape == (40, 48, 3)


def test_plan_reads_reads_nearby_members_of_a_shard_together():
    urls = ["s3://b/a.jpg", "s3://b/s.tar#1", "s3://b/s.tar#2", "s3://b/t.tar#1", "s3://b/s.tar#far"]
    offsets = [-1, 512, 2048, 512, 512 + embed_sources.SPAN_GAP + 10_000]
    lengths = [-1, 1000, 300, 70, 5]
    reads = sorted(embed_sources.plan_reads(urls, offsets, lengths))
    assert reads == [("s3://b/a.jpg", -1, -1, [(0, -1, -1)]),
                     ("s3://b/s.tar", 512, 2348, [(1, 512, 1000), (2, 2048, 300)]),
                     ("s3://b/s.tar", offsets[4], offsets[4] + 5, [(4, offsets[4], 5)]),
                     ("s3://b/t.tar", 512, 582, [(3, 512, 70)])]
    span = bytes(range(256)) * 10
    assert embed_sources.slice_member(span[512:2348], 512, 2048, 300) == span[2048:2348]


def test_a_batch_reads_each_shard_once_and_gets_the_same_bytes(tmp_path, monkeypatch):
    write_files(str(tmp_path), survey_files())
    work, _ = embed_sources.list_archive(str(tmp_path))
    batch = {c: work[c].to_numpy() for c in work.columns}
    reads = []
    real_read = embed_sources.read_range
    monkeypatch.setattr(embed_sources, "read_range", lambda *a: reads.append(a) or real_read(*a))
    fetched = embed_pipeline.fetch_batch(batch)
    tar_reads = [r for r in reads if r[0].endswith(".tar")]
    assert len(tar_reads) == 1 and len(reads) == len(work) - (len(TAR_GOOD) + 1) + 1
    for url, (data, err) in zip(work["url"], fetched):
        assert err is None and data == embed_sources.read_image_bytes(url)


def test_damaged_tar_keeps_readable_members_and_reports_the_shard(tmp_path):
    whole = tar_bytes({"a.jpg": photo_bytes(1), "b.jpg": photo_bytes(2)})
    storage.write_bytes(str(tmp_path / "s.tar"), whole[:1536 + 100])  # cut inside b.jpg's header
    work, _ = embed_sources.list_archive(str(tmp_path))
    errors = dict(zip(work["image_key"], work["list_error"]))
    assert set(errors) == {"s.tar/a.jpg", "s.tar"}
    assert errors["s.tar/a.jpg"] == "" and "truncated" in errors["s.tar"]


def test_embedder_matches_a_plain_forward_and_flip_tta(model_url):
    import torch

    from whale_dist.model import load_encoder

    photos = np.stack([images.load_photo(photo_bytes(i), IMAGE_SIZE) for i in range(5)])
    encoder, _ = load_encoder(model_url)
    with torch.no_grad():
        reference = encoder(images.to_tensor_batch(photos)).numpy()
        mirrored = encoder(images.to_tensor_batch(photos[:, :, ::-1].copy())).numpy()
    got = embed.Embedder(model_url, batch_size=2).embed_images(photos)
    assert got.dtype == np.float32 and got.shape == (5, 16)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    tta = embed.Embedder(model_url, flip_tta=True).embed_images(photos)
    expected = (reference + mirrored) / np.linalg.norm(reference + mirrored, axis=1, keepdims=True)
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(tta, axis=1), 1.0, atol=1e-5)


def test_fetch_decode_then_embedder_reports_each_broken_file(tmp_path, model_url):
    write_files(str(tmp_path), survey_files())
    work, _ = embed_sources.list_archive(str(tmp_path))
    work = embed_pipeline.plan_chunks(work, set(), 0, 100)
    batch = {c: work[c].to_numpy() for c in work.columns}
    rows = embed.Embedder(model_url)(embed_pipeline.fetch_decode(batch, IMAGE_SIZE))
    stages = dict(zip(rows["image_key"], rows["stage"]))
    assert {k: stages[k] for k in BROKEN} == BROKEN
    assert all(stages[k] == "" for k in good_keys())
    assert "image" not in rows and rows["embedding"].shape == (len(work), 16)
    assert not rows["embedding"][~rows["ok"]].any()
    np.testing.assert_allclose(np.linalg.norm(rows["embedding"][rows["ok"]], axis=1), 1.0, atol=1e-5)


def test_missing_manifest_file_is_a_read_error(tmp_path):
    storage.write_bytes(str(tmp_path / "a.jpg"), photo_bytes(0))
    (tmp_path / "m.csv").write_text("image,species,bbox\na.jpg,humpback_whale,2 2 30 30\ngone.jpg,beluga,\n")
    work = embed.load_work(str(tmp_path / "m.csv"))[0]
    assert list(work["species"]) == ["humpback_whale", "beluga_whale"]
    out = embed_pipeline.fetch_decode({c: work[c].to_numpy() for c in work.columns}, IMAGE_SIZE)
    assert list(out["stage"]) == ["", "read"] and "gone.jpg" in out["message"][1]
    assert out["sha256"][0] == __import__("hashlib").sha256(photo_bytes(0)).hexdigest()


def test_store_skips_published_chunks_and_clears_a_killed_runs_leftovers(tmp_path):
    out, version = str(tmp_path), "mtest"
    embed_store.publish_chunk(out, version, 0, *_chunk(["a", "b", "c"]))
    embed_store.publish_chunk(out, version, 2, *_chunk(["d", "e"]))
    leftover = _chunk(["f", "g"])  # chunk 1 of a killed run: errors published, embeddings never marked
    embed_store.write_parquet(storage.join(embed_store.embeddings_dir(out, version), "part-00001.parquet"), leftover[0])
    storage.mark_done(storage.join(embed_store.errors_dir(out, version), "part-00001.parquet"))
    done = embed_store.published(out, version)
    assert done == [0, 2]
    embed_store.remove_unpublished(out, version, done)
    assert not [u for u in storage.list_files(out) if "part-00001" in u]
    assert embed_store.done_keys(out, version, done) == {"a", "b", "c", "d", "e"}
    frame, vectors = embed_store.read_embeddings(out, version)
    assert list(frame["image_key"]) == ["a", "b", "d"] and vectors.shape == (3, 4)
    assert list(embed_store.read_errors(out, version)["image_key"]) == ["c", "e"]
    import pandas as pd

    work = pd.DataFrame({"image_key": list("abcdefgh")})
    todo = embed_pipeline.plan_chunks(work, {"a", "b", "c", "d", "e"}, 3, 2)
    assert list(todo["image_key"]) == ["f", "g", "h"] and list(todo["partition"]) == [3, 3, 4]


def test_gpu_decode_path_agrees_with_cpu_decoding_on_cpu():
    datas = np.array([photo_bytes(1), photo_bytes(2, "PNG"), b"not a jpeg", photo_bytes(3)[:100]], dtype=object)
    bboxes = np.array(["", "4 4 40 30", "", ""], dtype=object)
    tensor, failures = __import__("whale_dist.embed.gpu_decode").embed.gpu_decode.decode_on_device(
        datas, bboxes, np.ones(4, dtype=bool), IMAGE_SIZE, "cpu")
    assert set(failures) == {2, 3} and failures[2][0] == "decode"
    cpu = images.load_photo(photo_bytes(1), IMAGE_SIZE)
    assert np.abs(tensor[0].permute(1, 2, 0).numpy() * 255 - cpu).mean() < 8  # resize filters differ slightly
    assert np.allclose(tensor[1].permute(1, 2, 0).numpy() * 255,
                       images.load_photo(photo_bytes(2, "PNG"), IMAGE_SIZE, (4, 4, 40, 30)), atol=1)


def test_bad_command_lines_are_one_line_errors(tmp_path, capsys, model_url):
    assert cli.run_job(embed.main, ["--images", str(tmp_path), "--manifest", "x.csv", f"embed.model={model_url}"]) == 2
    assert cli.run_job(embed.main, ["--images", str(tmp_path / "none"), f"embed.model={model_url}"]) == 2
    assert cli.run_job(embed.main, ["--images", str(tmp_path), "embed.model=/nope/model.pt"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "at most one" in lines[0] and "not found" in lines[1] and "model" in lines[2]


def test_the_happywhale_catalogue_is_embeddable_without_a_manifest(tmp_path):
    """Kaggle's train.csv names files relative to train_images/: the catalogue reader resolves them."""
    (tmp_path / "train_images").mkdir()
    (tmp_path / "train_images" / "a.jpg").write_bytes(photo_bytes(1))
    (tmp_path / "train.csv").write_text("image,species,individual_id\na.jpg,kiler_whale,w1\nmissing.jpg,beluga,w2\n")
    from whale_dist.config import load_config

    work = embed_sources.from_catalogue(load_config(None, [f"catalogue.url={tmp_path}"]))
    assert list(work["image_key"]) == ["a.jpg", "missing.jpg"]
    assert work["url"][0] == storage.join(str(tmp_path), "train_images", "a.jpg")
    assert list(work["species"]) == ["killer_whale", "beluga_whale"] and list(work["individual_id"]) == ["w1", "w2"]
    assert embed_sources.read_image_bytes(work["url"][0]) == photo_bytes(1)


def test_partitions_store_vectors_as_fixed_size_binary_read_back_bit_for_bit(tmp_path):
    """``embed_store.stored_table``: the embedding column is written as FIXED_LEN_BYTE_ARRAY (tagged), and both the
    store's readers and the index's give back exactly the floats written, from a sliced table (Arrow offset) too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from whale_dist.index import inputs as index_inputs

    out, version = str(tmp_path), "mtest"
    embedded, errors = _chunk(["a", "b", "c", "d", "e"])
    x = np.random.default_rng(0).standard_normal((embedded.num_rows, 4)).astype(np.float32)
    x[0, 0] = np.float32(1e-42)  # a subnormal survives too
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)
    embedded = embedded.set_column(embedded.schema.get_field_index("embedding"), "embedding", column)
    embed_store.publish_chunk(out, version, 0, embedded.slice(1), errors)
    url = embed_store.published_urls(out, version)[0]
    field = pq.read_schema(url).field("embedding")
    assert field.type == pa.binary(16) and field.metadata == {k.encode(): v.encode()
                                                               for k, v in embed_store.STORED_VECTOR.items()}
    frame, vectors = embed_store.read_embeddings(out, version)
    assert list(frame["image_key"]) == ["b", "c", "d"] and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors.view(np.uint32), x[1:].view(np.uint32))
    assert index_inputs.embedding_dim(url) == 4
    raw = index_inputs.read_vectors(url, np.arange(3), 4)
    np.testing.assert_allclose(raw, x[1:] / np.linalg.norm(x[1:], axis=1, keepdims=True), rtol=1e-6)


def test_a_store_written_with_list_vectors_reads_as_before_beside_new_partitions(tmp_path):
    """Stores written before the binary column (lists of float32) stay readable, mixed with new partitions."""
    out = str(tmp_path)
    x = clustered(30)
    write_partitions(storage.join(out, "embeddings"), "mL", x[:20], rows_per_part=10, stored_as_lists=True)
    write_partitions(storage.join(out, "embeddings"), "mL", x[20:], rows_per_part=10, start=20)
    _, vectors = embed_store.read_embeddings(out, "mL")
    np.testing.assert_array_equal(vectors, x)


@pytest.mark.parametrize("column, message", [
    ("float64", "expected fixed_size_binary(4·D) or fixed_size_list<float32>[D]"),
    ("odd bytes", "expected fixed_size_binary(4·D) or fixed_size_list<float32>[D]"),
    ("missing", "1 missing vector(s)")])
def test_embedding_columns_of_another_type_or_with_gaps_are_refused(column, message):
    import pyarrow as pa

    arrays = {"float64": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8)), 4),
              "odd bytes": pa.array([b"abc", b"def"], pa.binary(3)),
              "missing": pa.array([b"\0" * 8, None], pa.binary(8))}
    with pytest.raises(ValueError, match=re.escape(message)):
        embed_store.vectors_of(arrays[column])


def test_vectors_of_a_sliced_binary_column_start_at_the_slice():
    """A binary column sliced in memory (Arrow offset, as after ``take``/``slice``) yields its own rows only."""
    import pyarrow as pa

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), 6, [None, pa.py_buffer(x)])
    np.testing.assert_array_equal(embed_store.vectors_of(column.slice(2, 3)), x[2:5])
    np.testing.assert_array_equal(embed_store.vectors_of(pa.chunked_array([column[:2], column[2:]])), x)
