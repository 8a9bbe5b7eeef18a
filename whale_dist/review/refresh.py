"""Index refresh after a review: the catalogue's new photos into the catalogue's embedding store and its index.

The index holds the catalogue (labelled photos) only; a night's photos are queries, kept in the query store, until a
review confirms them. Refreshing therefore (1) copies the confirmed photos' vectors, embedded already by the nightly
run, with their catalogue labels into the catalogue store (``embed.out``) as one new published chunk -- so the
catalogue store holds exactly the catalogue and a full rebuild (``index.build_index``) indexes exactly it -- and
(2) adds those vectors to the ``LATEST`` index (``index.add_vectors``: the trained quantizer, untouched shards by
reference), or rebuilds when ``index.should_rebuild`` says so (another model, or the catalogue outgrew the sample its
quantizer was trained on by ``index.rebuild_growth``). Cost follows the new photos: the keys files find the
partitions that hold them, nothing else is read.

Each catalogue version records the index version that covers it (``catalogue/v<N>/index.json``, written last), so a
review killed between the catalogue write and the index publish is completed by the next review.
"""

from __future__ import annotations

import copy

from whale_dist import catalog_versions, index, ray_connect, storage
from whale_dist.config import Config, ConfigError
from whale_dist.embed import store as embed_store

INDEX_RECORD = "index.json"
LABELS = ("individual_id", "species", "encounter_id", "date", "location", "bbox")


def record_url(cfg: Config, number: int) -> str:
    return storage.join(catalog_versions.catalogue_root(cfg), f"v{number}", INDEX_RECORD)


def refresh_pending(cfg: Config, model_version: str) -> str:
    """Bring the index up to the latest catalogue version unless its record says it is; returns the index version
    covering it ('' when no version was ever written: the catalogue is still the configured one)."""
    root = catalog_versions.catalogue_root(cfg)
    numbers = catalog_versions.list_versions(root)
    if not numbers:
        return ""
    latest = numbers[-1]
    if storage.exists(record_url(cfg, latest)):
        return storage.read_json(record_url(cfg, latest))["index_version"]
    table = catalog_versions.read_version(root, latest)
    before = catalog_versions.read_version(root, latest - 1) if latest > 1 else table.iloc[:0]
    added = table[~table["image_key"].isin(set(before["image_key"]))].reset_index(drop=True)
    version_url = refresh_index(cfg, added, model_version) if len(added) else index.resolve_version_url(
        cfg.index_root)
    name = version_url.rstrip("/").rsplit("/", 1)[-1]
    storage.write_json(record_url(cfg, latest), {"index_version": name, "catalogue_version": latest,
                                                 "added": len(added), "model_version": model_version})
    return name


def refresh_index(cfg: Config, added, model_version: str) -> str:
    """Copy ``added`` (catalogue rows) with their vectors into the catalogue store, then add them to the index (or
    rebuild it); returns the published index version URL."""
    rows, vectors = labelled_vectors(cfg, added, model_version)
    copy_to_catalogue_store(cfg, model_version, rows, vectors)
    manifest = index.read_manifest(index.resolve_version_url(cfg.index_root))
    if index.should_rebuild(manifest, model_version, len(rows), cfg.index.rebuild_growth):
        print(f"refresh: full rebuild of {storage.redact(cfg.index_root)} (model {model_version}, index of "
              f"{manifest['model_version']} with {manifest['n']} photos)", flush=True)
        return rebuild_index(cfg, model_version)
    from whale_dist.index.inputs import METADATA_COLUMNS

    url = index.add_vectors(cfg.index_root, vectors, rows[list(METADATA_COLUMNS)])
    print(f"refresh: added {len(rows)} photos to index {manifest['version']} -> {url.rstrip('/').rsplit('/', 1)[-1]}",
          flush=True)
    return url


def labelled_vectors(cfg: Config, added, model_version: str):
    """(query-store rows of ``added`` relabelled from the catalogue, their vectors), in ``added``'s key order."""
    rows, vectors = embed_store.read_rows(cfg.query_store, model_version, added["image_key"])
    missing = sorted(set(added["image_key"]) - set(rows["image_key"]))
    if missing:
        raise ConfigError(f"photo '{missing[0]}' (and {len(missing) - 1} more) has no embedding of model "
                          f"{model_version} in {storage.redact(cfg.query_store)}; run the night's nightly again")
    labels = added.set_index("image_key")
    for column in LABELS:
        rows[column] = [str(labels.at[key, column]) for key in rows["image_key"]]
    return rows, vectors


def copy_to_catalogue_store(cfg: Config, version: str, rows, vectors) -> int:
    """Publish the rows not in the catalogue store yet as its next chunk (exactly once, like the embed job)."""
    out = cfg.embed_out
    done = embed_store.published(out, version)
    embed_store.remove_unpublished(out, version, done)
    fresh = ~rows["image_key"].isin(embed_store.done_keys(out, version, done, rows["image_key"])).to_numpy()
    if not fresh.any():
        return 0
    number = max(done, default=-1) + 1
    embed_store.publish_chunk(out, version, number, chunk_table(rows[fresh], vectors[fresh]), empty_errors())
    embed_store.compact_keys(out, version)
    return int(fresh.sum())


def chunk_table(rows, vectors):
    """An embeddings partition (the embed job's schema) from store rows and their vectors."""
    import numpy as np
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    columns = {c: pa.array(rows[c].astype(str).tolist(), pa.string()) for c in rows.columns
               if c not in ("embedded_at", "embedding")}
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    if "embedded_at" in rows.columns:
        columns["embedded_at"] = pa.array(rows["embedded_at"].tolist(), pa.timestamp("us", tz="UTC"))
    return pa.table(columns)


def empty_errors():
    import pyarrow as pa

    return pa.table({c: pa.array([], pa.string()) for c in embed_store.ERROR_COLUMNS})


def rebuild_index(cfg: Config, model_version: str) -> str:
    """A full build over the catalogue store (which holds exactly the catalogue) on the connected Ray cluster."""
    ray_connect.connect()
    build_cfg = copy.deepcopy(cfg)
    build_cfg.index.model_version = model_version
    return index.build_index(build_cfg)
