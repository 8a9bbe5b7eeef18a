"""The user's path, end to end: a Ray head started with ``ray start --head`` on loopback ports, every pipeline job
(train, embed, index, identify) submitted with ``ray job submit --runtime-env cluster/runtime_env.yaml
--working-dir .`` exactly as docs/CLUSTER.md says, the data on a loopback S3 server. Only the head started here is
stopped (see tests/ray_head.py).

Storage credentials reach the jobs the way they do on a real cluster: from the cluster's environment (here the
environment of ``ray start``; on AWS the instance profile), not from the submitter -- ``ray job submit`` runs without
any AWS variable. The secret must then appear nowhere: not in job logs, job metadata, Ray's own logs or the outputs.
"""

from __future__ import annotations

import io
import os
import subprocess
import uuid

import pytest
from conftest import TEST_SECRET
from ray_head import RAY_BIN, RayHead, diagnose

from whale_dist import storage
from whale_dist.config import load_config
from whale_dist.embed import store as embed_store
from whale_dist.synth.survey import generate_survey

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/debug.yaml"
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
JOB_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def submit_argv(head: RayHead, submission_id: str, job: list[str]) -> list[str]:
    """The documented submit line (plus an explicit submission id so the test can query the job)."""
    return [RAY_BIN, "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
            "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", "--", "python", *job]


def job_cli(head: RayHead, *args: str) -> str:
    result = subprocess.run([RAY_BIN, "job", *args, "--address", head.dashboard_url], cwd=REPO, text=True,
                            capture_output=True, env=head.client_env(drop=AWS_VARS), timeout=120)
    return result.stdout + result.stderr


def submit(head: RayHead, name: str, job: list[str], transcript: list[str]) -> str:
    """Submit ``python <job>`` from the repository root, wait, and require SUCCEEDED; returns the job's log (as
    ``submit`` printed it: one CLI call per job, each ``ray`` CLI start costs seconds of a 2-core machine)."""
    submission_id = f"wd-{name}-{uuid.uuid4().hex[:6]}"
    try:
        result = subprocess.run(submit_argv(head, submission_id, job), cwd=REPO, text=True, capture_output=True,
                                env=head.client_env(drop=AWS_VARS), timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job_cli(head, "stop", submission_id)
        pytest.fail(f"job {name} did not finish in {JOB_TIMEOUT_S} s:\n{job_cli(head, 'logs', submission_id)[-6000:]}")
    output = result.stdout + result.stderr  # ``submit`` follows the job's log to its end, then prints its status
    transcript.append(output)
    assert result.returncode == 0 and f"Job '{submission_id}' succeeded" in output, (
        f"job {name} failed:\n{output[-8000:]}\n{job_cli(head, 'status', submission_id)}\n{diagnose(head)}")
    return output


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


def test_jobs_submitted_with_ray_job_submit_run_the_pipeline(head, s3_bucket):
    cfg = load_config(CONFIG, [f"root={s3_bucket}/store"])
    common = ["--config", CONFIG, f"root={cfg.root}"]
    transcript: list[str] = []

    # the survey is written in-process (``synth`` is a data generator, not a pipeline stage; its entry point is
    # tested in tests/test_synth.py): one submission less keeps the suite's time down
    generate_survey(cfg.synth, cfg.survey_url)
    assert storage.exists(f"{cfg.survey_url}/train_manifest.csv")

    submit(head, "train", ["jobs/train.py", *common, "train.epochs=1"], transcript)
    version = storage.read_json(storage.join(cfg.run_url, "model.json"))["version"]
    assert storage.exists(cfg.model_url)

    manifest = f"{cfg.survey_url}/train_manifest.csv"
    submit(head, "embed", ["jobs/embed.py", *common, "--manifest", manifest], transcript)
    assert embed_store.published(cfg.embed_out, version)

    submit(head, "index", ["jobs/index.py", *common], transcript)
    first_index = latest(cfg)
    assert first_index and storage.exists(storage.join(cfg.index_root, first_index, "manifest.json"))

    # calibration runs in-process in tests/test_identify.py; here a fixed threshold saves one submission
    submit(head, "identify", ["jobs/identify.py", *common, "--images", f"{cfg.survey_url}/test_manifest.csv",
                              "identify.threshold=0.5"], transcript)
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
