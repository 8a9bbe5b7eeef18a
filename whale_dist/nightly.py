"""The nightly job: embed what is new under an archive prefix, then re-index and publish -- safe to run twice.

A scheduler (KubeRay RayCronJob, a Kubernetes CronJob, cron + ``ray job submit``) can fire late, twice, or after a
failure; each run must leave the store as if it had run once. Embedding is exactly-once by construction (published
partitions are skipped, see ``embed_store``). Publishing is guarded here: after a publish the job records what the
index was built from (model version, published embedding partitions, index settings) and which index version it
published; a later run that finds the same inputs and that version still ``LATEST`` publishes nothing. The record
lives beside the index (``{root}/nightly/<catalogue>/last_publish.json``) rather than inside it, so this guard does
not depend on the index's own file layout.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid

from whale_dist import embed, index, ray_connect, storage
from whale_dist.config import Config, ConfigError, config_from_argv, dump_config
from whale_dist.embed import store as embed_store

FLAGS = {"--images": "embed.images", "--model": "embed.model"}


def record_url(cfg: Config) -> str:
    return cfg.url("nightly", cfg.index.catalogue_name, "last_publish.json")


def index_inputs(cfg: Config, version: str) -> dict:
    """What an index built now would be built from; equal inputs give an equivalent index."""

    settings = dataclasses.asdict(cfg.index)
    settings["model_version"] = version
    return {"model_version": version, "partitions": embed_store.published(cfg.embed_out, version),
            "index": settings}


def latest_index_version(cfg: Config) -> str:
    latest = storage.join(cfg.index_root, "LATEST")
    return storage.read_text(latest).strip() if storage.exists(latest) else ""


def is_current(cfg: Config, inputs: dict) -> bool:
    """True when the published ``LATEST`` index was built by a previous run from exactly ``inputs``."""
    if not storage.exists(record_url(cfg)):
        return False
    record = storage.read_json(record_url(cfg))
    latest = latest_index_version(cfg)
    return bool(latest) and record.get("index_version") == latest and record.get("inputs") == inputs


def publish_index(cfg: Config, version: str) -> str:
    """Build and publish the index over every embedding of ``version``; returns the published index version."""

    ray_connect.connect()  # embed joined the cluster already; this is for a caller that did not
    cfg.index.model_version = version  # the archive may hold embeddings of older models too
    index.build_index(cfg)
    published = latest_index_version(cfg)
    if not published:
        raise RuntimeError(f"index build finished but {storage.join(cfg.index_root, 'LATEST')} is missing")
    return published


def run_nightly(cfg: Config) -> dict:
    """Embed new photos under ``embed.images``, then publish a new index version only if its inputs changed."""

    if not cfg.embed.images or cfg.embed.manifest:
        raise ConfigError("nightly needs embed.images (the archive prefix, e.g. s3://bucket/surveys/) and no "
                          "embed.manifest")
    embedded = embed.run_embed(cfg)
    version = embedded["model_version"]
    inputs = index_inputs(cfg, version)
    summary = {"model_version": version, "embedded": embedded["embedded"], "errors": embedded["errors"],
               "partitions": len(inputs["partitions"]), "published": False, "index_version": ""}
    if not inputs["partitions"]:
        print("nightly: no embeddings of this model yet; nothing to index", flush=True)
    elif is_current(cfg, inputs):
        summary["index_version"] = latest_index_version(cfg)
        print(f"nightly: index {summary['index_version']} already covers these {summary['partitions']} partitions "
              "of model " + version + "; nothing published", flush=True)
    else:
        summary["index_version"] = publish_index(cfg, version)
        summary["published"] = True
        storage.write_json(record_url(cfg), {"inputs": inputs, "index_version": summary["index_version"]})
        print(f"nightly: published index {summary['index_version']} over {summary['partitions']} partitions "
              f"of model {version}", flush=True)
    save_run(cfg, summary)
    return summary


def save_run(cfg: Config, summary: dict) -> None:
    """The resolved config and the summary of this run, next to the publish record (one folder per run, even two
    runs in the same second: a scheduler's retry must not overwrite the record of the run it retries)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    run_dir = cfg.url("nightly", cfg.index.catalogue_name, "runs", stamp)
    dump_config(cfg, run_dir)
    storage.write_json(storage.join(run_dir, "summary.json"), summary)


def main(argv: list[str] | None = None) -> int:
    """``whale-dist nightly [--config FILE] [--images URL] [--model URL] [key=value ...]``."""
    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), FLAGS)
    if not storage.exists(cfg.model_url):
        raise FileNotFoundError(f"model not found: {cfg.model_url} (train first, or set --model)")
    run_nightly(cfg)
    return 0
