"""Re-indexing on Ray: sharded build vs a monolithic reference, IVF recall, refusals, integrity, atomic publish."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import D, clustered, write_partitions
from helpers import index_config as config

from whale_dist import cli, storage
from whale_dist.index import Catalogue, IndexInputError, IndexIntegrityError, build_index, list_versions
from whale_dist.index import publish as index_publish

pytestmark = pytest.mark.slow  # every test here builds an index on Ray


def exact_top(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]


def test_sharded_flat_build_on_s3_equals_a_monolithic_flat_index(ray_cluster, s3_bucket):
    import faiss

    x = clustered(600)  # the first two partitions as stores wrote them before the binary vector column
    write_partitions(s3_bucket + "/embeddings", "mA", x[:260], rows_per_part=130, stored_as_lists=True)
    write_partitions(s3_bucket + "/embeddings", "mA", x[260:], rows_per_part=130, start=260)
    url = build_index(config(s3_bucket, "index.num_shards=3"))
    catalogue = Catalogue.load(storage.join(s3_bucket, "indexes", "test"))
    assert catalogue.url == url and catalogue.index_key == "Flat" and len(catalogue.manifest["shards"]) == 3
    assert catalogue.model_version == "mA" and catalogue.dim == D and catalogue.ntotal == 600
    reference = faiss.IndexFlatIP(D)
    reference.add(x)
    queries = clustered(20, seed=1)
    ref_scores, ref_ids = reference.search(queries, 10)
    found = catalogue.search(queries, 10)
    np.testing.assert_array_equal(found.ids, ref_ids)
    np.testing.assert_allclose(found.scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert list(catalogue.metadata["image_key"][:2]) == ["img000000.jpg", "img000001.jpg"]
    assert catalogue.metadata["url"][0] == "s3://photos/img000000.jpg"
    assert storage.exists(storage.join(url, "config.yaml"))


def test_ivf_recall_at_5_against_exact_search(ray_cluster, tmp_path):
    x = clustered(8000, clusters=200, noise=0.25)
    write_partitions(str(tmp_path / "embeddings"), "mB", x, rows_per_part=2000)
    build_index(config(str(tmp_path), "index.num_shards=2", "index.index_key=IVF256,Flat", "index.target_recall=0.97"))
    catalogue = Catalogue.load(str(tmp_path / "indexes" / "test"))
    queries = clustered(300, clusters=200, noise=0.25, seed=0)[:300] + 0.05 * clustered(300, seed=5)
    found = catalogue.search(queries, 5).ids
    truth = exact_top(x, queries / np.linalg.norm(queries, axis=1, keepdims=True), 5)
    recall = np.mean([len(set(f) & set(t)) / 5 for f, t in zip(found, truth)])
    assert catalogue.manifest["search"]["nprobe"] < 256, "tuned nprobe should not degenerate to exhaustive search"
    assert recall >= 0.95, f"recall@5 {recall:.3f} at nprobe {catalogue.manifest['search']['nprobe']}"


def test_a_partition_emptied_by_filters_leaves_every_other_vector_in_its_place(ray_cluster, tmp_path):
    """Blocks are per partition and the training sample is addressed by position: a partition with no kept row
    must not shift the others (IVF: the sample feeds k-means; ids must still find their own vectors)."""
    root = str(tmp_path / "embeddings")
    write_partitions(root, "mF", clustered(600, seed=1), rows_per_part=300, species="narwhal")
    x = clustered(1500, clusters=50, noise=0.2, seed=2)
    write_partitions(root, "mF", x, rows_per_part=300, start=600, species="orca")
    build_index(config(str(tmp_path), "index.species=[orca]", "index.index_key=IVF16,Flat", "index.nprobe=16",
                       "index.shard_max_vectors=500"))
    catalogue = Catalogue.load(str(tmp_path / "indexes" / "test"))
    assert catalogue.ntotal == 1500 and len(catalogue.manifest["shards"]) == 3  # 1500 / 500 per shard
    found = catalogue.search(x[::7], 1)
    np.testing.assert_array_equal(found.ids[:, 0], np.arange(0, 1500, 7))  # exhaustive probe: each finds itself
    assert list(catalogue.metadata["image_key"][:1]) == ["img000600.jpg"]


def test_build_filters_by_species_at_input(ray_cluster, tmp_path):
    write_partitions(str(tmp_path / "embeddings"), "mC", clustered(90), rows_per_part=40)
    build_index(config(str(tmp_path), "index.species=[orca]"))
    catalogue = Catalogue.load(str(tmp_path / "indexes" / "test"))
    assert catalogue.ntotal == 30 and set(catalogue.metadata["species"]) == {"orca"}
    assert catalogue.metadata["image_key"][1] == "img000003.jpg" and list(catalogue.metadata["id"]) == list(range(30))


def test_mixed_model_versions_are_refused(ray_cluster, tmp_path, capsys):
    emb = str(tmp_path / "embeddings")
    write_partitions(emb, "mOld", clustered(20))
    write_partitions(emb, "mNew", clustered(20))
    with pytest.raises(IndexInputError, match="several model versions .*mNew, mOld"):
        build_index(config(str(tmp_path)))
    assert cli.main(["index", f"root={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    write_partitions(emb, "mMix", clustered(20), versions_in_rows=["mOther"])
    with pytest.raises(IndexInputError, match="mixes model versions"):
        build_index(config(str(tmp_path), "index.model_version=mMix"))


def test_nan_embeddings_are_refused_in_one_line(ray_cluster, tmp_path):
    x = clustered(30)
    x[7, 3] = np.nan
    write_partitions(str(tmp_path / "embeddings"), "mN", x)
    with pytest.raises(IndexInputError, match="1 embeddings contain NaN or inf"):
        build_index(config(str(tmp_path)))


def test_corrupted_shard_is_detected_at_load(ray_cluster, tmp_path):
    write_partitions(str(tmp_path / "embeddings"), "mD", clustered(50))
    url = build_index(config(str(tmp_path), "index.num_shards=2"))
    shard = os.path.join(url, "shard-001.faiss")
    data = bytearray(open(shard, "rb").read())
    data[-5] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(IndexIntegrityError, match="shard-001.faiss is corrupted"):
        Catalogue.load(url)


def test_build_killed_during_publish_leaves_latest_on_the_previous_version(ray_cluster, tmp_path, monkeypatch):
    write_partitions(str(tmp_path / "embeddings"), "mE", clustered(40))
    cfg = config(str(tmp_path))
    first = build_index(cfg)
    real_write_json = storage.write_json

    def killed_at_manifest(url, payload):
        if url.endswith(index_publish.MANIFEST):
            raise KeyboardInterrupt("killed while publishing")
        real_write_json(url, payload)

    monkeypatch.setattr(storage, "write_json", killed_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        build_index(cfg)
    monkeypatch.undo()
    root = str(tmp_path / "indexes" / "test")
    half = [d for d in os.listdir(root) if d not in ("LATEST", first.rsplit("/", 1)[1])]
    assert len(half) == 1 and os.path.exists(os.path.join(root, half[0], "shard-000.faiss"))
    assert Catalogue.load(root).url == first and list_versions(root) == [first.rsplit("/", 1)[1]]
    with pytest.raises(IndexIntegrityError, match="no manifest.json"):
        Catalogue.load(os.path.join(root, half[0]))
    second = build_index(cfg)
    assert Catalogue.load(root).url == second and len(list_versions(root)) == 2 and second > first


def test_merged_shards_answer_like_separate_shards(ray_cluster, tmp_path):
    write_partitions(str(tmp_path / "embeddings"), "mF", clustered(120), rows_per_part=50)
    sharded = Catalogue.load(build_index(config(str(tmp_path), "index.num_shards=3")))
    merged = Catalogue.load(build_index(config(str(tmp_path), "index.num_shards=3", "index.merge_shards=true")))
    assert len(sharded.manifest["shards"]) == 3 and len(merged.manifest["shards"]) == 1
    assert not os.path.exists(os.path.join(merged.url, "shard-000.faiss")) and set(merged.metadata["shard"]) == {0}
    queries = clustered(10, seed=9)
    np.testing.assert_array_equal(merged.search(queries, 7).ids, sharded.search(queries, 7).ids)


def test_job_wrapper_builds_and_reports_in_one_line(ray_cluster, tmp_path, capsys):
    import importlib.util

    write_partitions(str(tmp_path / "embeddings"), "mG", clustered(30))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("index_job", os.path.join(repo, "jobs", "index.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main([f"root={tmp_path}", "--catalogue-name", "cli"]) == 0
    assert "published" in capsys.readouterr().out
    assert storage.exists(str(tmp_path / "indexes" / "cli" / "LATEST"))


def test_faiss_threads_follow_the_ray_cpu_share(ray_cluster):
    import ray

    @ray.remote(num_cpus=2)
    def threads() -> int:
        from whale_dist.index import faiss_ops as index_train

        return index_train.set_threads()

    assert ray.get(threads.remote()) == 2


def test_quantizer_training_takes_a_whole_node(ray_cluster):
    from whale_dist.index.build import _node_cpus

    assert _node_cpus() == 4  # the session cluster's one node: k-means gets 4 faiss threads, not cpus_per_task=1


def test_unit_vectors_pass_through_and_others_are_normalised():
    """``normalised``: unit-length rows (what the embedder writes) come back unchanged, without a copy; any other
    row set is divided by its norms; zero rows are refused."""
    from whale_dist.index.inputs import normalised

    unit = clustered(200, seed=3)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    assert np.shares_memory(normalised(unit, "u"), unit)
    scaled = unit * np.linspace(0.5, 3, len(unit), dtype=np.float32)[:, None]
    again = normalised(scaled, "s")
    assert not np.shares_memory(again, scaled) and np.allclose(again, unit, atol=1e-6)
    with pytest.raises(IndexInputError, match="zero embeddings"):
        normalised(np.vstack([unit, np.zeros((1, unit.shape[1]), np.float32)]), "z")


@pytest.mark.parametrize("threads", [1, 3])
def test_training_sample_gathered_in_place_equals_fancy_indexing(threads):
    """``_gathered`` (rows taken straight into one array, blocks on several threads) gives exactly what per-block
    fancy indexing and ``np.concatenate`` gave, blocks with no sampled rows and a whole block included; a position
    outside its block is refused rather than clipped."""
    from whale_dist.index.build import _gathered

    rng = np.random.default_rng(7)
    blocks = [rng.standard_normal((n, 8), dtype=np.float32) for n in (50, 1, 0, 70, 33)]
    positions = [np.sort(rng.choice(50, 17, replace=False)), np.array([0]), np.array([], dtype=np.int64),
                 np.array([], dtype=np.int64), np.arange(33)]
    expected = np.concatenate([block[rows] for block, rows in zip(blocks, positions)])
    got = _gathered(blocks, positions, 8, threads=threads)
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, expected)
    with pytest.raises(ValueError, match="outside block 1"):
        _gathered(blocks[:2], [positions[0], np.array([1])], 8, threads=threads)


def test_every_shard_is_synced_to_disk_before_the_manifest_names_it(ray_cluster, tmp_path, monkeypatch):
    """Fills write their shards without waiting for the disk (``durable=False``); the driver syncs each one that the
    manifest lists before publishing it, so a crash can never leave LATEST pointing at shards still in the cache."""
    x = clustered(3000, clusters=40)
    write_partitions(str(tmp_path / "embeddings"), "mS", x, rows_per_part=1000)
    synced, published = [], []
    real_sync, real_publish = storage.sync, index_publish.publish
    monkeypatch.setattr(storage, "sync", lambda urls: (synced.extend(urls), real_sync(urls)))
    monkeypatch.setattr(index_publish, "publish", lambda *a: (published.append(list(synced)), real_publish(*a))[1])
    build_index(config(str(tmp_path), "index.num_shards=3", "index.index_key=IVF16,Flat"))
    catalogue = Catalogue.load(str(tmp_path / "indexes" / "test"))
    files = sorted(s["file"] for s in catalogue.manifest["shards"])
    assert len(files) == 3 and published == [synced]
    assert sorted(url.rsplit("/", 1)[-1] for url in synced) == files
