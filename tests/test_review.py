"""Review without Ray: decisions files checked before anything is written, catalogue versions append-only.

The index refresh and the whole loop through ``ray job submit`` are in tests/test_nightly_loop_e2e.py.
"""

from __future__ import annotations

import pandas as pd
import pytest

from whale_dist import catalog_versions, storage
from whale_dist.config import load_config
from whale_dist.review import job as review
from whale_dist.review.job import DecisionsError

NIGHT = pd.DataFrame({"image": ["n1/a.jpg", "n1/b.jpg", "n1/c.jpg"], "url": ["s3://x/a.jpg", "s3://x/b.jpg", "u"],
                      "encounter_id": "", "date": "2026-11-26", "location": "bay", "predicted_species": "humpback",
                      "error": ""})
INFO = {"night": "n1", "model_version": "m1"}


def decisions(tmp_path, text: str) -> pd.DataFrame:
    path = tmp_path / "decisions.csv"
    path.write_text(text)
    return review.read_decisions(str(path))


def check(tmp_path, text: str, known=("whale-1",)):
    return review.check_decisions(decisions(tmp_path, text), NIGHT, set(known))


def test_undecided_rows_are_skipped_and_duplicates_agreeing_are_one(tmp_path):
    rows = check(tmp_path, "image,decision,individual_id,reviewer\nn1/a.jpg,confirm,whale-1,ann\n"
                           "n1/a.jpg,Confirm,whale-1,ann\nn1/b.jpg,,whale-1,\nn1/c.jpg,reject,,\n")
    assert list(rows["image"]) == ["n1/a.jpg", "n1/c.jpg"]


@pytest.mark.parametrize("text, message", [
    ("image,decision,individual_id\nn1/a.jpg,confirm,whale-1\n", "missing column 'reviewer'"),
    ("image,decision,individual_id,reviewer\nn9/z.jpg,confirm,whale-1,\n", "row 2: photo 'n9/z.jpg' is not among"),
    ("image,decision,individual_id,reviewer\nn1/a.jpg,confirm,whale-7,\n", "row 2: confirm names individual 'whale-7'"),
    ("image,decision,individual_id,reviewer\nn1/a.jpg,confirm,,\n", "confirm names individual ''"),
    ("image,decision,individual_id,reviewer\nn1/a.jpg,confirm,whale-1,\nn1/a.jpg,reject,,\n",
     "decided twice with different answers (rows 2, 3)"),
    ("image,decision,individual_id,reviewer\nn1/a.jpg,maybe,,\n", "decision 'maybe' is not one of"),
    ("image,decision,individual_id,reviewer\nn1/a.jpg,new,whale-1,\n", "in the catalogue already (use 'confirm')"),
])
def test_bad_decisions_fail_with_one_line(tmp_path, text, message):
    with pytest.raises(DecisionsError) as error:
        check(tmp_path, text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_confirm_may_name_an_individual_declared_new_in_the_same_file(tmp_path):
    rows = check(tmp_path, "image,decision,individual_id,reviewer\nn1/a.jpg,new,orca-9,\nn1/b.jpg,confirm,orca-9,\n")
    assert len(rows) == 2


def catalogue_config(tmp_path):
    folder = tmp_path / "survey"
    folder.mkdir()
    (folder / "train.csv").write_text("image,species,individual_id\nk1.jpg,humpback,whale-1\nk2.jpg,orca,whale-2\n")
    return load_config(None, [f"root={tmp_path / 'store'}", f"catalogue.url={folder}"])


def test_review_rows_carry_labels_and_provenance_and_a_stable_minted_id(tmp_path):
    cfg = catalogue_config(tmp_path)
    _, catalogue, written = catalog_versions.latest_version(cfg)
    assert not written and list(catalogue["image_key"]) == ["k1.jpg", "k2.jpg"]
    rows = check(tmp_path, "image,decision,individual_id,reviewer\nn1/a.jpg,confirm,whale-1,ann\n"
                           "n1/b.jpg,new,,\nn1/c.jpg,new,new_individual,\n")
    added = review.added_rows(rows, NIGHT, INFO, catalogue, "bob")
    assert list(added["individual_id"]) == ["whale-1", review.mint_id("n1", "n1/b.jpg"),
                                            review.mint_id("n1", "n1/c.jpg")]
    assert added["individual_id"][1] != added["individual_id"][2]
    assert list(added["reviewer"]) == ["ann", "bob", "bob"] and set(added["night"]) == {"n1"}
    assert list(added["species"]) == ["humpback", "humpback", "humpback"] and set(added["model_version"]) == {"m1"}
    assert list(added["url"]) == ["s3://x/a.jpg", "s3://x/b.jpg", "u"]


def test_versions_are_append_only_and_the_previous_stays_readable(tmp_path):
    cfg = catalogue_config(tmp_path)
    _, catalogue, _ = catalog_versions.latest_version(cfg)
    rows = check(tmp_path, "image,decision,individual_id,reviewer\nn1/a.jpg,confirm,whale-1,ann\n")
    number, url = catalog_versions.append_version(cfg, review.added_rows(rows, NIGHT, INFO, catalogue, ""))
    root = catalog_versions.catalogue_root(cfg)
    assert number == 2 and catalog_versions.list_versions(root) == [1, 2]
    v1, v2 = catalog_versions.read_version(root, 1), catalog_versions.read_version(root, 2)
    assert list(v1["image_key"]) == ["k1.jpg", "k2.jpg"] and v1["decision"][0].startswith("initial")
    assert list(v2["image_key"]) == ["k1.jpg", "k2.jpg", "n1/a.jpg"] and v2["reviewer"].iloc[-1] == "ann"
    with pytest.raises(catalog_versions.CatalogueVersionError):
        catalog_versions.write_version(root, 2, v2)
    # the version is a generic manifest: the catalogue reader takes it as it is
    from whale_dist.catalog import read_manifest

    assert list(read_manifest(url, check=False)["url"])[-1] == "s3://x/a.jpg"
    # applying the same decisions again adds nothing; another id for a catalogued photo is refused
    assert review.added_rows(rows, NIGHT, INFO, v2, "").empty
    other = check(tmp_path, "image,decision,individual_id,reviewer\nn1/a.jpg,confirm,whale-2,\n",
                  ("whale-1", "whale-2"))
    with pytest.raises(DecisionsError, match="in the catalogue as 'whale-1'"):
        review.added_rows(other, NIGHT, INFO, v2, "")


def test_a_bad_file_writes_nothing(tmp_path, capsys):
    from whale_dist import cli

    cfg = catalogue_config(tmp_path)
    night = storage.join(cfg.surveys_url, "n1")
    buffer = __import__("io").BytesIO()
    NIGHT.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(night, "predictions.parquet"), buffer.getvalue())
    storage.write_json(storage.join(night, "summary.json"), INFO)
    bad = tmp_path / "filled.csv"
    bad.write_text("image,decision,individual_id,reviewer\nn1/a.jpg,confirm,whale-1,\nn1/zz.jpg,reject,,\n")
    argv = ["--decisions", str(bad), "--night", "n1", f"root={cfg.root}", f"catalogue.url={cfg.catalogue.url}"]
    assert cli.run_job(review.main, argv) == 2
    assert "n1/zz.jpg" in capsys.readouterr().err
    assert not storage.list_files(catalog_versions.catalogue_root(cfg))
