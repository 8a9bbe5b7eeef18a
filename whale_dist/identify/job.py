"""``whale-dist identify``: embed query photos, search the published catalogue, propose top-5 or ``new_individual``.

``identify --catalogue URL --images URL|manifest --out URL`` writes ``predictions.parquet`` (top-k ids, similarities,
best-matching catalogue photos, the threshold used), ``submission.csv`` (Kaggle ``image,predictions``) and
``report/index.html`` for review. Query photos go through the nightly job's own pipeline (``embed.embed_source``) so
they are decoded, cropped and embedded exactly like the catalogue; photos that fail are kept as rows with their error.
"""

from __future__ import annotations

import sys

from whale_dist import embed, storage
from whale_dist.config import ConfigError, config_from_argv, dump_config
from whale_dist.embed import store as embed_store
from whale_dist.identify.calibrate import load_calibration
from whale_dist.identify.ranking import (
    head_species,
    open_catalogue,
    predict,
    predictions_table,
    rank_queries,
    ratio_threshold,
    resolve_model,
    submission_csv,
)
from whale_dist.identify.render import render_report
from whale_dist.model_card import load_card

FLAGS = {"--catalogue": "identify.catalogue", "--images": "identify.images", "--out": "identify.out",
         "--threshold": "identify.threshold", "--name": "identify.name", "--model": "embed.model",
         "--species": "identify.species", "--location": "identify.locations", "--date-from": "identify.date_from",
         "--date-to": "identify.date_to"}
LIST_FLAGS = ("--species", "--location")  # comma-separated on the command line, lists in the config
TEXT_FLAGS = ("--date-from", "--date-to")  # kept as text (YAML would read 2025-06-01 as a date)


def thresholds_for_run(cfg, catalogue) -> dict:
    """A fixed ``identify.threshold`` when set (>= 0), else the calibration saved for this catalogue's model."""

    if cfg.identify.threshold >= 0:
        return {"global": float(cfg.identify.threshold), "per_species": {}}
    return load_calibration(cfg.identify_catalogue, catalogue.model_version)


def embed_queries(cfg, version: str):
    """(query rows, their embeddings, error rows) with the nightly job's own pipeline, under ``{out}``.

    Only this run's photos are returned (the store under ``{out}`` may hold earlier ones; they are not re-embedded).
    """
    if not cfg.identify.images:
        raise ConfigError("nothing to identify: set --images (a folder of photos or a manifest file)")
    if load_card(cfg.model_url).version != version:
        raise ConfigError(f"model {cfg.model_url} is not the model of the catalogue ({version}): set embed.model")
    out = cfg.identify_out
    work = embed.load_work(cfg.identify.images)[0]
    embed.embed_source(cfg.identify.images, out, cfg.model_url, cfg.embed, work=work)
    return read_queries(out, version, work["image_key"])


def read_queries(store: str, version: str, keys):
    """(rows, embeddings, error rows) of ``keys`` from an embedding store, reading only the partitions that hold
    them (``embed.store.read_rows``): what identifying a night costs follows the night, not the store."""
    table, vectors = embed_store.read_rows(store, version, keys)
    return table, vectors, embed_store.read_error_rows(store, version, keys)


def with_errors(table, errors):
    """Failed photos stay in the output: a row with no prediction and the reason (never silently dropped)."""
    import pandas as pd

    table = table.assign(error="")
    failed = pd.DataFrame({"image": errors["image_key"], "url": errors["url"],
                           "error": [f"{s}: {m}" for s, m in zip(errors["stage"], errors["message"])]})
    for column in ("predictions", "scores", "match_keys", "match_urls", "candidate_species"):
        failed[column] = [[] for _ in range(len(failed))]
    text = {c: "" for c in ("encounter_id", "date", "location", "predicted_species") if c in table.columns}
    return pd.concat([table, failed], ignore_index=True).fillna(text)


def run_identify(cfg) -> dict:
    """The whole command on a resolved config; returns a summary with the output locations."""
    catalogue = open_catalogue(cfg.identify_catalogue, cfg.index.use_gpu)
    resolve_model(cfg, catalogue)
    calibration = thresholds_for_run(cfg, catalogue)
    queries, vectors, errors = embed_queries(cfg, catalogue.model_version)
    return identify_embedded(cfg, catalogue, calibration, queries, vectors, errors)


