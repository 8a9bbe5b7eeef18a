"""MAP@5 on hand-written cases (the Kaggle definition), and the vectorised threshold sweep against the loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whale_dist.metrics import (
    average_precision_at_5,
    choose_threshold,
    evaluate_predictions,
    insert_new_individual,
    map_at_5,
    threshold_curve,
    top_k_accuracy,
)

NEW = "new_individual"


@pytest.mark.parametrize("prediction, expected", [
    (["a", "b", "c", "d", "e"], 1.0),
    (["b", "a", "c", "d", "e"], 0.5),
    (["b", "c", "d", "e", "a"], 0.2),
    (["b", "c", "d", "e", "f"], 0.0),
    (["b", "c", "d", "e", "f", "a"], 0.0),  # sixth place does not count
    ([], 0.0),
    (["b", "b", "b", "a", "c"], 0.5),  # repeats count once: 'a' is the second distinct label
    (["a", "a", "a", "a", "a"], 1.0),
])
def test_average_precision_hand_written(prediction, expected):
    assert average_precision_at_5("a", prediction) == pytest.approx(expected)


def test_new_individual_is_an_ordinary_label():
    assert average_precision_at_5(NEW, ["x", NEW, "y"]) == pytest.approx(0.5)
    assert average_precision_at_5("x", [NEW, "x"]) == pytest.approx(0.5)
    assert average_precision_at_5(NEW, ["x", "y", "z", "w", "v"]) == 0.0


def test_map_is_the_mean_and_rejects_bad_input():
    truths = ["a", "b", NEW, "c"]
    predictions = [["a"], ["x", "b"], ["x", "y", "z", "w", NEW], ["q"]]
    assert map_at_5(truths, predictions) == pytest.approx((1 + 0.5 + 0.2 + 0) / 4)
    with pytest.raises(ValueError):
        map_at_5([], [])
    with pytest.raises(ValueError):
        map_at_5(["a"], [])


def test_top_k_and_known_new_split():
    truths = ["a", "b", NEW, NEW]
    predictions = [["a", NEW], ["x", "b"], [NEW, "x"], ["x", "y", "z", "w", "v"]]
    assert top_k_accuracy(truths, predictions, 1) == pytest.approx(0.5)
    assert top_k_accuracy(truths, predictions, 5) == pytest.approx(0.75)
    row = evaluate_predictions(truths, predictions)
    assert row["known_top1"] == pytest.approx(0.5)
    assert row["new_top1"] == pytest.approx(0.5)
    assert row["n_new"] == 2
    assert math.isnan(evaluate_predictions(["a"], [["a"]])["new_top1"])


def test_insert_new_individual_positions():
    ids, scores = ["a", "b", "c", "d", "e"], [0.9, 0.8, 0.7, 0.6, 0.5]
    assert insert_new_individual(ids, scores, 0.75) == ["a", "b", NEW, "c", "d"]
    assert insert_new_individual(ids, scores, 0.95) == [NEW, "a", "b", "c", "d"]
    assert insert_new_individual(ids, scores, 0.1) == ["a", "b", "c", "d", "e"]
    assert insert_new_individual(["a", "b"], [0.9, 0.8], 0.1) == ["a", "b", NEW]
    # a tie with the threshold keeps the candidate above new_individual
    assert insert_new_individual(ids, scores, 0.8) == ["a", "b", NEW, "c", "d"]


def _loop_curve(truths, ids, scores, thresholds):
    return np.array([map_at_5(truths, [insert_new_individual(i, s[:len(i)], t) for i, s in zip(ids, scores)])
                     for t in thresholds])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "e", "f", "g", NEW]),
                          st.permutations(["a", "b", "c", "d", "e", "f", "g"]),
                          st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.5, 0.7, 0.9]), min_size=5, max_size=5),
                          st.integers(1, 5)), min_size=1, max_size=12))
def test_vectorised_curve_equals_the_loop(cases):
    truths = [c[0] for c in cases]
    ids = [list(c[1][:c[3]]) for c in cases]
    scores = np.full((len(cases), 5), -np.inf)
    for row, case in enumerate(cases):
        scores[row, :case[3]] = sorted(case[2], reverse=True)[:case[3]]
    thresholds = np.array([0.0, 0.2, 0.5, 0.6, 0.8, 1.0])
    assert np.allclose(threshold_curve(truths, ids, scores, thresholds), _loop_curve(truths, ids, scores, thresholds))


def test_choose_threshold_constructed_case():
    """Known individuals match at >= 0.8, new ones peak at <= 0.55: the best threshold lies between them."""
    truths = ["a", "b", "c", NEW, NEW, NEW]
    ids = [["a", "x"], ["b", "x"], ["c", "x"], ["x", "y"], ["y", "z"], ["z", "x"]]
    scores = np.array([[0.9, 0.3], [0.85, 0.4], [0.8, 0.2], [0.55, 0.3], [0.5, 0.2], [0.45, 0.1]])
    scores = np.pad(scores, ((0, 0), (0, 3)), constant_values=-np.inf)
    threshold, best, thresholds, curve = choose_threshold(truths, ids, scores)
    assert 0.55 < threshold < 0.8
    assert best == pytest.approx(1.0)
    assert curve.max() == pytest.approx(1.0) and len(curve) == len(thresholds)
    # all-new answering gets only the new half right
    assert curve[-1] == pytest.approx((3 * 0.5 + 3 * 1.0) / 6)
