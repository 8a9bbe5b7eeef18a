"""faiss side of the build, with no Ray in it: create, train, tune nprobe / efSearch, fill, move to/from GPU, serialise.

Cosine similarity is inner product on L2-normalised vectors (faiss wiki, "MetricType and distances"). Flat and HNSW
do not store ids, so they are wrapped in ``IDMap2`` to take the catalogue's 64-bit ids; IVF stores them natively.
GPU use follows faiss ``bench_gpu_*`` / the wiki's "Faiss on the GPU": k-means through a GPU ``clustering_index``,
IVF filled on a GPU clone and copied back; anything the cloner refuses stays on the CPU.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from whale_dist.index import choice as index_choice

log = logging.getLogger(__name__)
HNSW_EF_SEARCH = 128  # efSearch when none was tuned (a manifest from before the tuner measured HNSW)
HNSW_EF_MIN, HNSW_EF_MAX = 16, 1024
TUNE_QUERIES = 1000  # held-out queries per measurement: recall to about ±0.003 at 0.99


def make_index(key: str, dim: int):
    """Empty index for factory ``key`` with inner-product metric, able to ``add_with_ids``."""
    import faiss

    factory = key if "IVF" in key else f"IDMap2,{key}"
    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)


def default_search(key: str) -> dict:
    """Search-time parameters stored in the manifest for indexes that need no training."""
    return {"efSearch": HNSW_EF_SEARCH} if key.startswith("HNSW") else {}


def set_threads(n: int | None = None) -> int:
    """faiss OpenMP threads = the CPUs Ray gave this task (or the machine's outside Ray)."""
    import faiss

    if n is None:
        ray = sys.modules.get("ray")  # only a Ray worker (which has imported Ray) has a CPU share to follow
        context = ray.get_runtime_context() if ray is not None and ray.is_initialized() else None
        in_worker = context is not None and context.worker.mode == ray.WORKER_MODE
        n = int(context.get_assigned_resources().get("CPU", 1)) if in_worker else os.cpu_count()
    faiss.omp_set_num_threads(max(1, n))
    return max(1, n)


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def train(key: str, dim: int, vectors: np.ndarray, *, use_gpu: bool = False):
    """An empty index trained on ``vectors`` (a sample of the catalogue); its search parameters are tuned once it
    is filled (``fill_and_tune``)."""
    import faiss

    assert len(vectors) > 0, "training needs vectors"
    index = make_index(key, dim)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and use_gpu and gpu_count():
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(vectors)
    if ivf is not None:
        ivf.clustering_index = None
    return index


def fill(index, blocks: list[np.ndarray], ids: list[np.ndarray], use_gpu: bool = False):
    """``index`` with ``blocks`` added under ``ids`` (on a GPU clone when asked and possible), back on the host."""
    device = to_device(index, use_gpu)
    for block, block_ids in zip(blocks, ids):
        device.add_with_ids(block, block_ids)
    return to_host(device)


def fill_and_tune(index, blocks: list[np.ndarray], ids: list[np.ndarray], target: float, *, fixed: int = 0,
                  n_total: int = 0, k: int = 5, use_gpu: bool = False) -> tuple:
    """``fill`` and the filled index's search parameters, measured on it (host side): the smallest
    nprobe (IVF, also OPQ/PQ) or efSearch (HNSW) at which it finds ``target`` of the exact neighbours of held-out
    vectors (``choice.tune_setting``); ``fixed`` > 0 is measured, not tuned. Measured on the real lists or graph, so
    PQ code loss counts and HNSW is judged on the graph it searches (a small sample's graph was far easier: 0.99 at
    efSearch 20 where the catalogue's needed 851, ``bench/index_hard.py``). The held-out vectors are searched before
    they are added (a member of the graph finds itself, then its own links: too easy), then added like the rest."""
    n = sum(len(block) for block in blocks)
    held = held_out_rows(n)
    k = index_choice.matched_k(k, n - len(held), max(n_total, n))
    if len(held) == 0 or n - len(held) < k:  # too few vectors to measure: say so, search everything
        index = fill(index, blocks, ids, use_gpu)
        knob = _knob(index)
        unmeasured = {"recall": None, "target_reached": False}
        return index, {knob[0]: fixed or knob[2], **unmeasured} if knob else unmeasured
    kept, kept_ids, queries, query_ids = _split(blocks, ids, held)
    index = fill(index, kept, kept_ids, use_gpu)
    search = _tune(index, queries, _exact(queries, kept, kept_ids, k), target, fixed)
    index.add_with_ids(queries, query_ids)
    return index, search


def tuning_shard_share(key: str) -> float:
    """How much of an ordinary shard's vectors to give the shard whose fill also tunes (``fill_and_tune``), so
    both take about as long. Filling an IVF shard of n vectors costs ~n·nlist·d multiply-adds (each vector against
    every centroid), the tuner's exact neighbours ~TUNE_QUERIES·n·d more, hence nlist / (nlist + TUNE_QUERIES):
    0.80 for IVF4096, whose tuning fill took 7.7 s against 6.1 s per fill at 1M (one worker ended 1.5 s after the
    other). Never under half a share, so recall is measured on a shard like the rest; 1 for keys without lists."""
    nlist = index_choice.nlist_of(key)
    return max(0.5, nlist / (nlist + TUNE_QUERIES)) if nlist else 1.0


def held_out_rows(n: int) -> np.ndarray:
    """Positions (sorted) of the vectors ``fill_and_tune`` searches with: ``TUNE_QUERIES``, at most a fifth."""
    return np.sort(np.random.default_rng(0).choice(n, size=min(TUNE_QUERIES, n // 5), replace=False))


def _tune(index, queries: np.ndarray, truth: np.ndarray, target: float, fixed: int) -> dict:
    def recall(search: dict) -> float:
        set_search_parameters(index, search)
        return index_choice.recall_at_k(index.search(queries, truth.shape[1])[1], truth)

    knob = _knob(index)
    if knob is None:  # e.g. "PQ32": nothing to tune, report what it reaches
        found = recall({})
        return {"recall": _rounded(found), "target_reached": found >= target}
    name, lo, hi = knob
    if fixed:
        found = recall({name: min(fixed, hi)})
        tuned = index_choice.Tuned(min(fixed, hi), found, found >= target)
    else:
        tuned = index_choice.tune_setting(lambda v: recall({name: v}), lo, hi, target)
    set_search_parameters(index, {name: int(tuned.value)})
    return {name: int(tuned.value), "recall": _rounded(tuned.recall), "target_reached": bool(tuned.reached)}


def _knob(index) -> tuple[str, int, int] | None:
    """(parameter, smallest, largest) that trades speed for recall in ``index``; None when it has none."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", 1, int(ivf.nlist)
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    return ("efSearch", HNSW_EF_MIN, HNSW_EF_MAX) if hasattr(inner, "hnsw") else None


def _split(blocks: list[np.ndarray], ids: list[np.ndarray], held: np.ndarray) -> tuple:
    """(kept blocks, their ids, held-out vectors, their ids): ``held`` are positions in the blocks taken as one."""
    starts = np.cumsum([0] + [len(block) for block in blocks])
    kept, kept_ids, queries, query_ids = [], [], [], []
    for block, block_ids, lo, hi in zip(blocks, ids, starts[:-1], starts[1:]):
        mask = np.zeros(len(block), dtype=bool)
        mask[held[(held >= lo) & (held < hi)] - lo] = True
        kept.append(block[~mask])
        kept_ids.append(block_ids[~mask])
        queries.append(block[mask])
        query_ids.append(block_ids[mask])
    return kept, kept_ids, np.concatenate(queries), np.concatenate(query_ids)


def _exact(queries: np.ndarray, blocks: list[np.ndarray], ids: list[np.ndarray], k: int) -> np.ndarray:
    """Ids of the exact top-``k`` inner products over the blocks: a flat scan of each, merged."""
    import faiss

    scores, found = [], []
    for block, block_ids in zip(blocks, ids):
        if len(block):
            d, i = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            scores.append(d)
            found.append(block_ids[i])
    scores, found = np.concatenate(scores, axis=1), np.concatenate(found, axis=1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(found, best, axis=1)


def _rounded(recall: float | None) -> float | None:
    return None if recall is None else round(float(recall), 4)


def set_search_parameters(index, search: Mapping[str, Any]) -> None:
    """nprobe (IVF, also under OPQ) or efSearch (HNSW, also under IDMap2) from the manifest, set once."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(search.get("nprobe", 1))
        return
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(search.get("efSearch", 128))


def to_device(index, use_gpu: bool):
    """A GPU clone of ``index`` when asked and possible, else ``index`` itself."""
    import faiss

    if not (use_gpu and gpu_count()):
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as exc:  # e.g. IDMap2/HNSW: the GPU cloner supports IVF and Flat only
        log.info("index stays on CPU (%s)", str(exc).splitlines()[0])
        return index


def to_host(index):
    import faiss

    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


def serialize(index) -> np.ndarray:
    import faiss

    return faiss.serialize_index(index)


def deserialize(blob: np.ndarray):
    import faiss

    return faiss.deserialize_index(blob)
