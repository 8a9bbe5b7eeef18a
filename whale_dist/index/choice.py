"""Index choice as pure functions of (N, d, memory budget), in the manner of autofaiss ``external/optimize.py``.

Everything here is plain arithmetic on integers and numpy arrays: no Ray, no faiss, no I/O, so each heuristic is
tested with exact expected index keys. Sources:

* faiss wiki, "Guidelines to choose an index": Flat when exact results are needed and N is small; HNSW when memory
  is not a concern; IVF-Flat when memory is "somewhat" a concern; OPQ + IVF + PQ when it is very important;
  nlist between 4·√N and 16·√N, trained on 30 to 256 vectors per list.
* autofaiss ``get_optimal_index_keys_v2`` / ``get_optimal_quantization``: HNSW whenever it fits the budget, IVF-Flat
  below 1M vectors, otherwise the largest PQ code that fits, with an OPQ rotation to ``(min(d // m, 6) + 1) * m``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

ID_BYTES = 8  # one int64 id per vector in inverted lists / IDMap (faiss InvertedLists.h)
PQ_CODE_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # autofaiss's candidate PQ sizes, largest first
HNSW_M = 32


def choose_nlist(n: int, *, per_sqrt: float = 4.0, min_points_per_list: int = 30) -> int:
    """Number of IVF lists: the power of two nearest ``per_sqrt·√n`` (faiss wiki: 4·√N .. 16·√N; autofaiss rounds
    to a power of two), reduced until every list gets at least ``min_points_per_list`` training vectors."""
    assert n > 0, "choose_nlist needs at least one vector"
    nlist = 2 ** round(math.log2(max(1.0, per_sqrt * math.sqrt(n))))
    while nlist > 1 and nlist * min_points_per_list > n:
        nlist //= 2
    return int(nlist)


def training_size(n: int, nlist: int, *, points_per_list: int = 64, min_points: int = 30, max_points: int = 256) -> int:
    """Training vectors for the coarse quantizer: ``points_per_list`` per list clamped to the faiss k-means range
    [30, 256] per list (faiss ``Clustering`` warns below 39 and subsamples above 256), never more than ``n``."""
    per_list = min(max(points_per_list, min_points), max_points)
    return int(min(n, per_list * nlist))


def opq_out_dim(d: int, m: int) -> int:
    """OPQ output dimension for ``m`` sub-quantizers: a multiple of m slightly above d, at most 7·m (autofaiss)."""
    return (min(d // m, 6) + 1) * m


def index_memory_bytes(key: str, n: int, d: int) -> int:
    """Estimated resident size of index ``key`` holding ``n`` vectors of dimension ``d`` (ids included)."""
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", key)) else 0
    if key == "Flat":
        return n * (4 * d + ID_BYTES)
    if key.startswith("HNSW"):
        links = int(re.match(r"HNSW(\d+)", key).group(1))
        return n * (4 * d + 2 * links * 4 + ID_BYTES)
    if key.endswith(",Flat"):
        return n * (4 * d + ID_BYTES) + nlist * d * 4
    pq = re.search(r"OPQ(\d+)_(\d+),IVF\d+,PQ(\d+)", key)
    if pq:  # codes + ids, coarse centroids, OPQ matrix, PQ codebooks (256 centroids per sub-quantizer)
        code, out_dim = int(pq.group(3)), int(pq.group(2))
        return n * (code + ID_BYTES) + nlist * out_dim * 4 + d * out_dim * 4 + 256 * out_dim * 4
    raise ValueError(f"no memory model for index key {key!r}")


def choose_index_key(
    n: int,
    d: int,
    memory_budget_bytes: int,
    *,
    flat_max_n: int = 20_000,
    hnsw_max_n: int = 200_000,
    ivf_flat_max_n: int = 10_000_000,
    nlist_per_sqrt: float = 4.0,
) -> str:
    """faiss ``index_factory`` key for ``n`` vectors of dimension ``d`` that fits ``memory_budget_bytes``.

    Flat (exact) up to ``flat_max_n``; HNSW32 up to ``hnsw_max_n`` when it fits (faiss wiki: "memory is not a
    concern"; kept to mid-sized catalogues because graphs neither train once nor merge, and filtered graph search
    loses recall); IVF-Flat up to ``ivf_flat_max_n`` when it fits; otherwise OPQ + IVF + PQ with the largest code
    that fits (autofaiss ``get_optimal_quantization``). Raises ``ValueError`` when nothing fits.
    """
    assert n > 0 and d > 0, f"need n > 0 and d > 0, got n={n} d={d}"
    candidates = []
    if n <= flat_max_n:
        candidates.append("Flat")
    if n <= hnsw_max_n:
        candidates.append(f"HNSW{HNSW_M}")
    nlist = choose_nlist(n, per_sqrt=nlist_per_sqrt)
    if n <= ivf_flat_max_n:
        candidates.append(f"IVF{nlist},Flat")
    candidates += [f"OPQ{m}_{opq_out_dim(d, m)},IVF{nlist},PQ{m}x8" for m in PQ_CODE_SIZES if m < d and d % m == 0]
    for key in candidates:
        if index_memory_bytes(key, n, d) <= memory_budget_bytes:
            return key
    raise ValueError(f"no index for {n} vectors of dimension {d} fits in {memory_budget_bytes / 2**30:.2f} GiB")


def needs_training(key: str) -> bool:
    return "IVF" in key or "PQ" in key


def nlist_of(key: str) -> int:
    found = re.search(r"IVF(\d+)", key)
    return int(found.group(1)) if found else 0


class Tuned(NamedTuple):
    value: int  # the search parameter chosen (nprobe or efSearch)
    recall: float  # recall measured at ``value``
    reached: bool  # whether ``recall`` reached the target


def tune_setting(recall_at: Callable[[int], float], lo: int, hi: int, target: float, *, slack: float = 0.005) -> Tuned:
    """Smallest setting in [lo, hi] whose measured recall reaches ``target``: doubling from ``lo``, then bisection
    between the last miss and the first hit, so a 4096-list index costs about 2·log2(4096) measurements. Recall rises
    with nprobe and efSearch while the cost per query grows about linearly (faiss wiki, "Faster search", "Indexing 1M
    vectors"), so the smallest setting that reaches the target is the fastest one that does.

    When even ``hi`` misses, returns the smallest setting tried within ``slack`` of the best recall tried, marked
    unreached: PQ recall plateaus at what its codes can tell apart, so probing further only costs time."""
    assert 1 <= lo <= hi, f"need 1 <= lo <= hi, got {lo}, {hi}"
    tried: dict[int, float] = {}

    def measure(value: int) -> float:
        if value not in tried:
            tried[value] = float(recall_at(value))
        return tried[value]

    value = lo
    while measure(value) < target and value < hi:
        value = min(hi, 2 * value)
    if measure(value) < target:
        best = max(tried.values())
        value = min(v for v, r in tried.items() if r >= best - slack)
        return Tuned(value, tried[value], False)
    miss = max((v for v, r in tried.items() if r < target and v < value), default=lo - 1)
    while value - miss > 1:
        middle = (value + miss) // 2
        value, miss = (middle, miss) if measure(middle) >= target else (value, middle)
    return Tuned(value, tried[value], True)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k (``truth``, one row per query) among its ``found`` ids."""
    assert found.shape[0] == truth.shape[0], "one row of found ids per query"
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=1)
    return float(hits.mean())


