"""Every location is a URL: plain path, ``file://``, ``s3://``, ``gs://``, resolved through fsspec.

S3 endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``, profiles), never from
config. Publication is atomic: a single object is written to a temporary name and renamed (local) or PUT in one
request (object stores, where a PUT is all-or-nothing); a multi-file output becomes visible through a marker written
last (the ``_SUCCESS`` habit of Hadoop/Spark, and faiss ``contrib/ondisk.py``'s ``.tmp`` + ``os.replace``).
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import uuid
from collections.abc import Callable
from typing import Any

from whale_dist.failpoints import failpoint

DONE_SUFFIX = ".done"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme_of(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else "file"


def is_local(url: str) -> bool:
    return scheme_of(url) in ("file", "local")


def strip_scheme(url: str) -> str:
    """The path part of a URL, as fsspec filesystems expect it (``bucket/key`` for s3, absolute path locally)."""
    if is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        return os.path.abspath(path)
    return _SCHEME.sub("", url)


def join(url: str, *parts: str) -> str:
    """Join URL parts with '/', dropping empty parts."""
    out = url.rstrip("/") if url not in ("/", "") else url
    for part in parts:
        if part:
            out = f"{out}/{part.strip('/')}" if out else part
    return out


def filesystem(url: str):
    """The fsspec filesystem for ``url`` (cached per process by fsspec)."""
    import fsspec

    protocol = scheme_of(url)
    if protocol in ("file", "local"):
        return fsspec.filesystem("file", auto_mkdir=True)
    if protocol in ("s3", "s3a"):
        return fsspec.filesystem("s3", **_s3_options())
    return fsspec.filesystem(protocol)


def _s3_options() -> dict[str, Any]:
    """Endpoint from ``AWS_ENDPOINT_URL(_S3)`` (explicitly, for s3fs versions that do not read it themselves).

    s3fs's listings cache is off: other processes publish into the same prefixes (partitions, markers, index
    versions), and a cached listing would make ``exists``/``read_bytes`` deny a file published after it was taken.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {"use_listings_cache": False}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def arrow_filesystem(url: str, *, memory_map: bool = False):
    """A ``pyarrow.fs.FileSystem`` for Ray Data / pyarrow readers and writers, plus the path within it.

    ``memory_map``: a local file is mapped rather than read into fresh Arrow buffers; for files never rewritten in
    place (published partitions: a mapped file truncated under its reader is a SIGBUS, not an error). Measured on a
    200 MB embedding partition, two processes at once: 0.5 s for the first read against 1.5–2.1 s unmapped."""
    import pyarrow.fs as pafs

    if is_local(url):
        return pafs.LocalFileSystem(use_mmap=memory_map), strip_scheme(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem(url))), strip_scheme(url)


def exists(url: str) -> bool:
    return filesystem(url).exists(strip_scheme(url))


def read_bytes(url: str) -> bytes:
    return filesystem(url).cat_file(strip_scheme(url))


def read_object(url: str) -> bytes:
    """The bytes of one whole object, for hot paths that read many small ones (photos).

    On ``s3://`` this takes Arrow's C++ S3 client: measured on the loopback S3 server, 1.4 ms of client CPU per
    JPEG against 10 ms through s3fs (``bench/embed_throughput.py``), CPU the decode tasks need. Anywhere else, or
    when that client cannot be built, it is ``read_bytes``. A missing object is ``FileNotFoundError`` either way.
    """
    path = strip_scheme(url)
    client = _native_s3(path.split("/", 1)[0]) if scheme_of(url) in ("s3", "s3a") else None
    if client is None:
        return read_bytes(url)
    try:
        with client.open_input_stream(path) as stream:
            return stream.read()
    except OSError as exc:
        if "ACCESS_DENIED" in str(exc):  # s3fs says PermissionError; keep one error type for callers
            raise PermissionError(str(exc).splitlines()[0]) from exc
        raise


