"""``whale-dist identify``: embed query photos, search the published catalogue, propose top-5 or ``new_individual``.

``identify --catalogue URL --images URL|manifest --out URL`` writes ``predictions.parquet`` (top-k ids, similarities,
best-matching catalogue photos, the threshold used), ``submission.csv`` (Kaggle ``image,predictions``) and
``report/index.html`` for review. Query photos go through the nightly job's own pipeline (``embed.embed_source``) so
they are decoded, cropped and embedded exactly like the catalogue; photos that fail are kept as rows with their error.
"""

from __future__ import annotations

import sys

import numpy as np

from whale_dist import embed, storage
from whale_dist.config import ConfigError, config_from_argv, dump_config
from whale_dist.embed import store as embed_store
from whale_dist.identify.calibrate import load_calibration
from whale_dist.identify.ranking import open_catalogue, predict, predictions_table, rank_queries, submission_csv
from whale_dist.identify.render import render_report

FLAGS = {"--catalogue": "identify.catalogue", "--images": "identify.images", "--out": "identify.out",
         "--threshold": "identify.threshold", "--name": "identify.name"}


def thresholds_for_run(cfg, catalogue) -> dict:
    """A fixed ``identify.threshold`` when set (>= 0), else the calibration saved for this catalogue's model."""

    if cfg.identify.threshold >= 0:
        return {"global": float(cfg.identify.threshold), "per_species": {}}
    return load_calibration(cfg.identify_catalogue, catalogue.model_version)


def embed_queries(cfg, version: str):
    """(query rows, their embeddings, error rows) with the nightly job's own pipeline, under ``{out}``.

    Only this run's photos are returned (the store under ``{out}`` may hold earlier ones; they are not re-embedded).
    """
    from whale_dist.model import load_card  # model.py imports torch

    if not cfg.identify.images:
        raise ConfigError("nothing to identify: set --images (a folder of photos or a manifest file)")
    if load_card(cfg.model_url).version != version:
        raise ConfigError(f"model {cfg.model_url} is not the model of the catalogue ({version}): set embed.model")
    out = cfg.identify_out
    embed.embed_source(cfg.identify.images, out, cfg.model_url, cfg.embed)
    keys = set(embed.load_work(cfg.identify.images)[0]["image_key"])
    table, vectors = embed_store.read_embeddings(out, version)
    keep = np.flatnonzero(table["image_key"].isin(keys).to_numpy())
    errors = embed_store.read_errors(out, version)
    errors = errors[errors["image_key"].isin(keys)].reset_index(drop=True)
    return table.iloc[keep].reset_index(drop=True), vectors[keep], errors


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
    import io

    out = cfg.identify_out
    catalogue = open_catalogue(cfg.identify_catalogue)
    calibration = thresholds_for_run(cfg, catalogue)
    queries, vectors, errors = embed_queries(cfg, catalogue.model_version)
    ranked = rank_queries(catalogue, vectors, queries, cfg.identify)
    predictions, thresholds = predict(ranked, calibration, cfg.identify.k, cfg.identify.per_species_threshold)
    table = with_errors(predictions_table(queries, ranked, predictions, thresholds), errors)
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
            "report": report, "queries": len(queries), "new": new, "errors": len(errors)}


def kaggle_rows(table, catalogue, k: int):
    """Kaggle refuses a submission that misses a test image: a photo that failed keeps its row in submission.csv,
    proposing ``new_individual`` then the catalogue's most photographed individuals (the best guess without pixels)."""
    from whale_dist.catalog import NEW_INDIVIDUAL

    ids = catalogue.metadata["individual_id"]
    counts = ids[ids != ""].value_counts()
    fallback = [NEW_INDIVIDUAL, *sorted(counts.index, key=lambda name: (-counts[name], name))[: max(0, k - 1)]]
    return table.assign(predictions=[list(p) if len(p) else fallback for p in table["predictions"]])


def main(argv: list[str] | None = None) -> int:
    """``whale-dist identify --catalogue URL --images URL|manifest --out URL [--config FILE] [key=value ...]``."""

    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), FLAGS)
    run_identify(cfg)
    dump_config(cfg, cfg.identify_out)
    return 0

