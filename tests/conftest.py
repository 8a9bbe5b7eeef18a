"""Session fixtures: a loopback S3 server (moto, real wire protocol) and a local Ray cluster; the rule that Ray runs
only in tests marked ``slow`` (so ``pytest -m "not slow"``, ``make test-fast``, starts no Ray).

Each fixture stops only what it started. The S3 environment is set before Ray starts so that Ray workers inherit
the endpoint and the (fake) credentials, exactly as workers on a cluster inherit them from the runtime environment.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (``derandomize``): a CI run on a fresh clone must not turn red
# because this run's random draw found what the last one missed (it did, once: a CSV row longer than its header).
# ``HYPOTHESIS_PROFILE=explore`` draws new examples, to look for such cases on purpose; each one found becomes an
# ``@example`` and a unit test.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A distinctive secret: tests assert it never appears in anything the jobs write.
TEST_SECRET = "wds3cr3t-" + "Zq7XbK2pLm9V"


_RAY_FIXTURE_STARTED = []  # the session's Ray, once ``ray_cluster`` has started it

# Ray Train's controller looks at its workers every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``): each training run
# then waits on average 1 s to notice that its workers finished or died. The suite trains about a dozen times; a
# 0.5 s look costs an RPC per worker and changes no outcome (set before either cluster starts, so their workers
# inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_runtest_setup(item):
    """A test that asks for the Ray cluster must be marked ``slow``: the fast suite starts no Ray."""
    if "ray_cluster" in item.fixturenames and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} uses ray_cluster but is not marked @pytest.mark.slow", pytrace=False)


@pytest.fixture(autouse=True)
def ray_only_in_slow_tests(request):
    """After a test not marked ``slow``: Ray must not have been started (by ``ray.init`` or ``ray_connect``)."""
    yield
    if request.node.get_closest_marker("slow") is None and not _RAY_FIXTURE_STARTED and "ray" in sys.modules:
        ray = sys.modules["ray"]
        if getattr(ray, "is_initialized", lambda: False)():
            ray.shutdown()
            pytest.fail(f"{request.node.nodeid} started Ray but is not marked @pytest.mark.slow", pytrace=False)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL and sets the standard AWS variables."""
    from whale_dist.local_s3 import loopback_s3

    with loopback_s3("testing-key", TEST_SECRET) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback server; yields ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray cluster for the whole session (4 logical CPUs on this 2-core machine), shut down at the end."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The raylet aborts when its dashboard agent has not registered within 15 s (ray-project/ray#65983); importing
    # the agent alone can take longer than that on a busy 2-core machine.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    _RAY_FIXTURE_STARTED.append(True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def head(s3_server):
    """A ``ray start --head`` cluster for the ``ray job submit`` tests (tests/ray_head.py), one for the session: its
    environment, like a cluster node's, holds the storage endpoint and credentials."""
    from ray_head import ray_head

    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` = this venv
    env["RAY_AUTH_MODE"] = "disabled"
    with ray_head(env, num_cpus=4) as started:
        yield started


@pytest.fixture(scope="session")
def submitted_catalogue(head, s3_server):
    """A catalogue built the user's way once for the session, on ``head`` and its own bucket: the survey written,
    then ``train`` (one epoch), ``embed`` (the catalogue's manifest) and ``index``, each a ``ray job submit``
    (tests/ray_head.py). The submit test goes on to ``identify`` from it and checks every job's log for the secret;
    the nightly-loop test grows a copy. Two job submissions (embed, index) and a survey fewer than each test
    building its own."""
    from types import SimpleNamespace

    import boto3
    from ray_head import submit_job

    from whale_dist import storage
    from whale_dist.config import load_config
    from whale_dist.synth.survey import generate_survey

    bucket = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    config = "configs/debug.yaml"
    common = ["--config", config, f"root=s3://{bucket}/store"]
    cfg = load_config(config, common[2:])
    transcript: list[str] = []
    # the survey is written in-process (``synth`` is a data generator, not a pipeline stage; its entry point is
    # tested in tests/test_synth.py)
    generate_survey(cfg.synth, cfg.survey_url)
    submit_job(head, "train", ["jobs/train.py", *common, "train.epochs=1"], transcript)
    manifest = f"{cfg.survey_url}/train_manifest.csv"
    submit_job(head, "embed", ["jobs/embed.py", *common, "--manifest", manifest], transcript)
    submit_job(head, "index", ["jobs/index.py", *common], transcript)
    version = storage.read_json(storage.join(cfg.run_url, "model.json"))["version"]
    return SimpleNamespace(config=config, common=common, cfg=cfg, version=version, transcript=transcript)