def _native_s3(bucket: str):
    """A ``pyarrow.fs.S3FileSystem`` for the current AWS environment (cached per endpoint and region), or None.

    Arrow does not read ``AWS_ENDPOINT_URL`` itself, so the endpoint is passed explicitly, as for s3fs. With no
    region set and no endpoint (AWS itself), the bucket's region is looked up once, as s3fs does, because Arrow
    would otherwise assume us-east-1 and fail on buckets elsewhere.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    return _native_s3_for(endpoint, region, "" if endpoint or region else bucket)


@functools.lru_cache(maxsize=64)
def _native_s3_for(endpoint: str, region: str, bucket: str):
    try:
        import pyarrow.fs as pafs

        if bucket:
            region = pafs.resolve_s3_region(bucket)
        # Timeouts so a dropped connection fails the read (and the caller retries) instead of hanging a task
        kwargs: dict[str, Any] = {"connect_timeout": 10, "request_timeout": 60}
        if region:
            kwargs["region"] = region
        if endpoint:
            scheme, _, host = endpoint.rstrip("/").partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        return pafs.S3FileSystem(**kwargs)
    except (ImportError, OSError, ValueError):  # pyarrow built without S3, or an unusable setting: use s3fs
        return None


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(strip_scheme(url), exist_ok=True)


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` at ``url`` atomically: readers see the old object or the whole new one, never a part."""
    failpoint("storage.put", url=url, size=len(data))
    if is_local(url):
        _replace_local(strip_scheme(url), lambda handle: handle.write(data))
    else:
        filesystem(url).pipe_file(strip_scheme(url), data)


def write_file(url: str, write: Callable[[str], None], durable: bool = True) -> None:
    """Atomically publish the file that ``write(path)`` creates at a local path it is given: for a local ``url``
    the path is a temporary name beside the target, renamed over it when complete (no second copy: a 1M-vector
    index build wrote its 2 GB of shards twice, through a temporary folder and ``write_bytes``); for object storage
    a local temporary file, then one upload. ``write`` may also read the finished file (to hash it).

    ``durable=False`` (local files) starts the write-back without waiting for it: the caller then ``sync``s the file
    before publishing anything that points at it. A build writing eight shards waited ~0.5 s per 280 MB shard in
    ``fsync`` while holding its CPU; synced together at publish time the data is already on disk (measured 0.0 s)."""
    if is_local(url):
        path = strip_scheme(url)
        failpoint("storage.put", url=url, size=-1)
        _replace_local(path, lambda handle: write(handle.name), durable)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="whale-put-") as tmp:
        local = os.path.join(tmp, posixpath.basename(strip_scheme(url)) or "object")
        write(local)
        failpoint("storage.put", url=url, size=os.path.getsize(local))
        filesystem(url).put_file(local, strip_scheme(url))


def sync(urls: list[str]) -> None:
    """Wait until local files written with ``durable=False`` are on disk (object storage: nothing to wait for)."""
    for url in urls:
        if is_local(url):
            fd = os.open(strip_scheme(url), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _replace_local(path: str, fill: Callable[[Any], Any], durable: bool = True) -> None:
    """``fill(handle)`` writes a temporary file beside ``path`` (opened for writing, ``handle.name`` its path),
    which is flushed to disk (or, not ``durable``, its write-back started) and renamed over ``path``: readers see
    the old file or the whole new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            fill(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
            elif hasattr(os, "posix_fadvise"):  # Linux starts write-back of the dirty pages here, without waiting
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, payload: Any) -> None:
    write_text(url, json.dumps(payload, indent=2, sort_keys=True, default=str))


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url), strip_scheme(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def list_files(url: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """All files under ``url`` (recursively), as full URLs, sorted; optionally only those ending in ``suffixes``."""
    fs, path = filesystem(url), strip_scheme(url)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        found = [path]
    else:
        found = fs.find(path)
    lowered = tuple(s.lower() for s in suffixes)
    keep = [p for p in found if not lowered or p.lower().endswith(lowered)]
    return sorted(_as_url(url, p) for p in keep)


def _as_url(template: str, path: str) -> str:
    if is_local(template):
        return path
    return f"{scheme_of(template)}://{path}"


def relative_key(root_url: str, file_url: str) -> str:
    """``file_url`` relative to ``root_url`` with '/' separators (a stable image key)."""
    root = strip_scheme(root_url).rstrip("/")
    path = strip_scheme(file_url)
    if path.startswith(root + "/"):
        return path[len(root) + 1:]
    return posixpath.basename(path)


def safe_relative_path(key: str) -> str:
    """A key from user data made safe to use as a relative output path: no '..', no absolute, no odd characters."""
    parts = [p for p in re.split(r"[\\/]+", key) if p not in ("", ".", "..")]
    cleaned = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts]
    return "/".join(cleaned) or "_"


def done_marker(url: str) -> str:
    return url + DONE_SUFFIX


def is_done(url: str) -> bool:
    return exists(done_marker(url))


def mark_done(url: str, payload: dict | None = None) -> None:
    """Publish ``url`` by writing its done-marker last."""
    write_json(done_marker(url), payload or {})


def redact(text: str) -> str:
    """Remove any credential value found in the environment from ``text`` (for logs and error lines)."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
