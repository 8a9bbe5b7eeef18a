"""Embedding under faults, each struck at a failpoint so the state at the fault is known exactly: an embedder actor
SIGKILLed while it holds a batch, the driver SIGKILLed after N published chunks and the job re-run, the S3 server gone
while the driver is between chunks. After each, the finished output holds every input exactly once across embeddings
and errors, and no photo is lost to the fault (the only error rows are the deliberately broken photos).

The driver is a separate process attached to the session's Ray cluster (as ``ray job submit`` attaches one), with
the failpoints armed in it and, through its job's runtime_env, in its actors; a test waits for the pause marker,
asserts the state there, then SIGKILLs the paused process or resumes it. Nothing here waits for a duration to pass.
"""

from __future__ import annotations

import io
import os
import re
import signal
from collections import Counter

import pytest
from fault_log import record
from helpers import (
    BROKEN,
    await_pause,
    chunk,
    finish,
    good_keys,
    kill_paused,
    make_model,
    photo_bytes,
    start_driver,
    survey_files,
)

from whale_dist import embed, failpoints, storage
from whale_dist.config import load_config
from whale_dist.embed import store as embed_store

N_EXTRA = 6


def setup_night(bucket: str, **overrides):
    """A survey night (good photos, a tar shard, the broken files of ``BROKEN``, a few more photos) and a model."""
    embed_cfg = {"rows_per_partition": 3, "decode_batch_size": 3, "batch_size": 3, "actor_num_cpus": 0.5,
                 "num_actors": 1, **overrides}
    argv = [f"root={bucket}/store", f"embed.images={bucket}/night", *[f"embed.{k}={v}" for k, v in embed_cfg.items()]]
    cfg = load_config(None, argv)
    card = make_model(cfg.model_url)
    files = {**survey_files(), **{f"extra/{i:03d}.jpg": photo_bytes(200 + i) for i in range(N_EXTRA)}}
    for name, data in files.items():
        storage.write_bytes(storage.join(cfg.embed.images, name), data)
    inputs = good_keys() | set(BROKEN) | {name for name in files if name.startswith("extra/")}
    return cfg, card, inputs, ["embed", *argv]


def published_keys(cfg, version: str) -> set[str]:
    return embed_store.done_keys(cfg.embed_out, version, embed_store.published(cfg.embed_out, version))


def exactly_once(cfg, version: str, inputs: set[str]) -> dict:
    """Counts over the finished store: lost, duplicated, embedded, errors, errors that are not broken photos,
    unpublished files; asserts they are those of a clean run."""
    frame, vectors = embed.read_embeddings(cfg.embed_out, version)
    errors = embed.read_errors(cfg.embed_out, version)
    keys = Counter(list(frame["image_key"]) + list(errors["image_key"]))
    leftovers = [u for u in storage.list_files(storage.join(cfg.embed_out, "embeddings"))
                 + storage.list_files(storage.join(cfg.embed_out, "errors"))
                 if "/_runs/" not in u and u.endswith(".parquet") and not storage.is_done(u)]
    counts = {"inputs": len(inputs), "lost": len(inputs - set(keys)), "duplicated": sum(n - 1 for n in keys.values()),
              "embedded": len(frame), "errors": len(errors), "unpublished_files": len(leftovers),
              "errors_not_broken_photos": len(set(errors["image_key"]) - set(BROKEN))}
    assert len(vectors) == len(frame)
    assert set(keys) == inputs, counts
    assert counts["duplicated"] == counts["errors_not_broken_photos"] == counts["unpublished_files"] == 0, counts
    assert counts["embedded"] == len(inputs) - len(BROKEN), counts
    return counts


# --- an embedder actor killed while it holds a batch -----------------------------------------------------------------


@pytest.mark.slow
def test_embedder_actor_killed_mid_run(ray_cluster, s3_bucket, tmp_path):
    # One photo per batch: the actor's 3rd call holds exactly one photo. (The driver is not paused too: Ray Data may
    # hold an actor's earlier outputs until its task ends, so "N chunks published" is not a state the actor waits on.)
    cfg, card, inputs, argv = setup_night(s3_bucket, rows_per_partition=1, decode_batch_size=1, batch_size=1)
    log = tmp_path / "driver.log"
    driver = start_driver(argv, log, "embed.actor_batch=2*off->1*pause", tmp_path)
    try:
        actor = await_pause("embed.actor_batch", tmp_path, driver, log)
        assert actor.hit == 3 and len(actor.context["keys"]) == 1 and actor.pid != driver.pid, actor
        held = actor.context["keys"][0]
        published_at_kill = published_keys(cfg, card.version)
        assert held not in published_at_kill and len(published_at_kill) <= 2  # at most its two finished photos
        kill_paused(actor)
        # Ray Data restarts the actor (a new process: its failpoint counts from 0) and retries what it held
        restarted = await_pause("embed.actor_batch", tmp_path, driver, log, exclude=(actor.pid,))
        assert restarted.hit == 3 and restarted.pid != actor.pid
        failpoints.resume(restarted)
        status, output = finish(driver, log)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert status == 0, output[-4000:]  # one lost actor does not fail the job: no re-run needed
    counts = exactly_once(cfg, card.version, inputs)
    assert held in published_keys(cfg, card.version)
    record("embedder actor SIGKILLed holding a batch (failpoint embed.actor_batch)", injected=1, failed_runs=0,
           chunks_published_at_kill=len(published_at_kill), **counts)


