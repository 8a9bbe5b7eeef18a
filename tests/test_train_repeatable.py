"""Repeatable training data (``train.deterministic``): the augmentation draws depend on ``train.seed`` and the
batch's rows alone, the seeded shuffle gives a new order each epoch and the same orders on every run, and the trainer
keeps Ray Data's block order so the same rows share a batch run to run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import photo_bytes, write_files

from whale_dist.config import load_config
from whale_dist.train import data
from whale_dist.train.job import dataset_config


def batch(rows: list[int]) -> dict[str, np.ndarray]:
    image = np.random.default_rng(0).integers(0, 256, (len(rows), 24, 24, 3), dtype=np.uint8)
    return {"image": image, "row": np.array(rows, dtype=np.int64)}


def test_seeded_augmentation_depends_on_the_seed_and_rows_only():
    torch.manual_seed(123)
    first = data.augment_batch(batch([0, 1, 2, 3]), 24, seed=7)["image"]
    after = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(5)  # another global generator state: the seeded draws must not depend on it
    again = data.augment_batch(batch([0, 1, 2, 3]), 24, seed=7)["image"]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, data.augment_batch(batch([4, 1, 2, 3]), 24, seed=7)["image"])
    assert not np.array_equal(first, data.augment_batch(batch([0, 1, 2, 3]), 24, seed=8)["image"])
    torch.manual_seed(123)
    data.augment_batch(batch([0, 1, 2, 3]), 24, seed=7)
    assert torch.equal(torch.rand(1), after), "the seeded batch left torch's global generator where it was"


def test_deterministic_runs_keep_ray_datas_block_order():
    assert dataset_config(load_config(None, ["train.deterministic=true"]))._resolve_execution_options(
        "train").preserve_order
    assert not dataset_config(load_config(None, []))._resolve_execution_options("train").preserve_order


def epoch_orders(table: pd.DataFrame, seed: int | None, epochs: int = 2) -> list[tuple[list[int], bytes]]:
    """(rows, image bytes) of each epoch, read the way Ray Train reads: one streaming split, iterated per epoch."""
    from ray.data import DataContext

    context = DataContext.get_current()
    kept, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        split = data.photo_dataset(table, 16, augment=True, shuffle=True, rows_per_block=8, seed=seed).streaming_split(
            1, equal=True)[0]
        out = []
        for _ in range(epochs):
            batches = list(split.iter_batches(batch_size=None, batch_format="numpy"))
            out.append(([int(r) for b in batches for r in b["row"]], b"".join(b["image"].tobytes() for b in batches)))
        return out
    finally:
        context.execution_options.preserve_order = kept


@pytest.mark.slow
def test_seeded_training_data_repeats_run_to_run_and_changes_epoch_to_epoch(ray_cluster, tmp_path):
    write_files(str(tmp_path), {f"p{i}.jpg": photo_bytes(i) for i in range(16)})
    table = pd.DataFrame({"url": [str(tmp_path / f"p{i}.jpg") for i in range(16)], "bbox": [""] * 16,
                          "label": np.arange(16) % 4, "species": np.zeros(16, np.int64), "row": np.arange(16)})
    run_a, run_b = epoch_orders(table, seed=3), epoch_orders(table, seed=3)
    assert run_a == run_b
    (rows_1, images_1), (rows_2, images_2) = run_a
    assert sorted(rows_1) == sorted(rows_2) == list(range(16))
    assert rows_1 != rows_2 and images_1 != images_2, "each epoch gets its own order and draws"
    assert epoch_orders(table, seed=4, epochs=1)[0][0] != rows_1
