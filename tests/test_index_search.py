"""Catalogue search without Ray: filters restrict candidates before ranking; photos aggregate to individuals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from whale_dist.index import Catalogue, IndexInputError, aggregate_individuals, filter_mask
from whale_dist.index import faiss_ops as index_train

D = 16


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Tiny indexes on a shared machine: OpenMP spinning across threads costs more than it saves."""
    import faiss

    before = faiss.omp_get_max_threads()
    yield index_train.set_threads(1)
    index_train.set_threads(before)


def metadata_frame(n: int, **columns) -> pd.DataFrame:
    base = {"id": np.arange(n), "image_key": [f"p{i}.jpg" for i in range(n)], "url": [f"s3://b/p{i}.jpg" for i in
            range(n)], "individual_id": [f"ind{i // 4}" for i in range(n)], "species": ["beluga"] * n,
            "encounter_id": [""] * n, "date": ["2020-01-01"] * n, "location": ["north"] * n, "shard": [0] * n}
    base.update(columns)
    return pd.DataFrame(base)


def in_memory_catalogue(vectors: np.ndarray, metadata: pd.DataFrame, key: str = "Flat", shards: int = 2):
    """A Catalogue built in memory (the published layout is tested in test_index_build)."""
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    template = index_train.train(key, D, x) if "IVF" in key else index_train.make_index(key, D)
    search = index_train.default_search(key)
    parts = []
    for number, ids in enumerate(np.array_split(np.arange(len(x)), shards)):
        shard = index_train.deserialize(index_train.serialize(template))
        if number == 0 and "IVF" in key:  # as the build does: tuned on its first shard
            shard, search = index_train.fill_and_tune(shard, [x[ids]], [ids.astype(np.int64)], 0.999)
        else:
            shard = index_train.fill(shard, [x[ids]], [ids.astype(np.int64)])
        parts.append(shard)
    manifest = {"model_version": "mtest", "dim": D, "index_key": key, "version": "v", "search": search}
    return Catalogue("memory://", manifest, metadata, parts)


def test_aggregation_to_individuals_on_a_hand_built_example():
    meta = metadata_frame(6, individual_id=["A", "A", "B", "", "C", "B"])
    ids = np.array([[1, 0, 3, 2, 5, 4, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, -np.inf]], dtype=np.float32)
    ranked = aggregate_individuals(ids, scores, meta, k=5)[0]
    assert [(m.individual_id, m.image_key, round(m.score, 3)) for m in ranked] == [
        ("A", "p1.jpg", 0.9), ("B", "p2.jpg", 0.6), ("C", "p4.jpg", 0.4)]
    assert ranked[0].url == "s3://b/p1.jpg" and ranked[0].species == "beluga"
    shuffled = aggregate_individuals(ids[:, ::-1], scores[:, ::-1], meta, k=2)[0]
    assert [m.individual_id for m in shuffled] == ["A", "B"]


def test_filter_mask_species_locations_dates_and_exclusions():
    meta = metadata_frame(6, species=["beluga", "orca", "beluga", "beluga", "orca", "beluga"],
                          location=["n", "n", "s", "n", "s", "n"],
                          date=["2020-01-01", "2021-05-05", "", "2022-12-31T10:00:00", "2021-01-01", "2019-01-01"])
    assert filter_mask(meta, {"species": ["orca"]}).tolist() == [0, 1, 0, 0, 1, 0]
    assert filter_mask(meta, {"species": ["beluga"], "locations": ["n"]}).tolist() == [1, 0, 0, 1, 0, 1]
    assert filter_mask(meta, {"date_from": "2020-01-01", "date_to": "2022-12-31"}).tolist() == [1, 1, 0, 1, 1, 0]
    assert filter_mask(meta, {"exclude_image_keys": {"p0.jpg", "p5.jpg"}}).tolist() == [0, 1, 1, 1, 1, 0]
    with pytest.raises(IndexInputError, match="unknown filter"):
        filter_mask(meta, {"specie": ["orca"]})


@pytest.mark.parametrize("key", ["Flat", "HNSW32", "IVF16,Flat", "OPQ4_16,IVF16,PQ4x4"])
def test_filters_restrict_candidates_before_ranking(key):
    rng = np.random.default_rng(1)
    n = 1200
    vectors = rng.standard_normal((n, D)).astype(np.float32)
    species = np.where(np.arange(n) % 10 == 0, "orca", "beluga")  # 120 orcas, scattered
    catalogue = in_memory_catalogue(vectors, metadata_frame(n, species=species), key)
    found = catalogue.search(vectors[1:4], k=10, filters={"species": ["orca"]})
    assert (found.ids >= 0).all(), "a post-filtered top-k would come back short"
    assert set(catalogue.metadata["species"].to_numpy()[found.ids.ravel()]) == {"orca"}
    if key == "Flat":  # exact: the same as brute force over the allowed subset
        x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        orcas = np.flatnonzero(species == "orca")
        expected = orcas[np.argsort(-(x[1:4] @ x[orcas].T), axis=1)[:, :10]]
        np.testing.assert_array_equal(found.ids, expected)


def test_exclude_image_keys_removes_the_query_photo_itself():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((40, D)).astype(np.float32)
    catalogue = in_memory_catalogue(vectors, metadata_frame(40))
    assert catalogue.search(vectors[7], k=1).ids[0, 0] == 7
    found = catalogue.search(vectors[7], k=3, filters={"exclude_image_keys": {"p7.jpg"}})
    assert 7 not in found.ids and (found.ids >= 0).all()
    frame = found.frame()
    assert list(frame["rank"]) == [0, 1, 2] and "p7.jpg" not in set(frame["image_key"])


