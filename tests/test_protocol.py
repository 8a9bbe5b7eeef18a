"""The one ranking protocol (``whale_dist.protocol``): ranking, thresholds from the catalogue, and every caller
(training validation, baselines, identify + evaluate, calibrate)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.config import IdentifyConfig
from whale_dist.identify.baselines import nearest_neighbour_scores
from whale_dist.identify.calibrate import calibrate_ranked
from whale_dist.identify.ranking import predict, rank_queries
from whale_dist.metrics import choose_threshold, evaluate_predictions
from whale_dist.protocol import (
    catalogue_queries,
    catalogue_threshold,
    held_out_individuals,
    knn,
    neighbour_hits,
    rank_hits,
    score_matrix,
    score_queries,
)
from whale_dist.train.validate import evaluate, evaluate_leave_one_out


def unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(seed=0, known=12, photos=4, singletons=4, dim=32, noise=0.35):
    """A catalogue of ``known`` individuals with ``photos`` each plus singletons, and queries: half known, half new."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(known + singletons, dim))
    labels = [f"ind{i}" for i in range(known) for _ in range(photos)] + [f"one{i}" for i in range(singletons)]
    rows = [centres[i] for i in range(known) for _ in range(photos)] + list(centres[known:])
    gallery = unit(np.stack(rows) + noise * rng.normal(size=(len(rows), dim)))
    queries = unit(np.concatenate([centres[:6], rng.normal(size=(6, dim))]) + noise * rng.normal(size=(12, dim)))
    truths = [f"ind{i}" for i in range(6)] + [NEW_INDIVIDUAL] * 6
    return gallery, labels, queries, truths


def test_ranking_keeps_each_individuals_best_photo_ties_by_id():
    catalogue = unit(np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [0.8, 0.6]]))
    scores, rows = knn(np.array([[1.0, 0.0]]), catalogue, 5)
    ranked = rank_hits(neighbour_hits(scores, rows, ["a", "b", "b", "d", "c"]), 1, 5)
    assert ranked["ids"][0] == ["a", "c", "d", "b"]  # c and d tie at 0.8: by id
    assert ranked["scores"][0] == pytest.approx([1.0, 0.8, 0.8, 0.6])
    assert list(score_matrix(ranked)[0, 4:]) == [-np.inf]


def test_threshold_separates_known_from_new_queries():
    ranked = [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.2], [0.25, 0.1]])
    threshold, best, _, _ = choose_threshold(["a", "b", NEW_INDIVIDUAL, NEW_INDIVIDUAL], ranked, scores)
    assert 0.3 < threshold <= 0.8 and best == 1.0


@pytest.mark.parametrize("labels,fraction,held", [
    (["a", "a", "b", "b", "c"], 0.2, 0),  # the singleton c is 20 % already
    (["a", "a", "b", "b", "c"], 0.6, 1),  # one more individual of two photos reaches 3/5
    (["a", "a", "b", "b"], 1.0, 2),
    (["a", "b"], 0.0, 0),
])
def test_held_out_individuals_reach_the_new_fraction(labels, fraction, held):
    chosen = held_out_individuals(labels, fraction, seed=3)
    assert len(chosen) == held and chosen <= {"a", "b"}
    assert chosen == held_out_individuals(labels, fraction, seed=3)


def test_catalogue_threshold_has_new_cases_and_separates_them():
    gallery, labels, queries, truths = clustered()
    result = catalogue_threshold(gallery, labels, new_fraction=0.3)
    assert result["n_new"] >= 0.3 * len(labels) and result["held_out"] >= 1
    scored = evaluate_predictions(truths, predict(rank_hits(neighbour_hits(*knn(queries, gallery, 50), labels), 12, 5),
                                                  {"global": result["threshold"]})[0])
    assert scored["known_top1"] == 1.0 and scored["new_top1"] == 1.0


def test_a_held_out_individual_never_finds_itself():
    gallery = unit(np.array([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 0.99, 0.0]]))
    result = catalogue_threshold(gallery, ["a", "a", "b", "b"], new_fraction=1.0, k=3)
    assert result["n_new"] == 4 and result["held_out"] == 2
    assert result["map5"] == 1.0  # every query is new, and only its own individual's photos were close


class ExactCatalogue:
    """The published catalogue's aggregation (``index.aggregate_individuals``) over an exact search, without Ray."""

    def __init__(self, vectors, labels):
        self.vectors = vectors
        self.metadata = pd.DataFrame({"image_key": [f"k{i}" for i in range(len(labels))], "individual_id": labels,
                                      "url": "", "species": "", "encounter_id": "", "date": "", "location": ""})

    def individuals(self, embeddings, k=5, filters=None):
        from whale_dist.index import aggregate_individuals

        scores = embeddings @ self.vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")
        return aggregate_individuals(order, np.take_along_axis(scores, order, 1), self.metadata, k)


