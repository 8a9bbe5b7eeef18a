"""Embedding under faults: an embedder actor killed mid-run, the driver killed and the job re-run, the S3 server gone
for several seconds mid-run. After each, the finished output holds every input exactly once across embeddings and
errors, and no photo is lost to the fault (the only error rows are the deliberately broken photos).

The driver of the killed / outage runs is a separate process attached to the session's Ray cluster (as
``ray job submit`` would attach it), so killing it with SIGKILL is a real driver death; the actor is killed with
SIGKILL on its own pid (found in the GCS actor table of this cluster only). The outage is a loopback TCP proxy in
front of the moto server that closes its port and drops every open connection, then reopens the same port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from fault_log import record
from test_bad_input import BAD_PHOTOS, survey
from test_embed import make_model, photo_bytes

from whale_dist import embed, storage
from whale_dist.config import load_config
from whale_dist.embed import store as embed_store

N_GOOD_EXTRA = 14


def night_files() -> dict[str, bytes]:
    """The bad-input mix (10 good, 7 broken photos) plus more good photos, so the run spans many chunks."""
    files = survey()
    files.update({f"extra/{i:03d}.jpg": photo_bytes(200 + i) for i in range(N_GOOD_EXTRA)})
    return files


def setup_night(bucket: str, **overrides):
    cfg = load_config(None, [f"root={bucket}/store", f"embed.images={bucket}/night", "embed.rows_per_partition=3",
                             "embed.decode_batch_size=3", "embed.batch_size=3", "embed.actor_num_cpus=0.5",
                             *[f"embed.{k}={v}" for k, v in overrides.items()]])
    card = make_model(cfg.model_url)
    files = night_files()
    for name, data in files.items():
        storage.write_bytes(storage.join(cfg.embed.images, name), data)
    return cfg, card, files


def exactly_once(cfg, version: str, files: dict) -> dict:
    """Counts over the finished store: lost, duplicated, embedded, errors, and errors that are not broken photos."""
    frame, vectors = embed.read_embeddings(cfg.embed_out, version)
    errors = embed.read_errors(cfg.embed_out, version)
    keys = Counter(list(frame["image_key"]) + list(errors["image_key"]))
    unexpected = sorted(set(errors["image_key"]) - set(BAD_PHOTOS))
    leftovers = [u for u in storage.list_files(storage.join(cfg.embed_out, "embeddings"))
                 + storage.list_files(storage.join(cfg.embed_out, "errors"))
                 if "/_runs/" not in u and u.endswith(".parquet") and not storage.is_done(u)]
    assert len(vectors) == len(frame)
    return {"lost": len(set(files) - set(keys)), "duplicated": sum(n - 1 for n in keys.values()),
            "embedded": len(frame), "errors": len(errors), "errors_not_broken_photos": len(unexpected),
            "unpublished_files": len(leftovers), "unexpected": unexpected[:3]}


def assert_clean(counts: dict, files: dict) -> None:
    assert counts["lost"] == 0 and counts["duplicated"] == 0, counts
    assert counts["errors_not_broken_photos"] == 0, counts
    assert counts["embedded"] == len(files) - len(BAD_PHOTOS) and counts["unpublished_files"] == 0, counts


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def published_count(cfg, version: str) -> int:
    try:
        return len(embed_store.published(cfg.embed_out, version))
    except Exception:  # the store may be briefly unreachable (outage test): not published yet
        return 0


# --- an embedder actor killed mid-run -----------------------------------------------------------------------------


def embedder_actor_pids() -> list[int]:
    """Pids of this cluster's live Ray Data map-worker actors (the Embedder pool)."""
    import ray

    actors = ray._private.state.actors().values()
    pids = [a["Pid"] for a in actors if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"] and a["Pid"]]
    return [pid for pid in pids if process_title(pid).startswith("ray::MapWorker")]


def process_title(pid: int) -> str:
    """The process title Ray gives an actor's worker (``ray::<Class>...``); "" for a process that is gone.

    The GCS actor table alone once named a pid whose process was by then another actor (a CI run killed an embedder
    instead of the training worker), so the fault tests kill a pid only while its title says what it runs.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_embedder_actor_killed_mid_run(ray_cluster, s3_bucket):
    # one photo per chunk: on an idle machine a 3-photo chunking finished before the killer saw the first chunk
    cfg, card, files = setup_night(s3_bucket, rows_per_partition=1, decode_batch_size=1, batch_size=1)
    kills: list[int] = []

    def killer():
        pids = wait_for(embedder_actor_pids, 600, "an embedder actor", interval=0.1)
        wait_for(lambda: published_count(cfg, card.version) >= 1, 600, "the first published chunk", interval=0.1)
        pid = (embedder_actor_pids() or pids)[0]
        os.kill(pid, signal.SIGKILL)
        kills.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    failed_runs = 0
    try:
        summary = embed.run_embed(cfg)
    except Exception as exc:  # acceptable only if the re-run then completes the work exactly once
        failed_runs, summary = 1, {"error": str(exc).splitlines()[0]}
    thread.join(timeout=120)
    assert kills, "the actor was never killed: the run finished before the first chunk was seen"
    if failed_runs:
        embed.run_embed(cfg)
    counts = exactly_once(cfg, card.version, files)
    assert_clean(counts, files)
    assert failed_runs == 0, f"killing one actor failed the job: {summary}"
    record("embedder actor SIGKILLed mid-run", injected=len(kills), inputs=len(files), failed_runs=failed_runs,
           **{k: v for k, v in counts.items() if k != "unexpected"})


# --- the driver killed, then the job re-run -------------------------------------------------------------------------

DRIVER = """
import json, os, sys
import ray
ray.init(address=os.environ["WD_RAY_ADDRESS"], log_to_driver=False,
         runtime_env={"env_vars": json.loads(os.environ.get("WD_WORKER_ENV", "{}"))})
from whale_dist import cli
from whale_dist import embed
sys.exit(cli.run_job(embed.main, sys.argv[1:]))
"""


def start_driver(cfg, log_dir, name: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """The embed job's driver as a separate process attached to the session's cluster; returns (process, log path)."""
    import ray

    log_path = os.path.join(str(log_dir), f"{name}.log")
    child_env = {**os.environ, "WD_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                 "WD_WORKER_ENV": json.dumps(env or {}), **(env or {})}
    argv = [sys.executable, "-c", DRIVER, f"root={cfg.root}", f"embed.images={cfg.embed.images}",
            *[f"embed.{k}={getattr(cfg.embed, k)}" for k in ("rows_per_partition", "decode_batch_size", "batch_size",
                                                             "actor_num_cpus")]]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    return process, log_path


@pytest.mark.slow
def test_driver_killed_then_job_rerun(ray_cluster, s3_bucket, tmp_path):
    cfg, card, files = setup_night(s3_bucket)
    process, log_path = start_driver(cfg, tmp_path, "driver")
    try:
        wait_for(lambda: published_count(cfg, card.version) >= 2 or process.poll() is not None, 600,
                 "two published chunks")
        assert process.poll() is None, "the driver finished before it could be killed:\n" + open(log_path).read()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    published_at_kill = published_count(cfg, card.version)
    assert published_at_kill * cfg.embed.rows_per_partition < len(files)  # the kill really was mid-run
    summary = embed.run_embed(cfg)  # the re-run, as the next night's schedule would do it
    counts = exactly_once(cfg, card.version, files)
    assert_clean(counts, files)
    assert summary["skipped"] >= 2 * cfg.embed.rows_per_partition  # finished chunks were not redone
    assert summary["skipped"] + summary["embedded"] + summary["errors"] == len(files)
    record("embed driver SIGKILLed mid-run, job re-run", injected=1, inputs=len(files),
           chunks_published_before_kill=published_at_kill, rerun_skipped=summary["skipped"],
           **{k: v for k, v in counts.items() if k != "unexpected"})


# --- the S3 server unreachable for several seconds ------------------------------------------------------------------


class PausableProxy:
    """A loopback TCP proxy; ``pause()`` closes its port and drops open connections (an S3 outage), ``resume()``
    reopens the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.refused_seconds = 0.0
        self.dropped = 0
        self._open()

    def _open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self) -> None:
        self.listener.close()
        with self.lock:
            dropped, self.connections = self.connections, []
        self.dropped += len(dropped)
        for s in dropped:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def resume(self) -> None:
        self._open()

    def outage(self, seconds: float) -> None:
        self.pause()
        time.sleep(seconds)
        self.resume()
        self.refused_seconds += seconds

    def close(self) -> None:
        self.pause()


