"""Catalogue versions: ``{root}/catalogue/v<N>/manifest.parquet``, append-only, each version whole and readable.

The labelled catalogue grows by review: version ``N+1`` is version ``N`` plus the photos a person confirmed or
declared new, each added row carrying its provenance (night, model version, reviewer, decision, time). A version is
never rewritten, so a model or an index can always say which catalogue it was made from, and the previous one stays
readable. ``manifest.parquet`` is a generic manifest (``image`` = the photo's URL, ``image_key``, labels), so
``catalogue.url=<root>/catalogue/v<N>/manifest.parquet catalogue.format=manifest`` trains or embeds any version.

Version 1 is the configured catalogue (``catalog.catalogue_from_config``: ``train.csv``, a manifest, a wildlife
table) as it stands when the first version is written; until then it is read from the configuration, so a
deployment that never reviews never needs this folder. Two reviews writing the same version at once are refused by
the existence check only on a best-effort basis (not supported, like two embed runs of one model version).
"""

from __future__ import annotations

import io
import re
import time

from whale_dist import storage
from whale_dist.catalog import CATALOGUE_COLUMNS, catalogue_from_config
from whale_dist.errors import UserError

MANIFEST = "manifest.parquet"
PROVENANCE_COLUMNS = ("night", "model_version", "reviewer", "decision", "added_at")
_VERSION = re.compile(r"/v(\d+)/" + re.escape(MANIFEST) + "$")


class CatalogueVersionError(UserError, ValueError):
    """A catalogue version that cannot be written or read as asked: one line."""


def catalogue_root(cfg) -> str:
    return cfg.url("catalogue")


def version_url(root: str, number: int) -> str:
    return storage.join(root, f"v{number}", MANIFEST)


def list_versions(root: str) -> list[int]:
    """Numbers of the written versions, ascending."""
    return sorted(int(m.group(1)) for url in storage.list_files(root, (MANIFEST,))
                  if (m := _VERSION.search(url)))


def read_version(root: str, number: int):
    """Version ``number`` as the catalogue table (``CATALOGUE_COLUMNS``) plus the provenance columns."""
    import pandas as pd

    url = version_url(root, number)
    if not storage.exists(url):
        raise CatalogueVersionError(f"catalogue version {number} not found ({url})")
    frame = pd.read_parquet(io.BytesIO(storage.read_bytes(url))).rename(columns={"image": "url"})
    return frame.fillna("")


def initial_version(cfg):
    """Version 1: the configured catalogue, every row with the provenance of the initial import."""
    table = catalogue_from_config(cfg, check=False)
    source = storage.redact(cfg.catalogue_url)
    return with_provenance(table, night="", model_version="", reviewer="", decision=f"initial: {source}")


def latest_version(cfg) -> tuple[int, object, bool]:
    """(number, table, written): the newest written version, or version 1 from the configuration (not written)."""
    numbers = list_versions(catalogue_root(cfg))
    if numbers:
        return numbers[-1], read_version(catalogue_root(cfg), numbers[-1]), True
    return 1, initial_version(cfg), False


def with_provenance(table, **values):
    """``table`` with the provenance columns set (``added_at`` defaults to now, UTC, to the second)."""
    values.setdefault("added_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    table = table.copy()
    for column in PROVENANCE_COLUMNS:
        table[column] = str(values.get(column, ""))
    return table


def write_version(root: str, number: int, table) -> str:
    """Write version ``number`` (never over an existing one); returns its URL."""
    url = version_url(root, number)
    if storage.exists(url):
        raise CatalogueVersionError(f"catalogue version {number} exists already ({url}); versions are append-only")
    columns = [*CATALOGUE_COLUMNS, *[c for c in table.columns if c not in CATALOGUE_COLUMNS]]
    frame = table[columns].rename(columns={"url": "image"}).astype(str)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(url, buffer.getvalue())
    return url


def append_version(cfg, added) -> tuple[int, str]:
    """Write ``latest + added`` as the next version (writing version 1 first when only the configuration held it).

    ``added`` must already carry its provenance; returns (new number, its URL).
    """
    import pandas as pd

    number, table, written = latest_version(cfg)
    root = catalogue_root(cfg)
    if not written:
        write_version(root, number, table)
    grown = pd.concat([table, added], ignore_index=True).fillna("")
    return number + 1, write_version(root, number + 1, grown)
