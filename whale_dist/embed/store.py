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

Keys: every published chunk also has ``{out}/keys/model=<v>/part-XXXXX.parquet`` (image_key, fingerprint, ok),
written before the chunk's marker, so "what is already embedded" reads a few bytes per photo instead of every
partition's rows; ``compact_keys`` folds them into one ``through-XXXXX.parquet`` (the keys of chunks up to XXXXX) so a
store of a million photos answers with one file plus the chunks published since. A photo listed again with another
fingerprint (size + ETag of its file) is embedded again into a newer chunk; readers take the newest row per key.
"""

from __future__ import annotations

import io
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor

from whale_dist import storage

EMBEDDING_META = ("individual_id", "species", "encounter_id", "date", "location", "bbox")
ERROR_COLUMNS = ("image_key", "url", "stage", "message")
KEY_COLUMNS = ("image_key", "fingerprint", "ok")
COMPACT_AFTER = 32  # chunks past the last compacted keys file before ``compact_keys`` writes a new one
_THROUGH = re.compile(r"^through-(\d{5,})\.parquet$")
_PART = re.compile(r"^part-(\d{5,})\.parquet(\.done)?$")
_PUBLISHED_MARKER = re.compile(r"/model=([^/]+)/part-\d{5,}\.parquet\.done$")
STORED_VECTOR = {"whale_dist.embedding": "float32 little-endian vector per row"}  # the binary column's tag
VECTOR_TYPES = "fixed_size_binary(4·D) or fixed_size_list<float32>[D]"  # what ``vector_dim`` accepts, for messages


def embeddings_dir(out: str, version: str) -> str:
    return storage.join(out, "embeddings", f"model={version}")


def errors_dir(out: str, version: str) -> str:
    return storage.join(out, "errors", f"model={version}")


def keys_dir(out: str, version: str) -> str:
    return storage.join(out, "keys", f"model={version}")


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
    for folder in (embeddings_dir(out, version), errors_dir(out, version), keys_dir(out, version)):
        for number, files in _parts(folder).items():
            if number not in keep:
                for url in sorted(files, reverse=True):  # the marker before its data
                    storage.remove(url)
                    removed += 1
    return removed


def done_keys(out: str, version: str, done: list[int], keys=None) -> set[str]:
    """Image keys of the published chunks (embedded or failed), which a new run skips; only those among ``keys``
    when given (a night asks about its own photos, not the store's million)."""
    return set(key_table(out, version, done, keys)["image_key"])


def done_fingerprints(out: str, version: str, done: list[int], keys=None) -> dict[str, str]:
    """image key -> fingerprint of its newest published row ('' when the source had none, e.g. a manifest); only
    for ``keys`` when given."""
    table = key_table(out, version, done, keys)
    return dict(zip(table["image_key"], table["fingerprint"]))


def key_table(out: str, version: str, done: list[int], keys=None):
    """The newest row of every key in the published chunks (of ``keys`` only, when given): image_key, fingerprint,
    ok, partition.

    Reads the last compacted keys file and the per-chunk keys files published after it; a chunk published before
    keys files existed is read from its partitions (key column only). With ``keys``, every file's rows are cut to
    them in Arrow before anything else, so asking about a night's 100 photos in a store of a million costs one
    vectorised membership test, not a million Python strings.
    """
    import pandas as pd

    wanted = _key_set(keys)
    through, base = _compacted(out, version, done)
    later = [n for n in done if n > through]
    have = set(_parts(keys_dir(out, version))) & set(later)
    tables = [t for t in (base, _read_parts(keys_dir(out, version), sorted(have))) if t is not None]
    frames = [_only(t, wanted).to_pandas() for t in tables]
    frames += [f[f["image_key"].isin(set(keys))] if keys is not None else f
               for f in _legacy_keys(out, version, [n for n in later if n not in have])]
    if not frames:
        return pd.DataFrame({"image_key": [], "fingerprint": [], "ok": [], "partition": []})
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values("partition", kind="stable").drop_duplicates("image_key", keep="last")


def _key_set(keys):
    """``keys`` as an Arrow string array (for ``pyarrow.compute.is_in``), or None for every key."""
    import pyarrow as pa

    return None if keys is None else pa.array([str(k) for k in keys], type=pa.string())


def _only(table, wanted):
    """Rows of the Arrow ``table`` whose image_key is in ``wanted`` (all rows when None)."""
    import pyarrow.compute as pc

    if wanted is None:
        return table
    return table.filter(pc.is_in(table.column("image_key").cast("string"), value_set=wanted))


def _compacted(out: str, version: str, done: list[int]):
    """(highest chunk covered, its keys as an Arrow table) of the newest compacted keys file, or (-1, None)."""
    import pyarrow.parquet as pq

    through, url = _newest_compacted(out, version, done)
    return through, (pq.read_table(io.BytesIO(storage.read_bytes(url))) if url else None)


def _newest_compacted(out: str, version: str, done: list[int]) -> tuple[int, str]:
    """(highest chunk covered, URL) of the newest compacted keys file, or (-1, ''), from a listing alone."""
    found = sorted((int(m.group(1)), url) for url in storage.list_files(keys_dir(out, version))
                   if (m := _THROUGH.match(posixpath.basename(url))) and int(m.group(1)) in set(done))
    return found[-1] if found else (-1, "")


def _legacy_keys(out: str, version: str, numbers: list[int]) -> list:
    """Keys of chunks without a keys file (published before there were any), read from their partitions."""
    frames = []
    for folder, ok in ((embeddings_dir(out, version), True), (errors_dir(out, version), False)):
        for number in numbers:
            table = _read_parts(folder, [number], columns=["image_key"])
            keys = table.column("image_key").to_pylist() if table is not None else []
            frames.append(_key_frame(keys, [""] * len(keys), ok, number))
    return frames


def _key_frame(keys, fingerprints, ok: bool, number: int):
    import pandas as pd

    return pd.DataFrame({"image_key": list(keys), "fingerprint": list(fingerprints), "ok": [ok] * len(keys),
                         "partition": [number] * len(keys)})


def chunk_keys(embedded, errors, number: int):
    """The keys table of one chunk (both of its tables), as ``publish_chunk`` writes it."""
    import pandas as pd

    frames = [_key_frame(t.column("image_key").to_pylist(), _fingerprints(t), ok, number)
              for t, ok in ((embedded, True), (errors, False))]
    return _arrow(pd.concat(frames, ignore_index=True).astype({"ok": bool, "partition": "int64"}))


def _fingerprints(table) -> list[str]:
    if "fingerprint" in table.column_names:
        return [str(f or "") for f in table.column("fingerprint").to_pylist()]
    return [""] * table.num_rows


def compact_keys(out: str, version: str, every: int = COMPACT_AFTER) -> bool:
    """Fold the per-chunk keys files into one ``through-N.parquet`` when ``every`` chunks came since the last."""
    done = published(out, version)
    through, _ = _newest_compacted(out, version, done)
    if not done or len([n for n in done if n > through]) < every:
        return False
    table = key_table(out, version, done)
    write_parquet(storage.join(keys_dir(out, version), f"through-{done[-1]:05d}.parquet"),
                  _arrow(table.reset_index(drop=True)))
    return True


def _arrow(frame):
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


def read_rows(out: str, version: str, keys):
    """The newest embedded row of each of ``keys``: (DataFrame without vectors, float32 (N, D)), in key order.

    Only the partitions holding those rows are read (found through the keys files), so what a night costs follows
    the night's photos, not the size of the store. Keys without an embedded row are absent.
    """
    import numpy as np
    import pandas as pd

    wanted = key_table(out, version, published(out, version), keys)
    wanted = wanted[wanted["ok"].astype(bool)]
    table = _read_parts(embeddings_dir(out, version), sorted(set(wanted["partition"].astype(int))))
    if table is None:
        return pd.DataFrame(columns=["image_key", "url", *EMBEDDING_META]), np.zeros((0, 0), dtype=np.float32)
    frame, vectors = _split_vectors(table)
    frame["_partition"] = _partition_column(table)
    newest = set(zip(wanted["image_key"], wanted["partition"].astype(int)))
    keep = np.array([(k, p) in newest for k, p in zip(frame["image_key"], frame["_partition"])], dtype=bool)
    frame, vectors = frame[keep].drop(columns="_partition"), vectors[keep]
    order = np.argsort(frame["image_key"].to_numpy(dtype=str), kind="stable")
    return frame.iloc[order].reset_index(drop=True), vectors[order]


def read_error_rows(out: str, version: str, keys):
    """The error rows of ``keys`` whose newest published row is an error (partitions found through the keys)."""
    import pandas as pd

    wanted = key_table(out, version, published(out, version), keys)
    wanted = wanted[~wanted["ok"].astype(bool)]
    table = _read_parts(errors_dir(out, version), sorted(set(wanted["partition"].astype(int))))
    if table is None:
        return pd.DataFrame(columns=list(ERROR_COLUMNS))
    frame = table.to_pandas()
    frame = frame[frame["image_key"].isin(set(wanted["image_key"]))]
    return frame.drop_duplicates("image_key", keep="last").sort_values("image_key").reset_index(drop=True)


def _read_parts(folder: str, numbers: list[int], columns: list[str] | None = None):
    """Concatenate partitions ``numbers`` of ``folder`` (in number order) as one pyarrow table, or None.

    The table's schema metadata ``partitions`` holds the row count of each partition read (for ``_partition_column``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [storage.join(folder, part_name(n)) for n in numbers]
    if not urls:
        return None

    def read(url: str):  # partitions written before ``stored_table`` hold lists: one form to concatenate
        return stored_table(pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=columns))

    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(read, urls))
    table = pa.concat_tables(tables, promote_options="permissive")
    counts = ",".join(f"{n}:{t.num_rows}" for n, t in zip(numbers, tables))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"partitions": counts.encode()})


def _partition_column(table):
    """The partition number of every row of a ``_read_parts`` table."""
    import numpy as np

    pairs = [p.split(":") for p in table.schema.metadata[b"partitions"].decode().split(",") if p]
    return np.repeat([int(n) for n, _ in pairs], [int(c) for _, c in pairs])


def _split_vectors(table):
    """(metadata DataFrame, float32 (N, D) vectors) of an embeddings table."""
    vectors = vectors_of(table.column("embedding"))
    return table.drop_columns(["embedding"]).to_pandas(), vectors


def write_parquet(url: str, table) -> None:
    """zstd for every column but ``embedding``, stored plain (float32 embeddings shrink ~8 % under zstd, and
    decompressing them cost 0.40 s against 0.24 s per 100k × 512 partition read, measured) and as fixed-size
    binary (``stored_table``), paid by every index build and refresh."""
    import pyarrow.parquet as pq

    table = stored_table(table)
    buffer = io.BytesIO()
    compression = {name: "none" if name == "embedding" else "zstd" for name in table.column_names}
    dictionary = [name for name in table.column_names if name != "embedding"]  # distinct floats: no dictionary
    pq.write_table(table, buffer, compression=compression, use_dictionary=dictionary)
    storage.write_bytes(url, buffer.getvalue())


def stored_table(table):
    """``table`` as partitions store it: a ``fixed_size_list<float32>[D]`` embedding column becomes
    ``fixed_size_binary(4·D)``, each row the vector's D little-endian float32 (numpy:
    ``np.frombuffer(row, "<f4")``), the field tagged ``STORED_VECTOR``. Parquet has no fixed-size list: Arrow
    writes one as a list with a repetition level per float, and decoding those took 0.33 s per 100k × 512
    partition against 0.04 s for the same bytes as FIXED_LEN_BYTE_ARRAY (warm; 1.38 s against 0.29 s cold), on
    every read by the index build, the refresh and identification. Readers take both (``vectors_of``): stores
    written before keep working."""
    import numpy as np
    import pyarrow as pa

    index = table.schema.get_field_index("embedding")
    if index < 0 or not pa.types.is_fixed_size_list(table.schema.field(index).type):
        return table
    vectors = np.ascontiguousarray(vectors_of(table.column(index)), dtype="<f4")
    dim = vectors.shape[1]
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * dim), len(vectors), [None, pa.py_buffer(vectors)])
    field = pa.field("embedding", pa.binary(4 * dim), nullable=False, metadata=STORED_VECTOR)
    return table.set_column(index, field, column)


def vector_dim(column_type) -> int | None:
    """D of an embedding column of either form (``stored_table``'s binary or a float32 fixed-size list), else
    None."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(column_type) and pa.types.is_float32(column_type.value_type):
        return int(column_type.list_size)
    if pa.types.is_fixed_size_binary(column_type) and column_type.byte_width % 4 == 0:
        return column_type.byte_width // 4
    return None


def vectors_of(column):
    """The float32 (N, D) vectors of an embedding column (Arrow array or chunked array) of either form, without a
    copy where the column is one contiguous buffer."""
    import numpy as np
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = vector_dim(column.type)
    if dim is None:
        raise ValueError(f"embedding column is {column.type}, expected {VECTOR_TYPES}")
    if column.null_count:
        raise ValueError(f"embedding column has {column.null_count} missing vector(s)")
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    data = np.frombuffer(column.buffers()[1], dtype="<f4", count=(column.offset + len(column)) * dim)
    return data[column.offset * dim:].reshape(-1, dim).astype(np.float32, copy=False)


def publish_chunk(out: str, version: str, number: int, embedded, errors) -> None:
    """Write chunk ``number``: errors partition + marker, keys, embeddings partition, then the chunk marker last."""
    error_url = storage.join(errors_dir(out, version), part_name(number))
    write_parquet(error_url, errors)
    storage.mark_done(error_url, {"rows": errors.num_rows})
    write_parquet(storage.join(keys_dir(out, version), part_name(number)), chunk_keys(embedded, errors, number))
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
    """All published embedding rows of ``version``, the newest per key: (DataFrame without the vectors, float32
    array (N, D)).

    Rows are in partition order and, within a partition, sorted by image key; the array is row-aligned. A key
    embedded again (its file changed) keeps only its row in the newest partition.
    """
    import numpy as np

    table = _read_parts(embeddings_dir(out, version), published(out, version))
    if table is None:
        import pandas as pd

        return pd.DataFrame(columns=["image_key", "url", "sha256", "model_version", "embedded_at",
                                     *EMBEDDING_META]), np.zeros((0, 0), dtype=np.float32)
    frame, vectors = _split_vectors(table)
    keep = ~frame["image_key"].duplicated(keep="last").to_numpy()
    if keep.all():
        return frame, vectors
    return frame[keep].reset_index(drop=True), vectors[keep]


def read_errors(out: str, version: str):
    """All published error rows of ``version`` (image_key, url, stage, message) as a DataFrame."""
    import pandas as pd

    table = _read_parts(errors_dir(out, version), published(out, version))
    return pd.DataFrame(columns=list(ERROR_COLUMNS)) if table is None else table.to_pandas()
