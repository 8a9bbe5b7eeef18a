"""Ranking: per-individual candidates, encounter pooling, ``new_individual`` at the threshold, output tables.

One ranking code path serves ``calibrate``, ``identify`` and ``evaluate``: catalogue search hits (one row per query
and candidate individual, holding that individual's best-matching photo) -> optional encounter pooling -> top-k per
query (``protocol.rank_hits``, the same step training validation and the baselines use) -> ``new_individual``
inserted where similarity drops below the threshold of the query's predicted species (``predicted_species``: the
model's species head, else the best candidate's species, the same rule in ``calibrate`` and ``identify``).
The system only proposes: every row of the report is a candidate list for a person to confirm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from whale_dist import storage
from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.config import ConfigError
from whale_dist.index import Catalogue, IndexIntegrityError
from whale_dist.metrics import insert_new_individual
from whale_dist.model_card import load_card
from whale_dist.protocol import HIT_COLUMNS, rank_hits


def combine_encounters(hits, encounter_ids):
    """Pool the candidates of photos sharing an ``encounter_id``: each individual keeps its best similarity.

    An encounter is one sighting of one animal from several angles (left flank, right flank, fluke); the best view
    is the evidence, so the maximum (not the mean, which a bad angle would drag down) is the encounter's score for an
    individual. Queries without an encounter keep their own candidates.
    """
    import pandas as pd

    encounter_ids = np.asarray([str(e or "") for e in encounter_ids], dtype=object)
    hits = hits.copy()
    hits["encounter"] = encounter_ids[hits["query"].to_numpy()]
    alone, grouped = hits[hits["encounter"] == ""], hits[hits["encounter"] != ""]
    if grouped.empty:
        return alone.drop(columns="encounter")
    best = grouped.sort_values("score", ascending=False, kind="stable")
    best = best.drop_duplicates(["encounter", "individual_id"]).drop(columns="query")
    members = pd.DataFrame({"query": np.flatnonzero(encounter_ids != ""),
                            "encounter": encounter_ids[encounter_ids != ""]})
    pooled = members.merge(best, on="encounter", how="inner")
    return pd.concat([alone, pooled], ignore_index=True).drop(columns="encounter")


def predicted_species(ranked, head: Sequence[str] | None = None) -> list[str]:
    """The species each query's per-species threshold is keyed on: the species head's answer (``head``, one per
    query, from ``head_species``) where there is one, else the species of the best candidate. Query photos usually
    arrive without a species label (Kaggle test set); calibration and identification both key on this, or a
    calibrated threshold would be applied to other queries than the ones it was chosen on."""
    head = [""] * len(ranked) if head is None else list(head)
    return [h or (species[0] if species else "") for h, species in zip(head, ranked["species"])]


def catalogue_model(cfg, model_version: str):
    """The ``ModelCard`` of ``cfg.model_url`` when it is the catalogue's model (``model_version``), else None (no
    model there, another model, or a baseline's catalogue)."""
    if not storage.exists(cfg.model_url):
        return None
    card = load_card(cfg.model_url)
    return card if card.version == model_version else None


