"""The nightly job: embed a survey night's new photos, propose matches against the catalogue, write the night's review
folder -- safe to run twice.

``whale-dist nightly --config FILE --images URL [--night NAME]`` (``URL`` = that night's photos: folders and/or tar
shards; ``{night}`` in it stands for the night's name, so a scheduled run can pass ``--images
s3://bucket/surveys/{night}/``). The photos are embedded into the query store (``nightly.store``, default
``{root}/queries``), not the catalogue's: until a person confirms them they are queries, and the index holds the
catalogue only. Their keys are ``<night>/<path under URL>``, so two nights' ``IMG_0001.jpg`` stay two photos. Then
the night is identified with ``identify``'s own code against the catalogue's ``LATEST`` index, writing
``{surveys}/<night>/``: ``predictions.parquet``, ``submission.csv``, ``report/index.html`` + ``report/decisions.csv``
(the review template that ``whale-dist review`` reads back) and ``summary.json`` last.

A scheduler can fire late, twice or after a failure. Embedding is exactly-once by construction (``embed.store``); a
rerun that embeds nothing and finds the same photos, index version and identify settings as the night's
``summary.json`` leaves every output as it is. What a night costs follows its photos: the store answers "already
embedded?" from its keys files and only the partitions holding the night's rows are read.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import sys
import time

from whale_dist import embed, storage
from whale_dist.config import Config, ConfigError, config_from_argv, dump_config
from whale_dist.model_card import load_card

FLAGS = {"--images": "embed.images", "--model": "embed.model", "--night": "nightly.night"}
SUMMARY = "summary.json"


def night_name(cfg: Config) -> str:
    """``nightly.night``, or today's UTC date; one safe path segment (it names a folder and prefixes keys)."""
    night = cfg.nightly.night or time.strftime("%Y-%m-%d", time.gmtime())
    if storage.safe_relative_path(night) != night or "/" in night:
        raise ConfigError(f"nightly.night '{night}' must be one plain name (letters, digits, '.', '_', '-')")
    return night


def night_url(cfg: Config, night: str) -> str:
    return storage.join(cfg.surveys_url, night)


def night_work(cfg: Config, night: str):
    """The night's photos as a work table, keys prefixed with the night."""
    work, _ignored = embed.load_work(cfg.embed.images, manifest=False)
    work["image_key"] = night + "/" + work["image_key"]
    return work


def run_inputs(cfg: Config, work, catalogue) -> dict:
    """What the night's outputs are a function of: its photos (keys and fingerprints), the index version and the
    identify settings; equal inputs give equal outputs."""
    digest = hashlib.sha256()
    for key, fingerprint in zip(work["image_key"], work["fingerprint"]):
        digest.update(f"{key}\t{fingerprint}\n".encode())
    settings = {k: v for k, v in dataclasses.asdict(cfg.identify).items() if k not in ("out", "images", "name")}
    return {"photos": digest.hexdigest(), "index_version": catalogue.version,
            "model_version": catalogue.model_version, "identify": settings}


def unchanged(url: str, inputs: dict, embedded: dict) -> bool:
    """True when this night was already written from ``inputs`` and this run embedded nothing new."""
    if embedded["embedded"] or embedded["errors"] or not storage.exists(storage.join(url, SUMMARY)):
        return False
    return storage.read_json(storage.join(url, SUMMARY)).get("inputs") == inputs


def check_model(cfg: Config, catalogue) -> None:
    if not storage.exists(cfg.model_url):
        raise ConfigError(f"model not found: {cfg.model_url} (train first, or set --model)")
    version = load_card(cfg.model_url).version
    if version != catalogue.model_version:
        raise ConfigError(f"model {cfg.model_url} ({version}) is not the model of the catalogue index "
                          f"({catalogue.model_version}): embed the catalogue with it and index again, or set --model")


def run_nightly(cfg: Config) -> dict:
    """Embed the night's new photos, then identify them against ``LATEST`` unless the outputs are already current."""
    from whale_dist import identify
    from whale_dist.identify.job import identify_embedded, read_queries, resolve_model, thresholds_for_run

    if not cfg.embed.images or cfg.embed.manifest:
        raise ConfigError("nightly needs --images (the night's photos, e.g. s3://bucket/surveys/2026-11-26/) and no "
                          "embed.manifest")
    night = night_name(cfg)
    cfg.embed.images = cfg.embed.images.replace("{night}", night)  # a schedule names one URL for every night
    catalogue = identify.open_catalogue(cfg.identify_catalogue, cfg.index.use_gpu)
    resolve_model(cfg, catalogue)
    check_model(cfg, catalogue)
    calibration = thresholds_for_run(cfg, catalogue)
    work = night_work(cfg, night)
    embedded = embed.embed_source(cfg.embed.images, cfg.query_store, cfg.model_url, cfg.embed, work=work)
    print(f"nightly {night}: seen {embedded['seen']}, embedded {embedded['embedded']}, skipped (already done) "
          f"{embedded['skipped']}, errors {embedded['errors']}", flush=True)
    out, inputs = night_url(cfg, night), run_inputs(cfg, work, catalogue)
    if unchanged(out, inputs, embedded):
        print(f"nightly {night}: outputs in {storage.redact(out)} are current (index {catalogue.version}); "
              "left as they are", flush=True)
        return {**storage.read_json(storage.join(out, SUMMARY)), "embedded_now": 0}
    queries, vectors, errors = read_queries(cfg.query_store, catalogue.model_version, work["image_key"])
    night_cfg = copy.deepcopy(cfg)
    night_cfg.identify.out, night_cfg.identify.name = out, night
    result = identify_embedded(night_cfg, catalogue, calibration, queries, vectors, errors)
    summary = {"night": night, "seen": embedded["seen"], "embedded": embedded["embedded"],
               "skipped": embedded["skipped"], "errors": result["errors"], "proposed_matches": result["matches"],
               "probably_new": result["new"], "model_version": catalogue.model_version,
               "index_version": catalogue.version, "catalogue": storage.redact(cfg.identify_catalogue),
               "report": result["report"], "decisions": storage.join(out, "report", "decisions.csv"),
               "inputs": inputs}
    dump_config(night_cfg, out)
    storage.write_json(storage.join(out, SUMMARY), summary)  # last: the night is complete when it exists
    print(f"nightly {night}: {summary['proposed_matches']} proposed matches, {summary['probably_new']} probably new, "
          f"{summary['errors']} failed; review {storage.redact(summary['decisions'])}", flush=True)
    return {**summary, "embedded_now": embedded["embedded"]}


def main(argv: list[str] | None = None) -> int:
    """``whale-dist nightly --config FILE --images URL [--night NAME] [--model URL] [key=value ...]``."""
    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), FLAGS)
    run_nightly(cfg)
    return 0
