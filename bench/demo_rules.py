"""Which ``new_individual`` rule works on the demo survey? Calibration query sets x decision scores, on embeddings
saved by ``demo_harness.py --save`` (no training: seconds per run).

Calibration sets (thresholds chosen there, never on the test photos): ``fold+held`` (the demo's ``calibrate``:
the validation fold plus every photo of individuals outside it until ``new_fraction`` are new), ``loo+held``
(``protocol.catalogue_threshold``'s: every catalogue photo against the others, held-out individuals new), ``fold``
(the fold alone). Decision scores: ``raw`` (the best similarity), ``gap`` (minus the second individual's),
``local`` (minus the mean of the 2nd-5th: a query's background similarity, the query-side term of CSLS, Conneau et al.
2018, "Word translation without parallel data", which corrects hub queries that are close to everything).
``oracle`` rows choose on the test photos themselves: a diagnostic ceiling only.

    PYTHONPATH=bench .venv/bin/python bench/demo_rules.py /tmp/whale-harness/demo-emb-s0.npz [...] [key=value]
"""

from __future__ import annotations

import sys

import numpy as np
from demo_harness import memory_catalogue, survey, survey_tables

from whale_dist import catalog
from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.config import load_config
from whale_dist.identify.calibrate import calibration_queries
from whale_dist.identify.ranking import rank_queries
from whale_dist.metrics import choose_threshold, evaluate_predictions, insert_new_individual
from whale_dist.protocol import held_out_individuals, knn, neighbour_hits, rank_hits, score_matrix

RULES = {"raw": lambda s: np.zeros(len(s)), "gap": lambda s: np.where(np.isfinite(s[:, 1]), s[:, 1], 0.0),
         "local": lambda s: np.array([r[1:][np.isfinite(r[1:])].mean() if np.isfinite(r[1:]).any() else 0.0
                                      for r in s])}


def loo_held(frame, vectors, c, encounters: bool):
    """``catalogue_threshold``'s queries; ``encounters``: a query never matches photos of its own encounter."""
    labels = np.asarray(frame["individual_id"], dtype=object)
    held = held_out_individuals(labels, c.new_fraction, c.seed)
    scores, rows = knn(vectors, vectors, 60)
    same = labels[np.maximum(rows, 0)] == labels[:, None]
    keep = rows != np.arange(len(labels))[:, None]
    if encounters:
        enc = np.asarray(frame["encounter_id"], dtype=object)
        keep &= ~((enc[np.maximum(rows, 0)] == enc[:, None]) & (enc[:, None] != ""))
    keep &= ~(np.isin(labels, list(held))[:, None] & same)
    left = (keep & same).any(axis=1)  # the query's individual still has a photo to be found
    truths = [x if ok else NEW_INDIVIDUAL for x, ok in zip(labels, left)]
    return truths, rank_hits(neighbour_hits(scores, rows, labels, keep), len(labels), 5)


def fold_queries(cfg, frame, vectors, catalogue, queries, encounters: bool):
    """Queries against the catalogue minus themselves (``encounters``: minus their encounters too)."""
    position = {key: i for i, key in enumerate(frame["image_key"])}
    out = set(queries["image_key"])
    if encounters:
        enc = set(queries["encounter_id"]) - {""}
        out |= set(frame["image_key"][frame["encounter_id"].isin(enc)])
    left = set(frame["individual_id"][~frame["image_key"].isin(out)])
    truths = [x if x in left else NEW_INDIVIDUAL for x in queries["individual_id"]]
    q = vectors[[position[k] for k in queries["image_key"]]]
    return truths, rank_queries(catalogue, q, queries, cfg.identify, exclude_keys=sorted(out))


def calibration_sets(cfg, frame, vectors, catalogue):
    _, fold = catalog.split_fold(frame, cfg.catalogue.fold, cfg.catalogue.n_folds, cfg.catalogue.seed)
    held = calibration_queries(frame, cfg.catalogue)
    return {"loo+held": loo_held(frame, vectors, cfg.catalogue, False),
            "loo+held-enc": loo_held(frame, vectors, cfg.catalogue, True),
            "fold+held": fold_queries(cfg, frame, vectors, catalogue, held, False),
            "fold+held-enc": fold_queries(cfg, frame, vectors, catalogue, held, True),
            "fold": fold_queries(cfg, frame, vectors, catalogue, fold, False)}


def apply(truths, ranked, rule, threshold):
    shifted = score_matrix(ranked) - RULES[rule](score_matrix(ranked))[:, None]
    predictions = [insert_new_individual(ids, row, threshold, NEW_INDIVIDUAL) for ids, row in
                   zip(ranked["ids"], shifted)]
    return evaluate_predictions(truths, predictions)


def choose(truths, ranked, rule):
    scores = score_matrix(ranked)
    return choose_threshold(truths, list(ranked["ids"]), scores - RULES[rule](scores)[:, None])[0]


def main() -> None:
    paths = [a for a in sys.argv[1:] if a.endswith(".npz")]
    cfg = load_config("configs/demo.yaml", ["root=/tmp/unused", *[a for a in sys.argv[1:] if a not in paths]])
    folder = survey(cfg)
    frame, test = survey_tables(folder)
    truths = list(test["individual_id"])
    print("| embeddings | calibration | rule | threshold | test MAP@5 | known top-1 | new top-1 |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        saved = np.load(path)
        catalogue = memory_catalogue(frame, saved["catalogue"])
        test_ranked = rank_queries(catalogue, saved["test"], test, cfg.identify)
        sets = calibration_sets(cfg, frame, saved["catalogue"], catalogue)
        sets["oracle"] = (truths, test_ranked)
        for name, (cal_truths, cal_ranked) in sets.items():
            for rule in RULES:
                threshold = choose(cal_truths, cal_ranked, rule)
                r = apply(truths, test_ranked, rule, threshold)
                print(f"| {path.split('/')[-1]} | {name} | {rule} | {threshold:.3f} | {r['map5']:.3f} | "
                      f"{r['known_top1']:.3f} | {r['new_top1']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
