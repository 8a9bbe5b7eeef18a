"""``whale-dist calibrate``: choose the ``new_individual`` threshold that maximises MAP@5 on catalogue queries.

The queries are the fold training held out (``catalog.split_fold`` on the catalogue table, same seed and order), so
the model has not seen those photos, plus every photo of some individuals outside the fold (a seeded choice,
``protocol.held_out_individuals``) until about ``catalogue.new_fraction`` of the queries are new: a fold alone holds
few new animals (the demo's had 2), and a threshold chosen without them never fires. All queries are searched against
the published catalogue *minus themselves and their encounters*, as survey photos are (``left_out``); those whose
individual has no photo left are, truthfully, new. The result is saved as ``calibration.json`` beside the catalogue,
keyed to the model version: a threshold is a property of one embedding space and meaningless in another.
"""

from __future__ import annotations

import sys

import numpy as np

from whale_dist import storage
from whale_dist.catalog import NEW_INDIVIDUAL, read_catalogue, split_fold
from whale_dist.config import ConfigError, config_from_argv, dump_config
from whale_dist.embed.store import read_embeddings
from whale_dist.identify.ranking import open_catalogue, predict, predicted_species, rank_queries
from whale_dist.identify.report import write_threshold_plot
from whale_dist.metrics import choose_threshold, map_at_5
from whale_dist.protocol import held_out_individuals, score_matrix

CALIBRATION_FILE = "calibration.json"


def calibrate_ranked(truths: list[str], ranked, min_species_queries: int = 20) -> dict:
    """Global and per-species thresholds from ranked candidates and their truths, with the MAP@5 curves.

    A species gets its own threshold only with ``min_species_queries`` validation queries (keyed on the predicted
    species, as at identification time); below that a per-species optimum is noise and the global one is used.
    """

    ids, scores = list(ranked["ids"]), score_matrix(ranked)
    threshold, best, grid, curve = choose_threshold(truths, ids, scores)
    species = np.array(predicted_species(ranked), dtype=object)
    per_species, curves = {}, {}
    for name in sorted(set(species) - {""}):
        rows = np.flatnonzero(species == name)
        if len(rows) < min_species_queries:
            continue
        sp_threshold, _, _, sp_curve = choose_threshold([truths[i] for i in rows], [ids[i] for i in rows],
                                                        scores[rows], grid)
        per_species[name], curves[name] = sp_threshold, [round(float(v), 6) for v in sp_curve]
    result = {"global": threshold, "per_species": per_species, "map5_global": best,
              "curve": {"thresholds": [round(float(t), 6) for t in grid], "map5": [round(float(v), 6) for v in curve],
                        "per_species": curves},
              "n_queries": len(truths), "n_new": int(sum(t == "new_individual" for t in truths))}
    predictions, _ = predict(ranked, result, per_species=True)
    result["map5_per_species"] = map_at_5(truths, predictions)
    return result


def calibration_url(catalogue_url: str) -> str:
    return storage.join(catalogue_url, CALIBRATION_FILE)


def save_calibration(catalogue_url: str, calibration: dict) -> str:
    url = calibration_url(catalogue_url)
    storage.write_json(url, calibration)
    return url


def load_calibration(catalogue_url: str, model_version: str) -> dict:
    """The saved calibration, refused when it was made for another model version."""
    url = calibration_url(catalogue_url)
    if not storage.exists(url):
        raise ConfigError(f"no calibration at {url}: run `whale-dist calibrate` first or set identify.threshold")
    calibration = storage.read_json(url)
    if calibration.get("model_version") != model_version:
        raise ConfigError(f"calibration {url} was made for model {calibration.get('model_version')!r}, but the "
                          f"catalogue uses {model_version!r}: run `whale-dist calibrate` again")
    return calibration


def with_held_out_individuals(frame, val, new_fraction: float, seed: int):
    """The fold plus every photo of some individuals outside it (``protocol.held_out_individuals``), as new, so
    that about ``new_fraction`` of the queries are new."""
    import pandas as pd

    outside = frame[~frame["individual_id"].isin(set(val["individual_id"]))]["individual_id"]
    held = held_out_individuals(outside, new_fraction, seed, int((val["label"] == NEW_INDIVIDUAL).sum()), len(val))
    extra = frame[frame["individual_id"].isin(held)].assign(label=NEW_INDIVIDUAL)
    return pd.concat([val, extra], ignore_index=True)