def matched_k(k: int, n_base: int, n_total: int) -> int:
    """Neighbours to check in a base of ``n_base`` vectors sampled from a catalogue of ``n_total``: the catalogue's
    rank-k neighbour sits near rank k·n_base/n_total in the sample (density-matched). Judging the thin sample on its
    own top-k would score, for a 5-photos-per-individual catalogue, other individuals' photos far away."""
    return max(1, math.ceil(k * n_base / n_total)) if n_total > n_base else k


def needs_rebuild(index_model: str, model: str, trained_for: int, n_after: int, *, growth: float = 0.5) -> bool:
    """Full rebuild instead of an incremental add: when the embedding model changed (old and new vectors live in
    different spaces), or when the catalogue outgrew the sample the quantizer was trained for by more than
    ``growth`` (the k-means centroids describe the old distribution; faiss wiki, "Guidelines to choose an index":
    the quantizer is trained on a sample representative of the data, lists grow unbalanced as it drifts)."""
    return index_model != model or n_after > trained_for * (1 + growth)


def shard_to_extend(shard_sizes: list[int], n_new: int, *, small: float = 0.125) -> int | None:
    """Which shard an incremental add rewrites with its new vectors, or None for a new shard: the smallest one, if
    it stays under ``small`` × the largest; so nightly adds gather in one small shard (rewriting it costs little)
    instead of leaving a shard per night for every search to visit."""
    if not shard_sizes:
        return None
    smallest = int(np.argmin(shard_sizes))
    return smallest if shard_sizes[smallest] + n_new <= small * max(shard_sizes) else None
