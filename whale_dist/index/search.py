"""Search a published index: photo-level neighbours, then their aggregation to individuals.

``Catalogue.load(url)`` follows ``LATEST`` (or takes a version folder), checks every shard's sha256 against the
manifest, and keeps the shards with their own 64-bit ids. Shards built from one trained index (IVF, Flat) are merged
in memory at load (faiss ``merge_from``, the ``contrib/ondisk.py`` idea without the disk), so one query pays one
coarse quantization and one ``search`` call, as plain faiss does; HNSW graphs cannot merge and are searched one by
one, their top-k merged by score (faiss 1.15 ``IndexShards`` does not translate a selector through ``IDMap2``).
nprobe / efSearch are set on the index once at load; a search without filters passes no ``SearchParameters``.
Metadata filters become an ``IDSelectorBitmap`` in ``SearchParameters``, so candidates are restricted *before*
ranking (faiss wiki, "Setting search parameters for one query": ``sel``), never by post-filtering a too-short list.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from whale_dist.index import faiss_ops
from whale_dist.index import inputs as index_input
from whale_dist.index import publish as index_publish

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndividualMatch:
    """One ranked individual for a query: its best similarity and the catalogue photo that gave it."""

    individual_id: str
    score: float
    image_key: str
    url: str
    species: str
    id: int


@dataclass
class Neighbours:
    """Photo-level results: ``ids`` / ``scores`` of shape (n_queries, k), best first; id -1 = no candidate."""

    ids: np.ndarray
    scores: np.ndarray
    metadata: pd.DataFrame

    def frame(self) -> pd.DataFrame:
        """Long table: query, rank, id, score and the photo's metadata (image_key, url, individual_id, ...)."""
        query, rank = np.nonzero(self.ids >= 0)
        ids = self.ids[query, rank]
        rows = self.metadata.iloc[ids].reset_index(drop=True)
        head = pd.DataFrame({"query": query, "rank": rank, "score": self.scores[query, rank]})
        return pd.concat([head, rows], axis=1)


def aggregate_individuals(ids: np.ndarray, scores: np.ndarray, metadata: pd.DataFrame, k: int) -> list:
    """Per query, the first ``k`` distinct individuals in score order, each with its best photo (the best
    similarity per individual, as in wildlife-tools' ``KnnClassifier`` and the Happywhale top solutions).
    Photos without an ``individual_id`` identify nobody and are skipped."""
    found = np.unique(ids[ids >= 0])  # only the photos found: a million-row catalogue is not converted per call
    rows = metadata.iloc[found]
    where = {int(photo): i for i, photo in enumerate(found)}
    individual, keys = rows["individual_id"].to_numpy(), rows["image_key"].to_numpy()
    urls, species = rows["url"].to_numpy(), rows["species"].to_numpy()
    results = []
    for row_ids, row_scores in zip(ids, scores):
        ranked: dict[str, IndividualMatch] = {}
        for i in np.argsort(-row_scores, kind="stable"):
            photo = int(row_ids[i])
            at = where.get(photo, -1)
            if at < 0 or not individual[at] or individual[at] in ranked:
                continue
            ranked[individual[at]] = IndividualMatch(str(individual[at]), float(row_scores[i]), str(keys[at]),
                                                     str(urls[at]), str(species[at]), photo)
            if len(ranked) == k:
                break
        results.append(list(ranked.values()))
    return results