OUTAGE_SECONDS = 8.0


@pytest.mark.slow
def test_s3_outage_mid_run(ray_cluster, s3_bucket, s3_server, tmp_path):
    cfg, card, files = setup_night(s3_bucket)
    host, port = s3_server.rsplit("/", 1)[-1].split(":")
    proxy = PausableProxy((host, int(port)))
    process, log_path = start_driver(cfg, tmp_path, "driver", env={"AWS_ENDPOINT_URL": proxy.endpoint})
    try:
        wait_for(lambda: published_count(cfg, card.version) >= 1 or process.poll() is not None, 600,
                 "the first published chunk")
        assert process.poll() is None, "the driver finished before the outage:\n" + open(log_path).read()
        at_outage = published_count(cfg, card.version)
        proxy.outage(OUTAGE_SECONDS)
        status = process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
        proxy.close()
    output = open(log_path).read()
    reruns = 0
    if status != 0:  # allowed: one clear error line, then a re-run resumes
        last = output.strip().splitlines()[-1]
        assert "Traceback" not in output, output[-3000:]
        reruns, summary = 1, embed.run_embed(cfg)
        assert summary["skipped"] > 0, "the re-run started over instead of resuming"
    counts = exactly_once(cfg, card.version, files)
    assert_clean(counts, files)
    assert status == 0 or reruns == 1, output[-3000:]
    assert at_outage * cfg.embed.rows_per_partition < len(files)  # the outage hit a run with work left
    record("S3 unreachable mid-embed (port closed, connections dropped)", injected=1,
           outage_s=OUTAGE_SECONDS, inputs=len(files), first_run_exit=status, reruns=reruns,
           chunks_published_before_outage=at_outage, connections_dropped=proxy.dropped,
           **({"error_line": last} if status else {}), **{k: v for k, v in counts.items() if k != "unexpected"})


