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
    table = _gather([_scan.remote(p, version, _filters(icfg)) for p in parts])
    if table.empty:
        raise IndexInputError(f"no embeddings of model {version} left to index after filters {_filters(icfg)}")
    table = _assign_ids(table, parts, icfg.num_shards)
    key = icfg.index_key or index_choice.choose_index_key(len(table), dim, int(icfg.memory_budget_gb * 2**30))
    task = {"num_cpus": icfg.cpus_per_task, "num_gpus": 1 if icfg.use_gpu else 0}
    name = index_publish.version_name(version)
    version_url = storage.join(cfg.index_root, name)
    groups = [frame for _, frame in table.groupby("shard", sort=True)]
    vectors = [_read_rows.remote(_pieces(frame, parts), dim) for frame in groups]  # each vector read once, kept
    template, search = _train({**task, "num_cpus": icfg.train_cpus or _node_cpus()}, key, dim, table, groups,
                              vectors, icfg)
    shards = _fill_all(task, template, groups, vectors, dim, version_url, icfg.use_gpu)
    template, search = _gather_list([template, search])
    shards, table = _maybe_merge(task, shards, table, key, dim, version_url, icfg)
    failpoint("index.shards_written", version=name, shards=[s["file"] for s in shards])
    manifest = _manifest(cfg, name, version, dim, key, search, table, shards, parts, started)
    manifest["ids"] = index_publish.write_ids(version_url, table)
    manifest["trained"] = index_publish.write_trained(version_url, template, len(table))

    dump_config(cfg, version_url)
    log.info("index %s: %s over %d vectors in %d shard(s)", name, key, len(table), len(shards))
    return index_publish.publish(cfg.index_root, name, manifest)


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


@ray.remote(num_cpus=0.5)
def _scan(part_url: str, version: str, filters: dict) -> pd.DataFrame:
    frame = index_input.read_metadata(part_url, version)
    frame = frame[index_input.filter_mask(frame, filters)].copy()
    frame["part"] = part_url
    return frame


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


def _pieces(frame: pd.DataFrame, parts: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(partition URL, rows to read, ids to give them) for one shard."""
    return [(p, g["row"].to_numpy(np.int64), g["id"].to_numpy(np.int64)) for p, g in frame.groupby("part", sort=False)]


@ray.remote(num_cpus=0.5)
def _read_rows(pieces, dim: int) -> np.ndarray:
    """One shard's vectors, in id order, into the object store: the training task samples them and the fill task
    adds them there, so no vector is read from storage twice."""
    return np.concatenate([index_input.read_vectors(p, rows, dim) for p, rows, _ in pieces])


def _train(task: dict, key: str, dim: int, table: pd.DataFrame, groups: list[pd.DataFrame], vectors: list, icfg):
    """Object refs of (the empty trained index, its search parameters): the coarse quantizer (and OPQ/PQ) trained
    once on a uniform sample of the shards' vectors, taken inside the task (the vectors never visit the driver)."""
    if not index_choice.needs_training(key):
        return ray.put(index_train.serialize(index_train.make_index(key, dim))), ray.put(
            index_train.default_search(key))
    nlist = index_choice.nlist_of(key)
    size = index_choice.training_size(len(table), nlist) if nlist else min(len(table), 65_536)
    sample = np.sort(table["id"].sample(n=size, random_state=SEED).to_numpy())
    positions = [_positions(frame["id"].to_numpy(), sample) for frame in groups]
    return _train_task.options(**task, num_returns=2).remote(key, dim, icfg.target_recall, icfg.nprobe, icfg.use_gpu,
                                                             len(table), positions, *vectors)


def _positions(shard_ids: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Rows of a shard's vector block (ids in order) that are in the sorted id ``sample``."""
    chosen = sample[(sample >= shard_ids[0]) & (sample <= shard_ids[-1])]
    return np.searchsorted(shard_ids, chosen)


def _fill_all(task: dict, template, groups: list[pd.DataFrame], vectors: list, dim: int, version_url: str,
              use_gpu: bool) -> list[dict]:
    """Fill every shard from its vector block; each block leaves the object store as soon as its shard is written
    (the driver drops its reference once the fill is submitted; Ray frees the block when that task ends)."""
    refs = [_fill.options(**task).remote(template, vectors[i], frame["id"].to_numpy(), dim,
                                         storage.join(version_url, f"shard-{int(frame['shard'].iloc[0]):03d}.faiss"),
                                         use_gpu) for i, frame in enumerate(groups)]
    vectors.clear()
    return _gather_list(refs)


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
def _fill(template, vectors: np.ndarray, ids: np.ndarray, dim: int, shard_url: str, use_gpu: bool) -> dict:
    index_train.set_threads()
    index = index_train.to_device(index_train.deserialize(template), use_gpu)
    index.add_with_ids(vectors.reshape(-1, dim), ids)
    return index_publish.write_shard(index_train.to_host(index), shard_url)


@ray.remote
def _merge(urls: list[str], checksums: list[str], out_url: str) -> dict:
    index = index_publish.read_shard(urls[0], checksums[0])
    for url, checksum in zip(urls[1:], checksums[1:]):
        index.merge_from(index_publish.read_shard(url, checksum), 0)
    return index_publish.write_shard(index, out_url)


@ray.remote
def _train_task(key, dim, target_recall, nprobe, use_gpu, n_total, positions, *blocks):
    index_train.set_threads()
    vectors = np.concatenate([block[rows] for block, rows in zip(blocks, positions)])
    index, search = index_train.train(key, dim, vectors, target_recall=target_recall, nprobe=nprobe, use_gpu=use_gpu,
                                      n_total=n_total)
    return index_train.serialize(index), search
