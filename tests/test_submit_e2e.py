"""The user's path, end to end: a Ray head started with ``ray start --head`` on loopback ports, every pipeline job
(train, embed, index, identify) submitted with ``ray job submit --runtime-env cluster/runtime_env.yaml
--working-dir .`` exactly as docs/CLUSTER.md says, the data on a loopback S3 server (train, embed and index by the
session's ``submitted_catalogue`` fixture, which the nightly-loop test shares). Only the head the suite started is
stopped (see tests/ray_head.py).

Storage credentials reach the jobs the way they do on a real cluster: from the cluster's environment (here the
environment of ``ray start``; on AWS the instance profile), not from the submitter -- ``ray job submit`` runs without
any AWS variable. The secret must then appear nowhere: not in job logs, job metadata, Ray's own logs or the outputs.
"""

from __future__ import annotations

import io
import os

import pytest
from conftest import TEST_SECRET
from ray_head import RayHead, job_cli, submit_job

from whale_dist import storage
from whale_dist.embed import store as embed_store

pytestmark = pytest.mark.slow


def object_texts(root: str) -> dict[str, bytes]:
    return {url: storage.read_bytes(url) for url in storage.list_files(root)}


def temp_dir_hits(temp_dir: str, needle: bytes) -> list[str]:
    hits = []
    for folder, _, files in os.walk(temp_dir):
        for name in files:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as handle:
                    if needle in handle.read():
                        hits.append(path)
            except OSError:
                continue
    return hits


def test_jobs_submitted_with_ray_job_submit_run_the_pipeline(head, submitted_catalogue):
    """train -> embed -> index were submitted by the ``submitted_catalogue`` fixture (conftest.py); their outputs are
    checked here, then ``identify`` is submitted and every job's log, Ray's files and the outputs are searched for
    the secret."""
    built = submitted_catalogue
    cfg, common = built.cfg, built.common
    assert storage.exists(f"{cfg.survey_url}/train_manifest.csv")
    assert storage.exists(cfg.model_url)
    assert embed_store.published(cfg.embed_out, built.version)
    first_index = latest(cfg)
    assert first_index and storage.exists(storage.join(cfg.index_root, first_index, "manifest.json"))

    # calibration runs in-process in tests/test_identify.py; here a fixed threshold saves one submission
    transcript = list(built.transcript)
    submit_job(head, "identify", ["jobs/identify.py", *common, "--images", f"{cfg.survey_url}/test_manifest.csv",
                                  "identify.threshold=0.5"], transcript)
    assert len(transcript) == 4  # train, embed, index, identify
    check_identify_outputs(cfg)

    check_no_secret(head, cfg.root, transcript)


def latest(cfg) -> str:
    url = storage.join(cfg.index_root, "LATEST")
    return storage.read_text(url).strip() if storage.exists(url) else ""


def check_identify_outputs(cfg) -> None:
    import pandas as pd

    out = cfg.identify_out
    table = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(out, "predictions.parquet"))))
    queries = pd.read_csv(io.BytesIO(storage.read_bytes(f"{cfg.survey_url}/test_manifest.csv")))
    assert len(table) == len(queries) and all(len(p) == cfg.identify.k for p in table["predictions"])
    assert len(storage.read_text(storage.join(out, "submission.csv")).strip().splitlines()) == len(queries) + 1
    assert [url for url in storage.list_files(out, (".html",)) if "report" in url]


def check_no_secret(head: RayHead, root: str, transcript: list[str]) -> None:
    """The secret reached the jobs (they read S3) but was written nowhere: logs, job info, Ray's files, outputs."""
    secret = TEST_SECRET.encode()
    assert not [i for i, text in enumerate(transcript) if TEST_SECRET in text], "secret in a job log"
    assert TEST_SECRET not in job_cli(head, "list"), "secret in the job metadata (runtime env?)"
    assert not temp_dir_hits(head.temp_dir, secret), "secret in Ray's session files"
    objects = object_texts(root)
    assert objects and not [url for url, data in objects.items() if secret in data], "secret in an output"
