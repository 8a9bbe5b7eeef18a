"""Search a published index: photo-level neighbours, then their aggregation to individuals.

``Catalogue.load(url)`` follows ``LATEST`` (or takes a version folder), checks every shard's sha256 against the
manifest, and keeps the shards with their own 64-bit ids. Metadata filters become an ``IDSelectorBitmap`` passed in
``SearchParameters`` to every shard, so candidates are restricted *before* ranking (faiss wiki, "Setting search
parameters for one query": ``sel``), never by post-filtering a too-short list. Shards are searched one by one and
their top-k merged by score: faiss 1.15 ``IndexShards`` does not translate a selector through ``IDMap2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from whale_dist import storage
from whale_dist.index import inputs as index_input
from whale_dist.index import publish as index_publish


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
    individual, keys = metadata["individual_id"].to_numpy(), metadata["image_key"].to_numpy()
    urls, species = metadata["url"].to_numpy(), metadata["species"].to_numpy()
    results = []
    for row_ids, row_scores in zip(ids, scores):
        ranked: dict[str, IndividualMatch] = {}
        for i in np.argsort(-row_scores, kind="stable"):
            photo = int(row_ids[i])
            if photo < 0 or not individual[photo] or individual[photo] in ranked:
                continue
            ranked[individual[photo]] = IndividualMatch(str(individual[photo]), float(row_scores[i]),
                                                        str(keys[photo]), str(urls[photo]), str(species[photo]), photo)
            if len(ranked) == k:
                break
        results.append(list(ranked.values()))
    return results


class Catalogue:
    """A loaded index version: ``manifest``, ``metadata`` (ids.parquet, row i = id i), ``model_version``, ``dim``."""

    def __init__(self, url: str, manifest: dict, metadata: pd.DataFrame, shards: list):
        self.url, self.manifest, self.metadata, self.shards = url, manifest, metadata, shards
        self.model_version: str = manifest["model_version"]
        self.dim: int = int(manifest["dim"])
        self.index_key: str = manifest["index_key"]
        self.version: str = manifest["version"]

    @classmethod
    def load(cls, url: str, verify: bool = True) -> Catalogue:
        """Load ``url``: a catalogue root (follows ``LATEST``) or a version folder; corrupted shards are refused."""
        version_url = index_publish.resolve_version_url(url)
        manifest = index_publish.read_manifest(version_url)
        metadata = index_publish.read_ids(version_url, manifest["ids"]["sha256"] if verify else None)
        if not np.array_equal(metadata["id"].to_numpy(), np.arange(len(metadata))):
            raise index_publish.IndexIntegrityError(f"{version_url}: ids.parquet ids are not 0..N-1")
        shards = [index_publish.read_shard(index_publish.shard_url(version_url, s), s["sha256"] if verify else None)
                  for s in manifest["shards"]]
        return cls(version_url, manifest, metadata, shards)

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
        bits = np.packbits(allowed, bitorder="little") if allowed is not None else None
        found = [shard.search(queries, k, params=self._params(bits)) for shard in self.shards]
        scores = np.concatenate([f[0] for f in found], axis=1)
        ids = np.concatenate([f[1] for f in found], axis=1)
        scores[ids < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return Neighbours(np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1), self.metadata)

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
        """Boolean mask over ids of the candidates, or None when every photo is one."""
        allowed = index_input.filter_mask(self.metadata, filters)
        if labelled_only:
            allowed &= (self.metadata["individual_id"] != "").to_numpy()
        return None if allowed.all() else allowed

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
        search = self.manifest.get("search", {})
        inner = None
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
