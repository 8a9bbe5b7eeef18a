"""The embedding store: partition layout, publication, what is already done, and readers.

Layout (per model version, since "already embedded" means "by this model"):
``{out}/embeddings/model=<v>/part-XXXXX.parquet`` (+ ``.done``) and ``{out}/errors/model=<v>/part-XXXXX.parquet``
(+ ``.done``). Partition ``N`` of both tables comes from one chunk of inputs, so every input of the chunk is in
exactly one of the two. A chunk is *published* when its embeddings marker exists; that marker is written last (after
the errors partition and its marker), so a chunk is either wholly visible or not at all.

Exactly once, and resuming: at the start of a run every partition file of a chunk that is not published is a leftover
of a killed run and is deleted; keys in published chunks are skipped; the remaining inputs, sorted by key, are cut
into chunks numbered from ``1 + the highest published number``. Published partitions are never rewritten. Partition
names are therefore a deterministic function of (store state, inputs); numbers left by a killed run may leave gaps.
Two runs writing the same model version at once are not supported.
"""

from __future__ import annotations

import io
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor

from whale_dist import storage

EMBEDDING_META = ("individual_id", "species", "encounter_id", "date", "location", "bbox")
ERROR_COLUMNS = ("image_key", "url", "stage", "message")
_PART = re.compile(r"^part-(\d{5,})\.parquet(\.done)?$")
_PUBLISHED_MARKER = re.compile(r"/model=([^/]+)/part-\d{5,}\.parquet\.done$")


def embeddings_dir(out: str, version: str) -> str:
    return storage.join(out, "embeddings", f"model={version}")


def errors_dir(out: str, version: str) -> str:
    return storage.join(out, "errors", f"model={version}")


def part_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def _parts(folder: str) -> dict[int, list[str]]:
    """Partition number -> its files (parquet and marker) in ``folder``."""
    found: dict[int, list[str]] = {}
    parent = storage.strip_scheme(folder).rstrip("/")
    for url in storage.list_files(folder):
        match = _PART.match(posixpath.basename(url))
        if match and posixpath.dirname(storage.strip_scheme(url)) == parent:  # not in _runs/ below
            found.setdefault(int(match.group(1)), []).append(url)
    return found


def published(out: str, version: str) -> list[int]:
    """Numbers of the published chunks, sorted."""
    return sorted(n for n, files in _parts(embeddings_dir(out, version)).items()
                  if any(f.endswith(storage.DONE_SUFFIX) for f in files))


def remove_unpublished(out: str, version: str, done: list[int]) -> int:
    """Delete every partition file of a chunk without an embeddings marker (a killed run's leftovers)."""
    keep, removed = set(done), 0
    for folder in (embeddings_dir(out, version), errors_dir(out, version)):
        for number, files in _parts(folder).items():
            if number not in keep:
                for url in sorted(files, reverse=True):  # the marker before its data
                    storage.remove(url)
                    removed += 1
    return removed


def done_keys(out: str, version: str, done: list[int]) -> set[str]:
    """Image keys of the published chunks (embedded or failed), which a new run skips."""
    keys: set[str] = set()
    for folder in (embeddings_dir(out, version), errors_dir(out, version)):
        table = _read_parts(folder, done, columns=["image_key"])
        if table is not None:
            keys.update(table.column("image_key").to_pylist())
    return keys


def _read_parts(folder: str, numbers: list[int], columns: list[str] | None = None):
    """Concatenate partitions ``numbers`` of ``folder`` (in number order) as one pyarrow table, or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [storage.join(folder, part_name(n)) for n in numbers]
    if not urls:
        return None

    def read(url: str):
        return pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=columns)

    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(read, urls))
    return pa.concat_tables(tables, promote_options="permissive")


def write_parquet(url: str, table) -> None:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(url, buffer.getvalue())


def publish_chunk(out: str, version: str, number: int, embedded, errors) -> None:
    """Write chunk ``number``: errors partition + marker, embeddings partition, then the chunk marker last."""
    error_url = storage.join(errors_dir(out, version), part_name(number))
    write_parquet(error_url, errors)
    storage.mark_done(error_url, {"rows": errors.num_rows})
    embed_url = storage.join(embeddings_dir(out, version), part_name(number))
    write_parquet(embed_url, embedded)
    storage.mark_done(embed_url, {"rows": embedded.num_rows, "errors": errors.num_rows})


def model_versions(out: str) -> list[str]:
    """Model versions with at least one published chunk under ``out``, from one listing of the markers."""
    markers = storage.list_files(storage.join(out, "embeddings"), (storage.DONE_SUFFIX,))
    return sorted({m.group(1) for url in markers if (m := _PUBLISHED_MARKER.search(url))})


def published_urls(out: str, version: str) -> list[str]:
    """URLs of the published embedding partitions of ``version``, in partition order."""
    folder = embeddings_dir(out, version)
    return [storage.join(folder, part_name(n)) for n in published(out, version)]


def read_embeddings(out: str, version: str):
    """All published embedding rows of ``version``: (DataFrame without the vectors, float32 array (N, D)).

    Rows are in partition order and, within a partition, sorted by image key; the array is row-aligned.
    """
    import numpy as np

    table = _read_parts(embeddings_dir(out, version), published(out, version))
    if table is None:
        import pandas as pd

        return pd.DataFrame(columns=["image_key", "url", "sha256", "model_version", "embedded_at",
                                     *EMBEDDING_META]), np.zeros((0, 0), dtype=np.float32)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return table.drop_columns(["embedding"]).to_pandas(), vectors


def read_errors(out: str, version: str):
    """All published error rows of ``version`` (image_key, url, stage, message) as a DataFrame."""
    import pandas as pd

    table = _read_parts(errors_dir(out, version), published(out, version))
    return pd.DataFrame(columns=list(ERROR_COLUMNS)) if table is None else table.to_pandas()
