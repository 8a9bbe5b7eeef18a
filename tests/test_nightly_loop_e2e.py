"""The nightly loop as researchers run it, every step a ``ray job submit`` on a local head (tests/ray_head.py):
catalogue embedded and indexed -> night 1 proposes matches and writes the review template -> a person confirms one
photo and declares another a new animal -> ``review`` writes catalogue version 2 and refreshes the index (an
incremental add, not a rebuild) -> night 2 brings another photo of the new animal, which is now its rank-1 proposal
-> night 2 run again embeds nothing and leaves its outputs.

The catalogue (a one-epoch model, the survey embedded and indexed, each step submitted) is the session's
``submitted_catalogue`` (conftest.py), copied to this test's bucket so that growing it changes nothing the submit
test sees. The test is about the loop's plumbing, not the model's eye, so night 2's photo of the new animal is night
1's re-encoded (another JPEG quality, like a burst frame) -- close for any encoder.
"""

from __future__ import annotations

import io
import uuid

import pandas as pd
import pytest
from helpers import copy_tree
from ray_head import submit_job

from whale_dist import catalog_versions, storage
from whale_dist.config import load_config
from whale_dist.embed import store as embed_store
from whale_dist.review.job import mint_id

pytestmark = pytest.mark.slow


def reencoded(data: bytes) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def read_parquet(url: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(storage.read_bytes(url)))


def night_photos(cfg) -> tuple[str, str, str]:
    """(a test photo of a catalogued individual, its id, a test photo of an animal not in the catalogue)."""
    labels = pd.read_csv(io.BytesIO(storage.read_bytes(f"{cfg.survey_url}/test_labels.csv")), dtype=str)
    known = labels[labels["individual_id"] != "new_individual"].iloc[0]
    new = labels[labels["individual_id"] == "new_individual"].iloc[0]
    return known["image"], known["individual_id"], new["image"]


def test_the_nightly_loop_grows_the_catalogue_and_finds_the_new_animal_the_next_night(head, submitted_catalogue,
                                                                                     s3_bucket):
    root = f"{s3_bucket}/store"
    assert copy_tree(submitted_catalogue.cfg.root, root)  # the model, survey, embeddings and index, as built
    common = ["--config", submitted_catalogue.config, f"root={root}", "identify.threshold=0.5"]
    cfg = load_config(submitted_catalogue.config, common[2:])
    transcript: list[str] = []
    version = submitted_catalogue.version
    first_index = storage.read_text(storage.join(cfg.index_root, "LATEST")).strip()

    known, known_id, new = night_photos(cfg)
    incoming = f"{s3_bucket}/incoming-{uuid.uuid4().hex[:6]}"
    for name in (known, new):
        storage.write_bytes(f"{incoming}/night-1/{name}", storage.read_bytes(f"{cfg.survey_url}/test_images/{name}"))
    submit_job(head, "night1", ["jobs/nightly.py", *common, "--images", f"{incoming}/night-1/", "--night", "night-1"],
           transcript)
    night = storage.join(cfg.surveys_url, "night-1")
    summary = storage.read_json(storage.join(night, "summary.json"))
    assert (summary["seen"], summary["embedded"], summary["errors"]) == (2, 2, 0)
    assert summary["proposed_matches"] + summary["probably_new"] == 2
    assert len(read_parquet(storage.join(night, "predictions.parquet"))) == 2
    assert storage.exists(storage.join(night, "submission.csv"))
    assert storage.exists(storage.join(night, "report", "index.html"))
    template = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(night, "report", "decisions.csv"))), dtype=str,
                           keep_default_na=False)
    assert list(template.columns)[:4] == ["image", "decision", "individual_id", "reviewer"]
    assert sorted(template["image"]) == [f"night-1/{known}", f"night-1/{new}"] and set(template["decision"]) == {""}

    filled = template.set_index("image")
    filled.loc[f"night-1/{known}", ["decision", "individual_id", "reviewer"]] = ["confirm", known_id, "ann"]
    filled.loc[f"night-1/{new}", ["decision", "individual_id", "reviewer"]] = ["new", "", "ann"]
    decisions = f"{s3_bucket}/reviews/night-1.csv"
    storage.write_text(decisions, filled.reset_index().to_csv(index=False))
    submit_job(head, "review", ["jobs/review.py", *common, "--decisions", decisions, "--night", "night-1"], transcript)

    catalogue = catalog_versions.catalogue_root(cfg)
    assert catalog_versions.list_versions(catalogue) == [1, 2]
    v1, v2 = (catalog_versions.read_version(catalogue, n) for n in (1, 2))
    minted = mint_id("night-1", f"night-1/{new}")
    assert len(v2) == len(v1) + 2 and set(v2["individual_id"].iloc[-2:]) == {known_id, minted}
    assert set(v2["night"].iloc[-2:]) == {"night-1"} and set(v2["model_version"].iloc[-2:]) == {version}
    refreshed = storage.read_json(storage.join(cfg.index_root, storage.read_text(
        storage.join(cfg.index_root, "LATEST")).strip(), "manifest.json"))
    assert refreshed["parent"] == first_index and refreshed["added"] == 2, "an incremental add, not a rebuild"

    storage.write_bytes(f"{incoming}/night-2/again.jpg",
                        reencoded(storage.read_bytes(f"{cfg.survey_url}/test_images/{new}")))
    night2 = ["jobs/nightly.py", *common, "--images", f"{incoming}/night-2/", "--night", "night-2"]
    submit_job(head, "night2", night2, transcript)
    predictions = read_parquet(storage.join(cfg.surveys_url, "night-2", "predictions.parquet"))
    assert list(predictions["predictions"][0])[0] == minted

    chunks = embed_store.published(cfg.query_store, version)
    logs = submit_job(head, "night2-again", night2, transcript)
    assert "embedded 0," in logs and embed_store.published(cfg.query_store, version) == chunks
    again = read_parquet(storage.join(cfg.surveys_url, "night-2", "predictions.parquet"))
    assert list(again["predictions"][0]) == list(predictions["predictions"][0])
