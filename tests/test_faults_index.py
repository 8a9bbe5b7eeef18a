"""Index publication under a real kill: the build's driver process SIGKILLs itself between shard upload and manifest.

Two kill points, both after every shard is uploaded to S3: before ``ids.parquet`` is written, and at the manifest
(ids and config already written). While each killed build runs, a reader keeps loading the catalogue root and
searching it: every load must give the previous complete version with the same answers, never an error or a mix.
A re-run then publishes a new version and ``LATEST`` moves to it. (``test_index_build.py`` covers the same point with
an exception instead of a process death, on local storage.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from fault_log import record
from test_index_build import clustered, config, write_partitions

from whale_dist import storage
from whale_dist.index import Catalogue, IndexIntegrityError, build_index, list_versions

DRIVER = """
import os, signal, sys
import ray
ray.init(address=os.environ["WD_RAY_ADDRESS"], log_to_driver=False)
from whale_dist.index import publish as index_publish
from whale_dist.config import load_config
from whale_dist.index import build_index
target = sys.argv[1]
def die(*args, **kwargs):
    sys.stdout.write("killed at " + target + "\\n"); sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
setattr(index_publish, target, die)
build_index(load_config(None, sys.argv[2:]))
"""
KILL_POINTS = ("write_ids", "publish")


def run_killed_build(overrides: list[str], kill_at: str, log_path: str) -> int:
    import ray

    env = {**os.environ, "WD_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", DRIVER, kill_at, *overrides], stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
    try:
        return process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_index_build_killed_between_shards_and_manifest(ray_cluster, s3_bucket, tmp_path):
    root = f"{s3_bucket}/store"
    vectors = clustered(60)
    write_partitions(f"{root}/embeddings", "mK", vectors, rows_per_part=20)
    overrides = [f"root={root}", "index.catalogue_name=test", "index.cpus_per_task=1", "index.num_shards=2"]
    cfg = config(root, "index.num_shards=2")
    first = build_index(cfg)
    catalogue_root = cfg.index_root
    queries = vectors[:8]
    expected = Catalogue.load(catalogue_root).search(queries, k=5)
    loads, wrong = [0], []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen = Catalogue.load(catalogue_root)
                got = seen.search(queries, k=5)
                if seen.url != first or not np.array_equal(got.ids, expected.ids):
                    wrong.append(seen.url)
            except Exception as exc:  # any failure to read is a reader-visible fault
                wrong.append(f"{type(exc).__name__}: {exc}")
            loads[0] += 1

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    statuses = []
    try:
        for kill_at in KILL_POINTS:
            statuses.append(run_killed_build(overrides, kill_at, str(tmp_path / f"{kill_at}.log")))
    finally:
        stop.set()
        thread.join(timeout=120)
    logs = {k: open(tmp_path / f"{k}.log").read() for k in KILL_POINTS}
    assert statuses == [-signal.SIGKILL] * len(KILL_POINTS), logs
    assert all(f"killed at {k}" in logs[k] for k in KILL_POINTS), logs
    assert wrong == [] and loads[0] >= 1, wrong[:3]
    relative = [storage.relative_key(catalogue_root, u) for u in storage.list_files(catalogue_root)]
    versions = sorted({r.split("/", 1)[0] for r in relative if "/" in r})
    halves = [v for v in versions if storage.join(catalogue_root, v) != first]
    assert len(halves) == len(KILL_POINTS)  # both killed builds left shards behind...
    for half in halves:
        assert storage.list_files(storage.join(catalogue_root, half), (".faiss",))
        with pytest.raises(IndexIntegrityError):
            Catalogue.load(storage.join(catalogue_root, half))  # ...which nobody can load as a version
    assert list_versions(catalogue_root) == [first.rsplit("/", 1)[1]]
    assert storage.read_text(storage.join(catalogue_root, "LATEST")).strip() == first.rsplit("/", 1)[1]
    second = build_index(cfg)  # the re-run publishes and moves LATEST
    after = Catalogue.load(catalogue_root)
    assert after.url == second and second > first and after.ntotal == len(vectors)
    assert np.array_equal(after.search(queries, k=5).ids, expected.ids)
    record("index build driver SIGKILLed between shard upload and manifest", injected=len(KILL_POINTS),
           reader_loads_during_kills=loads[0], reader_saw_partial_or_error=len(wrong),
           latest_moved_by_killed_build=0, versions_published_after_rerun=len(list_versions(catalogue_root)))
