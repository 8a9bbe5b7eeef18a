"""Baselines: k-NN through the protocol on known and new queries, raw pixels on duplicates, random's expectation."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from whale_dist import storage
from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.config import SynthConfig
from whale_dist.identify.baselines import (
    nearest_neighbour_scores,
    random_map5,
    random_predictions,
    raw_pixel_map5,
    survey_baselines,
)
from whale_dist.synth.survey import generate_survey


def test_nearest_neighbours_find_known_and_new_individuals():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 64))
    counts = [1] * 10 + [6] * 20  # singletons land in validation as new individuals
    rows = [(f"ind{i}", centres[i] + rng.normal(scale=0.2, size=64)) for i, n in enumerate(counts) for _ in range(n)]
    catalogue = pd.DataFrame({"individual_id": [r[0] for r in rows]})
    vectors = np.stack([r[1] for r in rows])
    queries = np.concatenate([centres[10:20], rng.normal(size=(10, 64))]) + rng.normal(scale=0.2, size=(20, 64))
    truths = [f"ind{i}" for i in range(10, 20)] + [NEW_INDIVIDUAL] * 10
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    result = nearest_neighbour_scores(norm(vectors), catalogue, norm(queries), truths)
    assert result["top1"] == 1.0 and result["map5"] == 1.0


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_raw_pixels_match_identical_duplicates_perfectly(tmp_path):
    rng = np.random.default_rng(1)
    records = []
    for ind in range(6):
        base = rng.integers(0, 256, size=(32, 32, 3))
        for photo in range(5):
            url = str(tmp_path / f"i{ind}_{photo}.png")
            noisy = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
            storage.write_bytes(url, _png(noisy))
            records.append({"url": url, "individual_id": f"ind{ind}"})
    catalogue = pd.DataFrame(records)
    queries = catalogue.iloc[::3].reset_index(drop=True)  # byte-identical copies of catalogue photos
    result = raw_pixel_map5(catalogue, queries, size=16)
    assert result["map5"] == 1.0 and result["top1"] == 1.0


def test_random_predictions_are_distinct_and_score_their_expectation():
    individuals = [f"ind{i}" for i in range(19)]
    predictions = random_predictions(individuals, 4000, seed=0)
    assert all(len(set(p)) == 5 and set(p) <= set(individuals) | {NEW_INDIVIDUAL} for p in predictions)
    truths = pd.DataFrame({"individual_id": list(np.random.default_rng(2).choice(individuals, 4000))})
    expected = sum(1 / r for r in range(1, 6)) / 20  # truth equally likely at each of 20 positions
    result = random_map5(pd.DataFrame({"individual_id": individuals}), truths, seed=0)
    assert result["map5"] == pytest.approx(expected, abs=0.01)


def test_survey_baselines_on_a_tiny_survey_are_sane(tmp_path):
    cfg = SynthConfig(seed=2, n_individuals=12, image_size=40, max_photos_per_individual=4, test_photos=10)
    generate_survey(cfg, str(tmp_path))
    results = survey_baselines(str(tmp_path))
    for result in results.values():
        assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
        assert result["top1"] <= result["map5"] <= result["top5"]
