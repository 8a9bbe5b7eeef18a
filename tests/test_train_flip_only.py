"""Flip-only training augmentation (``train.augment_flip``, ``train.augment_geometric``): each photo comes back
untouched or mirrored left-right, nothing else; the defaults keep the previous pipeline (no flip); and the training
datasets get the options from the config."""

from __future__ import annotations

import numpy as np
import torch

from whale_dist.config import load_config
from whale_dist.train import data

FLIP_ONLY = ["train.augment=true", "train.augment_geometric=false", "train.augment_colour=false",
             "train.augment_flip=true"]


def test_flip_only_mirrors_about_half_and_changes_nothing_else():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 12, 12, 3), dtype=np.uint8)
    torch.manual_seed(0)
    out = data.augment_batch({"image": images}, 12, colour=False, geometric=False, flip=True)["image"]
    same = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
    mirrored = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
    assert np.all(same | mirrored)  # no crop, affine, blur or colour change
    assert 16 <= mirrored.sum() <= 48  # p = 0.5


def test_defaults_have_no_flip_and_keep_the_geometric_pipeline():
    from torchvision.transforms import v2

    cfg = load_config(None, []).train
    assert cfg.augment_geometric and not cfg.augment_flip
    default = [type(t) for t in data.augmentation(12).transforms]
    assert v2.RandomHorizontalFlip not in default and v2.RandomResizedCrop in default
    flip_only = [type(t) for t in data.augmentation(12, colour=False, geometric=False, flip=True).transforms]
    assert flip_only == [v2.RandomHorizontalFlip]


def test_training_datasets_pass_the_flip_only_options(monkeypatch):
    calls = []
    monkeypatch.setattr(data, "photo_table", lambda frame, individuals, species: frame)
    monkeypatch.setattr(data, "photo_dataset", lambda table, size, **kwargs: calls.append(kwargs) or table)
    cfg = load_config(None, [*FLIP_ONLY, "train.final_fit=true", "model.image_size=32"])
    data.training_datasets("train-frame", "val-frame", {}, {}, cfg)
    assert calls == [{"augment": True, "shuffle": True, "colour": False, "geometric": False, "flip": True,
                      "seed": None}]
