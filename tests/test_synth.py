"""The synthetic survey: byte-for-byte determinism, the statistics it states, and writing to S3."""

from __future__ import annotations

import dataclasses
import json
import os

import pandas as pd
import pytest

from whale_dist import storage
from whale_dist.catalog import NEW_INDIVIDUAL, fix_species, read_happywhale, read_manifest, read_table
from whale_dist.config import SynthConfig
from whale_dist.identify.baselines import main as baselines_main
from whale_dist.synth import main
from whale_dist.synth.draw import SPECIES
from whale_dist.synth.plan import plan_survey
from whale_dist.synth.survey import generate_survey

TINY = SynthConfig(seed=3, n_individuals=14, image_size=48, max_photos_per_individual=5, singleton_fraction=0.3,
                   test_new_fraction=0.25, test_photos=12)
MICRO = SynthConfig(seed=7, n_individuals=6, image_size=32, max_photos_per_individual=3, test_new_fraction=0.25,
                    test_photos=4)  # for the slower paths: S3 and the command line


def tree(root: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file under a local folder."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("survey"))
    return out, generate_survey(TINY, out)


def test_same_seed_writes_identical_bytes(survey, tmp_path):
    again = str(tmp_path / "again")
    generate_survey(dataclasses.replace(TINY, out="somewhere/else"), again)
    first, second = tree(survey[0]), tree(again)
    assert sorted(first) == sorted(second)
    assert [p for p in first if first[p] != second[p]] == []
    assert sum(p.endswith(".jpg") for p in first) == survey[1]["photos"] + survey[1]["test_photos"]


def test_different_seed_writes_a_different_survey(survey, tmp_path):
    other = str(tmp_path / "other")
    generate_survey(dataclasses.replace(TINY, seed=4), other)
    first, second = tree(survey[0]), tree(other)
    assert first["train.csv"] != second["train.csv"]
    assert not set(v for k, v in first.items() if k.endswith(".jpg")) & set(v for k, v in second.items()
                                                                             if k.endswith(".jpg"))


def test_statistics_match_the_files_and_the_config(survey):
    out, stats = survey
    train = read_happywhale(out)  # also checks that every listed photo exists
    per_individual = train["individual_id"].value_counts()
    assert storage.read_json(storage.join(out, "survey.json")) == json.loads(json.dumps(stats))
    assert stats["photos"] == len(train) and stats["individuals"] == len(per_individual)
    assert stats["singletons"] == int((per_individual == 1).sum()) > 0
    assert per_individual.max() == stats["max_photos_per_individual"] <= TINY.max_photos_per_individual
    assert stats["seed"] == TINY.seed and stats["test_photos"] == TINY.test_photos
    assert {s: v["photos"] for s, v in stats["species"].items()} == train["species"].value_counts().to_dict()
    assert all(s in SPECIES and fix_species(s) == s for s in train["species"])


def test_test_split_holds_unseen_individuals_labelled_new(survey):
    out, stats = survey
    known = set(read_happywhale(out)["individual_id"])
    labels = read_table(storage.join(out, "test_labels.csv"))
    new = labels["individual_id"] == NEW_INDIVIDUAL
    assert new.sum() == stats["test_new_photos"] == round(TINY.test_photos * TINY.test_new_fraction)
    assert set(labels.loc[~new, "individual_id"]) <= known
    assert stats["test_new_fraction"] == pytest.approx(new.mean(), abs=1e-3)
    manifest = read_manifest(storage.join(out, "test_manifest.csv"))
    assert (manifest["individual_id"] == "").all() and (manifest["species"] == "").all()
    assert sorted(manifest["url"]) == sorted(storage.join(out, "test_images", i) for i in labels["image"])


def test_train_manifest_agrees_with_train_csv_and_has_encounters(survey):
    out, _ = survey
    manifest = read_manifest(storage.join(out, "train_manifest.csv"))
    happywhale = read_happywhale(out)
    assert sorted(manifest["url"]) == sorted(happywhale["url"])
    merged = manifest.merge(happywhale, on="url", suffixes=("", "_csv"))
    assert (merged["individual_id"] == merged["individual_id_csv"]).all()
    groups = manifest.groupby("encounter_id").agg(n=("url", "size"), ids=("individual_id", "nunique"),
                                                  dates=("date", "nunique"))
    assert (groups["ids"] == 1).all() and (groups["dates"] == 1).all() and (groups["n"] > 1).any()


def test_default_plan_is_long_tailed():
    rows = pd.DataFrame(plan_survey(SynthConfig()))
    counts = rows[rows["split"] == "train"]["individual_id"].value_counts()
    assert 0.25 < (counts == 1).mean() < 0.5  # many singletons
    assert counts.max() >= 8 and len(set(rows["species"])) >= 5


def test_writes_the_same_survey_to_s3(tmp_path, s3_bucket):
    url = storage.join(s3_bucket, "survey")
    assert generate_survey(MICRO, url) == generate_survey(MICRO, str(tmp_path))
    local = tree(str(tmp_path))
    remote = {storage.relative_key(url, f): storage.read_bytes(f) for f in storage.list_files(url)}
    assert remote == local


def test_main_prints_statistics_and_baselines(tmp_path, capsys):
    out = str(tmp_path / "cli")
    argv = ["--out", out, "--seed", "5"] + [f"synth.{k}={v}" for k, v in dataclasses.asdict(MICRO).items()
                                             if k not in ("out", "seed")]
    assert main(argv) == 0
    assert "singletons" in capsys.readouterr().out
    assert baselines_main(["--survey", out, "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "raw_pixel" in printed and "MAP@5" in printed
    assert storage.read_json(storage.join(out, "survey.json"))["seed"] == 5
    assert "seed: 5" in storage.read_text(storage.join(out, "synth_config.yaml"))
