"""Ranking metrics for photo-ID, with ``new_individual`` as an ordinary label (the Kaggle Happywhale definition).

MAP@5: each query scores 1/rank of the first correct label among its first five predictions (0 if absent);
repeated labels in a prediction count at their first position only, so duplicates can never earn extra credit.
"""

from __future__ import annotations

from typing import Sequence

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
