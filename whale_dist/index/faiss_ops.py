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
HNSW_EF_SEARCH = 128  # efSearch when none was tuned (a manifest from before tune_ef_search)
# The sample's graph is far easier to search than the catalogue's (bench/index_hard.py, 100k × 512 clustered: 0.99 of
# the sample's neighbours at efSearch 20, the full graph needed 851), so tuning only ever raises efSearch above the
# default; it cannot lower it safely.
HNSW_EF_MIN, HNSW_EF_MAX = HNSW_EF_SEARCH, 1024
TUNE_QUERIES = 1000  # held-out sample queries per measurement: recall to about ±0.003 at 0.99
# Largest base the tuner fills: IVF adds cost one coarse assignment each (100k × 4096 lists × 512 d ≈ 2 s on 2 cores,
# ~3% of a 1M build); HNSW inserts cost a graph search each, so its base is smaller (20k HNSW32 ≈ a few s).
TUNE_BASE = {"nprobe": 100_000, "efSearch": 20_000, "": 100_000}
EF_TUNE_SAMPLE = TUNE_QUERIES + TUNE_BASE["efSearch"]  # vectors tune_ef_search uses; a larger sample is cut


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


def train(key: str, dim: int, vectors: np.ndarray, *, target_recall: float = 0.99, nprobe: int = 0,
          use_gpu: bool = False, n_total: int = 0):
    """Train an empty index on ``vectors`` (a sample of ``n_total``); returns it and its search parameters for the
    manifest: nprobe tuned end to end (``tune_search``), plus the ``recall`` measured and ``target_reached``."""
    import faiss

    assert len(vectors) > 0, "training needs vectors"
    index = make_index(key, dim)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and use_gpu and gpu_count():
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(vectors)
    if ivf is not None:
        ivf.clustering_index = None
    return index, tune_search(index, vectors, target_recall, fixed=nprobe, n_total=n_total)


def tune_ef_search(key: str, dim: int, sample: np.ndarray, target_recall: float, n_total: int) -> dict:
    """efSearch for an HNSW key, measured on a graph of (part of) ``sample``: HNSW needs no training, so the build
    has no trained index to tune. The sample-sized graph is easier to search than the catalogue's (fewer points per
    identity, fewer hops), so the value found is a lower bound, ``HNSW_EF_SEARCH`` at least, and ``target_reached``
    is said of the sample only."""
    return tune_search(make_index(key, dim), sample, target_recall, n_total=n_total)


def tune_search(index, sample: np.ndarray, target: float, *, fixed: int = 0, n_total: int = 0, k: int = 5) -> dict:
    """The manifest's search parameters: the smallest nprobe (IVF, also OPQ/PQ) or efSearch (HNSW) at which
    ``index``, filled with part of ``sample``, finds ``target`` of the exact neighbours of held-out sample queries
    (``choice.tune_setting``); ``fixed`` > 0 is measured, not tuned. Measured end to end, so PQ code loss counts."""
    knob = _knob(index)
    recall = recall_probe(index, sample, k, n_total, TUNE_BASE[knob[0] if knob else ""])
    if knob is None:  # e.g. "PQ32": nothing to tune, report what it reaches
        found = recall({}) if recall else None
        return {"recall": _rounded(found), "target_reached": found is not None and found >= target}
    name, lo, hi = knob
    if recall is None:  # too few vectors to measure: search everything, and say it was not measured
        return {name: fixed or hi, "recall": None, "target_reached": False}
    if fixed:
        value = min(fixed, hi)
        found = recall({name: value})
        tuned = index_choice.Tuned(value, found, found >= target)
    else:
        tuned = index_choice.tune_setting(lambda v: recall({name: v}), lo, hi, target)
    return {name: int(tuned.value), "recall": _rounded(tuned.recall), "target_reached": bool(tuned.reached)}


def _knob(index) -> tuple[str, int, int] | None:
    """(parameter, smallest, largest) that trades speed for recall in ``index``; None when it has none."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", 1, int(ivf.nlist)
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    return ("efSearch", HNSW_EF_MIN, HNSW_EF_MAX) if hasattr(inner, "hnsw") else None


def recall_probe(template, sample: np.ndarray, k: int, n_total: int, max_base: int):
    """``recall(search_params) -> recall@k`` of a copy of ``template`` filled with a "base" part of ``sample``, on
    held-out sample queries, against exact search on that base (k density-matched, ``choice.matched_k``); None when
    the sample is too small to split. The base is at most ``max_base`` vectors (``TUNE_BASE``) so that filling the
    copy stays a small fraction of the build."""
    import faiss


    order = np.random.default_rng(0).permutation(len(sample))
    n_queries = min(TUNE_QUERIES, len(sample) // 5)
    base = sample[np.sort(order[n_queries:n_queries + max_base])]
    if n_queries < 1 or len(base) < k:
        return None
    queries = sample[order[:n_queries]]
    k = index_choice.matched_k(k, len(base), max(n_total, len(sample)))
    exact = faiss.IndexFlatIP(sample.shape[1])
    exact.add(base)
    truth = exact.search(queries, k)[1]
    index = faiss.clone_index(template)
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64))

    def recall(search: dict) -> float:
        set_search_parameters(index, search)
        return index_choice.recall_at_k(index.search(queries, k)[1], truth)

    return recall


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
