"""Publication never moves ``LATEST`` backwards: the pure rule, racing threads, and two publisher processes held
apart at the ``index.before_latest`` failpoint (no timing: the older one is paused exactly between its manifest and
``LATEST`` while the newer one publishes)."""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import sys
import threading

import pytest

from whale_dist import failpoints, storage
from whale_dist.index import list_versions, resolve_version_url
from whale_dist.index import publish as index_publish

PUBLISHER = """
import sys
from whale_dist.index import publish as index_publish
name = index_publish.version_name("m1")
print(name, flush=True)
index_publish.publish(sys.argv[1], name, {"version": name})
"""


@pytest.mark.parametrize(("candidate", "current", "expected"), [
    ("20260101T000000000000Z-m", None, True),
    ("20260101T000000000001Z-m", "20260101T000000000000Z-m", True),
    ("20260101T000000000000Z-m", "20260101T000000000001Z-m", False),
    ("20260101T000000000000Z-m", "20260101T000000000000Z-m", False),
    ("20260102T000000000000Z-a", "20260101T000000000000Z-z", True),  # time decides, not the model suffix
])
def test_latest_moves_only_forward(candidate, current, expected):
    assert index_publish.is_newer(candidate, current) is expected


def test_version_names_sort_by_creation_time():
    times = [dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=m) for m in (1, 10, 10**6, 10**9)]
    names = [index_publish.version_name(model, t) for t, model in zip(times, ["zz", "a", "m/1", "b"])]
    assert names == sorted(names)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_racing_publishers_leave_latest_on_the_newest(store, tmp_path, request):
    root = str(tmp_path / "indexes") if store == "local" else request.getfixturevalue("s3_bucket") + "/indexes"
    names = [f"20260101T0000{i:02d}000000Z-m" for i in range(12)]
    random.Random(0).shuffle(names)
    start = threading.Barrier(len(names))

    def publish(name):
        start.wait()
        index_publish.publish(root, name, {"version": name})

    threads = [threading.Thread(target=publish, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert storage.read_text(storage.join(root, "LATEST")).strip() == max(names)
    assert list_versions(root) == sorted(names)


def test_older_build_publishing_last_does_not_move_latest_back(tmp_path):
    root, markers = str(tmp_path / "indexes"), tmp_path / "failpoints"
    env = {**failpoints.env_vars("index.before_latest=pause", markers)}
    older = subprocess.Popen([sys.executable, "-c", PUBLISHER, root], stdout=subprocess.PIPE, text=True,
                             env={**_env(), **env})
    try:
        paused = failpoints.wait_paused("index.before_latest", markers, timeout=120, pid=older.pid)
        older_name = paused.context["version"]
        newer = subprocess.run([sys.executable, "-c", PUBLISHER, root], capture_output=True, text=True, env=_env(),
                               check=True, timeout=120)
        newer_name = newer.stdout.strip()
        assert newer_name > older_name
        assert resolve_version_url(root).endswith(newer_name)
        failpoints.resume(paused)
        assert older.wait(timeout=120) == 0
    finally:
        if older.poll() is None:
            older.kill()
    assert older.stdout.read().strip() == older_name
    assert storage.read_text(storage.join(root, "LATEST")).strip() == newer_name
    assert list_versions(root) == [older_name, newer_name]  # the older version is complete, just not LATEST


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in (failpoints.ENV, failpoints.DIR_ENV)}