class Catalogue:
    """A loaded index version: ``manifest``, ``metadata`` (ids.parquet, row i = id i), ``model_version``, ``dim``."""

    def __init__(self, url: str, manifest: dict, metadata: pd.DataFrame, shards: list, use_gpu: bool = False):
        self.url, self.manifest, self.metadata = url, manifest, metadata
        self.model_version: str = manifest["model_version"]
        self.dim: int = int(manifest["dim"])
        self.index_key: str = manifest["index_key"]
        self.version: str = manifest["version"]
        self.shards = merged(shards)
        for shard in self.shards:
            faiss_ops.set_search_parameters(shard, manifest.get("search", {}))
        self.device_shards = on_device(self.shards, manifest.get("search", {})) if use_gpu else self.shards

    @classmethod
    def load(cls, url: str, verify: bool = True, use_gpu: bool = False) -> Catalogue:
        """Load ``url``: a catalogue root (follows ``LATEST``) or a version folder; corrupted shards are refused.
        ``use_gpu``: unfiltered searches run on GPU clones of the shards (faiss-gpu and a GPU present; else CPU)."""
        version_url = index_publish.resolve_version_url(url)
        manifest = index_publish.read_manifest(version_url)
        metadata = index_publish.read_ids(version_url, manifest["ids"]["sha256"] if verify else None)
        if not np.array_equal(metadata["id"].to_numpy(), np.arange(len(metadata))):
            raise index_publish.IndexIntegrityError(f"{version_url}: ids.parquet ids are not 0..N-1")
        shards = [index_publish.read_shard(index_publish.shard_url(version_url, s), s["sha256"] if verify else None)
                  for s in manifest["shards"]]
        return cls(version_url, manifest, metadata, shards, use_gpu=use_gpu)

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    def search(self, embeddings: np.ndarray, k: int = 5, filters: Mapping[str, Any] | None = None,
               labelled_only: bool = False) -> Neighbours:
        """Top-``k`` catalogue photos per query by cosine similarity, among photos passing ``filters`` (and having
        an ``individual_id`` when ``labelled_only``)."""
        queries = self._queries(embeddings)
        allowed = self._allowed(filters, labelled_only)
        if (allowed is not None and not allowed.any()) or len(queries) == 0 or k <= 0:
            empty = np.full((len(queries), max(k, 0)), -1, dtype=np.int64)
            return Neighbours(empty, np.full(empty.shape, -np.inf, dtype=np.float32), self.metadata)
        if allowed is None:
            found = [shard.search(queries, k) for shard in self.device_shards]
        else:
            bits = np.packbits(allowed, bitorder="little")
            found = [shard.search(queries, k, params=self._params(bits)) for shard in self.shards]
        scores, ids = found[0] if len(found) == 1 else _merge_top_k(found, k)
        scores[ids < 0] = -np.inf
        return Neighbours(ids, scores, self.metadata)

    def individuals(self, embeddings: np.ndarray, k: int = 5, filters: Mapping[str, Any] | None = None,
                    photos_per_query: int = 0) -> list[list[IndividualMatch]]:
        """Top-``k`` individuals per query (best similarity per individual), among labelled photos passing
        ``filters``. Photo-level depth starts at ``photos_per_query`` (default 20·k) and grows until every query has
        ``k`` individuals or all candidates were seen."""
        allowed = self._allowed(filters, labelled_only=True)
        candidates = self.ntotal if allowed is None else int(allowed.sum())
        depth = min(photos_per_query or 20 * k, max(candidates, 1))
        while True:
            found = self.search(embeddings, depth, filters, labelled_only=True)
            ranked = aggregate_individuals(found.ids, found.scores, self.metadata, k)
            if depth >= min(candidates, self.ntotal) or all(len(r) >= k for r in ranked):
                return ranked
            depth = min(depth * 4, self.ntotal)

    def _allowed(self, filters: Mapping[str, Any] | None, labelled_only: bool) -> np.ndarray | None:
        """Boolean mask over ids of the candidates, or None when every photo is one (then nothing is scanned)."""
        active = index_input.active_filters(filters)
        allowed = index_input.filter_mask(self.metadata, active) if active else None
        if labelled_only and self._labelled is not None:
            allowed = self._labelled if allowed is None else allowed & self._labelled
        return None if allowed is None or allowed.all() else allowed

    @functools.cached_property
    def _labelled(self) -> np.ndarray | None:
        """Photos with an individual_id (None: all of them), computed once per catalogue."""
        labelled = (self.metadata["individual_id"] != "").to_numpy()
        return None if labelled.all() else labelled

    def _queries(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if x.shape[1] != self.dim:
            raise index_input.IndexInputError(f"query embeddings have dimension {x.shape[1]}, the index has {self.dim}")
        if not np.isfinite(x).all():
            raise index_input.IndexInputError("query embeddings contain NaN or inf")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x / np.where(norms > 0, norms, 1))

    def _params(self, bits: np.ndarray | None):
        """faiss ``SearchParameters`` for this index type: nprobe / efSearch from the manifest, plus the selector."""
        import faiss

        sel = faiss.IDSelectorBitmap(len(self.metadata), faiss.swig_ptr(bits)) if bits is not None else None
        search, inner = self.manifest.get("search", {}), None
        if "IVF" in self.index_key:
            params = inner = faiss.SearchParametersIVF(sel=sel, nprobe=int(search.get("nprobe", 1)))
            if self.index_key.startswith("OPQ"):
                params = faiss.SearchParametersPreTransform(index_params=inner, sel=sel)
        elif self.index_key.startswith("HNSW"):
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=int(search.get("efSearch", 128)))
        else:
            params = faiss.SearchParameters(sel=sel)
        params.referenced_objects = [sel, bits, inner]  # faiss idiom: the C++ side points at these
        return params


def _merge_top_k(found: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of several shards' (scores, ids), by score."""
    scores = np.concatenate([f[0] for f in found], axis=1)
    ids = np.concatenate([f[1] for f in found], axis=1)
    scores[ids < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def merged(shards: list) -> list:
    """One index holding every shard when faiss can merge them (IVF lists of one quantizer, Flat with an IDMap2),
    each shard freed as it is absorbed; otherwise (HNSW) the shards as they are."""
    if len(shards) < 2 or any("HNSW" in _inner_name(s) for s in shards):
        return shards
    first = shards[0]
    try:
        for other in shards[1:]:
            first.merge_from(other, 0)  # ids are the catalogue's own: no offset
    except RuntimeError as exc:
        log.warning("searching %d shards separately: %s", len(shards), str(exc).splitlines()[0])
        return shards
    return [first]


def on_device(shards: list, search: Mapping[str, Any]) -> list:
    """GPU clones of ``shards`` for unfiltered search (faiss wiki, "Faiss on the GPU": ``index_cpu_to_all_gpus``);
    the CPU shards stay for filtered searches, because GPU indexes take no ``IDSelector``. A shard the GPU cloner
    refuses (HNSW, IDMap2) stays on the CPU. nprobe is set again on the clone (``GpuParameterSpace``)."""
    clones = [faiss_ops.to_device(shard, True) for shard in shards]
    for clone, shard in zip(clones, shards):
        if clone is not shard and "nprobe" in search:
            import faiss

            faiss.GpuParameterSpace().set_index_parameter(clone, "nprobe", int(search["nprobe"]))
    return clones


def _inner_name(index) -> str:
    import faiss

    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    return type(inner).__name__
