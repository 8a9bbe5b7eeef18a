"""Publication of an index version: shard files with sha256, ``ids.parquet``, ``manifest.json`` last, then ``LATEST``.

``indexes/<catalogue>/<version>/`` is complete exactly when its ``manifest.json`` exists: shards, ids table and the
resolved config are written first, the manifest after them, and the ``LATEST`` pointer (one small object, replaced
atomically by ``storage.write_text``) only after the manifest. A build killed at any point therefore leaves ``LATEST``
on the previous complete version, and older versions stay (faiss ``contrib/ondisk.py``: ``.tmp`` + ``os.replace``;
the ``_SUCCESS`` marker habit of Hadoop/Spark).

``LATEST`` never goes backwards: version names sort by creation time, and ``advance_latest`` moves the pointer only
to a name greater than the one it holds, by a read-compare-write that is atomic per store (an exclusive ``flock`` on
the catalogue folder locally; on S3 a conditional PUT, ``If-Match`` on the ETag read or ``If-None-Match: *`` for the
first version, retried on ``412 Precondition Failed``). Two builds publishing at once leave it on the newer one.

A manifest's shard entry may carry ``"version"``: the file then lives in that earlier version's folder (an
incremental add reuses untouched shards by reference instead of copying them); ``shard_url`` resolves it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import logging
import os
import re
from typing import TYPE_CHECKING

from whale_dist import storage
from whale_dist.errors import UserError
from whale_dist.failpoints import failpoint

if TYPE_CHECKING:  # imported where used: the build's Ray workers write shards and never need it
    import pandas as pd

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "LATEST"
IDS_FILE = "ids.parquet"
TRAINED_FILE = "trained.faiss"
ID_COLUMNS = ["id", "image_key", "url", "individual_id", "species", "encounter_id", "date", "location", "shard"]


class IndexIntegrityError(UserError, ValueError):
    """A published index that cannot be trusted: missing manifest, checksum mismatch, unknown version."""


def version_name(model_version: str, now: dt.datetime | None = None) -> str:
    """Sortable, unique version folder name: UTC time to the microsecond, then the model version."""
    now = now or dt.datetime.now(dt.UTC)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_version) or "unknown"
    return f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{safe}"


def shard_url(version_url: str, entry: dict) -> str:
    """Where a manifest's shard ``entry`` lives: in ``version_url``, or in the sibling version it names."""
    version_url = version_url.rstrip("/")
    owner = entry.get("version")
    folder = storage.join(version_url.rsplit("/", 1)[0], owner) if owner else version_url
    return storage.join(folder, entry["file"])


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_shard(index, url: str, durable: bool = True) -> dict:
    """Write one faiss index to ``url`` atomically (``storage.write_file``: straight to its final folder when
    local) and describe it for the manifest, its sha256 taken from the written file. ``durable=False``: the caller
    ``storage.sync``s the shards before the manifest that names them (the build does, once for all its shards)."""
    import faiss

    entry = {"file": url.rstrip("/").split("/")[-1], "ntotal": int(index.ntotal)}

    def write(path: str) -> None:
        faiss.write_index(index, path)
        entry.update(bytes=os.path.getsize(path), sha256=sha256_file(path))

    storage.write_file(url, write, durable)
    return entry


def read_shard(url: str, expected_sha256: str | None):
    """Read one shard, refusing it when its sha256 differs from the manifest's (corrupted or half-written)."""
    import faiss
    import numpy as np

    if storage.is_local(url):
        path = storage.strip_scheme(url)
        actual = sha256_file(path) if expected_sha256 else None
        loader = lambda: faiss.read_index(path)  # noqa: E731
    else:
        data = storage.read_bytes(url)
        actual = hashlib.sha256(data).hexdigest() if expected_sha256 else None
        loader = lambda: faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))  # noqa: E731
    if expected_sha256 and actual != expected_sha256:
        raise IndexIntegrityError(f"shard {url} is corrupted: sha256 {actual[:12]}… differs from the manifest's "
                                  f"{expected_sha256[:12]}…; rebuild or load another version")
    return loader()


def write_trained(version_url: str, template, n: int) -> dict:
    """``trained.faiss``: the trained, empty index (quantizer, OPQ/PQ) that every shard was filled from, kept so an
    incremental add fills new shards from the very same quantizer; ``n`` is the catalogue size it was trained for."""
    data = template.tobytes()
    storage.write_bytes(storage.join(version_url, TRAINED_FILE), data)
    return {"file": TRAINED_FILE, "sha256": hashlib.sha256(data).hexdigest(), "n": int(n)}


