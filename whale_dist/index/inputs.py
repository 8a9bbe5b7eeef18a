"""Input of the re-indexing job: published embedding partitions of one model version, and metadata filters.

The store's layout (which partitions of which model version are published) is ``embed.store``'s alone; this
module reads what is inside the partitions. Metadata is read without the embedding column (cheap, on the
driver); vectors are read per partition inside the Ray tasks that need them. The same ``filter_mask`` restricts
the build and the search.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from whale_dist import storage
from whale_dist.config import ConfigError
from whale_dist.embed import store as embed_store

if TYPE_CHECKING:  # pandas only where a frame is built: a Ray worker reading partitions never imports it (0.25 s)
    import pandas as pd

METADATA_COLUMNS = ["image_key", "url", "individual_id", "species", "encounter_id", "date", "location"]
FILTER_KEYS = ("species", "locations", "date_from", "date_to", "exclude_image_keys")
UNIT_TOLERANCE = 1e-5  # |squared norm - 1| below which a vector counts as unit length (cosine unchanged to ~1e-5)


class IndexInputError(ConfigError):
    """Bad index input (mixed versions, NaN/inf or wrong-dimension embeddings, nothing to index): one line."""


def resolve_version(store: str, requested: str = "") -> str:
    """The one model version to index: ``requested``, or the only version present; mixing is refused."""
    embeddings_root = storage.join(store, "embeddings")
    versions = embed_store.model_versions(store)
    if requested:
        if requested not in versions:
            raise IndexInputError(f"no published embeddings for model version {requested!r} under "
                                  f"{embeddings_root} (present: {', '.join(versions) or 'none'})")
        return requested
    if not versions:
        raise IndexInputError(f"no published embeddings under {embeddings_root}")
    if len(versions) > 1:
        raise IndexInputError(f"several model versions under {embeddings_root} ({', '.join(versions)}): an index "
                              "holds one version; choose it with index.model_version=<version>")
    return versions[0]


def embedding_dim(part_url: str) -> int:
    """D of the embedding column (either form of ``embed_store.vector_dim``), from the parquet schema alone."""
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(part_url)
    field = pq.read_schema(path, filesystem=fs).field("embedding")
    dim = embed_store.vector_dim(field.type)
    if dim is None:
        raise IndexInputError(f"{part_url}: embedding column is {field.type}, expected {embed_store.VECTOR_TYPES}")
    return dim


def read_metadata(part_url: str, version: str) -> pd.DataFrame:
    """Metadata rows of one partition (no vectors), with its row number; rows of another version are refused."""
    return read_metadata_table(part_url, version).to_pandas()


def read_metadata_table(part_url: str, version: str):
    """``read_metadata`` as an Arrow table (missing values as ""): the build keeps metadata in Arrow end to end,
    because a million rows' strings as Python objects (pandas, then Ray's pickling) cost ~6 s of a 1M build."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(part_url, memory_map=True)
    table = pq.read_table(path, columns=METADATA_COLUMNS + ["model_version"], filesystem=fs)
    other = sorted(str(v) for v in pc.unique(table["model_version"]).to_pylist() if v != version)
    if other:
        raise IndexInputError(f"{part_url} mixes model versions ({', '.join(other)} besides {version}): "
                              "re-embed it or choose one version")
    columns = {name: pc.fill_null(table[name].cast(pa.string()), "") for name in METADATA_COLUMNS}
    return pa.table({**columns, "row": pa.array(np.arange(table.num_rows, dtype=np.int64))})


def filter_rows(table, filters: Mapping[str, Any] | None) -> np.ndarray | None:
    """Row numbers of an Arrow metadata ``table`` passing ``filters`` (``filter_mask``), or None when no filter
    is active: only a filtered build converts its metadata to pandas."""
    active = active_filters(filters)
    return np.flatnonzero(filter_mask(table.to_pandas(), active)) if active else None


