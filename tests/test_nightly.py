"""The nightly job's publish guard, without Ray: the embed and index steps are replaced by fakes that write what the
real ones write (published embedding partitions; an index version + ``LATEST``), so only ``run_nightly``'s decisions
are under test. The real jobs run end to end, twice, in tests/test_submit_e2e.py.
"""

from __future__ import annotations

import pytest

from whale_dist import embed, index, nightly, storage
from whale_dist.config import ConfigError, load_config


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A config on a local root, with fake embed/index steps that count their calls."""
    cfg = load_config(None, [f"root={tmp_path}", "embed.images=s3://archive/surveys/", "index.catalogue_name=c"])
    calls = {"embed": 0, "index": 0, "new": 1}

    def fake_embed(run_cfg):
        calls["embed"] += 1
        for _ in range(calls["new"]):  # publish one partition per new photo batch, as embed_store names them
            number = len(storage.list_files(storage.join(run_cfg.embed_out, "embeddings"), (".done",)))
            part = storage.join(run_cfg.embed_out, "embeddings", "model=m1", f"part-{number:05d}.parquet")
            storage.write_bytes(part, b"rows")
            storage.mark_done(part)
        return {"model_version": "m1", "embedded": calls["new"], "errors": 0}

    def fake_build(run_cfg):
        calls["index"] += 1
        name = f"v{calls['index']}"
        storage.write_json(storage.join(run_cfg.index_root, name, "manifest.json"), {"model_version": "m1"})
        storage.write_text(storage.join(run_cfg.index_root, "LATEST"), name + "\n")
        return storage.join(run_cfg.index_root, name)

    monkeypatch.setattr(embed, "run_embed", fake_embed)
    monkeypatch.setattr(index, "build_index", fake_build)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    return cfg, calls


def test_second_run_with_nothing_new_publishes_nothing(store):
    cfg, calls = store
    first = nightly.run_nightly(cfg)
    assert first["published"] and first["index_version"] == "v1" and cfg.index.model_version == "m1"
    calls["new"] = 0
    second = nightly.run_nightly(cfg)
    assert not second["published"] and second["index_version"] == "v1" and calls["index"] == 1
    assert len(storage.list_files(cfg.url("nightly", "c", "runs"), ("summary.json",))) == 2


def test_new_photos_or_new_index_settings_publish_again(store):
    cfg, calls = store
    nightly.run_nightly(cfg)
    assert nightly.run_nightly(cfg)["index_version"] == "v2"  # one more partition
    calls["new"] = 0
    cfg.index.num_shards += 1
    assert nightly.run_nightly(cfg)["index_version"] == "v3"  # same photos, different index
    assert calls["index"] == 3


def test_an_index_published_by_someone_else_is_not_mistaken_for_ours(store):
    cfg, calls = store
    nightly.run_nightly(cfg)
    storage.write_text(storage.join(cfg.index_root, "LATEST"), "hand-built\n")
    calls["new"] = 0
    assert nightly.run_nightly(cfg)["published"]


def test_nightly_needs_an_archive_prefix(store):
    cfg, _ = store
    cfg.embed.images = ""
    with pytest.raises(ConfigError, match="embed.images"):
        nightly.run_nightly(cfg)