def test_individuals_search_deeper_until_k_individuals_are_found():
    rng = np.random.default_rng(3)
    centre = rng.standard_normal(D).astype(np.float32)
    crowd = centre + 0.01 * rng.standard_normal((60, D)).astype(np.float32)  # 60 photos of one individual
    others = rng.standard_normal((20, D)).astype(np.float32)
    meta = metadata_frame(80, individual_id=["A"] * 60 + [f"other{i}" for i in range(20)])
    catalogue = in_memory_catalogue(np.concatenate([crowd, others]), meta)
    ranked = catalogue.individuals(centre, k=3, photos_per_query=5)[0]
    assert [m.individual_id for m in ranked][0] == "A" and len({m.individual_id for m in ranked}) == 3
    best_other = max(range(20), key=lambda i: float(others[i] @ centre / np.linalg.norm(others[i])))
    assert ranked[1].individual_id == f"other{best_other}"


def test_empty_filter_result_and_bad_queries():
    rng = np.random.default_rng(4)
    catalogue = in_memory_catalogue(rng.standard_normal((20, D)).astype(np.float32), metadata_frame(20))
    found = catalogue.search(np.ones((2, D)), k=3, filters={"species": ["narwhal"]})
    assert (found.ids == -1).all() and catalogue.individuals(np.ones(D), filters={"species": ["narwhal"]}) == [[]]
    with pytest.raises(IndexInputError, match="dimension 8"):
        catalogue.search(np.ones((1, 8)), k=3)
    with pytest.raises(IndexInputError, match="NaN"):
        catalogue.search(np.full((1, D), np.nan), k=3)


@pytest.mark.parametrize(("key", "searched"), [("Flat", 1), ("IVF8,Flat", 1), ("HNSW8", 3)])
def test_shards_of_one_trained_index_merge_at_load_and_answer_the_same(key, searched):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, D)).astype(np.float32)
    meta = metadata_frame(300)
    one = in_memory_catalogue(x, meta, key, shards=1)
    three = in_memory_catalogue(x, meta, key, shards=3)
    assert len(three.shards) == searched and three.ntotal == 300
    queries = rng.standard_normal((20, D)).astype(np.float32)
    np.testing.assert_array_equal(three.search(queries, 7).ids, one.search(queries, 7).ids)
    orca = {"species": ["beluga"], "exclude_image_keys": {"p0.jpg"}}
    np.testing.assert_array_equal(three.search(queries, 7, orca).ids, one.search(queries, 7, orca).ids)


def test_a_search_without_filters_scans_no_metadata(monkeypatch):
    from whale_dist.index import inputs

    catalogue = in_memory_catalogue(np.eye(D, dtype=np.float32)[:10], metadata_frame(10))
    monkeypatch.setattr(inputs, "filter_mask", lambda *a: pytest.fail("filter_mask called without filters"))
    assert catalogue.search(np.eye(D, dtype=np.float32)[:1], 1, {"species": [], "date_from": ""}).ids[0, 0] == 0
    with pytest.raises(IndexInputError, match="unknown filter"):
        catalogue.search(np.eye(D, dtype=np.float32)[:1], 1, {"colour": None})


class FakeGpuIndex:
    """Stands in for a faiss GPU clone: answers like its CPU original and counts its searches."""

    def __init__(self, host):
        self.host, self.searches = host, 0

    def search(self, queries, k, params=None):
        assert params is None, "GPU indexes take no IDSelector: filtered searches must stay on the CPU"
        self.searches += 1
        return self.host.search(queries, k)


def test_use_gpu_sends_unfiltered_searches_to_the_device_and_filtered_ones_to_the_cpu(monkeypatch):
    import faiss

    rng = np.random.default_rng(5)
    x, queries = rng.standard_normal((200, D)).astype(np.float32), rng.standard_normal((9, D)).astype(np.float32)
    cpu = in_memory_catalogue(x, metadata_frame(200), "IVF8,Flat", shards=2)
    clones = []
    monkeypatch.setattr(index_train, "to_device", lambda index, use_gpu: clones.append(FakeGpuIndex(index))
                        or clones[-1])
    monkeypatch.setattr(faiss, "GpuParameterSpace", lambda: type("P", (), {"set_index_parameter":
                                                                            lambda *a: None})(), raising=False)
    gpu = Catalogue("memory://", cpu.manifest, cpu.metadata, cpu.shards, use_gpu=True)
    np.testing.assert_array_equal(gpu.search(queries, 5).ids, cpu.search(queries, 5).ids)
    assert len(clones) == 1 and clones[0].searches == 1  # one merged shard, cloned once, searched on the "GPU"
    only = {"exclude_image_keys": {"p1.jpg"}}
    np.testing.assert_array_equal(gpu.search(queries, 5, only).ids, cpu.search(queries, 5, only).ids)
    assert clones[0].searches == 1


def test_use_gpu_without_a_gpu_searches_on_the_cpu():
    rng = np.random.default_rng(6)
    x, queries = rng.standard_normal((100, D)).astype(np.float32), rng.standard_normal((4, D)).astype(np.float32)
    cpu = in_memory_catalogue(x, metadata_frame(100), "IVF4,Flat", shards=1)
    gpu = Catalogue("memory://", cpu.manifest, cpu.metadata, cpu.shards, use_gpu=True)
    if index_train.gpu_count() == 0:
        assert gpu.device_shards[0] is gpu.shards[0]
    np.testing.assert_array_equal(gpu.search(queries, 5).ids, cpu.search(queries, 5).ids)
