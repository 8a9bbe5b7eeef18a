"""What to embed: an archive prefix (image files in nested folders and ``.tar`` shards) or an explicit manifest.

Every source becomes one work table with a row per photo: ``image_key``, ``url``, ``offset``/``length`` (a byte
range inside a tar shard, -1 for a whole file) and the catalogue metadata columns. Tar shards are indexed by reading
their headers with seeks (one small ranged GET per member on S3, not the whole shard), so the members are then spread
over the decode tasks like loose files and a shard never has to pass through one worker; each task reads the members
it got from one shard in one ranged request (``plan_reads``).

Image keys are stable ids: for an archive, the path relative to the prefix (``<tar path>/<member name>`` for a tar
member); for a manifest, its ``image_key`` (or ``image``) column. A photo's ``url`` for a tar member is
``<tar url>#<member name>``; ``read_image_bytes`` reads either form back (for reports and checks).
"""

from __future__ import annotations

import tarfile
from concurrent.futures import ThreadPoolExecutor

from whale_dist import storage
from whale_dist.catalog import CATALOGUE_COLUMNS, IMAGE_SUFFIXES, catalogue_from_config, read_manifest

TAR_SUFFIXES = (".tar",)
WORK_COLUMNS = (*CATALOGUE_COLUMNS, "offset", "length", "list_error", "fingerprint")
MEMBER_SEP = "#"
# Small reads while walking tar headers: s3fs would otherwise fetch 5 MB blocks, i.e. most of every photo.
_HEADER_BLOCK = 64 * 1024
# Tar members of one batch are read as one span while the bytes between them stay under SPAN_GAP.
SPAN_GAP = 1 << 20
SPAN_MAX = 256 << 20


def list_archive(prefix: str, threads: int = 8):
    """All photos under ``prefix`` as a work table sorted by key; returns (table, number of ignored non-image files).

    Files that are neither images (by suffix) nor tar shards are ignored, as are non-image tar members (webdataset
    sidecars such as ``.json``/``.cls``); a renamed non-image with an image suffix is kept and fails at decode.
    """
    import pandas as pd

    prints = list_fingerprints(prefix)
    files = sorted(prints)
    if not files and not storage.exists(prefix):
        raise FileNotFoundError(f"archive prefix not found: {prefix}")
    photos = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    tars = [f for f in files if f.lower().endswith(TAR_SUFFIXES)]
    rows = [_row(storage.relative_key(prefix, f), f, fingerprint=prints[f]) for f in photos]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(tars)))) as pool:
        for tar_url, (members, problem) in zip(tars, pool.map(_tar_members_or_error, tars)):
            tar_key = storage.relative_key(prefix, tar_url)
            rows += [_row(f"{tar_key}/{name}", f"{tar_url}{MEMBER_SEP}{name}", offset, size,
                          fingerprint=f"{prints[tar_url]}@{offset}") for name, offset, size in members]
            if problem:  # the members before the damage are kept; the shard itself becomes one error row
                rows.append(_row(tar_key, tar_url, list_error=problem))
    table = pd.DataFrame(rows, columns=list(WORK_COLUMNS))
    _check_unique(table, prefix)
    ignored = len(files) - len(photos) - len(tars)
    return table.sort_values("image_key", kind="stable").reset_index(drop=True), ignored


def list_fingerprints(prefix: str) -> dict[str, str]:
    """URL -> fingerprint (``size:ETag``, or ``size:mtime`` where the store has no ETag) of every file under
    ``prefix``, from the listing itself: a photo replaced under the same key gets a new fingerprint, so the embed
    step embeds it again, at no extra request per file."""
    fs, path = storage.filesystem(prefix), storage.strip_scheme(prefix)
    if not fs.exists(path):
        return {}
    found = {path: fs.info(path)} if fs.isfile(path) else fs.find(path, detail=True)
    scheme = "" if storage.is_local(prefix) else storage.scheme_of(prefix) + "://"
    return {scheme + p: _fingerprint(info) for p, info in found.items() if info.get("type", "file") == "file"}


def _fingerprint(info: dict) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size', '')}:{str(tag).strip(chr(34))}"


def from_manifest(url: str):
    """A manifest's rows as a work table; listed files are not checked here (a missing one is a ``read`` error)."""
    return _work_table(read_manifest(url, check=False))


def from_catalogue(cfg):
    """The configured labelled catalogue itself (``cfg.catalogue``, any format) as a work table.

    This is what a catalogue maintainer embeds before indexing; Kaggle's ``train.csv`` names files relative to
    ``train_images/`` and a wildlife-datasets table relative to its root, which only the catalogue reader resolves.
    A generic manifest keeps the manifest reader, which reports its missing files as error rows.
    """
    if cfg.catalogue.format == "manifest":
        return from_manifest(cfg.catalogue_url)
    return _work_table(catalogue_from_config(cfg, check=False))


