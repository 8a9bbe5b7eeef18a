"""Index publication under a real kill: the build's driver SIGKILLed at the two points between shard upload and
``LATEST``, each reached through a failpoint so the state there is known exactly.

``index.shards_written``: every shard is uploaded to S3, ``ids.parquet`` and ``manifest.json`` are not.
``index.before_latest``: the manifest is written, ``LATEST`` has not moved. At each pause the catalogue root still
loads the previous complete version with the same answers, then the paused driver is SIGKILLed; afterwards ``LATEST``
is unchanged and a re-run publishes a new version and moves it. (``test_index_build.py`` covers the same point with
an exception instead of a process death, on local storage.)
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from fault_log import record
from helpers import await_pause, clustered, finish, index_config, kill_paused, start_driver, write_partitions

from whale_dist import storage
from whale_dist.index import Catalogue, IndexIntegrityError, build_index, list_versions
from whale_dist.index.publish import IDS_FILE, LATEST, MANIFEST


def version_files(version_url: str) -> set[str]:
    return {url.rsplit("/", 1)[-1] for url in storage.list_files(version_url)}


@pytest.mark.slow
def test_index_build_killed_between_shards_and_manifest(ray_cluster, s3_bucket, tmp_path):
    root = f"{s3_bucket}/store"
    vectors = clustered(60)
    write_partitions(f"{root}/embeddings", "mK", vectors, rows_per_part=20)
    cfg = index_config(root, "index.num_shards=2")
    first = build_index(cfg)
    catalogue_root, first_name = cfg.index_root, first.rsplit("/", 1)[1]
    queries = vectors[:8]
    expected = Catalogue.load(catalogue_root).search(queries, k=5)
    argv = ["index", f"root={root}", "index.catalogue_name=test", "index.cpus_per_task=1", "index.num_shards=2"]

    def previous_version_is_served() -> None:
        seen = Catalogue.load(catalogue_root)
        assert seen.url == first and np.array_equal(seen.search(queries, k=5).ids, expected.ids)
        assert storage.read_text(storage.join(catalogue_root, LATEST)).strip() == first_name

    killed = {}
    for point in ("index.shards_written", "index.before_latest"):
        log = tmp_path / f"{point}.log"
        driver = start_driver(argv, log, f"{point}=pause", tmp_path)
        try:
            paused = await_pause(point, tmp_path, driver, log)
            half = storage.join(catalogue_root, paused.context["version"])
            files = version_files(half)
            shards = {name for name in files if name.startswith("shard-")}
            assert len(shards) == 2, files
            if point == "index.shards_written":  # shards uploaded, nothing that makes a version yet
                assert shards == set(paused.context["shards"]) and {IDS_FILE, MANIFEST}.isdisjoint(files), files
                with pytest.raises(IndexIntegrityError):
                    Catalogue.load(half)  # the half version cannot be loaded
            else:  # a complete version that LATEST does not name yet
                assert {IDS_FILE, MANIFEST} <= files, files
            previous_version_is_served()
            kill_paused(paused)
            status, output = finish(driver, log)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert status == -signal.SIGKILL, output[-3000:]
        previous_version_is_served()
        killed[point] = paused.context["version"]
    # only the build killed after its manifest left a version; LATEST never named either
    assert list_versions(catalogue_root) == sorted([first_name, killed["index.before_latest"]])
    second = build_index(cfg)  # the re-run publishes and moves LATEST
    after = Catalogue.load(catalogue_root)
    assert after.url == second and second > first and after.ntotal == len(vectors)
    assert np.array_equal(after.search(queries, k=5).ids, expected.ids)
    record("index build driver SIGKILLed after its shards and before LATEST moved (failpoints "
           "index.shards_written, index.before_latest)", injected=len(killed), latest_moved_by_killed_build=0,
           reader_saw_partial_or_error=0, versions_published_after_rerun=len(list_versions(catalogue_root)))
