"""faiss side of the build, with no Ray in it: create, train, tune nprobe, fill, move to/from GPU, serialise.

Cosine similarity is inner product on L2-normalised vectors (faiss wiki, "MetricType and distances"). Flat and HNSW
do not store ids, so they are wrapped in ``IDMap2`` to take the catalogue's 64-bit ids; IVF stores them natively.
GPU use follows faiss ``bench_gpu_*`` / the wiki's "Faiss on the GPU": k-means through a GPU ``clustering_index``,
IVF filled on a GPU clone and copied back; anything the cloner refuses stays on the CPU.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import numpy as np

from whale_dist.index import choice as index_choice

log = logging.getLogger(__name__)
HNSW_EF_SEARCH = 128


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
    """Train an empty index on ``vectors`` (a sample of ``n_total``); returns it and its search parameters (nprobe
    tuned for recall)."""
    import faiss

    assert len(vectors) > 0, "training needs vectors"
    index = make_index(key, dim)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:  # a custom key without inverted lists (e.g. "PQ32"): nothing to probe
        index.train(vectors)
        return index, {}
    if use_gpu and gpu_count():
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(vectors)
    ivf.clustering_index = None
    nprobe = nprobe or tune_nprobe(index, vectors, target_recall, n_total=n_total)
    return index, {"nprobe": int(min(nprobe, ivf.nlist))}


def transform(index, x: np.ndarray) -> np.ndarray:
    """Apply the pre-transforms (OPQ rotation) of ``index`` to ``x``, as the coarse quantizer sees it."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    return x


def tune_nprobe(index, vectors: np.ndarray, target: float, k: int = 5, max_queries: int = 500,
                n_total: int = 0) -> int:
    """Smallest nprobe whose probed lists hold ``target`` of the exact top-k neighbours, measured on the training
    sample split into queries and a small database (``index_choice.nprobe_for_recall``).

    The sample is ``s`` of ``n_total`` vectors, so a catalogue neighbour of rank k sits near rank k·s/n_total in
    it: the check uses that many neighbours (density-matched), else a 5-photos-per-individual catalogue would be
    judged on neighbours that, in the thin sample, are other individuals' photos scattered over every list."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    order = np.random.default_rng(0).permutation(len(vectors))
    n_queries = min(max_queries, len(vectors) // 5)
    if n_queries < 1 or len(vectors) - n_queries < k:
        return int(ivf.nlist)
    queries, base = vectors[order[:n_queries]], vectors[order[n_queries:]]
    k = max(1, math.ceil(k * len(base) / n_total)) if n_total > len(vectors) else k
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(base)
    _, neighbours = exact.search(queries, k)
    _, probe_order = ivf.quantizer.search(transform(index, queries), int(ivf.nlist))
    _, base_lists = ivf.quantizer.search(transform(index, base), 1)
    return index_choice.nprobe_for_recall(probe_order, base_lists[:, 0][neighbours], target)


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
