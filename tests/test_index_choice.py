"""Index choice heuristics: exact expected faiss keys for (N, d, memory budget), as autofaiss tests them."""

from __future__ import annotations

import pytest

from whale_dist.index.choice import (
    choose_index_key,
    choose_nlist,
    index_memory_bytes,
    opq_out_dim,
    training_size,
)

GB = 2**30


@pytest.mark.parametrize(
    ("n", "d", "budget", "kwargs", "expected"),
    [
        (1_000, 512, 4 * GB, {}, "Flat"),
        (20_000, 512, 4 * GB, {}, "Flat"),
        (100_000, 512, 4 * GB, {}, "HNSW32"),
        (100_000, 512, 100 * 2**20, {}, "OPQ256_768,IVF1024,PQ256x8"),
        (1_000_000, 512, 4 * GB, {}, "IVF4096,Flat"),
        (10_000_000, 512, 32 * GB, {}, "IVF16384,Flat"),
        (10_000_000, 512, 4 * GB, {}, "OPQ256_768,IVF16384,PQ256x8"),
        (10_000_000, 512, 1 * GB, {}, "OPQ64_448,IVF16384,PQ64x8"),
        (50_000_000, 512, 4 * GB, {}, "OPQ64_448,IVF32768,PQ64x8"),
        (5_000, 512, 4 * GB, {"flat_max_n": 1_000}, "HNSW32"),
        (5_000, 512, 4 * GB, {"flat_max_n": 0, "hnsw_max_n": 0}, "IVF128,Flat"),
        (1_000_000, 512, 4 * GB, {"nlist_per_sqrt": 16}, "IVF16384,Flat"),
        (1_000_000, 128, 4 * GB, {"hnsw_max_n": 2_000_000}, "HNSW32"),
        (1_000, 64, 100_000, {}, "OPQ8_56,IVF32,PQ8x8"),  # PQ32 and PQ16 codebooks overflow 100 kB
    ],
)
def test_choose_index_key(n, d, budget, kwargs, expected):
    assert choose_index_key(n, d, budget, **kwargs) == expected


def test_choice_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="no index for 10000000 vectors"):
        choose_index_key(10_000_000, 512, 10 * 2**20)


@pytest.mark.parametrize(
    ("n", "kwargs", "expected"),
    [(1, {}, 1), (100, {}, 2), (10_000, {}, 256), (1_000_000, {}, 4096), (10_000_000, {}, 16384),
     (1_000_000, {"per_sqrt": 16}, 16384), (10_000, {"min_points_per_list": 1}, 512)],
)
def test_choose_nlist(n, kwargs, expected):
    assert choose_nlist(n, **kwargs) == expected


@pytest.mark.parametrize(
    ("n", "nlist", "kwargs", "expected"),
    [(1_000_000, 4096, {}, 64 * 4096), (1_000_000, 4096, {"points_per_list": 10}, 30 * 4096),
     (2_000_000, 4096, {"points_per_list": 1000}, 256 * 4096), (5_000, 256, {}, 5_000)],
)
def test_training_size_stays_in_the_faiss_range(n, nlist, kwargs, expected):
    assert training_size(n, nlist, **kwargs) == expected


def test_memory_model_orders_index_families():
    n, d = 1_000_000, 512
    sizes = [index_memory_bytes(k, n, d) for k in ("HNSW32", "IVF4096,Flat", "Flat", "OPQ64_448,IVF4096,PQ64x8")]
    assert sizes == sorted(sizes, reverse=True)
    assert index_memory_bytes("Flat", n, d) == n * (4 * d + 8)
    assert opq_out_dim(512, 64) == 448 and opq_out_dim(100, 32) == 128
