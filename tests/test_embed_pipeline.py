"""The nightly embedding job end to end on loopback S3 and a local Ray: errors, exactly once, resume, reference."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BROKEN, IMAGE_SIZE, good_keys, make_model, photo_bytes, survey_files, write_files

from whale_dist import embed, images, storage
from whale_dist.config import load_config
from whale_dist.embed import pipeline as embed_pipeline
from whale_dist.embed import sources as embed_sources
from whale_dist.embed import store as embed_store

pytestmark = pytest.mark.slow


def config(bucket: str, **embed_overrides):
    overrides = [f"root={bucket}/store", f"embed.images={bucket}/night-1", "embed.rows_per_partition=4",
                 "embed.decode_batch_size=4", "embed.batch_size=4", "embed.actor_num_cpus=0.5"]
    return load_config(None, overrides + [f"embed.{k}={v}" for k, v in embed_overrides.items()])


def snapshot(cfg, version: str) -> dict[str, str]:
    """Every partition file of ``version`` -> its ETag: rewriting a finished partition changes it."""
    fs = storage.filesystem(cfg.root)
    folders = (embed_store.embeddings_dir(cfg.embed_out, version), embed_store.errors_dir(cfg.embed_out, version))
    return {url: fs.info(storage.strip_scheme(url))["ETag"] for folder in folders
            for url in storage.list_files(folder) if "/_runs/" not in url}


def reference_embeddings(model_url: str, keys: list[str], urls: list[str]) -> np.ndarray:
    """A single-process forward of the same model on the same photos (no Ray, no pipeline)."""
    embedder = embed.Embedder(model_url)
    photos = np.stack([images.load_photo(embed_sources.read_image_bytes(u), IMAGE_SIZE) for u in urls])
    return embedder.embed_images(photos)


def test_nightly_job_is_exactly_once_and_matches_a_single_process_forward(ray_cluster, s3_bucket):
    cfg = config(s3_bucket)
    card = make_model(cfg.model_url)
    write_files(cfg.embed.images, survey_files())
    first = embed.run_embed(cfg)
    n_inputs = len(good_keys()) + len(BROKEN)
    assert (first["seen"], first["embedded"], first["errors"], first["skipped"]) == (n_inputs, len(good_keys()),
                                                                                     len(BROKEN), 0)
    frame, vectors = embed.read_embeddings(cfg.embed_out, card.version)
    assert set(frame["image_key"]) == good_keys() and vectors.shape == (len(frame), 16)
    assert set(frame["model_version"]) == {card.version} and frame["sha256"].str.len().eq(64).all()
    np.testing.assert_allclose(vectors, reference_embeddings(cfg.model_url, list(frame["image_key"]),
                                                             list(frame["url"])), atol=1e-5)
    errors = embed.read_errors(cfg.embed_out, card.version)
    assert dict(zip(errors["image_key"], errors["stage"])) == BROKEN
    assert storage.exists(storage.join(embed_store.embeddings_dir(cfg.embed_out, card.version), "part-00000.parquet"))

    before = snapshot(cfg, card.version)
    again = embed.run_embed(cfg)
    assert (again["embedded"], again["errors"], again["skipped"]) == (0, 0, n_inputs)
    assert snapshot(cfg, card.version) == before  # nothing added, no finished partition rewritten

    write_files(cfg.embed.images, {f"night-2/new_{i}.jpg": photo_bytes(100 + i) for i in range(3)})
    third = embed.run_embed(cfg)
    assert (third["embedded"], third["errors"], third["skipped"]) == (3, 0, n_inputs)
    after = snapshot(cfg, card.version)
    assert {k: v for k, v in after.items() if k in before} == before
    frame, _ = embed.read_embeddings(cfg.embed_out, card.version)
    assert len(frame) == len(good_keys()) + 3 and frame["image_key"].is_unique


def test_a_killed_run_resumes_where_it_stopped(ray_cluster, s3_bucket):
    cfg = config(s3_bucket)
    card = make_model(cfg.model_url)
    write_files(cfg.embed.images, {f"p/{i:02d}.jpg": photo_bytes(i) for i in range(10)})
    out, version = cfg.embed_out, card.version
    # What a run killed halfway leaves: chunk 0 published, chunk 1 written but never marked, a partial chunk 7.
    embed_store.publish_chunk(out, version, 0, *fake_chunk([f"p/{i:02d}.jpg" for i in range(4)], version))
    unmarked = storage.join(embed_store.embeddings_dir(out, version), "part-00001.parquet")
    embed_store.write_parquet(unmarked, fake_chunk(["p/04.jpg", "p/05.jpg"], version)[0])
    storage.write_bytes(storage.join(embed_store.errors_dir(out, version), "part-00007.parquet"), b"partial")
    kept = snapshot(cfg, version)
    kept = {k: v for k, v in kept.items() if "part-00000" in k}
    resumed = embed.run_embed(cfg)
    assert (resumed["embedded"], resumed["skipped"], resumed["partitions"]) == (6, 4, 2)
    after = snapshot(cfg, version)
    assert {k: v for k, v in after.items() if k in kept} == kept  # the finished chunk was not rewritten
    assert not [k for k in after if "part-00007" in k] and embed_store.published(out, version) == [0, 1, 2]
    frame, vectors = embed.read_embeddings(out, version)
    assert sorted(frame["image_key"]) == [f"p/{i:02d}.jpg" for i in range(10)] and len(vectors) == 10


def fake_chunk(keys: list[str], version: str):
    """A chunk's (embeddings, errors) tables as the pipeline would publish them, without running it."""
    n = len(keys)
    rows = {"image_key": np.array(keys, dtype=object), "url": np.array(keys, dtype=object),
            "sha256": np.array(["0" * 64] * n, dtype=object), "ok": np.ones(n, dtype=bool),
            "stage": np.array([""] * n, dtype=object), "message": np.array([""] * n, dtype=object),
            "embedding": np.eye(n, 16, dtype=np.float32)}
    rows.update({c: np.array([""] * n, dtype=object) for c in embed_store.EMBEDDING_META})
    return embed_pipeline.chunk_tables(rows, version)


