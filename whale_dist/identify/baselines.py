"""Reference scores a model must beat: random guessing and raw-pixel nearest neighbours.

The raw-pixel baseline follows the protocol the model uses (``whale_dist.protocol``): cosine k-NN from each query
to every catalogue photo, best similarity per individual, and ``new_individual`` inserted below a threshold chosen
on the catalogue alone (leave-one-out with held-out individuals), never on the test labels. So the gap between it and
the model is the value of the learned embedding alone. ``nearest_neighbour_scores`` works on any vectors (pixels or
embeddings), so ``evaluate`` can run the model and the baseline through one code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from whale_dist import storage
from whale_dist.catalog import NEW_INDIVIDUAL, read_happywhale, read_table
from whale_dist.config import config_from_argv
from whale_dist.images import load_photo
from whale_dist.metrics import evaluate_predictions
from whale_dist.protocol import catalogue_threshold, score_queries

FLAGS = {"--survey": "synth.out", "--seed": "synth.seed"}


def pixel_vectors(urls: Sequence[str], size: int = 32) -> np.ndarray:
    """Photos -> (N, size*size*3) float32: downsampled, standardised per photo (removes exposure), L2-normalised."""

    pixels = np.stack([load_photo(storage.read_bytes(url), size) for url in urls]).astype(np.float32)
    flat = pixels.reshape(len(pixels), -1)
    flat = (flat - flat.mean(axis=1, keepdims=True)) / (flat.std(axis=1, keepdims=True) + 1e-6)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def nearest_neighbour_scores(vectors: np.ndarray, catalogue, query_vectors: np.ndarray, query_truths: Sequence[str],
                             seed: int = 0) -> dict:
    """MAP@5 / top-1 / top-5 of cosine k-NN on any vectors, through the one protocol (``whale_dist.protocol``).

    ``vectors`` are row-aligned with the ``catalogue`` table (needs ``individual_id``); ``query_truths`` hold an
    individual id or ``new_individual``. The threshold comes from the catalogue alone (``catalogue_threshold``).
    """

    labels = list(catalogue["individual_id"])
    threshold = catalogue_threshold(vectors, labels, seed=seed)["threshold"]
    return score_queries(query_vectors, query_truths, vectors, labels, threshold)


def raw_pixel_map5(catalogue, queries, size: int = 32, seed: int = 0) -> dict:
    """The raw-pixel baseline: tables with ``url`` (+ ``individual_id``; queries' may be ``new_individual``)."""
    return nearest_neighbour_scores(pixel_vectors(catalogue["url"], size), catalogue,
                                    pixel_vectors(queries["url"], size), list(queries["individual_id"]), seed=seed)


def random_predictions(individuals: Sequence[str], n_queries: int, seed: int = 0, k: int = 5) -> list[list[str]]:
    """``k`` distinct guesses per query, uniformly from the catalogue's individuals plus ``new_individual``."""
    rng = np.random.default_rng(seed)
    choices = np.array(sorted(set(individuals)) + [NEW_INDIVIDUAL])
    return [list(choices[rng.permutation(len(choices))[:k]]) for _ in range(n_queries)]


def random_map5(catalogue, queries, seed: int = 0) -> dict:
    predictions = random_predictions(catalogue["individual_id"], len(queries), seed)
    return {**evaluate_predictions(list(queries["individual_id"]), predictions), "threshold": float("nan")}


def read_test_split(survey_url: str):
    """The survey's test photos with their truth (``test_labels.csv`` + ``test_images/``) as a table with urls."""

    labels = read_table(storage.join(survey_url, "test_labels.csv"))
    labels["url"] = [storage.join(survey_url, "test_images", name) for name in labels["image"]]
    return labels


def survey_baselines(survey_url: str, seed: int = 0) -> dict:
    """Both baselines on a synthetic (or any Happywhale-layout) survey's test split."""

    catalogue, queries = read_happywhale(survey_url, check=False), read_test_split(survey_url)
    return {"raw_pixel": raw_pixel_map5(catalogue, queries, seed=seed), "random": random_map5(catalogue, queries, seed)}


def main(argv: list[str] | None = None) -> int:
    """``whale-dist baselines [--survey URL] [--seed N]``: how hard a survey is, before any model is trained."""
    import sys

    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), FLAGS)
    for name, result in survey_baselines(cfg.survey_url, seed=cfg.synth.seed).items():
        print(f"baseline {name:<10} test MAP@5 {result['map5']:.3f}  top-1 {result['top1']:.3f}  "
              f"top-5 {result['top5']:.3f}")
    return 0
