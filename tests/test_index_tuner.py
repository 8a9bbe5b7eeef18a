"""The nprobe / efSearch tuner: recall measured end to end on a filled shard (leave-one-out), and an honest answer when
the target is out of reach (coarse PQ codes on data whose neighbours are far apart)."""

from __future__ import annotations

import numpy as np
import pytest

from whale_dist.index import faiss_ops
from whale_dist.index.choice import matched_k, needs_training, recall_at_k, tune_setting


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Small indexes on a shared machine: OpenMP spinning across threads costs more than it saves."""
    import faiss

    before = faiss.omp_get_max_threads()
    yield faiss_ops.set_threads(1)
    faiss_ops.set_threads(before)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clusters(n: int, d: int, noise: float, seed: int = 0) -> np.ndarray:
    """Unit vectors around n // 20 centres: small ``noise`` keeps neighbours in one cluster (easy), large spreads
    them over the sphere (hard)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 20, d))
    return unit(centres[rng.integers(0, len(centres), n)] + noise * rng.standard_normal((n, d)))


@pytest.mark.parametrize(
    ("curve", "hi", "target", "expected"),
    [
        (lambda v: min(1.0, v / 10), 16, 0.5, (5, 0.5, True)),  # doubling to 8, bisection back to 5
        (lambda v: min(1.0, v / 10), 16, 0.99, (10, 1.0, True)),
        (lambda v: 1.0, 4096, 0.99, (1, 1.0, True)),
        (lambda v: min(0.8, v / 10), 64, 0.99, (8, 0.8, False)),  # plateau: the smallest setting near the best
        (lambda v: 0.5 - v / 1e4, 64, 0.99, (1, 0.4999, False)),  # more probes only lose: stays at 1
    ],
)
def test_tune_setting_on_hand_made_recall_curves(curve, hi, target, expected):
    value, recall, reached = tune_setting(curve, 1, hi, target)
    assert (value, round(recall, 4), reached) == expected


def test_tune_setting_measures_about_twice_log2_of_the_range():
    calls = []
    tune_setting(lambda v: calls.append(v) or float(v >= 1000), 1, 4096, 0.99)
    assert len(calls) == len(set(calls)) <= 2 * 12 + 1


def test_recall_at_k_and_the_density_matched_k():
    truth = np.array([[1, 2], [3, 4]])
    assert recall_at_k(np.array([[2, 9], [4, 3]]), truth) == 0.75
    assert [matched_k(5, 100, 100), matched_k(5, 100, 1000), matched_k(5, 260_000, 1_000_000)] == [5, 1, 2]


def filled(key: str, x: np.ndarray, target: float = 0.99, fixed: int = 0):
    """(index trained on ``x`` and filled with it, as a one-shard build does, its tuned search parameters)."""
    index = faiss_ops.train(key, x.shape[1], x) if needs_training(key) else faiss_ops.make_index(key, x.shape[1])
    index, search = faiss_ops.fill_and_tune(index, [x], [np.arange(len(x), dtype=np.int64)], target, fixed=fixed)
    assert index.ntotal == len(x)  # the held-out vectors are added too
    return index, search


def test_easy_data_reaches_the_target_with_few_probes():
    _, search = filled("IVF64,Flat", clusters(4000, 32, noise=0.05), 0.95)
    assert search["target_reached"] and search["recall"] >= 0.95
    assert 1 <= search["nprobe"] <= 4


def test_recall_is_measured_for_held_out_vectors_before_they_are_added():
    x = clusters(800, 32, noise=3.0)
    held = faiss_ops.held_out_rows(len(x))
    base = np.setdiff1d(np.arange(len(x)), held)
    index = faiss_ops.train("IVF16,Flat", 32, x)
    _, split = faiss_ops.fill_and_tune(index, [x[:300], x[300:301], x[301:]],
                                       [np.arange(300), np.arange(300, 301), np.arange(301, len(x))], 0.99,
                                       fixed=1)
    _, whole = filled("IVF16,Flat", x, fixed=1)
    reference = faiss_ops.train("IVF16,Flat", 32, x)
    reference.add_with_ids(x[base], base)
    faiss_ops.set_search_parameters(reference, {"nprobe": 1})
    k = matched_k(5, len(base), len(x))  # 4: the base is 4/5 of the shard
    truth = base[np.argsort(-(x[held] @ x[base].T), axis=1)[:, :k]]
    expected = recall_at_k(reference.search(x[held], k)[1], truth)
    assert split == whole == {"nprobe": 1, "recall": round(expected, 4), "target_reached": False}
    assert expected < 0.9  # hard data: a query counted as its own neighbour would have scored more


