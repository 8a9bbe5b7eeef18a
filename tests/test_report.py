"""The review report: escaping of user strings, file names that cannot leave the folder, failed photos shown."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest

from whale_dist.identify.report import build_report, threshold_plot, write_report

NEW = "new_individual"
EVIL_ID = "<script>alert('id')</script>"
EVIL_FILE = "../../<img src=x onerror=alert(1)>.jpg"


def photo(path, seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def table(tmp_path):
    cat = [photo(str(tmp_path / "cat" / f"c{i}.jpg"), i) for i in range(3)]
    queries = [photo(str(tmp_path / "q" / f"q{i}.jpg"), 10 + i) for i in range(2)]
    return pd.DataFrame([
        {"image": EVIL_FILE, "url": queries[0], "encounter_id": "<b>enc</b>", "threshold": 0.6,
         "predictions": [EVIL_ID, NEW, "bob"], "scores": [0.8, 0.6, 0.4], "match_keys": ["c0.jpg", "", "c1.jpg"],
         "match_urls": [cat[0], "", cat[1]], "candidate_species": ["<i>orca</i>", "", "orca"],
         "predicted_species": "<i>orca</i>"},
        {"image": "q1.jpg", "url": queries[1], "encounter_id": "", "threshold": 0.6,
         "predictions": [NEW, "bob", "ann"], "scores": [0.6, 0.5, 0.2], "match_keys": ["", "c1.jpg", "missing.jpg"],
         "match_urls": ["", cat[1], str(tmp_path / "nope.jpg")], "candidate_species": ["", "orca", "orca"],
         "predicted_species": "orca"}])


def test_report_escapes_every_user_string(table):
    errors = pd.DataFrame({"image_key": ["<script>bad</script>.jpg"], "stage": ["decode"], "message": ["<broken>"]})
    calibration = {"global": 0.6, "map5_global": 0.7, "curve": {"thresholds": [0.2, 0.6, 0.9], "map5": [.5, .7, .6]}}
    files = build_report(table, errors, calibration, truths={EVIL_FILE: EVIL_ID, "q1.jpg": "zed"},
                         info={"catalogue": "<catalogue>"})
    page = files["index.html"].decode()
    for raw in (EVIL_ID, "<img src=x", "<b>enc</b>", "<i>orca</i>", "<script>bad", "<broken>", "<catalogue>"):
        assert raw not in page
    assert "&lt;script&gt;alert(&#x27;id&#x27;)&lt;/script&gt;" in page
    assert "NEW INDIVIDUAL?" in page and "matches the label" in page and "label: zed" in page
    assert "Photos that could not be processed (1)" in page
    assert "<script" not in page.lower()


def test_report_files_stay_inside_the_output_folder(table, tmp_path):
    files = build_report(table, pd.DataFrame(columns=["image_key", "stage", "message"]), None)
    thumbs = [name for name in files if name.startswith("thumbs/")]
    assert len(thumbs) == 4  # two queries + two readable catalogue photos; the missing one is shown as missing
    assert all(len(name) == len("thumbs/") + 24 + 4 for name in thumbs)
    out = tmp_path / "out"
    index = write_report(files, str(out), local_copy=str(tmp_path / "copy"))
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
                     and ("out" in p.parts or "copy" in p.parts))
    assert all(p.startswith(("out/report/", "copy/report/")) for p in written)
    assert index == str(tmp_path / "copy" / "report" / "index.html")
    page = (out / "report" / "index.html").read_text()
    assert "photo unavailable" in page
    with pytest.raises(ValueError):
        write_report({"../evil.html": b"x"}, str(out))


def test_threshold_plot_is_a_png():
    data = threshold_plot({"global": 0.5, "map5_global": 0.8, "curve": {
        "thresholds": [0.1, 0.5, 0.9], "map5": [0.4, 0.8, 0.6], "per_species": {"orca": [0.3, 0.7, 0.5]}}})
    from PIL import Image

    assert Image.open(io.BytesIO(data)).format == "PNG"
