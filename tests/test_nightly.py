"""The nightly loop's pieces without Ray: the store's keys files (what is embedded, at what fingerprint, the newest
row per key, reads of only the partitions holding some keys) and the night's naming. The whole loop runs through
``ray job submit`` in tests/test_nightly_loop_e2e.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from whale_dist import nightly, storage
from whale_dist.config import ConfigError, load_config
from whale_dist.embed import pipeline as embed_pipeline
from whale_dist.embed import sources as embed_sources
from whale_dist.embed import store as embed_store
from whale_dist.review.refresh import chunk_table, empty_errors


def publish(out: str, number: int, keys: list[str], fingerprint: str = "f1", value: float = 1.0) -> None:
    rows = pd.DataFrame({"image_key": keys, "url": [f"u/{k}" for k in keys], "sha256": "", "model_version": "m1",
                         **{c: "" for c in embed_store.EMBEDDING_META}, "fingerprint": fingerprint})
    vectors = np.full((len(keys), 4), value, dtype=np.float32)
    embed_store.publish_chunk(out, "m1", number, chunk_table(rows, vectors), empty_errors())


def store_with_compacted_keys(out: str, compacted: int, keys=lambda n: [f"k{n}"], fingerprint=lambda n: "f1"):
    """Chunks 0..compacted-1 folded into one compacted keys file, then chunk ``compacted`` published after it."""
    for number in range(compacted):
        publish(out, number, keys(number), fingerprint=fingerprint(number))
    assert embed_store.compact_keys(out, "m1", every=compacted)
    publish(out, compacted, keys(compacted), fingerprint=fingerprint(compacted))


def recorded_reads(monkeypatch) -> list[str]:
    """The URLs the store reads from now on, in order."""
    read = []
    original = embed_store.storage.read_bytes
    monkeypatch.setattr(embed_store.storage, "read_bytes", lambda url: read.append(url) or original(url))
    return read


def test_keys_files_answer_what_is_done_and_the_newest_row_wins(tmp_path):
    out = str(tmp_path)
    publish(out, 0, ["a", "b"])
    publish(out, 1, ["c"])
    publish(out, 2, ["b"], fingerprint="f2", value=2.0)  # b's file changed: embedded again, supersedes
    done = embed_store.published(out, "m1")
    assert embed_store.done_fingerprints(out, "m1", done) == {"a": "f1", "b": "f2", "c": "f1"}
    table, vectors = embed_store.read_embeddings(out, "m1")
    assert sorted(table["image_key"]) == ["a", "b", "c"]
    assert vectors[list(table["image_key"]).index("b")][0] == 2.0
    rows, picked = embed_store.read_rows(out, "m1", ["b", "zz"])
    assert list(rows["image_key"]) == ["b"] and picked[0][0] == 2.0


def test_read_rows_reads_only_the_partitions_holding_the_keys(tmp_path, monkeypatch):
    out = str(tmp_path)
    for number in range(5):
        publish(out, number, [f"k{number}"])
    read = recorded_reads(monkeypatch)
    embed_store.read_rows(out, "m1", ["k3"])
    assert [u for u in read if "/embeddings/" in u] == [storage.join(embed_store.embeddings_dir(out, "m1"),
                                                                     "part-00003.parquet")]


def test_compacted_keys_replace_the_per_chunk_files_for_the_reader(tmp_path, monkeypatch):
    out = str(tmp_path)
    store_with_compacted_keys(out, 4)
    read = recorded_reads(monkeypatch)
    keys = embed_store.done_keys(out, "m1", embed_store.published(out, "m1"))
    assert keys == {"k0", "k1", "k2", "k3", "k4"}
    assert sorted(u.rsplit("/", 1)[-1] for u in read) == ["part-00004.parquet", "through-00003.parquet"]


def test_asking_about_some_keys_gives_the_whole_answer_cut_to_them(tmp_path):
    out = str(tmp_path)
    store_with_compacted_keys(out, 4, keys=lambda n: [f"k{n}", "shared"], fingerprint=lambda n: f"f{n}")
    done = embed_store.published(out, "m1")
    whole = embed_store.done_fingerprints(out, "m1", done)
    asked = ["shared", "k1", "k4", "never"]
    expected = {k: whole[k] for k in asked if k in whole}
    assert embed_store.done_fingerprints(out, "m1", done, pd.Series(asked)) == expected
    assert embed_store.done_fingerprints(out, "m1", done, asked)["shared"] == "f4"  # the newest row still wins
    assert embed_store.done_keys(out, "m1", done, []) == set()


def test_compacting_keys_lists_but_does_not_read_the_compacted_file(tmp_path, monkeypatch):
    out = str(tmp_path)
    store_with_compacted_keys(out, 3)
    read = recorded_reads(monkeypatch)
    assert not embed_store.compact_keys(out, "m1", every=3)  # one chunk since: nothing to fold yet
    assert read == []


def test_a_changed_file_is_planned_again_and_manifests_never_are():
    work = pd.DataFrame({"image_key": ["a", "b", "c"], "fingerprint": ["f1", "f2", ""]})
    todo = embed_pipeline.plan_chunks(work, {"a": "f1", "b": "f1", "c": "f9"}, 7, 10)
    assert list(todo["image_key"]) == ["b"] and list(todo["partition"]) == [7]


def test_listing_gives_each_photo_a_fingerprint_that_changes_with_the_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"one")
    first = embed_sources.list_archive(str(tmp_path))[0]["fingerprint"][0]
    (tmp_path / "a.jpg").write_bytes(b"three")
    assert first and embed_sources.list_archive(str(tmp_path))[0]["fingerprint"][0] != first


def test_night_names_are_one_safe_folder_and_default_to_the_utc_date(tmp_path):
    cfg = load_config(None, [f"root={tmp_path}"])
    assert len(nightly.night_name(cfg)) == 10
    cfg.nightly.night = "../x"
    with pytest.raises(ConfigError, match="one plain name"):
        nightly.night_name(cfg)


def test_nightly_needs_the_nights_photos(tmp_path):
    cfg = load_config(None, [f"root={tmp_path}"])
    with pytest.raises(ConfigError, match="--images"):
        nightly.run_nightly(cfg)


def test_identify_stands_alone_on_the_index_manifest_and_takes_catalogue_filters():
    from types import SimpleNamespace

    from whale_dist.config import config_from_argv
    from whale_dist.identify import job as identify_job
    from whale_dist.identify.ranking import catalogue_filters

    argv = identify_job.list_flags(["--catalogue", "s3://b/idx", "--images", "s3://b/n", "--out", "s3://b/o",
                                    "--species", "humpback_whale,orca", "--location=bay", "--date-from", "2025-06-01"])
    cfg = config_from_argv(argv, identify_job.FLAGS)
    assert catalogue_filters(cfg.identify) == {"species": ["humpback_whale", "orca"], "locations": ["bay"],
                                               "date_from": "2025-06-01", "date_to": ""}
    identify_job.resolve_model(cfg, SimpleNamespace(manifest={"model_url": "s3://b/runs/r/model.pt"}))
    assert cfg.model_url == "s3://b/runs/r/model.pt"


def test_images_url_may_name_the_night(tmp_path, monkeypatch):
    """A schedule passes one URL for every night (``surveys/{night}/``); the run reads that night's folder."""
    from whale_dist import nightly
    from whale_dist.config import load_config

    seen = []

    def stop(cfg, night):
        seen.append(cfg.embed.images)
        raise RuntimeError("stop")

    monkeypatch.setattr(nightly, "night_work", stop)
    monkeypatch.setattr("whale_dist.identify.open_catalogue", lambda url, use_gpu=False: None)
    monkeypatch.setattr("whale_dist.identify.job.resolve_model", lambda cfg, catalogue: None)
    monkeypatch.setattr(nightly, "check_model", lambda cfg, catalogue: None)
    monkeypatch.setattr("whale_dist.identify.job.thresholds_for_run", lambda cfg, catalogue: {})
    cfg = load_config(None, [f"root={tmp_path}", "embed.images=s3://b/surveys/{night}/", "nightly.night=2026-11-28"])
    with pytest.raises(RuntimeError, match="stop"):
        nightly.run_nightly(cfg)
    assert seen == ["s3://b/surveys/2026-11-28/"]
