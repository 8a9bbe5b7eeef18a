"""``whale-dist calibrate``: choose the ``new_individual`` threshold that maximises MAP@5 on catalogue queries.

Every labelled catalogue photo is a query against the others (``protocol.catalogue_queries``, as training validation
and the baselines do): some individuals are held out (all their photos removed from their own search, a seeded
choice) until about ``catalogue.new_fraction`` of the queries are new, since a catalogue alone holds few new animals
and a threshold chosen without them never fires; and, here, a query never meets the other photos of its own
encounter, since a survey photo comes from a new encounter. On the demo, calibrating on the 60 photos of the
held-out fold instead set the threshold 0.03-0.06 lower and let unseen animals through (notes of issue 14).
The held-out individuals are the ones the model's training left out (``ModelCard.held_out``, ``train.hold_out_new``):
stand-ins the model trained on look newer than real unseen animals. A model that records none (older models, runs
with ``hold_out_new=false``, baselines) gets the seeded choice, which it may have trained on. Per-species thresholds
are keyed on the species head's answer (``ranking.predicted_species``), as identify keys them.
The result is saved as ``calibration.json`` beside the catalogue, keyed to the model version: a threshold is a
property of one embedding space and meaningless in another.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from whale_dist import storage
from whale_dist.catalog import read_catalogue
from whale_dist.config import ConfigError, config_from_argv, dump_config
from whale_dist.embed.store import read_embeddings
from whale_dist.identify.ranking import (
    catalogue_model,
    head_species,
    open_catalogue,
    predict,
    predicted_species,
    resolve_model,
)
from whale_dist.identify.report import write_threshold_plot
from whale_dist.metrics import choose_threshold, map_at_5
from whale_dist.protocol import catalogue_queries, score_matrix

CALIBRATION_FILE = "calibration.json"


def calibrate_ranked(truths: list[str], ranked, min_species_queries: int = 20,
                     head: Sequence[str] | None = None) -> dict:
    """Global and per-species thresholds from ranked candidates and their truths, with the MAP@5 curves.

    A species gets its own threshold only with ``min_species_queries`` validation queries (keyed on
    ``predicted_species(ranked, head)``, as at identification time: ``head`` is the species head's answer per query);
    below that a per-species optimum is noise and the global one is used. ``species_key`` records which rule keyed
    them ("head" or "candidate"), so that identify applies the same one.
    """

    ids, scores = list(ranked["ids"]), score_matrix(ranked)
    threshold, best, grid, curve = choose_threshold(truths, ids, scores)
    species = np.array(predicted_species(ranked, head), dtype=object)
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
              "n_queries": len(truths), "n_new": int(sum(t == "new_individual" for t in truths)),
              "species_key": "head" if head is not None and any(head) else "candidate"}
    predictions, _ = predict(ranked, result, per_species=True, head=head)
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


def catalogue_embeddings(cfg, model_version: str):
    """(labelled catalogue rows, their embeddings) read from the embedding store, encounters from the embedded
    manifest where the catalogue table has none (``train.csv``)."""

    c = cfg.catalogue
    frame = read_catalogue(cfg.catalogue_url, c.format, c.csv, c.images_dir, c.root, c.orientation)
    frame = frame[frame["individual_id"] != ""].reset_index(drop=True)
    table, vectors = read_embeddings(cfg.embed_out, model_version)
    position = {url: i for i, url in enumerate(table["url"])}
    position.update({key: i for i, key in enumerate(table["image_key"]) if key not in position})
    rows = [position.get(url, position.get(key)) for url, key in zip(frame["url"], frame["image_key"])]
    keep = [i for i, row in enumerate(rows) if row is not None]
    if not keep:
        raise ConfigError(f"none of the {len(frame)} catalogue photos is in the embedding store "
                          f"{storage.redact(cfg.embed_out)} for model {model_version}")
    frame = frame.iloc[keep].reset_index(drop=True)
    if "encounter_id" in table.columns:
        frame["encounter_id"] = [e or table["encounter_id"][rows[i]] for e, i in zip(frame["encounter_id"], keep)]
    return frame, vectors[[rows[i] for i in keep]]


def run_calibration(cfg) -> dict:
    """Every catalogue photo a query against the others (``protocol.catalogue_queries``: held-out individuals as
    new, own encounter left out), choose thresholds, save them, return them."""

    catalogue = open_catalogue(cfg.identify_catalogue)
    resolve_model(cfg, catalogue)
    frame, vectors = catalogue_embeddings(cfg, catalogue.model_version)
    card, c = catalogue_model(cfg, catalogue.model_version), cfg.catalogue
    held = None if card is None else card.held_out
    truths, ranked = catalogue_queries(vectors, list(frame["individual_id"]), c.new_fraction, c.seed, held=held,
                                       encounters=list(frame["encounter_id"]), species=list(frame["species"]))
    head = head_species(cfg, catalogue.model_version, vectors[ranked["row"].to_numpy()])[0]
    calibration = calibrate_ranked(truths, ranked, cfg.identify.min_species_queries, head)
    calibration.update(model_version=catalogue.model_version, new_fraction=c.new_fraction,
                       held_out_from="model.json" if held is not None else "seed")
    url = save_calibration(cfg.identify_catalogue, calibration)

    write_threshold_plot(calibration, storage.join(cfg.identify_catalogue, "calibration.png"), cfg.identify.local_copy)
    print(f"calibrate: {len(truths)} catalogue photos as queries ({calibration['n_new']} new), threshold "
          f"{calibration['global']:.3f} -> MAP@5 {calibration['map5_global']:.3f} "
          f"(per species: {len(calibration['per_species'])} thresholds, MAP@5 {calibration['map5_per_species']:.3f}); "
          f"saved {storage.redact(url)}"
          + ("" if held is not None else "; the model records no held-out individuals: the stand-ins for new animals "
             "may be ones it trained on (train.hold_out_new)"))
    return calibration


def calibrate_main(argv: list[str] | None = None) -> int:
    """``whale-dist calibrate [--catalogue URL] [--config FILE] [key=value ...]``."""

    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), {"--catalogue": "identify.catalogue"})
    run_calibration(cfg)
    dump_config(cfg, storage.join(cfg.identify_catalogue, "calibration"))
    return 0
