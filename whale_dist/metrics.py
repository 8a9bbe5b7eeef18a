"""Ranking metrics for photo-ID, with ``new_individual`` as an ordinary label (the Kaggle Happywhale definition).

MAP@5: each query scores 1/rank of the first correct label among its first five predictions (0 if absent);
repeated labels in a prediction count at their first position only, so duplicates can never earn extra credit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _dedupe(prediction: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    unique = []
    for label in prediction:
        if label not in seen:
            seen.add(label)
            unique.append(label)
    return unique


def average_precision_at_5(truth: str, prediction: Sequence[str]) -> float:
    """1/rank of ``truth`` among the first five distinct predictions, 0 if absent."""
    for rank, label in enumerate(_dedupe(prediction)[:5], start=1):
        if label == truth:
            return 1.0 / rank
    return 0.0


def map_at_5(truths: Sequence[str], predictions: Sequence[Sequence[str]]) -> float:
    """Mean of ``average_precision_at_5`` over queries; an empty query set is an error, not a zero."""
    if len(truths) != len(predictions):
        raise ValueError(f"{len(truths)} truths but {len(predictions)} predictions")
    if not len(truths):
        raise ValueError("MAP@5 of no queries is undefined")
    return float(np.mean([average_precision_at_5(t, p) for t, p in zip(truths, predictions)]))


def top_k_accuracy(truths: Sequence[str], predictions: Sequence[Sequence[str]], k: int) -> float:
    if not len(truths):
        raise ValueError("accuracy of no queries is undefined")
    return float(np.mean([t in _dedupe(p)[:k] for t, p in zip(truths, predictions)]))


def insert_new_individual(individuals: Sequence[str], scores: Sequence[float], threshold: float,
                          new_label: str = "new_individual", k: int = 5) -> list[str]:
    """Put ``new_label`` at the first rank whose similarity falls below ``threshold`` (Happywhale practice)."""
    ranked: list[str] = []
    inserted = False
    for individual, score in zip(individuals, scores):
        if not inserted and score < threshold:
            ranked.append(new_label)
            inserted = True
        ranked.append(individual)
    if not inserted:
        ranked.append(new_label)
    return _dedupe(ranked)[:k]


def evaluate_predictions(truths: Sequence[str], predictions: Sequence[Sequence[str]],
                         new_label: str = "new_individual") -> dict[str, float]:
    """The evaluation row: MAP@5, top-1, top-5, and top-1 accuracy split into known and new individuals.

    The split matters because most Happywhale individuals are seen once: a model can score well on MAP@5 by
    answering ``new_individual`` everywhere, which only the known-individual accuracy exposes.
    """
    truths = list(truths)
    known = [i for i, t in enumerate(truths) if t != new_label]
    new = [i for i, t in enumerate(truths) if t == new_label]

    def _subset(rows: list[int]) -> float:
        if not rows:
            return float("nan")
        return top_k_accuracy([truths[i] for i in rows], [predictions[i] for i in rows], 1)

    return {"map5": map_at_5(truths, predictions), "top1": top_k_accuracy(truths, predictions, 1),
            "top5": top_k_accuracy(truths, predictions, 5), "known_top1": _subset(known), "new_top1": _subset(new),
            "n_queries": float(len(truths)), "n_new": float(len(new))}


def truth_ranks(truths: Sequence[str], ranked_ids: Sequence[Sequence[str]], k: int = 5) -> np.ndarray:
    """0-based rank of each truth among the first ``k`` distinct candidates (``k`` when absent or new)."""
    ranks = np.full(len(truths), k, dtype=np.int64)
    for row, (truth, ids) in enumerate(zip(truths, ranked_ids)):
        unique = _dedupe(ids)[:k]
        if truth in unique:
            ranks[row] = unique.index(truth)
    return ranks


def threshold_curve(truths: Sequence[str], ranked_ids: Sequence[Sequence[str]], ranked_scores: np.ndarray,
                    thresholds: np.ndarray, new_label: str = "new_individual") -> np.ndarray:
    """MAP@5 of ``insert_new_individual`` at every threshold, vectorised (queries x thresholds).

    ``ranked_scores`` is (n, 5) with scores sorted descending per row (-inf pads missing candidates), so the
    ``new_individual`` slot lands after the ``p`` candidates scoring at or above the threshold. A known truth at
    rank r stays at r when r < p and moves one down otherwise; a new truth sits at p. Equal to looping over
    ``insert_new_individual`` (tested), but fast enough to sweep hundreds of thresholds over a whole fold.
    """
    scores = np.asarray(ranked_scores, dtype=np.float64)[:, :5]
    thresholds = np.asarray(thresholds, dtype=np.float64)
    is_new = np.array([t == new_label for t in truths])
    rank = truth_ranks(truths, ranked_ids, 5)[:, None]  # (n, 1)
    slot = (scores[:, :, None] >= thresholds[None, None, :]).sum(axis=1)  # (n, T) = position of new_individual
    known_rank = np.where(rank < slot, rank, rank + 1)
    final = np.where(is_new[:, None], slot, np.where(rank < 5, known_rank, 5))
    gain = np.where(final < 5, 1.0 / (final + 1.0), 0.0)
    return gain.mean(axis=0)


def candidate_thresholds(scores: np.ndarray, max_count: int = 400) -> np.ndarray:
    """Midpoints between distinct observed scores, plus one below and one above: every distinct MAP@5 value.

    MAP@5 only changes when the threshold crosses an observed score, so these midpoints are exhaustive; past
    ``max_count`` they are thinned by quantile so that a whole catalogue fold stays cheap.
    """
    values = np.unique(np.asarray(scores, dtype=np.float64)[np.isfinite(scores)])
    if not len(values):
        return np.array([0.5])
    cuts = np.concatenate([[values[0] - 0.05], (values[:-1] + values[1:]) / 2.0, [values[-1] + 0.05]])
    if len(cuts) > max_count:
        cuts = np.quantile(cuts, np.linspace(0.0, 1.0, max_count))
    return cuts


def choose_threshold(truths: Sequence[str], ranked_ids: Sequence[Sequence[str]], ranked_scores: np.ndarray,
                     thresholds: np.ndarray | None = None) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(best threshold, its MAP@5, thresholds, curve); among equally good thresholds the middle one is taken,
    so that the choice sits inside the best plateau rather than on its edge."""
    if thresholds is None:
        thresholds = candidate_thresholds(np.asarray(ranked_scores)[:, :5])
    curve = threshold_curve(truths, ranked_ids, ranked_scores, thresholds)
    best = np.flatnonzero(curve >= curve.max() - 1e-12)
    pick = int(best[len(best) // 2])
    return float(thresholds[pick]), float(curve[pick]), np.asarray(thresholds), curve