def head_species(cfg, model_version: str, vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(species, probability) of each embedding from the catalogue model's species head (``model.predict_species``),
    applied to embeddings already in hand; ``""`` and NaN without a head or without the catalogue's model."""
    from whale_dist.model import predict_species  # torch

    if catalogue_model(cfg, model_version) is None:
        return [""] * len(vectors), np.full(len(vectors), np.nan)
    return predict_species(cfg.model_url, vectors)


def ratio_threshold(ranked, new_ratio: float) -> float:
    """The threshold under which ``new_ratio`` of this run's best similarities fall, so that about that share of the
    photos is proposed as new (the Happywhale 1st place solution set its threshold to the expected share of new
    individuals). For a run of many photos from a population whose share of new animals is known, e.g. a survey
    design; a calibrated threshold (``calibrate``) is the default."""
    best = np.array([scores[0] if len(scores) else -np.inf for scores in ranked["scores"]], dtype=np.float64)
    best = best[np.isfinite(best)]
    return float(np.quantile(best, new_ratio)) if len(best) else float("inf")


def threshold_for(species: str, calibration: dict, per_species: bool = True) -> float:
    if per_species and species in calibration.get("per_species", {}):
        return float(calibration["per_species"][species])
    return float(calibration["global"])


def predict(ranked, calibration: dict, k: int = 5, per_species: bool = True,
            head: Sequence[str] | None = None) -> tuple[list, list]:
    """(predictions, thresholds): each query's top-``k`` ids with ``new_individual`` inserted at its threshold, the
    threshold of its ``predicted_species(ranked, head)``."""
    predictions, thresholds = [], []
    for ids, scores, species in zip(ranked["ids"], ranked["scores"], predicted_species(ranked, head)):
        threshold = threshold_for(species, calibration, per_species)
        predictions.append(insert_new_individual(ids, scores, threshold, NEW_INDIVIDUAL, k))
        thresholds.append(threshold)
    return predictions, thresholds


def predictions_table(queries, ranked, predictions, thresholds):
    """The ``predictions.parquet`` rows: what was proposed, with the evidence a reviewer needs per candidate.

    ``scores``/``match_keys``/``match_urls``/``candidate_species`` align with ``predictions``; the
    ``new_individual`` slot holds the threshold as its score and empty match fields.
    """
    import pandas as pd

    rows = []
    for (_, query), (_, cand), prediction, threshold in zip(queries.iterrows(), ranked.iterrows(), predictions,
                                                            thresholds):
        by_id = {i: n for n, i in enumerate(cand["ids"])}
        pick = [by_id.get(label) for label in prediction]
        rows.append({"image": query["image_key"], "url": query["url"], "encounter_id": query.get("encounter_id", ""),
                     "date": query.get("date", ""), "location": query.get("location", ""),
                     "predictions": list(prediction), "threshold": float(threshold),
                     "scores": [float(cand["scores"][n]) if n is not None else float(threshold) for n in pick],
                     "match_keys": [cand["match_keys"][n] if n is not None else "" for n in pick],
                     "match_urls": [cand["match_urls"][n] if n is not None else "" for n in pick],
                     "candidate_species": [cand["species"][n] if n is not None else "" for n in pick],
                     "predicted_species": cand["species"][0] if cand["species"] else ""})
    return pd.DataFrame(rows)


def submission_csv(table) -> str:
    """Kaggle's ``image,predictions`` with five space-separated ids per row."""
    lines = ["image,predictions"]
    lines += [f"{_csv_field(image)},{' '.join(prediction)}" for image, prediction in zip(table["image"],
                                                                                          table["predictions"])]
    return "\n".join(lines) + "\n"


def _csv_field(value: str) -> str:
    """Quote a file name only when it needs it (commas or quotes in user-supplied names)."""
    if any(c in value for c in ',"\n\r'):
        return '"' + value.replace('"', '""') + '"'
    return value


def open_catalogue(url: str, use_gpu: bool = False):
    """The published catalogue at ``url`` (searched on the GPU with ``use_gpu``: ``index.use_gpu``); a missing or
    damaged one is a one-line user error, not a traceback."""

    try:
        return Catalogue.load(url, use_gpu=use_gpu)
    except IndexIntegrityError as exc:
        raise ConfigError(f"catalogue: {exc}") from exc


def resolve_model(cfg, catalogue) -> None:
    """Without ``embed.model``, use the model the index was built with (its manifest names it): queries are embedded
    and species predicted with it, so ``identify --catalogue URL --images URL --out URL`` needs no config, and
    ``calibrate`` reads the same model's species head and held-out individuals."""
    model_url = getattr(catalogue, "manifest", {}).get("model_url", "")
    if not cfg.embed.model and model_url:
        cfg.embed.model = model_url


def catalogue_filters(icfg) -> dict:
    """The catalogue filters of an ``IdentifyConfig`` (species, locations, dates) as ``index.filter_mask`` keys."""
    return {"species": list(icfg.species), "locations": list(icfg.locations), "date_from": icfg.date_from,
            "date_to": icfg.date_to}


def search_hits(catalogue, vectors: np.ndarray, k: int, exclude_keys=None, filters=None):
    """Catalogue search as a hits table (``HIT_COLUMNS``): ``k`` individuals per query, each with its best photo.

    ``Catalogue.individuals`` does the per-individual aggregation over labelled photos; ``exclude_keys`` removes
    photos before ranking (calibration searches a validation fold against the catalogue minus itself), as do
    ``filters`` (species, locations, dates: the survey's own region or season).
    """
    import pandas as pd

    filters = {k: v for k, v in (filters or {}).items() if v}
    if exclude_keys is not None:
        filters["exclude_image_keys"] = set(exclude_keys)
    filters = filters or None
    results = catalogue.individuals(np.asarray(vectors, dtype=np.float32), k=k, filters=filters)
    rows = [(q, m.individual_id, m.score, m.image_key, m.url, m.species) for q, ms in enumerate(results) for m in ms]
    return pd.DataFrame(rows, columns=list(HIT_COLUMNS)).astype({"score": np.float64})


def rank_queries(catalogue, vectors: np.ndarray, queries, icfg, exclude_keys=None):
    """The one ranking path of calibrate, identify and evaluate: search -> (encounters) -> top-k per query."""
    import pandas as pd

    k = max(icfg.k, 5)
    if not len(queries):
        return rank_hits(pd.DataFrame(columns=list(HIT_COLUMNS)), 0, k)
    hits = search_hits(catalogue, vectors, 4 * k if icfg.encounters else k, exclude_keys, catalogue_filters(icfg))
    if icfg.encounters and "encounter_id" in queries.columns:
        hits = combine_encounters(hits, list(queries["encounter_id"]))
    return rank_hits(hits, len(queries), k)

