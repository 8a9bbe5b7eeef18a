"""The Ray Data pipeline: work rows -> fetch + decode (CPU tasks) -> embedder actor pool -> partition writer.

Every input row comes out of the pipeline exactly once, either with an embedding (``ok``) or with the stage and
message of its failure, so the writer can check that a chunk is complete before publishing it. Fetch and decode run
as plain tasks (Ray fuses them into one) so that decoding scales with the CPUs while the actors keep the model busy;
actors ask for a *fraction* of a CPU, because whole-CPU actors on a small machine take every CPU and leave the read
tasks none (the pipeline then hangs, a known Ray Data issue). The writer runs on the driver and sees only embeddings
and metadata (the actors drop the pixels), a few KB per photo.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from whale_dist.catalog import parse_bbox
from whale_dist.embed import sources as embed_sources
from whale_dist.embed import store as embed_store
from whale_dist.embed.embedder import Embedder
from whale_dist.failpoints import failpoint
from whale_dist.images import ImageError, load_photo
from whale_dist.progress import Ticker

MAX_BLOCKS = 2000
RETRY_ATTEMPTS = 6
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)
_SOURCE_ONLY = ("offset", "length", "list_error")  # where the bytes were; not needed past the fetch


def plan_chunks(work, skip, first_number: int, rows_per_partition: int):
    """The inputs not done, in key order, with a ``partition`` column numbering chunks from ``first_number``.

    ``skip`` is a set of done keys, or a mapping of done key -> fingerprint: then a key whose listed fingerprint
    differs from the stored one (the file was replaced) is embedded again; an empty fingerprint on either side
    (manifests, stores older than fingerprints) counts as unchanged.
    """
    keys = work["image_key"]
    if isinstance(skip, dict):
        listed = work["fingerprint"] if "fingerprint" in work.columns else [""] * len(work)
        done = [k in skip and (not f or not skip[k] or skip[k] == f) for k, f in zip(keys, listed)]
    else:
        done = keys.isin(skip).to_numpy()
    todo = work[~np.asarray(done, dtype=bool)].reset_index(drop=True)
    todo["partition"] = first_number + np.arange(len(todo)) // max(1, rows_per_partition)
    return todo


def fetch_decode(batch: dict, image_size: int, decode: bool = True, threads: int = 8,
                 attempts: int = RETRY_ATTEMPTS) -> dict:
    """Read each photo's bytes (sha256 of them) and decode + crop + resize it; a failure becomes a row's error."""
    n = len(batch["image_key"])
    fetched = fetch_batch(batch, threads, attempts=attempts)
    out = {name: column for name, column in batch.items() if name not in _SOURCE_ONLY}
    out["sha256"] = np.array([hashlib.sha256(d).hexdigest() if d is not None else "" for d, _ in fetched], dtype=object)
    stages = [err[0] if err else "" for _, err in fetched]
    messages = [err[1] if err else "" for _, err in fetched]
    if decode:
        out["image"] = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
        for i, (data, err) in enumerate(fetched):
            if err is None:
                try:
                    out["image"][i] = load_photo(data, image_size, parse_bbox(str(batch["bbox"][i])))
                except ImageError as exc:
                    stages[i], messages[i] = exc.stage, exc.message
    else:  # decoded by the actor on its GPU
        out["data"] = np.array([d if d is not None else b"" for d, _ in fetched], dtype=object)
    out["stage"], out["message"] = np.array(stages, dtype=object), np.array(messages, dtype=object)
    out["ok"] = np.array([s == "" for s in stages])
    return out


def fetch_batch(batch: dict, threads: int = 8,
                attempts: int = RETRY_ATTEMPTS) -> list[tuple[bytes | None, tuple[str, str] | None]]:
    """(bytes, None) or (None, (stage, message)) per row; reads overlap in threads (S3 latency, not CPU, is the
    limit), nearby members of one tar shard come in one ranged read (``embed_sources.plan_reads``)."""
    fetched: list = [(None, ("list", str(e))) if e else None for e in batch["list_error"]]
    rows = [i for i, result in enumerate(fetched) if result is None]
    reads = embed_sources.plan_reads([batch["url"][i] for i in rows], [batch["offset"][i] for i in rows],
                                     [batch["length"][i] for i in rows])
    with ThreadPoolExecutor(max_workers=min(threads, max(1, len(reads)))) as pool:
        results = pool.map(lambda read: _read_or_error(read, attempts), reads)
        for (_url, start, _end, members), (data, err) in zip(reads, results):
            for item, offset, length in members:
                fetched[rows[item]] = (None, err) if err else (embed_sources.slice_member(data, start, offset,
                                                                                          length), None)
    return fetched


def _read_or_error(read, attempts: int = RETRY_ATTEMPTS) -> tuple[bytes | None, tuple[str, str] | None]:
    """A missing or forbidden file is its rows' error; anything else is retried and then fails the task."""
    url, start, end, _members = read
    try:
        return with_retries(embed_sources.read_range, url, start, end, attempts=attempts), None
    except PERMANENT_ERRORS as exc:
        message = str(exc).splitlines()[0] if str(exc) else ""
        return None, ("read", f"{type(exc).__name__}: {message}"[:500])