def calibration_queries(frame, c):
    """The calibration queries of a catalogue table (``label`` = truth): the fold training held out, plus held-out
    individuals as new (``c`` is the ``CatalogueConfig``: fold, n_folds, seed, new_fraction)."""
    _, val = split_fold(frame, c.fold, c.n_folds, c.seed)
    return with_held_out_individuals(frame, val, c.new_fraction, c.seed)


def left_out(metadata, queries) -> tuple[list[str], list[str]]:
    """(catalogue keys a calibration search leaves out, each query's truth).

    Left out: the queries themselves and every catalogue photo of their encounters, since a survey photo comes from
    a new encounter, never with a sibling (same light, same pose) in the catalogue; a sibling would flatter the known
    queries. A query whose individual has no photo left is, truthfully, new.
    """
    keys = set(queries["catalogue_key"])
    encounters = set(queries.get("encounter_id", ())) - {""}
    if encounters and "encounter_id" in metadata.columns:
        keys |= set(metadata["image_key"][metadata["encounter_id"].isin(encounters)])
    left = set(metadata["individual_id"][~metadata["image_key"].isin(keys)]) - {""}
    return sorted(keys), [name if name in left else NEW_INDIVIDUAL for name in queries["individual_id"]]


def validation_queries(cfg, catalogue):
    """(validation rows with ``label``, their embeddings) for the configured fold, read from the embedding store."""

    c = cfg.catalogue
    frame = read_catalogue(cfg.catalogue_url, c.format, c.csv, c.images_dir, c.root, c.orientation)
    val = calibration_queries(frame, c)
    table, vectors = read_embeddings(cfg.embed_out, catalogue.model_version)
    position = {url: i for i, url in enumerate(table["url"])}
    position.update({key: i for i, key in enumerate(table["image_key"]) if key not in position})
    rows = [position.get(url, position.get(key)) for url, key in zip(val["url"], val["image_key"])]
    keep = [i for i, row in enumerate(rows) if row is not None]
    if not keep:
        raise ConfigError(f"none of the {len(val)} validation photos of fold {c.fold} is in the embedding store "
                          f"{storage.redact(cfg.embed_out)} for model {catalogue.model_version}")
    val = val.iloc[keep].reset_index(drop=True)
    val["catalogue_key"] = [table["image_key"][rows[i]] for i in keep]
    if "encounter_id" in table.columns:  # train.csv has no encounters; the embedded manifest may
        val["encounter_id"] = [e or table["encounter_id"][rows[i]] for e, i in zip(val["encounter_id"], keep)]
    return val, vectors[[rows[i] for i in keep]]


def run_calibration(cfg) -> dict:
    """Search the validation fold against the catalogue minus itself, choose thresholds, save them, return them."""

    catalogue = open_catalogue(cfg.identify_catalogue)
    val, vectors = validation_queries(cfg, catalogue)
    excluded, truths = left_out(catalogue.metadata, val)
    ranked = rank_queries(catalogue, vectors, val, cfg.identify, exclude_keys=excluded)
    calibration = calibrate_ranked(truths, ranked, cfg.identify.min_species_queries)
    calibration.update(model_version=catalogue.model_version, fold=cfg.catalogue.fold,
                       encounters=cfg.identify.encounters)
    url = save_calibration(cfg.identify_catalogue, calibration)

    write_threshold_plot(calibration, storage.join(cfg.identify_catalogue, "calibration.png"), cfg.identify.local_copy)
    print(f"calibrate: {len(val)} validation photos ({calibration['n_new']} new), threshold "
          f"{calibration['global']:.3f} -> MAP@5 {calibration['map5_global']:.3f} "
          f"(per species: {len(calibration['per_species'])} thresholds, MAP@5 {calibration['map5_per_species']:.3f}); "
          f"saved {storage.redact(url)}")
    return calibration


def calibrate_main(argv: list[str] | None = None) -> int:
    """``whale-dist calibrate [--catalogue URL] [--config FILE] [key=value ...]``."""

    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), {"--catalogue": "identify.catalogue"})
    run_calibration(cfg)
    dump_config(cfg, storage.join(cfg.identify_catalogue, "calibration"))
    return 0