def test_every_caller_gives_the_same_map5_on_the_same_embeddings():
    gallery, labels, queries, truths = clustered(seed=1, noise=0.9)
    threshold = catalogue_threshold(gallery, labels)["threshold"]
    training = evaluate(queries, truths, gallery, labels)
    baseline = nearest_neighbour_scores(gallery, pd.DataFrame({"individual_id": labels}), queries, truths)
    ranked = rank_queries(ExactCatalogue(gallery, labels), queries, pd.DataFrame(index=range(12)), IdentifyConfig())
    identified = evaluate_predictions(truths, predict(ranked, {"global": threshold})[0])
    assert training["threshold"] == baseline["threshold"] == threshold
    assert training["map5"] == baseline["map5"] == identified["map5"]
    assert 0.0 < training["map5"] < 1.0  # noisy enough that the ranking matters
    loo = evaluate_leave_one_out(gallery, labels, threshold)
    assert loo["threshold"] == threshold and 0.0 < loo["map5"] <= 1.0
    calibrated = calibrate_ranked(truths, ranked)  # calibrate's MAP@5 at its threshold is the same measurement
    assert calibrated["map5_global"] == pytest.approx(
        score_queries(queries, truths, gallery, labels, calibrated["global"])["map5"])


def test_calibration_queries_never_meet_their_own_encounter():
    """A survey photo never has a sibling of its own encounter in the catalogue; calibration queries neither."""
    gallery = unit(np.array([[1.0, 0.0], [0.99, 0.1], [0.9, 0.4], [0.0, 1.0], [0.1, 0.99], [0.7, 0.7]]))
    labels, encounters = ["x", "x", "x", "y", "y", "z"], ["e1", "e1", "e2", "e3", "e3", ""]
    truths, ranked = catalogue_queries(gallery, labels, new_fraction=0.0, encounters=encounters, species=list("ssstuv"))
    assert truths == ["x", "x", "x", NEW_INDIVIDUAL, NEW_INDIVIDUAL, NEW_INDIVIDUAL]  # y's other photo is a sibling
    assert ranked["ids"][0][0] == "x" and ranked["scores"][0][0] == pytest.approx(0.9 / np.hypot(0.9, 0.4))
    assert ranked["ids"][3][0] == "z" and ranked["species"][3][0] == "v"  # y's sibling is never found
    plain, _ = catalogue_queries(gallery, labels, new_fraction=0.0)
    assert plain == ["x", "x", "x", "y", "y", NEW_INDIVIDUAL]


def test_calibration_holds_out_the_individuals_training_left_out():
    """``held`` (``ModelCard.held_out``) replaces the seeded choice; names no longer in the catalogue are ignored."""
    gallery = unit(np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [0.7, 0.7], [0.72, 0.69]]))
    labels = ["a", "a", "b", "b", "c", "c"]
    seeded, _ = catalogue_queries(gallery, labels, new_fraction=0.0)
    truths, ranked = catalogue_queries(gallery, labels, new_fraction=0.0, held={"b", "gone"})
    assert seeded == labels and truths == ["a", "a", NEW_INDIVIDUAL, NEW_INDIVIDUAL, "c", "c"]
    assert "b" not in ranked["ids"][2] and list(ranked["row"]) == list(range(6))


def test_ratio_threshold_proposes_that_share_of_a_run_as_new():
    from whale_dist.identify.ranking import ratio_threshold

    ranked = pd.DataFrame({"ids": [["a"]] * 10 + [[]], "scores": [[s] for s in np.linspace(0.1, 1.0, 10)] + [[]],
                           "species": [[""]] * 10 + [[]]})
    threshold = ratio_threshold(ranked, 0.2)
    predictions = predict(ranked.iloc[:10], {"global": threshold})[0]
    assert sum(p[0] == NEW_INDIVIDUAL for p in predictions) == 2  # the two least similar of ten


def test_a_large_catalogue_calibrates_on_a_sample_of_its_photos_with_the_same_answers():
    rng = np.random.default_rng(4)
    labels = [f"ind{i // 3}" for i in range(300)]
    gallery = unit(rng.standard_normal((300, 8)))
    encounters = [f"e{i // 2}" for i in range(300)]
    truths, ranked = catalogue_queries(gallery, labels, 0.2, encounters=encounters)
    some, sampled = catalogue_queries(gallery, labels, 0.2, encounters=encounters, max_queries=40)
    assert len(some) == len(sampled) == 40
    asked = np.sort(np.random.default_rng(0).choice(300, 40, replace=False))  # the sample the function draws
    assert some == [truths[i] for i in asked]
    assert list(sampled["ids"]) == [ranked["ids"][i] for i in asked] and list(sampled["row"]) == list(asked)
