"""Which ``new_individual`` rule works on the demo survey? Calibration query sets x decision scores, on embeddings
saved by ``demo_harness.py --save`` (no training: seconds per run).

Calibration sets (thresholds chosen there, never on the test photos): ``catalogue+enc`` (``calibrate``'s: every
catalogue photo against the others, held-out individuals new, own encounter left out), ``catalogue`` (the same with
encounter siblings allowed: training validation's and the baselines'), ``fold`` (the validation fold alone; commit
86a2b75's fold + held-out variants are in the notes of issue 14). Decision scores: ``raw`` (the best similarity),
``gap`` (minus the second individual's), ``local`` (minus the mean of the 2nd-5th: a query's background similarity,
the query-side term of CSLS, Conneau et al. 2018, "Word translation without parallel data", which corrects hub
queries that are close to everything).
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
from whale_dist.identify.ranking import rank_queries
from whale_dist.metrics import choose_threshold, evaluate_predictions, insert_new_individual
from whale_dist.protocol import catalogue_queries, score_matrix

RULES = {"raw": lambda s: np.zeros(len(s)), "gap": lambda s: np.where(np.isfinite(s[:, 1]), s[:, 1], 0.0),
         "local": lambda s: np.array([r[1:][np.isfinite(r[1:])].mean() if np.isfinite(r[1:]).any() else 0.0
                                      for r in s])}


def calibration_sets(cfg, frame, vectors, catalogue):
    """Each calibration set as (truths, ranked): ``catalogue+enc`` is ``calibrate``'s."""
    c = cfg.catalogue
    position = {key: i for i, key in enumerate(frame["image_key"])}
    _, fold = catalog.split_fold(frame, c.fold, c.n_folds, c.seed)
    fold_ranked = rank_queries(catalogue, vectors[[position[k] for k in fold["image_key"]]], fold, cfg.identify,
                               exclude_keys=list(fold["image_key"]))
    return {"catalogue+enc": catalogue_queries(vectors, list(frame["individual_id"]), c.new_fraction, c.seed,
                                               encounters=list(frame["encounter_id"])),
            "catalogue": catalogue_queries(vectors, list(frame["individual_id"]), c.new_fraction, c.seed),
            "fold": (list(fold["label"]), fold_ranked)}


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
