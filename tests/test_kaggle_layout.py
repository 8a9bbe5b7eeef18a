"""The Kaggle Happywhale download as-is: ``train.csv``, ``train_images/``, ``test_images/``, ``sample_submission.csv``
and nothing else, through train -> embed -> index -> calibrate -> identify over ``test_images/``, to a
``submission.csv`` that has the shape of ``sample_submission.csv`` (a photo that cannot be read keeps its row)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.cli import main as cli
from whale_dist.config import SynthConfig

KAGGLE_FILES = ("train.csv", "train_images", "test_images", "sample_submission.csv")


def kaggle_download(folder: Path) -> Path:
    """A tiny synthetic survey reduced to exactly the files of the Kaggle download, plus one damaged test photo."""
    from whale_dist.synth import generate_survey

    survey = folder / "survey"
    generate_survey(SynthConfig(seed=1, n_individuals=10, image_size=48, max_photos_per_individual=4, test_photos=6),
                    str(survey))
    kaggle = folder / "kaggle"
    kaggle.mkdir()
    for name in KAGGLE_FILES:
        (shutil.copytree if (survey / name).is_dir() else shutil.copy)(survey / name, kaggle / name)
    (kaggle / "test_images" / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
    sample = pd.read_csv(kaggle / "sample_submission.csv", dtype=str)
    sample.loc[len(sample)] = ["broken.jpg", sample["predictions"][0]]
    sample.to_csv(kaggle / "sample_submission.csv", index=False)
    return kaggle


def test_synth_writes_a_sample_submission(tmp_path):
    kaggle = kaggle_download(tmp_path)
    sample = pd.read_csv(kaggle / "sample_submission.csv", dtype=str)
    assert list(sample.columns) == ["image", "predictions"]
    assert set(sample["image"]) == {p.name for p in (kaggle / "test_images").iterdir()}
    assert all(p.split()[0] == NEW_INDIVIDUAL and len(p.split()) == 5 for p in sample["predictions"])


@pytest.mark.slow
def test_kaggle_layout_end_to_end(ray_cluster, tmp_path):
    kaggle = kaggle_download(tmp_path)
    out = tmp_path / "submission"
    common = ["--config", "configs/debug.yaml", f"root={tmp_path / 'store'}", f"catalogue.url={kaggle}",
              "catalogue.n_folds=2", "identify.min_species_queries=2"]
    assert cli(["train", *common, "train.epochs=1", "train.val_every=1"]) == 0
    assert cli(["embed", *common]) == 0  # no --images: the labelled catalogue of the config
    assert cli(["index", *common]) == 0
    assert cli(["calibrate", *common]) == 0
    assert cli(["identify", *common, "--images", str(kaggle / "test_images"), "--out", str(out)]) == 0

    sample = pd.read_csv(kaggle / "sample_submission.csv", dtype=str, keep_default_na=False)
    text = (out / "submission.csv").read_text()
    submission = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    assert text.splitlines()[0] == "image,predictions" == ",".join(sample.columns)
    assert sorted(submission["image"]) == sorted(sample["image"])  # every test image, the broken one too
    known = set(pd.read_csv(kaggle / "train.csv", dtype=str)["individual_id"]) | {NEW_INDIVIDUAL}
    for predictions in submission["predictions"]:
        ids = predictions.split(" ")
        assert len(ids) == 5 and len(set(ids)) == 5 and set(ids) <= known, predictions
    assert submission.set_index("image")["predictions"]["broken.jpg"].startswith(NEW_INDIVIDUAL)
