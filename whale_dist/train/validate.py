"""Validation of an embedding during training: the held-out fold ranked against the training photos.

The protocol is ``whale_dist.protocol``'s, the same that scores ``evaluate``, the baselines and the benches. The
``new_individual`` threshold comes from the gallery (the training photos, leave-one-out with held-out individuals),
never from the validation photos it scores, so the reported MAP@5 is what a calibrated deployment would get.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from whale_dist.protocol import catalogue_threshold, leave_one_out_truths, score_queries


def evaluate(query: np.ndarray, query_labels: Sequence[str], gallery: np.ndarray, gallery_labels: Sequence[str],
             k: int = 50, new_fraction: float = 0.2) -> dict[str, float]:
    """MAP@5 / top-1 / top-5 of queries (truth ``new_individual`` when unseen) at the gallery's own threshold."""
    threshold = catalogue_threshold(gallery, gallery_labels, new_fraction, k=k)["threshold"]
    return score_queries(query, query_labels, gallery, gallery_labels, threshold, k)


def evaluate_leave_one_out(embeddings: np.ndarray, labels: Sequence[str], threshold: float,
                           k: int = 50) -> dict[str, float]:
    """Each photo a query against all the others (the lions benchmark protocol), at a threshold chosen elsewhere."""
    return score_queries(embeddings, leave_one_out_truths(labels), embeddings, labels, threshold, k,
                         exclude_self=True)