def test_a_partition_published_by_another_process_is_readable_here(s3_bucket):
    """A reader that listed the store before another process published a chunk must see and read that chunk (a
    cached S3 listing made ``read_bytes``/``is_done`` deny it: FileNotFoundError on a published partition)."""
    import boto3
    import numpy as np
    import pyarrow.parquet as pq
    from test_embed import _chunk

    out, version = f"{s3_bucket}/store", "mpub"
    embed_store.publish_chunk(out, version, 0, *_chunk(["a", "b", "c"], version))
    assert len(embed.read_embeddings(out, version)[0]) == 2  # this process has now listed the folders
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])  # another writer, another cache
    bucket = s3_bucket.removeprefix("s3://")
    for table, folder in zip(_chunk(["d", "e", "f"], version), ("embeddings", "errors")):
        buffer = __import__("io").BytesIO()
        pq.write_table(table, buffer)
        key = f"store/{folder}/model={version}/part-00001.parquet"
        client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
        client.put_object(Bucket=bucket, Key=key + ".done", Body=b"{}")
    frame, vectors = embed.read_embeddings(out, version)
    assert list(frame["image_key"]) == ["a", "b", "d", "e"] and np.isfinite(vectors).all()
    assert embed_store.done_keys(out, version, embed_store.published(out, version)) == set("abcdef")
    record("partition published by another process after this one listed the store", injected=1,
           lost=6 - len(embed_store.done_keys(out, version, embed_store.published(out, version))))
