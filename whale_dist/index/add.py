"""Incremental add: new labelled photos into a published version, published as a new version, without retraining.

The nightly/review loop confirms a few hundred photos a night; rebuilding a million-vector index for them would
retrain the quantizer and rewrite every shard. Instead the new vectors are added, with new ids ``N..N+m-1``, to the
version's own trained (empty) index ``trained.faiss`` — the same quantizer, so a search gives exactly what a full
rebuild with that quantizer would — either as a new shard or by rewriting the smallest shard
(``choice.shard_to_extend``). Every other shard is reused *by reference*: the new manifest names the earlier version
that holds the file (``publish.shard_url``), nothing is copied. ``ids.parquet`` is written anew (row i = id i).
This is the per-shard ``add_with_ids`` that the build itself uses (faiss wiki, "Special operations on indexes":
``add_with_ids``; ``IndexIVF`` keeps the coarse quantizer fixed after ``train``). ``needs_rebuild`` says when the
quantizer is too old for this.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from whale_dist import storage
from whale_dist.index import choice as index_choice
from whale_dist.index import faiss_ops as index_train
from whale_dist.index import inputs as index_input
from whale_dist.index import publish as index_publish
from whale_dist.index.inputs import IndexInputError

log = logging.getLogger(__name__)


def add_vectors(url: str, vectors: np.ndarray, metadata: pd.DataFrame, index_root: str | None = None) -> str:
    """Add ``vectors`` (n, d) with their photos' ``metadata`` rows (image_key, url, individual_id, species, ...) to
    the version at ``url`` (a version folder, or a catalogue root's ``LATEST``) and publish the result under
    ``index_root`` (default: the version's own catalogue root). Photos already indexed (same image_key) are
    skipped. Returns the new version's URL, or the old one when nothing was new."""
    started = time.time()
    version_url = index_publish.resolve_version_url(url).rstrip("/")
    manifest = index_publish.read_manifest(version_url)
    table = index_publish.read_ids(version_url, manifest["ids"]["sha256"])
    rows, x = _new_rows(table, metadata, index_input.normalised(_shaped(vectors, manifest["dim"]), "new vectors"))
    if len(rows) == 0:
        log.info("nothing new to add to %s", version_url)
        return version_url
    root = index_root or version_url.rsplit("/", 1)[0]
    name = index_publish.version_name(manifest["model_version"])
    shards, rows = _add_to_shards(version_url, manifest, table, rows, x, storage.join(root, name))
    table = pd.concat([table, rows], ignore_index=True)
    new = {**manifest, "version": name, "n": len(table), "shards": shards, "parent": manifest["version"],
           "added": len(rows),
           "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "build_seconds": round(time.time() - started, 3)}
    if "trained" in manifest:
        new["trained"] = _reference(manifest["trained"], manifest["version"])
    new["ids"] = index_publish.write_ids(storage.join(root, name), table)
    log.info("index %s: %d vectors added to %s (now %d)", name, len(rows), manifest["version"], len(table))
    return index_publish.publish(root, name, new)


def add_partitions(url: str, part_urls: list[str]) -> str:
    """``add_vectors`` for embedding partitions (the embed job's output), filtered as the version's build was."""
    manifest = index_publish.read_manifest(index_publish.resolve_version_url(url))
    frames, blocks = [], []
    for part in part_urls:  # metadata and vectors are different columns: each byte is read once
        frame = index_input.read_metadata(part, manifest["model_version"])
        keep = index_input.filter_mask(frame, manifest.get("filters"))
        frames.append(frame[keep])
        blocks.append(index_input.read_vectors(part, frame["row"].to_numpy()[keep], int(manifest["dim"])))
    if not frames:
        return index_publish.resolve_version_url(url)
    return add_vectors(url, np.concatenate(blocks), pd.concat(frames, ignore_index=True))


def should_rebuild(manifest: dict, model_version: str, n_new: int, growth: float) -> bool:
    """``choice.needs_rebuild`` for a published version about to receive ``n_new`` photos of ``model_version``."""
    trained_for = int(manifest.get("trained", {}).get("n", manifest["n"]))
    return index_choice.needs_rebuild(manifest["model_version"], model_version, trained_for,
                                      int(manifest["n"]) + n_new, growth=growth)


def _shaped(vectors: np.ndarray, dim: int) -> np.ndarray:
    x = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if x.shape[1] != int(dim):
        raise IndexInputError(f"new vectors have dimension {x.shape[1]}, the index has {dim}")
    return x


def _new_rows(table: pd.DataFrame, metadata: pd.DataFrame, x: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata rows in the ids.parquet columns with new ids, and their vectors; already-indexed photos dropped."""
    if len(metadata) != len(x):
        raise IndexInputError(f"{len(x)} vectors but {len(metadata)} metadata rows")
    missing = sorted(set(index_input.METADATA_COLUMNS) - set(metadata.columns))
    if missing:
        raise IndexInputError(f"metadata lacks column(s) {', '.join(missing)}")
    fresh = ~_indexed(metadata["image_key"], table["image_key"])
    fresh &= ~metadata["image_key"].duplicated().to_numpy()
    rows = metadata.loc[fresh, index_input.METADATA_COLUMNS].fillna("").reset_index(drop=True)
    rows["id"] = np.arange(len(table), len(table) + len(rows), dtype=np.int64)
    return rows, np.ascontiguousarray(x[fresh])


def _indexed(keys: pd.Series, indexed: pd.Series) -> np.ndarray:
    """Which of ``keys`` are among the ``indexed`` image keys: Arrow's hash-based ``is_in`` (a Python set of a
    million keys took 5 s of a 6 s refresh at 1M)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    value_set = pa.array(indexed.astype(str).to_numpy(), type=pa.string())
    found = pc.is_in(pa.array(keys.astype(str).to_numpy(), type=pa.string()), value_set=value_set)
    return found.to_numpy(zero_copy_only=False).astype(bool)


def _add_to_shards(version_url: str, manifest: dict, table: pd.DataFrame, rows: pd.DataFrame, x: np.ndarray,
                   new_url: str) -> tuple[list[dict], pd.DataFrame]:
    """Shard entries of the new version: the old ones by reference, one of them (or a new one) holding ``x``."""
    old = [_reference(s, manifest["version"]) for s in manifest["shards"]]
    target = index_choice.shard_to_extend([s["ntotal"] for s in old], len(rows))
    if target is None:  # ids.parquet's "shard" is the entry's position in the manifest
        index, number = _trained(version_url, manifest), len(old)
    else:
        index = index_publish.read_shard(index_publish.shard_url(version_url, old[target]), old[target]["sha256"])
        number = target
    index_train.set_threads()
    index.add_with_ids(x, rows["id"].to_numpy())
    entry = index_publish.write_shard(index, storage.join(new_url, f"shard-{number:03d}.faiss"))
    shards = old + [entry] if target is None else [entry if i == target else s for i, s in enumerate(old)]
    return shards, rows.assign(shard=number)


def _trained(version_url: str, manifest: dict):
    """The version's trained empty index; for versions built before ``trained.faiss`` existed, a shard emptied."""
    entry = manifest.get("trained")
    if entry:
        return index_publish.read_shard(index_publish.shard_url(version_url, entry), entry["sha256"])
    first = manifest["shards"][0]
    index = index_publish.read_shard(index_publish.shard_url(version_url, first), first["sha256"])
    index.reset()  # drops the vectors, keeps the trained quantizer (and OPQ/PQ)
    return index


def _reference(entry: dict, owner: str) -> dict:
    """A manifest entry as seen from a later version: the file stays where it is, in ``owner``'s folder."""
    return {**entry, "version": entry.get("version") or owner}
