"""Catalogue: Happywhale layout, generic manifests, species fixes, folds, one-line errors before any work."""

import pandas as pd
import pytest

from whale_dist import catalog, storage
from whale_dist.catalog import NEW_INDIVIDUAL, CatalogueError


def write_happywhale(base: str, rows: list[tuple[str, str, str]], missing: tuple[str, ...] = ()) -> None:
    lines = ["image,species,individual_id"] + [",".join(r) for r in rows]
    storage.write_text(storage.join(base, "train.csv"), "\n".join(lines) + "\n")
    for image, _, _ in rows:
        if image not in missing:
            storage.write_bytes(storage.join(base, "train_images", image), b"jpeg")


ROWS = [("a.jpg", "bottlenose_dolpin", "id1"), ("b.jpg", "kiler_whale", "id2"),
        ("c.jpg", "globis", "id3"), ("d.jpg", "pilot_whale", "id3"), ("e.jpg", "humpback_whale", "id1")]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_happywhale_layout_and_species_fixes(where, tmp_path, request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/hw"
    write_happywhale(base, ROWS)
    table = catalog.read_happywhale(base)
    assert list(table.columns) == list(catalog.CATALOGUE_COLUMNS)
    assert list(table["species"]) == ["bottlenose_dolphin", "killer_whale", "short_finned_pilot_whale",
                                      "short_finned_pilot_whale", "humpback_whale"]
    assert table["url"][0] == storage.join(base, "train_images", "a.jpg")
    assert set(table["bbox"]) == {""}


def test_generic_manifest_with_metadata(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p1.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere.png").write_bytes(b"y")
    frame = pd.DataFrame({"image": ["photos/p1.jpg", str(tmp_path / "elsewhere.png")],
                          "individual_id": ["w1", ""], "species": ["beluga", "fin_whale"],
                          "bbox": ["1 2 30 40", ""], "encounter_id": ["e1", "e2"], "date": ["2024-06-01", ""]})
    frame.to_parquet(tmp_path / "m.parquet")
    table = catalog.read_manifest(str(tmp_path / "m.parquet"))
    assert table["url"][0] == storage.join(str(tmp_path), "photos/p1.jpg")
    assert table["url"][1] == str(tmp_path / "elsewhere.png")
    assert table["species"][0] == "beluga_whale"
    assert catalog.parse_bbox(table["bbox"][0]) == (1.0, 2.0, 30.0, 40.0)
    assert table["location"][0] == ""


@pytest.mark.parametrize("content, fragment", [
    ("img,species,individual_id\na.jpg,x,y\n", "missing column 'image'"),
    ("image,species\na.jpg,x\n", "missing column 'individual_id'"),
    ("image,species,individual_id\na.jpg,x,1\nb.jpg,x,2\na.jpg,x,3\n", "row 4: duplicate image key 'a.jpg'"),
    ("image,species,individual_id\na.jpg,x,1\nzzz.jpg,x,2\n", "row 3: listed file not found"),
    ("image,species,individual_id\n,x,1\n", "row 2: empty image key"),
])
def test_bad_happywhale_csv_fails_in_one_line(tmp_path, content, fragment):
    (tmp_path / "train_images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "train_images" / name).write_bytes(b"x")
    (tmp_path / "train.csv").write_text(content)
    with pytest.raises(CatalogueError) as info:
        catalog.read_happywhale(str(tmp_path))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_bad_encoding_and_bad_bbox(tmp_path):
    (tmp_path / "m.csv").write_bytes("image\nca\xf1on.jpg\n".encode("latin-1"))
    with pytest.raises(CatalogueError, match="not UTF-8"):
        catalog.read_manifest(str(tmp_path / "m.csv"))
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "m2.csv").write_text("image,bbox\na.jpg,10 10 5 5\n")
    with pytest.raises(CatalogueError, match="row 2: bad bbox"):
        catalog.read_manifest(str(tmp_path / "m2.csv"))


def test_a_trailing_comma_on_every_row_keeps_each_column_in_its_place(tmp_path):
    """Spreadsheet exports end rows with a comma: pandas then took the first column for an index and shifted the
    others left (image keys became individual ids)."""
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "m.csv").write_text("image,individual_id,species\na.jpg,w1,beluga,\nb.jpg,w2,beluga,\n")
    table = catalog.read_manifest(str(tmp_path / "m.csv"))
    assert list(table["image_key"]) == ["a.jpg", "b.jpg"] and list(table["individual_id"]) == ["w1", "w2"]
    assert list(table["species"]) == ["beluga_whale"] * 2


def test_a_filled_field_beyond_the_header_is_refused_not_dropped(tmp_path):
    (tmp_path / "m.csv").write_text("image,individual_id\na.jpg,w1,\nb.jpg,w2,2024-06-01\n")
    with pytest.raises(CatalogueError) as info:
        catalog.read_manifest(str(tmp_path / "m.csv"), check=False)
    assert str(info.value) == f"manifest {tmp_path / 'm.csv'} row 3: more fields than the header's 2"


def test_a_parquet_manifest_with_its_own_index_names_rows_by_position(tmp_path):
    frame = pd.DataFrame({"image": ["a.jpg", "", "c.jpg"], "individual_id": ["w1", "w2", "w3"]},
                         index=["x", "y", "z"])
    frame.to_parquet(tmp_path / "m.parquet")  # the index is stored and comes back
    with pytest.raises(CatalogueError, match=r"row 3: empty image key$"):
        catalog.read_manifest(str(tmp_path / "m.parquet"), check=False)
    frame.assign(image=["a.jpg", "c.jpg", "a.jpg"]).to_parquet(tmp_path / "m2.parquet")
    with pytest.raises(CatalogueError, match=r"row 4: duplicate image key 'a.jpg'$"):
        catalog.read_manifest(str(tmp_path / "m2.parquet"), check=False)


def synthetic_table(n_individuals=40, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for ind in range(n_individuals):
        for photo in range(int(rng.integers(1, 9))):
            rows.append({"image_key": f"{ind}_{photo}.jpg", "individual_id": f"ind{ind}", "species": "sp"})
    frame = pd.DataFrame(rows)
    for column in ("url", "bbox", "encounter_id", "date", "location"):
        frame[column] = ""
    return frame


def test_folds_are_stratified_and_unseen_become_new_individual():
    table = synthetic_table()
    folded = catalog.assign_folds(table, n_folds=5, seed=0)
    assert set(folded["fold"]) == set(range(5))
    counts = table["individual_id"].value_counts()
    for fold in range(5):
        train, val = catalog.split_fold(folded, fold)
        assert len(train) + len(val) == len(table)
        assert not set(train["image_key"]) & set(val["image_key"])
        known = set(train["individual_id"])
        for ind, label in zip(val["individual_id"], val["label"]):
            assert label == (ind if ind in known else NEW_INDIVIDUAL)
        # stratification: an individual with >= 5 photos has at least one in every fold
        for ind in counts[counts >= 5].index:
            assert ind in set(val["individual_id"])
    train, val = catalog.split_fold(folded, 0)
    assert (val["label"] == NEW_INDIVIDUAL).any(), "singletons in the val fold must be unseen individuals"


def test_folds_are_deterministic():
    table = synthetic_table(seed=3)
    first = catalog.assign_folds(table, 5, seed=7)["fold"].tolist()
    assert catalog.assign_folds(table, 5, seed=7)["fold"].tolist() == first


def test_label_maps_and_fingerprint():
    table = synthetic_table(5)
    individuals, species = catalog.label_maps(table)
    assert list(individuals) == sorted(individuals) and species == {"sp": 0}
    changed = table.copy()
    changed.loc[0, "individual_id"] = "other"
    assert catalog.fingerprint(table) == catalog.fingerprint(table.copy())
    assert catalog.fingerprint(table) != catalog.fingerprint(changed)


def test_read_table_parquet_and_csv_agree(tmp_path):
    frame = pd.DataFrame({"image": ["a", "b"], "species": ["x", "y"]})
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.csv", index=False)
    a = catalog.read_table(str(tmp_path / "t.parquet"))
    b = catalog.read_table(str(tmp_path / "t.csv"))
    pd.testing.assert_frame_equal(a, b)