def with_retries(fn, *args, attempts: int = RETRY_ATTEMPTS, delay: float = 0.5):
    """``fn(*args)``, retried with doubling waits (0.5 s, 1 s, ...: 15.5 s over 6 attempts, ``embed.retry_attempts``)
    unless the error is permanent.

    Error rows are final (a re-run skips them), so a storage outage of a few seconds must neither become error rows
    nor fail the night; a longer one fails the run, which a re-run then resumes.
    """
    for attempt in range(attempts):
        try:
            return fn(*args)
        except PERMANENT_ERRORS:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(delay * 2 ** attempt)


def build_dataset(todo, model_url: str, image_size: int, cfg):
    """The lazy Ray Dataset for ``todo``; ``cfg`` is the ``EmbedConfig``."""
    import ray
    from ray.data import ActorPoolStrategy

    gpu = cfg.actor_num_gpus > 0
    gpu_decode = gpu and cfg.gpu_decode
    # Small input blocks so decode tasks run in parallel (one block is one sequential task), but at most
    # MAX_BLOCKS of them so a night of millions of photos does not become millions of driver objects. Split here
    # because from_pandas(override_num_blocks=) fails on this numpy/pandas pair.
    batch = max(1, cfg.decode_batch_size)
    step = batch * max(1, -(-len(todo) // (batch * MAX_BLOCKS)))
    ds = ray.data.from_pandas([todo.iloc[i:i + step] for i in range(0, len(todo), step)])
    ds = ds.map_batches(fetch_decode, batch_size=cfg.decode_batch_size, batch_format="numpy",
                        fn_kwargs={"image_size": image_size, "decode": not gpu_decode,
                                   "attempts": cfg.retry_attempts}, num_cpus=cfg.decode_num_cpus)
    return ds.map_batches(
        Embedder, batch_size=cfg.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model_url": model_url, "device": "cuda" if gpu else "cpu",
                               "autocast": cfg.autocast, "flip_tta": cfg.flip_tta, "threads": cfg.actor_threads},
        compute=ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.actor_num_cpus, num_gpus=cfg.actor_num_gpus)


class PartitionWriter:
    """Collects pipeline rows by chunk and publishes each chunk as soon as all its inputs have come back."""

    def __init__(self, todo, out: str, version: str, attempts: int = RETRY_ATTEMPTS):
        self.out, self.version, self.attempts = out, version, attempts
        self.expected = todo.groupby("partition").size().to_dict()
        self.pending: dict[int, list[dict]] = {}
        self.embedded = self.errors = self.published = 0
        self.first_batch: tuple[float, int] | None = None  # (when, rows): the end of the start-up phase

    def add(self, batch: dict) -> None:
        if self.first_batch is None:
            self.first_batch = (time.perf_counter(), len(batch["image_key"]))
        for number in np.unique(batch["partition"]):
            rows = {k: v[batch["partition"] == number] for k, v in batch.items()}
            self.pending.setdefault(int(number), []).append(rows)
            if sum(len(r["image_key"]) for r in self.pending[int(number)]) == self.expected[int(number)]:
                self._publish(int(number))

    def _publish(self, number: int) -> None:
        parts = self.pending.pop(number)
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        embedded, errors = chunk_tables(rows, self.version)
        with_retries(embed_store.publish_chunk, self.out, self.version, number, embedded, errors,
                     attempts=self.attempts)
        self.embedded += embedded.num_rows
        self.errors += errors.num_rows
        self.published += 1
        failpoint("embed.chunk_published", chunk=number, published=self.published)

    def check_complete(self) -> None:
        if self.pending:
            raise RuntimeError(f"pipeline ended with incomplete chunks {sorted(self.pending)}; re-run to resume")


def chunk_tables(rows: dict, version: str):
    """(embeddings table, errors table) of one chunk, each sorted by image key."""
    import pyarrow as pa

    order = np.argsort(rows["image_key"].astype(str), kind="stable")
    rows = {k: v[order] for k, v in rows.items()}
    ok = rows["ok"].astype(bool)
    vectors = np.ascontiguousarray(rows["embedding"][ok], dtype=np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    now = pa.scalar(int(time.time() * 1e6), pa.timestamp("us", tz="UTC"))
    embedded = pa.table({
        "image_key": pa.array(rows["image_key"][ok].astype(str)), "url": pa.array(rows["url"][ok].astype(str)),
        "sha256": pa.array(rows["sha256"][ok].astype(str)), "embedding": embedding,
        "model_version": pa.array([version] * int(ok.sum()), pa.string()),
        "embedded_at": pa.array([now.value] * int(ok.sum()), pa.timestamp("us", tz="UTC")),
        **{c: pa.array(rows[c][ok].astype(str)) for c in embed_store.EMBEDDING_META},
        **_fingerprint_column(rows, ok)})
    errors = pa.table({**{c: pa.array(rows[c][~ok].astype(str), pa.string()) for c in embed_store.ERROR_COLUMNS},
                       **_fingerprint_column(rows, ~ok)})
    return embedded, errors


def _fingerprint_column(rows: dict, mask: np.ndarray) -> dict:
    """The source fingerprint of the rows in ``mask`` (size + ETag of the file), when the work table had one."""
    import pyarrow as pa

    if "fingerprint" not in rows:
        return {}
    return {"fingerprint": pa.array(rows["fingerprint"][mask].astype(str), pa.string())}


def warn_if_starved(cfg) -> None:
    """Say so when the actors would leave no CPU for a decode task (the pipeline would then wait forever).

    Only a warning: on an autoscaling cluster the CPUs present at start are not all the cluster will have.
    """
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    left = cpus - cfg.num_actors * cfg.actor_num_cpus
    if left < cfg.decode_num_cpus:
        print(f"embed: warning: {cfg.num_actors} actor(s) x {cfg.actor_num_cpus:g} CPU leave {left:g} of {cpus:g} "
              f"CPUs, less than a decode task needs ({cfg.decode_num_cpus:g}); unless the cluster grows the read "
              "tasks starve and the job hangs: lower embed.actor_num_cpus or embed.num_actors", flush=True)


def run_pipeline(todo, out: str, model_url: str, version: str, image_size: int, cfg) -> dict:
    """Run the pipeline over ``todo`` and publish its chunks; returns counts and timings.

    ``startup_s`` is the time to the first embedded batch (Ray Data start, actor start, model load: a fixed cost
    that a small night pays in full) and ``steady_images_per_s`` the rate after it, which is what a large night
    runs at.
    """
    start = time.perf_counter()
    writer = PartitionWriter(todo, out, version, cfg.retry_attempts)
    if len(todo):
        warn_if_starved(cfg)
        batches = build_dataset(todo, model_url, image_size, cfg).iter_batches(batch_size=None, batch_format="numpy")
        ticker = Ticker(len(todo))
        try:
            for batch in batches:
                writer.add(batch)
                ticker.add(len(batch["image_key"]), int((~batch["ok"].astype(bool)).sum()))
        finally:  # on an error, stop the executor and its actor pool now, not when the traceback is collected
            getattr(batches, "close", lambda: None)()
        writer.check_complete()
    end = time.perf_counter()
    first_at, first_rows = writer.first_batch or (end, 0)
    steady = (len(todo) - first_rows) / (end - first_at) if end > first_at else 0.0
    return {"embedded": writer.embedded, "errors": writer.errors, "pipeline_s": round(end - start, 2),
            "startup_s": round(first_at - start, 2), "steady_images_per_s": round(steady, 1)}
