"""``whale-dist stats``: its counts against counts taken independently with pandas from ``train.csv``, label problems
found rather than refused, dates and places from a manifest, header-only photo sizes on the lions (read in place),
and a page that escapes what it shows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from whale_dist import stats
from whale_dist.cli import run_job
from whale_dist.config import SynthConfig

LIONS = Path(os.environ.get("WHALE_LIONS", "/work/shared/data/lions"))
EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Path:
    from whale_dist.synth import generate_survey

    out = tmp_path_factory.mktemp("survey")
    generate_survey(SynthConfig(n_individuals=14, image_size=40, max_photos_per_individual=5, test_photos=6), str(out))
    return out


def damaged_copy(survey: Path, folder: Path) -> Path:
    """train.csv with a species typo, a duplicated key, a photo that is not there and a species name that is markup."""
    import shutil

    shutil.copytree(survey, folder)
    frame = pd.read_csv(folder / "train.csv", dtype=str)
    frame.loc[0, "species"] = "bottlenose_dolpin"
    frame.loc[1, "species"] = EVIL
    extra = pd.DataFrame([{**frame.iloc[2].to_dict()}, {"image": "gone.jpg", "species": "beluga",
                                                         "individual_id": "abc"}])
    pd.concat([frame, extra], ignore_index=True).to_csv(folder / "train.csv", index=False)
    return folder


def run(argv: list[str], capsys) -> dict:
    assert run_job(stats.main, argv) == 0, capsys.readouterr().err
    out = argv[argv.index("--out") + 1]
    return json.loads(Path(out, "stats.json").read_text())


def test_counts_equal_pandas_counts_of_train_csv(survey, tmp_path, capsys):
    folder = damaged_copy(survey, tmp_path / "survey")
    result = run(["--catalogue", str(folder), "--out", str(tmp_path / "out"), "catalogue.n_folds=2"], capsys)
    printed = capsys.readouterr().out
    raw = pd.read_csv(folder / "train.csv", dtype=str, keep_default_na=False)
    table = raw.drop_duplicates("image")  # the first row of a repeated key counts
    per = table["individual_id"].value_counts()
    species = table["species"].replace({"bottlenose_dolpin": "bottlenose_dolphin", "beluga": "beluga_whale"})
    assert result["photos"] == len(table) and result["individuals"] == len(per)
    assert result["singletons"] == int((per == 1).sum()) and result["species"] == species.nunique()
    assert result["photos_per_individual"]["max"] == per.max()
    assert result["photos_per_individual"]["p50"] == pytest.approx(per.median())
    assert {r["species"]: r["photos"] for r in result["species_table"]} == species.value_counts().to_dict()
    problems = result["problems"]
    assert problems["species_fixed"] == {"bottlenose_dolpin -> bottlenose_dolphin": 1, "beluga -> beluga_whale": 1}
    assert problems["duplicate_keys"] == {"rows": 1, "examples": [raw["image"][2]]}
    assert problems["missing_files"]["count"] == 1 and problems["missing_files"]["examples"][0].endswith("gone.jpg")
    fold = result["fold"]
    assert fold["val_photos"] + fold["train_photos"] == len(table) and fold["val_new_photos"] > 0
    assert result["photo_sizes"]["read"] == len(table) - 1 and result["photo_sizes"]["width"]["median"] == 40
    assert f"{len(table)} photos, {len(per)} individuals" in printed
    page = (tmp_path / "out" / "stats.html").read_text()
    assert "&lt;script&gt;" in page and "<script" not in page.lower()
    assert (tmp_path / "out" / "photos_per_individual.png").read_bytes().startswith(b"\x89PNG")


def test_dates_and_locations_from_a_manifest(survey, tmp_path, capsys):
    url = str(survey / "train_manifest.csv")
    result = run(["--catalogue", url, "--format", "manifest", "--out", str(tmp_path / "out")], capsys)
    manifest = pd.read_csv(url, dtype=str)
    where = result["when_where"]
    assert where["with_date"] == len(manifest) and sum(where["per_year"].values()) == len(manifest)
    assert where["first"] == min(manifest["date"]) and where["locations"] == manifest["location"].nunique()
    assert (tmp_path / "out" / "dates.png").exists()


def test_kaggle_shaped_table_has_the_competition_counts():
    from collections import Counter

    from whale_dist.synth.table import kaggle_table

    rows = kaggle_table()
    per = Counter(r["individual_id"] for r in rows)
    assert len(rows) == 51033 and len(per) == 15587 and sum(1 for n in per.values() if n == 1) == 9258
    assert len({r["species"] for r in rows}) == 30 and rows == sorted(rows, key=lambda r: r["image"])


def test_missing_catalogue_is_one_line_error(tmp_path, capsys):
    assert run_job(stats.main, ["--catalogue", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.skipif(not LIONS.is_dir(), reason="the lions photos are not on this machine")
def test_lions_as_a_table_sizes_from_headers_only(tmp_path, capsys, monkeypatch):
    from helpers import lions_wildlife_table

    from whale_dist.embed import sources

    lions_wildlife_table(LIONS).to_csv(tmp_path / "lions.csv", index=False)
    reads = []
    real_read_range = sources.read_range
    monkeypatch.setattr(sources, "read_range", lambda url, a, b: reads.append((a, b)) or real_read_range(url, a, b))
    result = run(["--catalogue", str(tmp_path / "lions.csv"), "--format", "wildlife", f"catalogue.root={LIONS}",
                  "--out", str(tmp_path / "out"), "stats.sample_headers=40"], capsys)
    assert result["photos"] == 740 and result["individuals"] == 94 and result["species"] == 1
    assert result["problems"]["missing_files"]["count"] == 0 and result["orientations"]["left"] > 0
    sizes = result["photo_sizes"]
    assert sizes["read"] == 40 and sizes["formats"] == {"JPEG": 40} and 50 < sizes["width"]["median"] < 400
    assert reads and set(reads) == {(0, stats.HEADER_BYTES)}  # one ranged read of the header per photo
