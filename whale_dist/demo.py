"""``make demo``: the whole pipeline on a synthetic survey, on this machine, through the cluster code paths.

The survey, model, embeddings and index live in an embedded S3-compatible server (moto) on loopback, so the demo
exercises the object-storage path exactly as a cluster run does; human-facing outputs (report, plots) are copied to
``demo-output/``. Each stage is a small callable run in order and timed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

from whale_dist import embed, identify, index, pretrained, storage, train
from whale_dist.config import Config, config_from_argv, dump_config
from whale_dist.local_s3 import loopback_s3
from whale_dist.synth import survey as synth

LOCAL_OUTPUT = "demo-output"


@contextmanager
def demo_bucket(bucket: str):
    """The loopback S3 server with the demo's bucket in it (fake, distinctive credentials: never real ones)."""
    import boto3

    with loopback_s3("loopback-demo-key", "loopback-demo-secret") as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint


@contextmanager
def local_ray():
    """A local Ray instance for the demo (jobs themselves call plain ``ray.init()``, which then attaches to it).

    Four logical CPUs on a small machine leave room for Ray Data's read tasks beside the training worker and the
    embedder actors (whole-CPU actors on 2 CPUs starve the read tasks).
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The raylet aborts when its dashboard agent has not registered within 15 s (ray-project/ray#65983); importing
    # the agent alone can take longer than that on a busy 2-core machine.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    # With the dashboard, as every cluster and a plain ``ray.init()`` have it: Ray Train's placement-group cleaner asks
    # the State API (served by the dashboard) each second whether the training controller lives, and without it
    # logged a warning each time (~100 lines per demo). It costs ~1-2 s of start-up here.
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True, log_to_driver=True)  # epoch lines
    try:
        yield
    finally:
        ray.shutdown()


def stage_synth(cfg: Config, results: dict) -> None:
    results["survey"] = synth.generate_survey(cfg.synth, cfg.survey_url)


def stage_weights(cfg: Config, results: dict) -> None:
    """Publish offline ImageNet weights to object storage when the config asks for them and they are not there.

    The demo then loads its backbone exactly as a cluster without internet does: ``model.backbone_weights`` = URL.
    """

    url = cfg.model.backbone_weights
    if url and cfg.model.backbone == pretrained.LITE0_BACKBONE and not storage.exists(url):
        results["weights"] = pretrained.write_efficientnet_lite0_weights(url)


def stage_train(cfg: Config, results: dict) -> None:
    results["train"] = train.run_training(cfg)


def stage_embed_catalogue(cfg: Config, results: dict) -> None:
    cfg.embed.manifest = storage.join(cfg.survey_url, "train_manifest.csv")
    results["embed"] = embed.run_embed(cfg)


def stage_index(cfg: Config, results: dict) -> None:
    results["index"] = index.build_index(cfg)


def stage_calibrate(cfg: Config, results: dict) -> None:
    results["calibration"] = identify.run_calibration(cfg)


def stage_identify(cfg: Config, results: dict) -> None:
    cfg.identify.images = storage.join(cfg.survey_url, "test_manifest.csv")
    results["identify"] = identify.run_identify(cfg)


def stage_evaluate(cfg: Config, results: dict) -> None:
    labels = storage.join(cfg.survey_url, "test_labels.csv")
    results["evaluate"] = identify.run_evaluation(cfg, labels)


STAGES: list[tuple[str, Callable[[Config, dict], None]]] = [
    ("synth", stage_synth),
    ("backbone weights", stage_weights),
    ("train", stage_train),
    ("embed catalogue", stage_embed_catalogue),
    ("index", stage_index),
    ("calibrate", stage_calibrate),
    ("identify test split", stage_identify),
    ("evaluate + report", stage_evaluate),
]


def run_stages(cfg: Config) -> dict:
    results: dict = {"timings": {}}
    for name, stage in STAGES:
        started = time.perf_counter()
        print(f"[demo] {name} ...", flush=True)
        stage(cfg, results)
        results["timings"][name] = time.perf_counter() - started
        print(f"[demo] {name} done in {results['timings'][name]:.1f} s", flush=True)
    return results


def bucket_of(root: str) -> str:
    if storage.scheme_of(root) != "s3":
        raise SystemExit(f"the demo keeps its data on a loopback S3 server: root must be s3://..., got {root}")
    return storage.strip_scheme(root).split("/")[0]


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(list(argv or []))
    os.makedirs(LOCAL_OUTPUT, exist_ok=True)
    if not cfg.identify.local_copy:
        cfg.identify.local_copy = LOCAL_OUTPUT
    started = time.perf_counter()
    with demo_bucket(bucket_of(cfg.root)) as endpoint, local_ray():
        print(f"[demo] object storage: {cfg.root} on the loopback S3 server {endpoint}", flush=True)
        dump_config(cfg, LOCAL_OUTPUT)
        results = run_stages(cfg)
    print_summary(results, time.perf_counter() - started)
    return 0


def print_summary(results: dict, seconds: float) -> None:
    evaluation = results.get("evaluate") or {}
    print("\n=== whale_dist demo ===")
    for name, value in evaluation.get("summary_lines", []):
        print(f"{name:<34} {value}")
    if "report" in evaluation:
        print(f"review report: {os.path.abspath(evaluation['report'])}")
    print(f"outputs on this machine: {os.path.abspath(LOCAL_OUTPUT)}")
    print(f"total time: {seconds / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