def read_vectors(part_url: str, rows: np.ndarray, dim: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``rows`` of the embedding column as float32 (n, dim), L2-normalised (into ``out`` when given, so a
    caller assembling many partitions holds one array, not one per partition plus their concatenation); NaN/inf
    and wrong D refused."""
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(part_url, memory_map=True)  # published partitions are never rewritten
    column = pq.read_table(path, columns=["embedding"], filesystem=fs).column("embedding")
    width = embed_store.vector_dim(column.type)
    if width != dim:
        raise IndexInputError(f"{part_url}: embeddings have dimension {width}, the index has {dim}")
    try:
        vectors = embed_store.vectors_of(column)
    except ValueError as exc:  # missing vectors
        raise IndexInputError(f"{part_url}: {exc}") from None
    if not (len(rows) == len(vectors) and np.array_equal(rows, np.arange(len(vectors)))):
        vectors = vectors[rows]  # a filtered partition; the whole one (the usual case) is not copied here
    return normalised(vectors, part_url, rows, out)


def normalised(vectors: np.ndarray, where: str, rows: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """``vectors`` as contiguous float32, L2-normalised for cosine search; NaN/inf and zero vectors refused.

    Vectors whose squared norms are all within ``UNIT_TOLERANCE`` of 1 are returned as they are (float32 rounding
    of a unit vector is ~1e-7; a 2 GB copy per million vectors is not). One pass for the squared norms (``einsum``,
    no temporary of the vectors' size): a NaN or inf anywhere in a row makes its norm non-finite, so the element-wise
    check runs only on such rows (a million-row build spent more time in ``isfinite`` and ``linalg.norm``
    temporaries than in reading the file)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    squared = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    odd = ~np.isfinite(squared)
    bad = odd.copy()
    bad[odd] = ~np.isfinite(vectors[odd]).all(axis=1)
    if bad.any():
        first = (rows if rows is not None else np.arange(len(vectors)))[bad][0]
        raise IndexInputError(f"{where}: {int(bad.sum())} embeddings contain NaN or inf (first row {first})")
    if (squared == 0).any():
        raise IndexInputError(f"{where}: zero embeddings cannot be normalised for cosine search")
    if out is None and (np.abs(squared - 1.0) <= UNIT_TOLERANCE).all():
        return np.ascontiguousarray(vectors)  # already unit length, as the embedder writes them: no copy
    return np.divide(vectors, np.sqrt(squared).astype(np.float32)[:, None], out=out)


def filter_mask(frame: pd.DataFrame, filters: Mapping[str, Any] | None) -> np.ndarray:
    """Rows of ``frame`` passing ``filters``: species, locations (lists), date_from/date_to (ISO strings,
    inclusive; rows without a date fail a date filter), exclude_image_keys (a set). Only the filters given cost
    anything (a search with none must not scan a million dates)."""
    filters = active_filters(filters)
    mask = np.ones(len(frame), dtype=bool)
    if filters.get("species"):
        mask &= frame["species"].isin(list(filters["species"])).to_numpy()
    if filters.get("locations"):
        mask &= frame["location"].isin(list(filters["locations"])).to_numpy()
    if filters.get("date_from") or filters.get("date_to"):
        dates = frame["date"].astype(str).str.slice(0, 10)
        if filters.get("date_from"):
            mask &= ((dates != "") & (dates >= str(filters["date_from"])[:10])).to_numpy()
        if filters.get("date_to"):
            mask &= ((dates != "") & (dates <= str(filters["date_to"])[:10])).to_numpy()
    if filters.get("exclude_image_keys"):
        mask &= ~frame["image_key"].isin(set(filters["exclude_image_keys"])).to_numpy()
    return mask


def active_filters(filters: Mapping[str, Any] | None) -> dict:
    """The filters that restrict anything (empty values dropped); unknown names refused."""
    filters = dict(filters or {})
    unknown = sorted(set(filters) - set(FILTER_KEYS))
    if unknown:
        raise IndexInputError(f"unknown filter(s) {', '.join(unknown)} (known: {', '.join(FILTER_KEYS)})")
    return {key: value for key, value in filters.items() if _present(value)}


def _present(value: Any) -> bool:
    return value is not None and (len(value) > 0 if hasattr(value, "__len__") else bool(value))
