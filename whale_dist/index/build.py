"""Build on Ray: scan metadata → train the coarse quantizer once on a sample → fill shards in parallel → publish.

The distributed recipe of autofaiss (train once, fill small indices in parallel, merge within a memory bound) with
faiss ``IndexShards`` semantics at search time: every shard keeps the catalogue's own 64-bit ids (``add_with_ids``),
so shards never need renumbering. Each task sets its faiss OpenMP thread count to its Ray CPU share (faiss wiki,
"Threads and asynchronous calls": oversubscribed OpenMP threads slow everything down).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import ray

from whale_dist import storage
from whale_dist.config import dump_config
from whale_dist.embed import store as embed_store
from whale_dist.failpoints import failpoint
from whale_dist.index import choice as index_choice
from whale_dist.index import faiss_ops as index_train
from whale_dist.index import inputs as index_input
from whale_dist.index import publish as index_publish
from whale_dist.index.inputs import IndexInputError

log = logging.getLogger(__name__)
SEED = 0


def build_index(cfg) -> str:
    """Build and publish an index of the embedding store ``cfg.embed_out`` under ``cfg.index_root``; returns its URL.

    Uses the Ray cluster this process is connected to (``ray.init`` is the caller's business)."""
    started = time.time()
    icfg = cfg.index
    version = index_input.resolve_version(cfg.embed_out, icfg.model_version)
    parts = embed_store.published_urls(cfg.embed_out, version)
    dim = index_input.embedding_dim(parts[0])
    reads = [_read_partition.options(num_returns=2).remote(p, version, _filters(icfg), dim) for p in parts]
    table = _gather([metadata for metadata, _ in reads])
    blocks = [block for _, block in reads]  # each partition's vectors, read once, stay in the object store
    del reads
    if table.empty:
        raise IndexInputError(f"no embeddings of model {version} left to index after filters {_filters(icfg)}")
    table = _assign_ids(table, parts, max(icfg.num_shards, -(-len(table) // icfg.shard_max_vectors)))
    key = icfg.index_key or index_choice.choose_index_key(len(table), dim, int(icfg.memory_budget_gb * 2**30))
    task = {"num_cpus": icfg.cpus_per_task, "num_gpus": 1 if icfg.use_gpu else 0}
    name = index_publish.version_name(version)
    version_url = storage.join(cfg.index_root, name)
    phases: dict[str, float] = {}
    _lap(phases, "read", started)
    template, search = _train({**task, "num_cpus": icfg.train_cpus or _node_cpus()}, key, dim, table, parts, blocks,
                              icfg)
    shards = _fill_all(task, template, table, parts, blocks, dim, version_url, icfg.use_gpu)
    template, search = _gather_list([template, search])
    _lap(phases, "train_tune", started)
    shards = _gather_list(shards)
    _lap(phases, "fill_write", started)
    _warn_if_short(name, key, search, icfg.target_recall)
    shards, table = _maybe_merge(task, shards, table, key, dim, version_url, icfg)
    failpoint("index.shards_written", version=name, shards=[s["file"] for s in shards])
    manifest = _manifest(cfg, name, version, dim, key, search, table, shards, parts, started)
    manifest["ids"] = index_publish.write_ids(version_url, table)
    manifest["trained"] = index_publish.write_trained(version_url, template, len(table))
    _lap(phases, "merge_publish", started)
    manifest["build_phases"] = {k: round(v, 2) for k, v in phases.items()}

    dump_config(cfg, version_url)
    log.info("index %s: %s over %d vectors in %d shard(s)", name, key, len(table), len(shards))
    return index_publish.publish(cfg.index_root, name, manifest)


def _lap(phases: dict[str, float], name: str, started: float) -> None:
    """Seconds since the previous phase ended, as ``phases[name]`` (the manifest's ``build_phases``)."""
    phases[name] = time.time() - started - sum(phases.values())


def _warn_if_short(name: str, key: str, search: dict, target: float) -> None:
    """Say so when the tuner could not reach ``index.target_recall`` (hard data, coarse PQ codes): the manifest
    records the recall measured on the training sample (``search["recall"]``) either way."""
    if search.get("target_reached") is False and search.get("recall") is not None:
        setting = {k: v for k, v in search.items() if k in ("nprobe", "efSearch")}
        log.warning("index %s: %s reaches recall@5 %.3f on the training sample at %s, below index.target_recall %s; "
                    "a key without PQ codes (or a larger M) reaches more", name, key, search["recall"], setting,
                    target)


def _filters(icfg) -> dict:
    return {"species": icfg.species, "locations": icfg.locations, "date_from": icfg.date_from, "date_to": icfg.date_to}


def _gather(refs) -> pd.DataFrame:
    return pd.concat(_gather_list(refs), ignore_index=True)


def _gather_list(refs) -> list:
    """``ray.get`` that re-raises a task's bad-input error as itself (one line for the user, not a Ray traceback)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, IndexInputError):
            raise exc.cause from None
        raise


@ray.remote
def _read_partition(part_url: str, version: str, filters: dict, dim: int) -> tuple[pd.DataFrame, np.ndarray]:
    """(metadata rows passing ``filters``, their vectors): each partition is read once, metadata to the driver, the
    vectors to the object store, where the training task samples them and the fill tasks add them (no vector is
    read from storage twice, none passes through the driver). ``pos`` = the row's place in the block."""
    frame = index_input.read_metadata(part_url, version)
    frame = frame[index_input.filter_mask(frame, filters)].copy()
    frame["part"] = part_url
    frame["pos"] = np.arange(len(frame), dtype=np.int64)
    vectors = index_input.read_vectors(part_url, frame["row"].to_numpy(np.int64), dim)
    _release_arrow_pool()
    return frame, vectors


def _release_arrow_pool() -> None:
    """Hand Arrow's freed buffers back to the OS: its mimalloc pool kept ~0.85 GiB per reader worker after three
    partitions (measured), which Ray then reused for fills and counted in the build's peak."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _assign_ids(table: pd.DataFrame, parts: list[str], num_shards: int) -> pd.DataFrame:
    """Ids 0..N-1 in partition/row order (stable across rebuilds of the same input); contiguous id ranges make the
    shards, so a shard reads few partitions."""
    order = {p: i for i, p in enumerate(parts)}
    table = table.assign(_p=table["part"].map(order)).sort_values(["_p", "row"], kind="stable").drop(columns="_p")
    table = table.reset_index(drop=True)
    table["id"] = np.arange(len(table), dtype=np.int64)
    n_shards = max(1, min(num_shards, len(table)))
    table["shard"] = (table["id"] * n_shards // len(table)).astype(np.int64)
    return table


def _pieces(frame: pd.DataFrame, parts: list[str]) -> list[tuple[int, int, int, np.ndarray]]:
    """(partition number, first and end position in its block, ids) of each partition a shard takes rows from: ids
    are contiguous in partition order, so a shard's rows of one partition are one slice of its block."""
    number = {p: i for i, p in enumerate(parts)}
    return [(number[p], int(g["pos"].iloc[0]), int(g["pos"].iloc[-1]) + 1, g["id"].to_numpy(np.int64))
            for p, g in frame.groupby("part", sort=False)]


def _train(task: dict, key: str, dim: int, table: pd.DataFrame, parts: list[str], blocks: list, icfg):
    """Object refs of (the empty trained index, its search parameters): the coarse quantizer (and OPQ/PQ) trained
    once on a uniform sample of the vectors, taken from the blocks inside the task (never through the driver)."""
    empty = not index_choice.needs_training(key)
    if empty and not key.startswith("HNSW"):  # Flat: nothing to train, nothing to tune
        return ray.put(index_train.serialize(index_train.make_index(key, dim))), ray.put(
            index_train.default_search(key))
    nlist = index_choice.nlist_of(key)
    size = index_choice.training_size(len(table), nlist) if nlist else min(len(table), 65_536)
    sample = table.sample(n=size, random_state=SEED).sort_values("id")
    chosen = {part: rows["pos"].to_numpy(np.int64) for part, rows in sample.groupby("part", sort=False)}
    positions = [chosen.get(part, np.zeros(0, dtype=np.int64)) for part in parts]  # aligned with the blocks
    return _train_task.options(**task, num_returns=2).remote(key, dim, icfg.target_recall, icfg.nprobe, icfg.use_gpu,
                                                             len(table), positions, *blocks)


def _fill_all(task: dict, template, table: pd.DataFrame, parts: list[str], blocks: list, dim: int,
              version_url: str, use_gpu: bool) -> list:
    """Refs of the shard entries: each shard filled from slices of the blocks it needs; a block leaves the object
    store when the last fill using it ends (the driver drops its references once the fills are submitted)."""
    refs = []
    for shard, frame in table.groupby("shard", sort=True):
        pieces = _pieces(frame, parts)
        refs.append(_fill.options(**task).remote(template, [(lo, hi, ids) for _, lo, hi, ids in pieces], dim,
                                                 storage.join(version_url, f"shard-{int(shard):03d}.faiss"), use_gpu,
                                                 *[blocks[number] for number, _, _, _ in pieces]))
    blocks.clear()
    return refs


def _node_cpus() -> float:
    """CPUs of the largest live node: k-means is the longest step of the build and nothing else runs meanwhile, so
    the training task takes a whole node (faiss OpenMP threads = its CPUs) instead of ``cpus_per_task``."""
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(cpus, default=1) or 1


def _maybe_merge(task, shards, table, key, dim, version_url, icfg):
    """Merge the shards into one when asked and the merged index fits the memory budget (HNSW graphs never merge)."""
    if not icfg.merge_shards or len(shards) < 2 or key.startswith("HNSW"):
        return shards, table
    if index_choice.index_memory_bytes(key, len(table), dim) > icfg.memory_budget_gb * 2**30:
        log.warning("keeping %d shards: merged %s would exceed index.memory_budget_gb", len(shards), key)
        return shards, table
    urls = [storage.join(version_url, s["file"]) for s in shards]
    merged = ray.get(_merge.options(**task).remote(urls, [s["sha256"] for s in shards],
                                                   storage.join(version_url, "shard-merged.faiss")))
    for url in urls:
        storage.remove(url)
    return [merged], table.assign(shard=0)


def _model_url(cfg, version: str) -> str:
    """The configured model's URL when it is the model that made these embeddings (so ``identify`` can embed
    queries with it and needs no config), else ''."""
    card = cfg.model_url[: -len(".pt")] + ".json" if cfg.model_url.endswith(".pt") else cfg.model_url + ".json"
    try:
        return cfg.model_url if storage.read_json(card).get("version") == version else ""
    except (FileNotFoundError, ValueError):
        return ""


def _manifest(cfg, name, version, dim, key, search, table, shards, parts, started) -> dict:
    return {
        "format": 1, "catalogue": cfg.index.catalogue_name, "version": name, "model_version": version,
        "model_url": _model_url(cfg, version),
        "dim": int(dim), "metric": "inner_product", "normalized": True, "index_key": key, "search": search,
        "n": int(len(table)), "shards": shards, "partitions": len(parts), "filters": _filters(cfg.index),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.time() - started, 3),
    }


@ray.remote
def _fill(template, slices: list, dim: int, shard_url: str, use_gpu: bool, *blocks) -> dict:
    index_train.set_threads()
    index = index_train.to_device(index_train.deserialize(template), use_gpu)
    for block, (lo, hi, ids) in zip(blocks, slices):
        index.add_with_ids(block[lo:hi].reshape(-1, dim), ids)
    return index_publish.write_shard(index_train.to_host(index), shard_url)


@ray.remote
def _merge(urls: list[str], checksums: list[str], out_url: str) -> dict:
    index = index_publish.read_shard(urls[0], checksums[0])
    for url, checksum in zip(urls[1:], checksums[1:]):
        index.merge_from(index_publish.read_shard(url, checksum), 0)
    return index_publish.write_shard(index, out_url)


@ray.remote(max_calls=1)  # the worker exits after: a live worker keeps its freed heap, and Ray reused it for a fill
def _train_task(key, dim, target_recall, nprobe, use_gpu, n_total, positions, *blocks):
    index_train.set_threads()
    vectors = np.concatenate([block[rows] for block, rows in zip(blocks, positions)])
    if not index_choice.needs_training(key):  # HNSW: no quantizer, but efSearch is tuned on the sample
        return (index_train.serialize(index_train.make_index(key, dim)),
                index_train.tune_ef_search(key, dim, vectors, target_recall, n_total))
    index, search = index_train.train(key, dim, vectors, target_recall=target_recall, nprobe=nprobe, use_gpu=use_gpu,
                                      n_total=n_total)
    return index_train.serialize(index), search