def _work_table(table):
    table["offset"], table["length"], table["list_error"], table["fingerprint"] = -1, -1, "", ""
    return table[list(WORK_COLUMNS)].sort_values("image_key", kind="stable").reset_index(drop=True)


def list_tar_members(tar_url: str) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of every image file in an uncompressed tar shard; damage raises."""
    members, problem = _tar_members_or_error(tar_url)
    if problem:
        raise ValueError(f"tar shard {tar_url}: {problem}")
    return members


def _tar_members_or_error(tar_url: str) -> tuple[list[tuple[str, int, int]], str]:
    """The readable members of a shard, and what went wrong after them ('' when nothing did)."""
    fs, path = storage.filesystem(tar_url), storage.strip_scheme(tar_url)
    kwargs = {} if storage.is_local(tar_url) else {"block_size": _HEADER_BLOCK}
    members: list[tuple[str, int, int]] = []
    try:
        size = fs.size(path)
        with fs.open(path, "rb", **kwargs) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for m in archive:
                if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES):
                    members.append((m.name, m.offset_data, min(m.size, max(0, size - m.offset_data))))
            end = archive.offset
            handle.seek(end)
            tail = handle.read(512)
    except Exception as exc:  # tarfile, network and EOF errors all mean: this shard is (partly) unreadable
        return members, f"unreadable tar shard after {len(members)} members: {type(exc).__name__}: {exc}"
    # tarfile ends quietly at a cut-off header; a proper shard ends with zero blocks, anything else lost members
    if len(tail) < 512 or any(tail):
        return members, f"tar shard damaged or truncated at byte {end} after {len(members)} members"
    return members, ""


def read_item(url: str, offset: int = -1, length: int = -1) -> bytes:
    """The bytes of one work item: a whole file, or a byte range of a tar shard."""
    if offset < 0:
        return storage.read_object(url)
    return read_range(url.split(MEMBER_SEP, 1)[0], offset, offset + length)


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file in one ranged read (``start`` < 0: the whole file)."""
    if start < 0:
        return storage.read_object(url)
    if end <= start:
        return b""
    return storage.filesystem(url).cat_file(storage.strip_scheme(url), start=start, end=end)


def plan_reads(urls, offsets, lengths) -> list[tuple[str, int, int, list[tuple[int, int, int]]]]:
    """Group a batch's items into reads: ``(url, start, end, [(item, offset, length), ...])``.

    A whole file is one read (start -1). Members of one tar shard that lie close together become one ranged read
    of their span, as webdataset streams a shard: one request instead of one per member, which on object storage
    saves a round trip and most of the per-request client CPU for every photo after the first.
    """
    reads, by_tar = [], {}
    for item, (url, offset, length) in enumerate(zip(urls, offsets, lengths)):
        if int(offset) < 0:
            reads.append((str(url), -1, -1, [(item, -1, -1)]))
        else:
            by_tar.setdefault(str(url).split(MEMBER_SEP, 1)[0], []).append((item, int(offset), int(length)))
    for tar_url, members in by_tar.items():
        members.sort(key=lambda member: member[1])
        span, start, end = [], 0, 0
        for member in members:
            _, offset, length = member
            if span and (offset - end > SPAN_GAP or offset + length - start > SPAN_MAX):
                reads.append((tar_url, start, end, span))
                span = []
            if not span:
                start = end = offset
            span.append(member)
            end = max(end, offset + length)
        reads.append((tar_url, start, end, span))
    return reads


def slice_member(data: bytes, start: int, offset: int, length: int) -> bytes:
    """One item's bytes out of a read that began at ``start`` (``offset`` < 0: the read is the item)."""
    return data if offset < 0 else data[offset - start:offset - start + length]


def read_image_bytes(url: str) -> bytes:
    """The photo at a ``url`` from the embedding table: a plain file or ``<tar url>#<member>``."""
    if MEMBER_SEP not in url or not url.split(MEMBER_SEP, 1)[0].lower().endswith(TAR_SUFFIXES):
        return storage.read_bytes(url)
    tar_url, member = url.split(MEMBER_SEP, 1)
    for name, offset, size in list_tar_members(tar_url):
        if name == member:
            return read_item(url, offset, size)
    raise FileNotFoundError(f"{member} not found in tar shard {tar_url}")


def _row(key: str, url: str, offset: int = -1, length: int = -1, list_error: str = "", fingerprint: str = "") -> dict:
    row = dict.fromkeys(CATALOGUE_COLUMNS, "")
    row.update(image_key=key, url=url, offset=offset, length=length, list_error=list_error, fingerprint=fingerprint)
    return row


def _check_unique(table, prefix: str) -> None:
    """Two inputs with one key (a folder named like a tar shard) would make 'already embedded' ambiguous."""
    duplicated = table["image_key"][table["image_key"].duplicated()]
    if len(duplicated):
        raise ValueError(f"archive {prefix}: two inputs share the image key '{duplicated.iloc[0]}'")