def test_coarse_pq_on_hard_data_says_the_target_is_out_of_reach():
    x = clusters(4000, 32, noise=3.0)  # neighbours nearly as far as strangers
    _, search = filled("IVF16,PQ4x4", x)
    assert set(search) == {"nprobe", "recall", "target_reached"}
    assert not search["target_reached"] and 0 < search["recall"] < 0.9
    _, exhaustive = filled("IVF16,PQ4x4", x, fixed=16)
    assert search["recall"] >= exhaustive["recall"] - 0.005  # the best it can do, at no more probes than needed
    assert search["nprobe"] <= 16


def test_a_configured_nprobe_is_measured_not_tuned():
    _, search = filled("IVF64,Flat", clusters(4000, 32, noise=3.0), fixed=1)
    assert search["nprobe"] == 1 and not search["target_reached"] and search["recall"] < 0.99


def test_hnsw_ef_search_rises_when_the_target_needs_it():
    x = clusters(3000, 32, noise=3.0)  # HNSW4 (few links) on hard data
    _, low = filled("HNSW4", x, 0.8)
    _, high = filled("HNSW4", x, 0.97)
    assert low["target_reached"] and high["target_reached"] and high["recall"] >= 0.97
    assert faiss_ops.HNSW_EF_MIN <= low["efSearch"] < high["efSearch"] <= faiss_ops.HNSW_EF_MAX


def test_too_small_a_shard_is_not_measured():
    index, search = filled("IVF2,Flat", unit(np.random.default_rng(0).standard_normal((4, 8))))  # no fifth to hold out
    assert search == {"nprobe": 2, "recall": None, "target_reached": False}


@pytest.mark.parametrize(
    ("key", "share"),
    [
        ("IVF4096,Flat", 4096 / 5096),  # ~0.80: the tuner's exact search adds TUNE_QUERIES / nlist to the fill
        ("OPQ16_64,IVF1024,PQ16", 1024 / 2024),
        ("IVF256,Flat", 0.5),  # never under half a share: recall is measured on a shard like the others
        ("HNSW32", 1.0),
        ("Flat", 1.0),
    ],
)
def test_the_shard_that_tunes_is_smaller_by_the_tuners_work(key, share):
    assert faiss_ops.TUNE_QUERIES == 1000
    assert faiss_ops.tuning_shard_share(key) == pytest.approx(share)


@pytest.mark.parametrize(("n", "num_shards"), [(10, 3), (1_000_000, 8), (7, 8), (999, 8), (1, 1), (600, 3)])
def test_equal_shares_keep_the_contiguous_equal_shards(n, num_shards):
    import pyarrow as pa

    from whale_dist.index.build import _sharded

    shard = _sharded(pa.table({"id": np.arange(n)}), num_shards)["shard"].to_numpy()
    np.testing.assert_array_equal(shard, np.arange(n) * min(num_shards, n) // n)


@pytest.mark.parametrize(("n", "num_shards", "share"), [(1_000_000, 8, 4096 / 5096), (600, 3, 0.5), (10, 2, 0.5)])
def test_the_tuning_shard_holds_its_share_and_the_rest_split_evenly(n, num_shards, share):
    import pyarrow as pa

    from whale_dist.index.build import _sharded

    shard = _sharded(pa.table({"id": np.arange(n)}), num_shards, share)["shard"].to_numpy()
    sizes = np.bincount(shard)
    assert len(sizes) == num_shards and sizes.sum() == n and (np.diff(shard) >= 0).all()  # contiguous id ranges
    assert sizes[1:].max() - sizes[1:].min() <= 1
    assert abs(sizes[0] - share * sizes[1:].mean()) <= 2