def identify_embedded(cfg, catalogue, calibration: dict, queries, vectors, errors) -> dict:
    """Rank embedded queries against ``catalogue`` and write predictions, submission and report to
    ``identify.out``: the part of ``identify`` that the nightly job shares (it embeds into its own store)."""
    import io

    out = cfg.identify_out
    ranked = rank_queries(catalogue, vectors, queries, cfg.identify)
    if cfg.identify.new_ratio > 0:
        calibration = {"global": ratio_threshold(ranked, cfg.identify.new_ratio), "per_species": {}}
    species, probability = head_species(cfg, catalogue.model_version, vectors)
    head = species if calibration.get("species_key") == "head" else None  # the rule its thresholds were chosen with
    predictions, thresholds = predict(ranked, calibration, cfg.identify.k, cfg.identify.per_species_threshold, head)
    table = predictions_table(queries, ranked, predictions, thresholds)
    table = with_errors(table.assign(predicted_species=species, species_probability=probability), errors)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(out, "predictions.parquet"), buffer.getvalue())
    submission = submission_csv(kaggle_rows(table, catalogue, cfg.identify.k))
    storage.write_text(storage.join(out, "submission.csv"), submission)
    report = render_report(cfg, table, calibration=calibration, model_version=catalogue.model_version)
    new = sum(1 for p in table["predictions"] if len(p) and p[0] == "new_individual")
    print(f"identify: {len(queries)} photos ranked against {storage.redact(cfg.identify_catalogue)} "
          f"({len(queries) - new} proposed matches, {new} probably new, {len(errors)} failed); "
          f"outputs in {storage.redact(out)}; report {report}")
    return {"predictions": storage.join(out, "predictions.parquet"), "submission": storage.join(out, "submission.csv"),
            "report": report, "queries": len(queries), "matches": len(queries) - new, "new": new,
            "errors": len(errors), "index_version": getattr(catalogue, "version", ""),
            "model_version": catalogue.model_version}


def list_flags(argv: list[str]) -> list[str]:
    """``--species a,b`` -> ``--species=[a, b]`` (a YAML list for the config's list keys); dates stay text."""
    out, items = [], list(argv)
    while items:
        item = items.pop(0)
        name, eq, value = item.partition("=")
        if name in LIST_FLAGS + TEXT_FLAGS and (eq or items):
            value = value if eq else items.pop(0)
            parts = [v.strip() for v in value.split(",") if v.strip()]
            item = f"{name}=[{', '.join(parts)}]" if name in LIST_FLAGS else f"{name}='{value}'"
        out.append(item)
    return out


def kaggle_rows(table, catalogue, k: int):
    """Kaggle refuses a submission that misses a test image: a photo that failed keeps its row in submission.csv,
    proposing ``new_individual`` then the catalogue's most photographed individuals (the best guess without pixels)."""
    from whale_dist.catalog import NEW_INDIVIDUAL

    if all(len(p) for p in table["predictions"]):
        return table.assign(predictions=[list(p) for p in table["predictions"]])
    ids = catalogue.metadata["individual_id"]
    counts = ids[ids != ""].value_counts().sort_index().sort_values(ascending=False, kind="stable")
    fallback = [NEW_INDIVIDUAL, *counts.index[: max(0, k - 1)]]
    return table.assign(predictions=[list(p) if len(p) else fallback for p in table["predictions"]])


def main(argv: list[str] | None = None) -> int:
    """``whale-dist identify --catalogue URL --images URL|manifest --out URL [--config FILE] [--model URL]
    [--species A,B] [--location L1,L2] [--date-from YYYY-MM-DD] [--date-to YYYY-MM-DD] [key=value ...]``."""

    cfg = config_from_argv(list_flags(list(sys.argv[1:] if argv is None else argv)), FLAGS)
    run_identify(cfg)
    dump_config(cfg, cfg.identify_out)
    return 0