# --- the driver killed after N published chunks, then the job re-run ------------------------------------------------


@pytest.mark.slow
def test_driver_killed_then_job_rerun(ray_cluster, s3_bucket, tmp_path):
    cfg, card, inputs, argv = setup_night(s3_bucket)
    log = tmp_path / "driver.log"
    driver = start_driver(argv, log, "embed.chunk_published=1*off->1*pause", tmp_path)
    try:
        paused = await_pause("embed.chunk_published", tmp_path, driver, log)
        assert paused.context["published"] == 2 and paused.pid == driver.pid
        published = embed_store.published(cfg.embed_out, card.version)
        done_at_kill = published_keys(cfg, card.version)
        assert len(published) == 2 and len(done_at_kill) == 2 * cfg.embed.rows_per_partition
        kill_paused(paused)
        status, output = finish(driver, log)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert status == -signal.SIGKILL, output[-4000:]
    assert embed_store.published(cfg.embed_out, card.version) == published  # nothing moved after the kill
    summary = embed.run_embed(cfg)  # the re-run, as the next night's schedule would do it
    assert summary["skipped"] == len(done_at_kill)  # exactly the published chunks were not redone
    assert summary["embedded"] + summary["errors"] == len(inputs) - len(done_at_kill)
    counts = exactly_once(cfg, card.version, inputs)
    record("embed driver SIGKILLed after 2 published chunks, job re-run (failpoint embed.chunk_published)",
           injected=1, chunks_published_at_kill=len(published), rerun_skipped=summary["skipped"], **counts)


# --- the S3 server gone mid-run, then back ----------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_outage_mid_run(ray_cluster, s3_bucket, s3_server, tmp_path):
    from helpers import S3Switch

    cfg, card, inputs, argv = setup_night(s3_bucket)
    s3 = S3Switch(s3_server)
    log = tmp_path / "outage.log"
    # a short retry budget (embed.retry_attempts: 0.5 s instead of 15.5 s) reaches the same give-up path sooner
    driver = start_driver([*argv, "embed.retry_attempts=2"], log, "embed.chunk_published=1*pause", tmp_path,
                          env={"AWS_ENDPOINT_URL": s3.endpoint})
    try:
        paused = await_pause("embed.chunk_published", tmp_path, driver, log)
        assert paused.context["published"] == 1 and len(embed_store.published(cfg.embed_out, card.version)) == 1
        done_before = published_keys(cfg, card.version)
        s3.stop()  # S3 is gone for the driver and its workers until the run has given up
        failpoints.resume(paused)
        status, output = finish(driver, log)
    finally:
        if driver.poll() is None:
            driver.kill()
        s3.stop()
    # outlasting every retry, the run stops with one error line, no traceback, and keeps what it published
    lines = output.strip().splitlines()
    first_status = status
    assert status == 1 and "Traceback" not in output, output[-4000:]
    assert re.fullmatch(r"whale-dist: error: embedding stopped \(.*\); published partitions are kept, re-run to "
                        r"resume", lines[-1]), lines[-1]
    assert published_keys(cfg, card.version) == done_before
    assert not set(embed.read_errors(cfg.embed_out, card.version)["image_key"]) - set(BROKEN)  # no outage errors
    s3.start()  # S3 is back (the same endpoint): the re-run resumes
    log = tmp_path / "rerun.log"
    status, output = finish(start_driver(argv, log, env={"AWS_ENDPOINT_URL": s3.endpoint}), log)
    s3.stop()
    assert status == 0, output[-4000:]
    skipped = int(re.search(r"skipped \(already done\) (\d+)", output).group(1))
    assert skipped == len(done_before) == cfg.embed.rows_per_partition
    counts = exactly_once(cfg, card.version, inputs)
    record("S3 gone after the first published chunk until the run gave up, then back (failpoint "
           "embed.chunk_published)", injected=1, chunks_published_before_outage=1, first_run_exit=first_status,
           connections_dropped=s3.dropped, rerun_skipped=skipped, **counts)


def test_a_partition_published_by_another_process_is_readable_here(s3_bucket):
    """A reader that listed the store before another process published a chunk must see and read that chunk (a
    cached S3 listing made ``read_bytes``/``is_done`` deny it: FileNotFoundError on a published partition)."""
    import boto3
    import numpy as np
    import pyarrow.parquet as pq

    out, version = f"{s3_bucket}/store", "mpub"
    embed_store.publish_chunk(out, version, 0, *chunk(["a", "b", "c"], version))
    assert len(embed.read_embeddings(out, version)[0]) == 2  # this process has now listed the folders
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])  # another writer, another cache
    bucket = s3_bucket.removeprefix("s3://")
    for table, folder in zip(chunk(["d", "e", "f"], version), ("embeddings", "errors")):
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        key = f"store/{folder}/model={version}/part-00001.parquet"
        client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
        client.put_object(Bucket=bucket, Key=key + ".done", Body=b"{}")
    frame, vectors = embed.read_embeddings(out, version)
    assert list(frame["image_key"]) == ["a", "b", "d", "e"] and np.isfinite(vectors).all()
    assert embed_store.done_keys(out, version, embed_store.published(out, version)) == set("abcdef")
    record("partition published by another process after this one listed the store", injected=1,
           lost=6 - len(embed_store.done_keys(out, version, embed_store.published(out, version))))
