"""Incremental add: the rebuild rule, the shard rule, and an add that answers exactly like a full rebuild with the
same quantizer while leaving every untouched shard file where it was (referenced, not copied)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from helpers import clustered, write_partitions
from helpers import index_config as config

from whale_dist.index import Catalogue, add_partitions, build_index, list_versions, needs_rebuild, should_rebuild
from whale_dist.index import publish as index_publish
from whale_dist.index.choice import shard_to_extend


@pytest.mark.parametrize(("index_model", "model", "trained_for", "n_after", "growth", "expected"), [
    ("m1", "m1", 1_000_000, 1_010_000, 0.5, False),
    ("m1", "m1", 1_000_000, 1_500_000, 0.5, False),
    ("m1", "m1", 1_000_000, 1_500_001, 0.5, True),
    ("m1", "m2", 1_000_000, 1_000_001, 0.5, True),  # another model: another vector space
    ("m1", "m1", 100, 110, 0.0, True),
    ("m1", "m1", 100, 100, 0.0, False),
])
def test_rebuild_when_the_model_changes_or_the_catalogue_outgrows_the_quantizer(index_model, model, trained_for,
                                                                               n_after, growth, expected):
    assert needs_rebuild(index_model, model, trained_for, n_after, growth=growth) is expected


def test_should_rebuild_reads_the_manifest():
    manifest = {"model_version": "m1", "n": 1200, "trained": {"n": 1000}}
    assert not should_rebuild(manifest, "m1", 300, growth=0.5)
    assert should_rebuild(manifest, "m1", 301, growth=0.5)
    assert should_rebuild({"model_version": "m1", "n": 1000}, "m1", 1, growth=0.0)  # built before trained.faiss


@pytest.mark.parametrize(("sizes", "n_new", "expected"), [
    ([500_000, 500_000], 10_000, None),  # full shards are never rewritten for a nightly add
    ([500_000, 500_000, 10_000], 10_000, 2),  # the small added shard takes the next nights
    ([500_000, 500_000, 60_000], 10_000, None),  # until it would pass 1/8 of the largest
    ([10, 500_000, 3], 5, 2),
    ([], 5, None),
])
def test_adds_gather_in_one_small_shard(sizes, n_new, expected):
    assert shard_to_extend(sizes, n_new) == expected


@pytest.mark.slow
def test_incremental_add_equals_a_rebuild_with_the_same_quantizer(ray_cluster, tmp_path):
    import faiss

    x = clustered(3150, clusters=60, noise=0.3)
    emb = str(tmp_path / "embeddings")
    write_partitions(emb, "mA", x[:3000], rows_per_part=1000)
    base_url = build_index(config(str(tmp_path), "index.num_shards=2", "index.index_key=IVF64,Flat"))
    base = Catalogue.load(base_url)
    files = {s["file"]: _stamp(os.path.join(base_url, s["file"])) for s in base.manifest["shards"]}

    first = add_partitions(base_url, write_partitions(emb, "mA", x[3000:3100], rows_per_part=100, start=3000))
    root = str(tmp_path / "indexes" / "test")
    second = add_partitions(root, write_partitions(emb, "mA", x[3100:], rows_per_part=50, start=3100))
    after = Catalogue.load(root)
    assert after.url == second and after.ntotal == len(x) and list(after.metadata["id"]) == list(range(len(x)))
    assert after.metadata["image_key"].iloc[-1] == "img003149.jpg" and set(after.metadata["shard"]) == {0, 1, 2}
    shards = after.manifest["shards"]
    assert [s.get("version") for s in shards] == [base.version, base.version, None]  # shard 2: extended, in `second`
    assert "version" not in Catalogue.load(first).manifest["shards"][2] and shards[2]["ntotal"] == 150
    assert {s["file"]: _stamp(os.path.join(base_url, s["file"])) for s in base.manifest["shards"]} == files
    assert sorted(f for f in os.listdir(second) if f.endswith(".faiss")) == ["shard-002.faiss"]
    assert after.manifest["trained"]["version"] == base.version and len(list_versions(root)) == 3

    reference = faiss.read_index(os.path.join(base_url, index_publish.TRAINED_FILE))
    reference.add_with_ids(x, np.arange(len(x)))
    reference.nprobe = after.manifest["search"]["nprobe"]
    queries = clustered(40, clusters=60, noise=0.3, seed=7)
    ref_scores, ref_ids = reference.search(queries, 10)
    found = after.search(queries, 10)
    np.testing.assert_array_equal(found.ids, ref_ids)
    np.testing.assert_allclose(found.scores, ref_scores, rtol=1e-5, atol=1e-6)


def _stamp(path: str) -> tuple[int, str]:
    return os.stat(path).st_mtime_ns, hashlib.sha256(open(path, "rb").read()).hexdigest()