def write_ids(version_url: str, table) -> dict:
    """``ids.parquet``: id → image_key, url, individual_id, species, encounter_id, date, location, shard, from a
    pandas frame (incremental add) or an Arrow table (the build keeps its metadata in Arrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):  # a pandas frame
        table = pa.Table.from_pandas(table[ID_COLUMNS], preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table.select(ID_COLUMNS), buffer)
    data = buffer.getvalue()
    storage.write_bytes(storage.join(version_url, IDS_FILE), data)
    return {"file": IDS_FILE, "rows": len(table), "sha256": hashlib.sha256(data).hexdigest()}


def read_ids(version_url: str, expected_sha256: str | None = None) -> pd.DataFrame:
    data = storage.read_bytes(storage.join(version_url, IDS_FILE))
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise IndexIntegrityError(f"{storage.join(version_url, IDS_FILE)} is corrupted (sha256 differs)")
    import pandas as pd

    return pd.read_parquet(io.BytesIO(data))


def publish(index_root: str, name: str, manifest: dict) -> str:
    """Write the manifest (last file of the version), then move ``LATEST`` forward to it. Returns the version URL."""
    version_url = storage.join(index_root, name)
    storage.write_json(storage.join(version_url, MANIFEST), manifest)
    failpoint("index.before_latest", version=name)
    now = advance_latest(index_root, name)
    if now != name:
        log.warning("published %s; LATEST stays on the newer %s (built concurrently)", name, now)
    return version_url


def is_newer(candidate: str, current: str | None) -> bool:
    """Whether ``LATEST`` may move from ``current`` to ``candidate``: only forward in creation order (names from
    ``version_name`` start with a fixed-width UTC timestamp, so string order is time order)."""
    return current is None or candidate > current


def advance_latest(index_root: str, name: str) -> str:
    """Point ``LATEST`` at ``name`` unless it already names a newer version; returns what it names afterwards."""
    url = storage.join(index_root, LATEST)
    if storage.is_local(url):
        with _folder_lock(storage.strip_scheme(index_root)):
            return _compare_and_write(url, name)
    if storage.scheme_of(url) in ("s3", "s3a"):
        return _advance_s3(url, name)
    log.warning("%s: no conditional write on this store; LATEST moves by plain read-compare-write", url)
    return _compare_and_write(url, name)


@contextlib.contextmanager
def _folder_lock(folder: str):
    """An exclusive ``flock`` on the folder itself (no lock file to list or clean up); released on close or death."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _compare_and_write(url: str, name: str) -> str:
    current = storage.read_text(url).strip() if storage.exists(url) else None
    if not is_newer(name, current):
        return current
    storage.write_text(url, name + "\n")
    return name


def _advance_s3(url: str, name: str, attempts: int = 20) -> str:
    """Compare-and-swap on S3: the PUT succeeds only if ``LATEST`` is still the object whose ETag was read (or, for
    the first version, still absent); S3 answers 412 otherwise and we read again (AWS S3 conditional writes)."""
    fs, path = storage.filesystem(url), storage.strip_scheme(url)
    for _ in range(attempts):
        fs.invalidate_cache(path)
        try:
            etag = fs.info(path)["ETag"]  # the ETag first: a change after it makes the conditional PUT fail
            current = fs.cat_file(path).decode().strip()
        except FileNotFoundError:
            etag, current = None, None
        if not is_newer(name, current):
            return current
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            fs.pipe_file(path, (name + "\n").encode(), **condition)
            return name
        except Exception as exc:  # s3fs wraps the 412/409 ClientError in OSError subclasses
            if not _precondition_failed(exc):
                raise
    raise IndexIntegrityError(f"{url}: LATEST kept changing under {attempts} conditional writes; publish again")


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{exc!r} {exc.__cause__!r}"
    return any(code in text for code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"))


def resolve_version_url(url: str) -> str:
    """``url`` itself when it holds a manifest, else the version named by its ``LATEST``."""
    if storage.exists(storage.join(url, MANIFEST)):
        return url
    latest = storage.join(url, LATEST)
    if not storage.exists(latest):
        raise IndexIntegrityError(f"{url} is neither a published index version (no {MANIFEST}; an interrupted "
                                  f"build?) nor a catalogue root (no {LATEST})")
    version_url = storage.join(url, storage.read_text(latest).strip())
    if not storage.exists(storage.join(version_url, MANIFEST)):
        raise IndexIntegrityError(f"{latest} names {version_url}, which has no {MANIFEST}")
    return version_url


def read_manifest(version_url: str) -> dict:
    return storage.read_json(storage.join(version_url, MANIFEST))


def list_versions(index_root: str) -> list[str]:
    """Complete versions under a catalogue root, oldest first."""
    manifests = storage.list_files(index_root, ("/" + MANIFEST,))
    return sorted(m.rstrip("/").split("/")[-2] for m in manifests)