def test_manifest_input_carries_metadata_and_reports_missing_files(ray_cluster, s3_bucket, tmp_path):
    cfg = config(s3_bucket, manifest=f"{s3_bucket}/m/manifest.csv", images="")
    card = make_model(cfg.model_url)
    write_files(f"{s3_bucket}/m", {"a.jpg": photo_bytes(1), "b.png": photo_bytes(2, "PNG")})
    storage.write_text(cfg.embed.manifest, "image,species,individual_id,encounter_id,date,location,bbox\n"
                       "a.jpg,kiler_whale,ind-1,e1,2026-11-26,fjord,4 4 40 30\n"
                       "b.png,beluga,,e1,2026-11-26,fjord,\ngone.jpg,beluga,,,,,\n")
    summary = embed.run_embed(cfg)
    assert (summary["embedded"], summary["errors"]) == (2, 1)
    frame, _ = embed.read_embeddings(cfg.embed_out, card.version)
    row = frame.set_index("image_key").loc["a.jpg"]
    assert (row["species"], row["individual_id"], row["bbox"], row["location"]) == ("killer_whale", "ind-1",
                                                                                     "4 4 40 30", "fjord")
    errors = embed.read_errors(cfg.embed_out, card.version)
    assert list(zip(errors["image_key"], errors["stage"])) == [("gone.jpg", "read")]
    runs = [u for u in storage.list_files(embed_store.embeddings_dir(cfg.embed_out, card.version)) if "/_runs/" in u]
    assert any(u.endswith("config.yaml") for u in runs) and any(u.endswith("summary.json") for u in runs)
