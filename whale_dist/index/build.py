"""Build on Ray: read partitions → train the coarse quantizer once on a sample → fill shards in parallel (the
first one also tunes nprobe/efSearch on itself) → publish.

The distributed recipe of autofaiss (train once, fill small indices in parallel, merge within a memory bound) with
faiss ``IndexShards`` semantics at search time: every shard keeps the catalogue's own 64-bit ids (``add_with_ids``),
so shards never need renumbering. Each task sets its faiss OpenMP thread count to its Ray CPU share (faiss wiki,
"Threads and asynchronous calls": oversubscribed OpenMP threads slow everything down).
"""

from __future__ import annotations

import logging
import time

import numpy as np
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
from whale_dist.model_card import load_card

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
    table, offsets, blocks = _read_all(parts, version, dim, icfg)
    key = icfg.index_key or index_choice.choose_index_key(len(table), dim, int(icfg.memory_budget_gb * 2**30))
    n_shards = max(icfg.num_shards, -(-len(table) // icfg.shard_max_vectors))
    table = _sharded(table, n_shards, index_train.tuning_shard_share(key))
    task = {"num_cpus": icfg.cpus_per_task, "num_gpus": 1 if icfg.use_gpu else 0}
    name = index_publish.version_name(version)
    version_url = storage.join(cfg.index_root, name)
    phases: dict[str, float] = {}
    _lap(phases, "read", started)
    template = _train({**task, "num_cpus": icfg.train_cpus or _node_cpus()}, key, dim, offsets, blocks, icfg)
    tune = None if key == "Flat" else {"target": icfg.target_recall, "fixed": icfg.nprobe, "n_total": int(offsets[-1])}
    fills = _fill_all(task, template, _shard_starts(table), offsets, blocks, dim, version_url, icfg.use_gpu, tune)
    template = _gather_list(template)
    _lap(phases, "train", started)
    shards, search = _gather_list([entry for entry, _ in fills]), _gather_list(fills[0][1])
    search = search if search is not None else index_train.default_search(key)
    _lap(phases, "fill_tune_write", started)
    _warn_if_short(name, key, search, icfg.target_recall)
    shards, table = _maybe_merge(task, shards, table, key, dim, version_url, icfg)
    storage.sync([storage.join(version_url, s["file"]) for s in shards])  # fills wrote them durable=False
    failpoint("index.shards_written", version=name, shards=[s["file"] for s in shards])
    manifest = _manifest(cfg, name, version, dim, key, search, table, shards, parts, started)
    manifest["ids"] = index_publish.write_ids(version_url, table)
    manifest["trained"] = index_publish.write_trained(version_url, template, len(table))
    _lap(phases, "merge_publish", started)
    manifest["build_phases"] = {k: round(v, 2) for k, v in phases.items()}

    dump_config(cfg, version_url)
    log.info("index %s: %s over %d vectors in %d shard(s)", name, key, len(table), len(shards))
    return index_publish.publish(cfg.index_root, name, manifest)


def _read_all(parts: list[str], version: str, dim: int, icfg) -> tuple:
    """(metadata with ids as one Arrow table, partition offsets, refs of each partition's vectors): ids
    offsets[i]..offsets[i+1]-1 come from parts[i], whose vectors, read once, stay in the object store."""
    reads = [_read_partition.options(num_returns=2).remote(p, version, _filters(icfg), dim) for p in parts]
    metadata = _gather_list([metadata for metadata, _ in reads])
    offsets = np.cumsum([0] + [len(m) for m in metadata])
    if offsets[-1] == 0:
        raise IndexInputError(f"no embeddings of model {version} left to index after filters {_filters(icfg)}")
    return _numbered(metadata), offsets, [block for _, block in reads]


def _lap(phases: dict[str, float], name: str, started: float) -> None:
    """Seconds since the previous phase ended, as ``phases[name]`` (the manifest's ``build_phases``)."""
    phases[name] = time.time() - started - sum(phases.values())


def _warn_if_short(name: str, key: str, search: dict, target: float) -> None:
    """Say so when the tuner could not reach ``index.target_recall`` (hard data, coarse PQ codes): the manifest
    records the recall measured on the first shard (``search["recall"]``) either way."""
    if search.get("target_reached") is False and search.get("recall") is not None:
        setting = {k: v for k, v in search.items() if k in ("nprobe", "efSearch")}
        log.warning("index %s: %s reaches recall@5 %.3f on its first shard at %s, below index.target_recall %s; "
                    "a key without PQ codes (or a larger M) reaches more", name, key, search["recall"], setting,
                    target)


def _filters(icfg) -> dict:
    return {"species": icfg.species, "locations": icfg.locations, "date_from": icfg.date_from, "date_to": icfg.date_to}


def _gather_list(refs) -> list:
    """``ray.get`` that re-raises a task's bad-input error as itself (one line for the user, not a Ray traceback)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, IndexInputError):
            raise exc.cause from None
        raise


@ray.remote
def _read_partition(part_url: str, version: str, filters: dict, dim: int):
    """(metadata rows passing ``filters`` as an Arrow table, their vectors): each partition is read once, metadata
    to the driver, the vectors to the object store, where the training task samples them and the fill tasks add
    them (no vector is read from storage twice, none passes through the driver)."""
    metadata = index_input.read_metadata_table(part_url, version)
    rows = index_input.filter_rows(metadata, filters)
    if rows is None:
        rows = np.arange(metadata.num_rows, dtype=np.int64)
    else:
        metadata = metadata.take(rows)
    vectors = index_input.read_vectors(part_url, rows, dim)
    return metadata.drop_columns(["row"]), vectors


def _release_freed_memory() -> None:
    """Hand freed buffers back to the OS before k-means or a fill, whose worker Ray may have used for reads or
    k-means (and the build's peak counts what it holds): Arrow's mimalloc pool, kept between reads on purpose (a
    reused pool read a partition in ~0.5 s, a fresh one in ~0.7 s), held ~0.85 GiB per worker after three
    partitions, and glibc keeps what k-means freed in its heap and per-thread arenas (``malloc_trim``)."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other C libraries have none to call
    if trim is not None:
        trim(0)


def _numbered(metadata: list):
    """The partitions' metadata (Arrow, in partition order) with ids 0..N-1, stable across rebuilds of the same
    input."""
    import pyarrow as pa

    table = pa.concat_tables(metadata)
    return table.append_column("id", pa.array(np.arange(table.num_rows, dtype=np.int64)))


def _sharded(table, num_shards: int, first_share: float = 1.0):
    """``table`` with each id's shard: contiguous id ranges (so a shard reads few partitions), equal but for shard
    0, which holds ``first_share`` of an equal share because its fill also tunes the search parameters
    (``faiss_ops.tuning_shard_share``): the fills, a few per worker, then end together."""
    import pyarrow as pa

    n = table.num_rows
    n_shards = max(1, min(num_shards, n))
    weights = np.full(n_shards, 10**6, dtype=np.int64)  # integers: exact for equal shares
    weights[0] = round(10**6 * first_share)
    ends = -(-n * np.cumsum(weights) // weights.sum())  # ceil, in integers: equal weights give ceil(s·n/S)
    return table.append_column("shard", pa.array(np.repeat(np.arange(n_shards), np.diff(ends, prepend=0))))


def _shard_starts(table) -> np.ndarray:
    """First id of each shard, and N last: shard s holds ids starts[s]..starts[s+1]-1."""
    shard = table["shard"].to_numpy()
    return np.searchsorted(shard, np.arange(int(shard[-1]) + 2))


def _pieces(lo: int, hi: int, offsets: np.ndarray) -> list[tuple[int, int, int, np.ndarray]]:
    """(partition number, first and end position in its block, ids) of each partition that ids lo..hi-1 come
    from: ids are contiguous in partition order, so a shard's rows of one partition are one slice of its block."""
    return [(number, max(lo, start) - start, min(hi, end) - start, np.arange(max(lo, start), min(hi, end)))
            for number, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])) if start < hi and end > lo]


def _train(task: dict, key: str, dim: int, offsets: np.ndarray, blocks: list, icfg):
    """Object ref of the empty trained index: the coarse quantizer (and OPQ/PQ) trained once on a uniform sample of
    the vectors, taken from the blocks inside the task (never through the driver)."""
    if not index_choice.needs_training(key):  # Flat, HNSW: nothing to train
        return ray.put(index_train.serialize(index_train.make_index(key, dim)))
    n, nlist = int(offsets[-1]), index_choice.nlist_of(key)
    size = index_choice.training_size(n, nlist) if nlist else min(n, 65_536)
    sample = np.sort(np.random.default_rng(SEED).choice(n, size=size, replace=False))
    cut = np.searchsorted(sample, offsets)
    positions = [sample[a:b] - start for a, b, start in zip(cut[:-1], cut[1:], offsets[:-1])]  # per block
    return _train_task.options(**task).remote(key, dim, icfg.use_gpu, positions, *blocks)


def _fill_all(task: dict, template, starts: np.ndarray, offsets: np.ndarray, blocks: list, dim: int,
              version_url: str, use_gpu: bool, tune: dict | None) -> list:
    """Refs of (shard entry, search parameters) per shard: each shard filled from slices of the blocks it needs
    (a block leaves the object store when the last fill using it ends: the driver drops its references once the
    fills are submitted); the first shard's fill also tunes nprobe/efSearch on itself (``fill_and_tune``)."""
    refs = []
    for shard, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
        pieces = _pieces(int(lo), int(hi), offsets)
        refs.append(_fill.options(**task, num_returns=2).remote(
            template, [(lo, hi, ids) for _, lo, hi, ids in pieces], dim,
            storage.join(version_url, f"shard-{shard:03d}.faiss"), use_gpu, tune if shard == 0 else None,
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
    import pyarrow as pa

    urls = [storage.join(version_url, s["file"]) for s in shards]
    merged = ray.get(_merge.options(**task).remote(urls, [s["sha256"] for s in shards],
                                                   storage.join(version_url, "shard-merged.faiss")))
    for url in urls:
        storage.remove(url)
    return [merged], table.set_column(table.schema.get_field_index("shard"), "shard",
                                       pa.array(np.zeros(len(table), dtype=np.int64)))


def _model_url(cfg, version: str) -> str:
    """The configured model's URL when it is the model that made these embeddings (so ``identify`` can embed
    queries with it and needs no config), else ''."""
    try:
        return cfg.model_url if load_card(cfg.model_url).version == version else ""
    except (FileNotFoundError, ValueError, TypeError):  # no card, not JSON, not a card
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
def _fill(template, slices: list, dim: int, shard_url: str, use_gpu: bool, tune: dict | None, *blocks):
    """(shard entry, search parameters tuned on this shard when ``tune`` is given, else None)."""
    _release_freed_memory()
    index_train.set_threads()
    index = index_train.deserialize(template)
    parts = [block[lo:hi].reshape(-1, dim) for block, (lo, hi, _) in zip(blocks, slices)]
    ids = [ids for _, _, ids in slices]
    if tune is None:
        index, search = index_train.fill(index, parts, ids, use_gpu), None
    else:
        index, search = index_train.fill_and_tune(index, parts, ids, tune["target"], fixed=tune["fixed"],
                                                  n_total=tune["n_total"], use_gpu=use_gpu)
    return index_publish.write_shard(index, shard_url, durable=False), search  # synced once, before the manifest


@ray.remote
def _merge(urls: list[str], checksums: list[str], out_url: str) -> dict:
    index = index_publish.read_shard(urls[0], checksums[0])
    for url, checksum in zip(urls[1:], checksums[1:]):
        index.merge_from(index_publish.read_shard(url, checksum), 0)
    return index_publish.write_shard(index, out_url)


@ray.remote
def _train_task(key, dim, use_gpu, positions, *blocks):
    """The serialised trained index. The worker stays for the fills (a new one cost ~1 s of the 1M build: Ray had
    also retired an idle reader while k-means held every CPU), once it has handed back what k-means freed."""
    _release_freed_memory()
    vectors = _gathered(blocks, positions, dim, threads=index_train.set_threads())
    template = index_train.serialize(index_train.train(key, dim, vectors, use_gpu=use_gpu))
    del vectors
    _release_freed_memory()
    return template


def _gathered(blocks: list, positions: list, dim: int, threads: int = 1) -> np.ndarray:
    """Rows ``positions[i]`` (sorted) of each ``blocks[i]``, one block after another, as one (n, dim) float32 array.

    Each block's rows are taken straight into their slice of the result (``np.take(..., out=)``, which releases the
    GIL, so ``threads`` blocks at once): per-block fancy indexing then ``np.concatenate`` copied the 1M build's
    262k × 512 sample twice, once into 512 MB of fresh temporaries, on the critical path while k-means' CPUs waited
    (``bench/RESULTS.md``, "the training sample gathered in place": 1.8–3.8 s before, 0.2–0.3 s after)."""
    from concurrent.futures import ThreadPoolExecutor

    ends = np.cumsum([len(rows) for rows in positions], dtype=np.int64)
    out = np.empty((int(ends[-1]) if len(ends) else 0, dim), dtype=np.float32)

    def take(i: int) -> None:
        block, rows = np.asarray(blocks[i]).reshape(-1, dim), np.asarray(positions[i], dtype=np.int64)
        if len(rows) and not 0 <= rows[0] <= rows[-1] < len(block):  # "clip" below would hide a bad position
            raise ValueError(f"sample positions {rows[0]}..{rows[-1]} outside block {i} of {len(block)} rows")
        np.take(block, rows, axis=0, out=out[ends[i] - len(rows):ends[i]], mode="clip")  # "raise" buffers

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(take, range(len(blocks))))
    return out
