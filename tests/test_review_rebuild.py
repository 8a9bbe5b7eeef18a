"""Review's index refresh on Ray when the catalogue outgrew the quantizer (``index.rebuild_growth``): a full rebuild
that leaves the catalogue store and the index holding exactly the catalogue (the incremental add is the nightly loop's
end-to-end test)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from whale_dist import index
from whale_dist.config import load_config
from whale_dist.embed import store as embed_store
from whale_dist.review.refresh import LABELS, chunk_table, empty_errors, refresh_index

pytestmark = pytest.mark.slow  # builds indexes on Ray
D = 16


def publish(out: str, number: int, keys: list[str], labelled: bool, seed: int) -> None:
    rows = pd.DataFrame({"image_key": keys, "url": [f"s3://p/{k}" for k in keys], "sha256": "",
                         "model_version": "m1", **{c: "" for c in embed_store.EMBEDDING_META}})
    rows["individual_id"] = [f"ind{i // 4}" if labelled else "" for i in range(len(keys))]
    vectors = np.random.default_rng(seed).standard_normal((len(keys), D)).astype(np.float32)
    embed_store.publish_chunk(out, "m1", number, chunk_table(rows, vectors), empty_errors())


def confirmed(keys: list[str]) -> pd.DataFrame:
    added = pd.DataFrame({"image_key": keys, **{c: "" for c in LABELS}})
    added["individual_id"] = "ind-new"
    return added


def test_review_rebuilds_the_index_when_the_catalogue_outgrew_it(ray_cluster, tmp_path, capsys):
    """The incremental branch runs in tests/test_nightly_loop_e2e.py; this is the other one."""
    cfg = load_config(None, [f"root={tmp_path}", "index.catalogue_name=test", "index.rebuild_growth=0"])
    publish(cfg.embed_out, 0, [f"cat/{i:03d}.jpg" for i in range(40)], labelled=True, seed=0)
    first = index.read_manifest(index.build_index(cfg))
    publish(cfg.query_store, 0, ["n1/a.jpg", "n1/b.jpg", "n1/c.jpg"], labelled=False, seed=1)
    url = refresh_index(cfg, confirmed(["n1/a.jpg", "n1/c.jpg"]), "m1")
    manifest = index.read_manifest(url)
    assert "full rebuild" in capsys.readouterr().out
    assert manifest["n"] == 42 and "parent" not in manifest and manifest["version"] != first["version"]
    catalogue = index.Catalogue.load(cfg.index_root)
    assert catalogue.version == manifest["version"]
    table = catalogue.metadata.set_index("image_key")
    assert table.loc["n1/c.jpg", "individual_id"] == "ind-new" and "n1/b.jpg" not in table.index
    stored = embed_store.done_keys(cfg.embed_out, "m1", embed_store.published(cfg.embed_out, "m1"))
    assert stored == set(table.index)  # the catalogue store holds exactly what the index holds
