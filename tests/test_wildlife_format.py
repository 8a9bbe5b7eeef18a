"""``catalogue.format=wildlife``: a wildlife-datasets table (``WildlifeDataset.df``) read as the catalogue, on
hand-written rows and on the lions photos converted to that table (read in place, never copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from helpers import lions_wildlife_table

from whale_dist import catalog
from whale_dist.config import load_config

LIONS = Path(os.environ.get("WHALE_LIONS", "/work/shared/data/lions"))


def write_photo(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (90, 90, 90)).save(path, format="JPEG")


def small_table(folder: Path) -> pd.DataFrame:
    rows = [("a1", "Ayo", "img/a1.jpg", [2, 3, 10, 5], "left", "lion"),
            ("a2", "Ayo", "img/a2.jpg", "[0, 0, 20.5, 10]", "right", "lion"),
            ("b1", "unknown", "img/b1.jpg", None, "left", "lion")]
    for _, _, path, *_ in rows:
        write_photo(folder / path)
    return pd.DataFrame(rows, columns=["image_id", "identity", "path", "bbox", "orientation", "species"])


@pytest.mark.parametrize("value,expected", [
    ([2, 3, 10, 5], "2 3 12 8"), ("[0, 0, 20.5, 10]", "0 0 20.5 10"), ("1 2 3 4", "1 2 4 6"), (None, ""),
    (float("nan"), ""), ("", ""), ("[1, 2]", "[1, 2]"),  # a bad one passes through for the row check to name
])
def test_bbox_is_xywh_in_any_spelling(value, expected):
    assert catalog.wildlife_bbox(value) == expected


def test_csv_table_with_paths_relative_to_its_folder(tmp_path):
    small_table(tmp_path).to_csv(tmp_path / "df.csv", index=False)
    table = catalog.read_catalogue(str(tmp_path / "df.csv"), "wildlife")
    assert list(table.columns) == [*catalog.CATALOGUE_COLUMNS, "orientation"]
    assert list(table["image_key"]) == ["a1", "a2", "b1"]
    assert list(table["individual_id"]) == ["Ayo", "Ayo", ""]  # the library's unknown_name: not labelled
    assert list(table["bbox"]) == ["2 3 12 8", "0 0 20.5 10", ""]
    assert table["url"][0] == str(tmp_path / "img" / "a1.jpg")
    left = catalog.read_catalogue(str(tmp_path / "df.csv"), "wildlife", orientations=["left"])
    assert list(left["image_key"]) == ["a1", "b1"]


def test_parquet_table_with_list_bboxes_and_a_root(tmp_path):
    frame = small_table(tmp_path / "photos").rename(columns={"orientation": "position"})  # older releases
    frame["bbox"] = [[2, 3, 10, 5], [0, 0, 20.5, 10], None]
    frame.to_parquet(tmp_path / "df.parquet", index=False)
    cfg = load_config(None, [f"catalogue.url={tmp_path / 'df.parquet'}", "catalogue.format=wildlife",
                             f"catalogue.root={tmp_path / 'photos'}", "catalogue.orientation=[right]"])
    table = catalog.catalogue_from_config(cfg)
    assert list(table["image_key"]) == ["a2"] and table["orientation"][0] == "right"
    assert table["bbox"][0] == "0 0 20.5 10"


def test_missing_photo_and_missing_column_are_one_line_errors(tmp_path):
    small_table(tmp_path).drop(columns=["identity"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(catalog.CatalogueError, match="missing column 'identity'"):
        catalog.read_catalogue(str(tmp_path / "bad.csv"), "wildlife")
    frame = small_table(tmp_path)
    frame.loc[len(frame)] = ["c1", "Cub", "img/none.jpg", None, "left", "lion"]
    frame.to_csv(tmp_path / "df.csv", index=False)
    with pytest.raises(catalog.CatalogueError, match="row 5: listed file not found"):
        catalog.read_catalogue(str(tmp_path / "df.csv"), "wildlife")


@pytest.mark.skipif(not LIONS.is_dir(), reason="the lions photos are not on this machine")
def test_lions_as_a_wildlife_table(tmp_path):
    frame = lions_wildlife_table(LIONS)
    frame.to_csv(tmp_path / "lions.csv", index=False)
    table = catalog.read_catalogue(str(tmp_path / "lions.csv"), "wildlife", root=str(LIONS))  # checks every file
    assert len(table) == len(frame) == 740
    assert table["individual_id"].nunique() == 94 and set(table["species"]) == {"lion"}
    left = catalog.read_catalogue(str(tmp_path / "lions.csv"), "wildlife", root=str(LIONS), orientations=["left"])
    assert 0 < len(left) < len(table) and set(left["orientation"]) == {"left"}


def test_a_wildlife_catalogue_is_embedded_from_its_own_paths(tmp_path):
    from whale_dist.embed.sources import from_catalogue

    small_table(tmp_path).to_csv(tmp_path / "df.csv", index=False)
    cfg = load_config(None, [f"catalogue.url={tmp_path / 'df.csv'}", "catalogue.format=wildlife",
                             "catalogue.orientation=[left]"])
    work = from_catalogue(cfg)
    assert list(work["image_key"]) == ["a1", "b1"]
    assert list(work["url"]) == [str(tmp_path / "img" / "a1.jpg"), str(tmp_path / "img" / "b1.jpg")]
    assert list(work["individual_id"]) == ["Ayo", ""] and list(work["bbox"]) == ["2 3 12 8", ""]
