"""Validation of an embedding: kNN of each query against a labelled gallery, MAP@5 with ``new_individual``.

This is the Happywhale evaluation protocol as the top solutions ran it on their validation fold: cosine kNN (faiss
inner product on L2-normalised vectors) against the training photos, neighbours collapsed to individuals by their
best similarity, ``new_individual`` inserted where the similarity drops below a threshold, and the threshold chosen
as the one that maximises MAP@5 on the fold. Pure numpy + faiss, no Ray, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.metrics import insert_new_individual, map_at_5, top_k_accuracy

THRESHOLDS = tuple(np.round(np.arange(-0.2, 1.0001, 0.05), 3))


def knn(queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-``k`` (scores, ids); ``exclude_self`` drops gallery row i for query i (leave-one-out)."""
    import faiss

    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    extra = 1 if exclude_self else 0
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k + extra, len(gallery)))
    if exclude_self:
        keep = ids != np.arange(len(queries))[:, None]
        scores = np.stack([row[mask][:k] for row, mask in zip(scores, keep)])
        ids = np.stack([row[mask][:k] for row, mask in zip(ids, keep)])
    return scores, ids


def rank_individuals(scores: np.ndarray, ids: np.ndarray, labels: Sequence[str]) -> list[tuple[list[str], list[float]]]:
    """Neighbour lists -> per query, distinct individuals in order of their best similarity (with that score)."""
    ranked = []
    for row_scores, row_ids in zip(scores, ids):
        individuals: list[str] = []
        best: list[float] = []
        for score, idx in zip(row_scores, row_ids):
            if idx < 0:
                continue
            label = labels[int(idx)]
            if label not in individuals:
                individuals.append(label)
                best.append(float(score))
        ranked.append((individuals, best))
    return ranked


def score_threshold(truths: Sequence[str], ranked, threshold: float) -> dict[str, float]:
    predictions = [insert_new_individual(ind, sc, threshold, NEW_INDIVIDUAL) for ind, sc in ranked]
    return {"map5": map_at_5(truths, predictions), "top1": top_k_accuracy(truths, predictions, 1),
            "top5": top_k_accuracy(truths, predictions, 5), "threshold": float(threshold)}


def evaluate_ranked(truths: Sequence[str], ranked, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    """Scores at the ``new_individual`` threshold that maximises MAP@5 (ties: the lowest threshold)."""
    best = None
    for threshold in thresholds:
        result = score_threshold(truths, ranked, threshold)
        if best is None or result["map5"] > best["map5"]:
            best = result
    return best


def evaluate(query: np.ndarray, query_labels: Sequence[str], gallery: np.ndarray, gallery_labels: Sequence[str],
             k: int = 50, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    """MAP@5 / top-1 / top-5 of queries (truth ``new_individual`` when unseen) against a labelled gallery."""
    scores, ids = knn(query, gallery, k)
    return evaluate_ranked(list(query_labels), rank_individuals(scores, ids, list(gallery_labels)), thresholds)


def leave_one_out_truths(labels: Sequence[str]) -> list[str]:
    """Truth of each photo queried against the others: its individual, or ``new_individual`` if it is alone."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return [label if counts[label] > 1 else NEW_INDIVIDUAL for label in labels]


def evaluate_leave_one_out(embeddings: np.ndarray, labels: Sequence[str], k: int = 50,
                           thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    """Each photo a query against all the others (the lions benchmark protocol)."""
    scores, ids = knn(embeddings, embeddings, k, exclude_self=True)
    return evaluate_ranked(leave_one_out_truths(labels), rank_individuals(scores, ids, list(labels)), thresholds)
