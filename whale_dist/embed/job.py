"""``whale-dist embed``: the job that runs the ``Embedder`` (``embed.embedder``) over new survey photos.

``embed_source`` runs the whole pipeline (list -> skip what is done -> Ray Data
-> published parquet chunks) for one archive prefix or manifest into one output root; ``run_embed(cfg)`` and
``main(argv)`` are the job entry points (``jobs/embed.py``, ``whale-dist embed``). See ``embed_store`` for the
layout and how exactly-once and resuming work.
"""

from __future__ import annotations

import sys
import time

from whale_dist import ray_connect, storage
from whale_dist.config import Config, ConfigError, EmbedConfig, config_from_argv, dump_config
from whale_dist.embed import pipeline as embed_pipeline
from whale_dist.embed import sources as embed_sources
from whale_dist.embed import store as embed_store
from whale_dist.errors import USER_ERRORS
from whale_dist.model_card import load_card

FLAGS = {"--images": "embed.images", "--manifest": "embed.manifest", "--model": "embed.model", "--out": "embed.out"}
MANIFEST_SUFFIXES = (".csv", ".parquet")


def load_work(source: str, manifest: bool | None = None):
    """(work table, ignored files) of an archive prefix or a manifest (by suffix when ``manifest`` is None)."""
    if manifest is None:
        manifest = source.lower().endswith(MANIFEST_SUFFIXES)
    return (embed_sources.from_manifest(source), 0) if manifest else embed_sources.list_archive(source)


def embed_source(source: str, out: str, model_url: str, cfg: EmbedConfig, manifest: bool | None = None,
                 work=None) -> dict:
    """Embed every photo of ``source`` (or of a ready ``work`` table) not yet embedded by this model into ``out``."""
    start = time.perf_counter()
    card = load_card(model_url)
    work, ignored = load_work(source, manifest) if work is None else (work, 0)
    done = embed_store.published(out, card.version)
    embed_store.remove_unpublished(out, card.version, done)
    todo = embed_pipeline.plan_chunks(work, embed_store.done_fingerprints(out, card.version, done, work["image_key"]),
                                      max(done, default=-1) + 1, cfg.rows_per_partition)
    if len(todo):
        ray_connect.connect()
    run = embed_pipeline.run_pipeline(todo, out, model_url, card.version, card.image_size, cfg)
    if len(todo):
        embed_store.compact_keys(out, card.version)
    seconds = run["pipeline_s"]
    return {"model_version": card.version, "source": source, "out": out, "seen": len(work),
            "skipped": len(work) - len(todo), "ignored_files": ignored,
            "partitions": int(todo["partition"].nunique()), **run,
            "images_per_s": round(len(todo) / seconds, 1) if seconds > 0 and len(todo) else 0.0,
            "total_s": round(time.perf_counter() - start, 2)}


def run_embed(cfg: Config) -> dict:
    """The nightly job on a resolved config: embed, print one summary line, save config + summary beside the output."""
    if cfg.embed.images and cfg.embed.manifest:
        raise ConfigError("set at most one of embed.images (archive prefix) or embed.manifest (manifest file)")
    work = None
    if not (cfg.embed.images or cfg.embed.manifest):  # neither: the labelled catalogue of the config
        work = embed_sources.from_catalogue(cfg)
    source = cfg.embed.manifest or cfg.embed.images or cfg.catalogue_url
    summary = embed_source(source, cfg.embed_out, cfg.model_url, cfg.embed, manifest=bool(cfg.embed.manifest),
                           work=work)
    run_dir = storage.join(embed_store.embeddings_dir(cfg.embed_out, summary["model_version"]), "_runs",
                           time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    dump_config(cfg, run_dir)
    storage.write_json(storage.join(run_dir, "summary.json"), summary)
    print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: dict) -> str:
    return ("embed: seen {seen}, embedded {embedded}, skipped (already done) {skipped}, errors {errors}, "
            "{images_per_s} images/s (start-up {startup_s} s, then {steady_images_per_s} images/s; "
            "model {model_version}, {partitions} new partitions)").format(**summary)


def main(argv: list[str] | None = None) -> int:
    """``whale-dist embed [--config FILE] [--images URL | --manifest URL] [--model URL] [--out URL] [key=value]``."""
    cfg = config_from_argv(list(argv or []), FLAGS)
    if not storage.exists(cfg.model_url):
        raise FileNotFoundError(f"model not found: {cfg.model_url} (train first, or set --model)")
    try:
        run_embed(cfg)
    except _interruptions() as exc:  # storage outage, lost workers: what is published stays, a re-run resumes
        if isinstance(exc, USER_ERRORS):
            raise
        cause = getattr(exc, "cause", None) or exc
        text = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        print(storage.redact(f"whale-dist: error: embedding stopped ({type(cause).__name__}: {text}); "
                             "published partitions are kept, re-run to resume"), file=sys.stderr)
        return 1
    return 0


def _interruptions() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError  # S3 unreachable after every retry: EndpointConnectionError
    from ray.exceptions import RayError

    return (RayError, BotoCoreError, ConnectionError, TimeoutError, OSError)


read_embeddings = embed_store.read_embeddings
read_errors = embed_store.read_errors
