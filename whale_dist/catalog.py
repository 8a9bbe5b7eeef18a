"""Catalogue reading: the Happywhale layout or a generic manifest -> one typed table, validated before any work.

Columns of the normalised table (``CATALOGUE_COLUMNS``): ``image_key`` (unique, stable id of a photo), ``url`` (where
its bytes are), ``individual_id``, ``species``, ``bbox`` ("x0 y0 x1 y1" in pixels or empty), ``encounter_id``,
``date``, ``location``. Missing optional values are empty strings so the table round-trips through CSV and parquet.
"""

from __future__ import annotations

import posixpath
import warnings

from whale_dist import storage
from whale_dist.errors import UserError

NEW_INDIVIDUAL = "new_individual"
CATALOGUE_COLUMNS = ("image_key", "url", "individual_id", "species", "bbox", "encounter_id", "date", "location")
OPTIONAL_COLUMNS = CATALOGUE_COLUMNS[2:]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Label errors of the Happywhale training CSV, as listed in the competition discussion and fixed by every top
# solution: misspellings, and two names for the same species.
SPECIES_FIXES = {
    "bottlenose_dolpin": "bottlenose_dolphin",
    "kiler_whale": "killer_whale",
    "beluga": "beluga_whale",
    "globis": "short_finned_pilot_whale",
    "pilot_whale": "short_finned_pilot_whale",
}


class CatalogueError(UserError, ValueError):
    """A bad manifest: one line naming the row or column."""


def fix_species(name: str) -> str:
    name = (name or "").strip()
    return SPECIES_FIXES.get(name, name)


def read_table(url: str):
    """A CSV or parquet file at ``url`` as a DataFrame of strings."""
    import io

    import pandas as pd

    data = storage.read_bytes(url)
    if url.lower().endswith(".parquet"):
        try:
            frame = pd.read_parquet(io.BytesIO(data))
        except Exception as exc:  # pyarrow raises several types for a damaged or non-parquet file
            raise CatalogueError(f"manifest {url}: not a readable parquet file ({_first_line(exc)})") from exc
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise CatalogueError(f"manifest {url}: not UTF-8 text (byte {exc.start})") from exc
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise CatalogueError(f"manifest {url}: not a readable CSV ({_first_line(exc)})") from exc
    return frame


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_happywhale(folder_url: str, csv: str = "train.csv", images_dir: str = "train_images", check: bool = True):
    """The Kaggle layout: ``train.csv`` (image, species, individual_id) + an image folder."""
    csv_url = storage.join(folder_url, csv)
    frame = read_table(csv_url)
    _require_columns(frame, ("image", "species", "individual_id"), csv_url)
    frame = frame.rename(columns={"image": "image_key"})
    frame["url"] = [storage.join(folder_url, images_dir, key) for key in frame["image_key"]]
    return _normalise(frame, csv_url, check)


def read_manifest(url: str, check: bool = True):
    """A generic manifest (CSV or parquet): ``image`` (URL or path relative to the manifest) + optional columns."""
    frame = read_table(url)
    _require_columns(frame, ("image",), url)
    base = posixpath.dirname(url.rstrip("/"))
    frame["url"] = [_resolve(base, str(ref)) for ref in frame["image"]]
    if "image_key" not in frame.columns:
        frame["image_key"] = [str(ref) for ref in frame["image"]]
    return _normalise(frame.drop(columns=["image"]), url, check)


def read_catalogue(url: str, fmt: str = "happywhale", csv: str = "train.csv", images_dir: str = "train_images"):
    if fmt == "happywhale":
        return read_happywhale(url, csv, images_dir)
    if fmt == "manifest":
        return read_manifest(url)
    raise CatalogueError(f"unknown catalogue format '{fmt}' (happywhale | manifest)")


def _resolve(base: str, ref: str) -> str:
    if "://" in ref or ref.startswith("/"):
        return ref
    return storage.join(base, ref)


def _require_columns(frame, columns, url: str) -> None:
    for column in columns:
        if column not in frame.columns:
            present = ", ".join(map(str, frame.columns))
            raise CatalogueError(f"manifest {url}: missing column '{column}' (has: {present})")


def _normalise(frame, url: str, check: bool):
    for column in OPTIONAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    frame = frame.fillna("").astype({c: str for c in OPTIONAL_COLUMNS})
    frame["image_key"] = frame["image_key"].astype(str)
    frame["species"] = frame["species"].map(fix_species)
    _check_keys(frame, url)
    _check_bboxes(frame, url)
    if check:
        _check_files_exist(frame, url)
    return frame[list(CATALOGUE_COLUMNS)].reset_index(drop=True)


def _check_keys(frame, url: str) -> None:
    empty = frame.index[frame["image_key"].str.strip() == ""]
    if len(empty):
        raise CatalogueError(f"manifest {url} row {int(empty[0]) + 2}: empty image key")
    duplicated = frame.index[frame["image_key"].duplicated()]
    if len(duplicated):
        row = int(duplicated[0])
        raise CatalogueError(f"manifest {url} row {row + 2}: duplicate image key '{frame['image_key'][row]}'")


def _check_bboxes(frame, url: str) -> None:
    for row, value in enumerate(frame["bbox"]):
        if value and parse_bbox(value) is None:
            raise CatalogueError(f"manifest {url} row {row + 2}: bad bbox '{value}' (want 'x0 y0 x1 y1', x0<x1, y0<y1)")


def parse_bbox(value: str) -> tuple[float, float, float, float] | None:
    """``"x0 y0 x1 y1"`` (spaces or commas) -> floats, or None when malformed."""
    try:
        parts = [float(p) for p in value.replace(",", " ").split()]
    except ValueError:
        return None
    if len(parts) != 4 or not (parts[0] < parts[2] and parts[1] < parts[3]) or min(parts) < 0:
        return None
    return parts[0], parts[1], parts[2], parts[3]


def _check_files_exist(frame, url: str) -> None:
    """Every listed file must exist; one listing per folder rather than one request per file."""
    listed: dict[str, set[str]] = {}
    for row, image_url in enumerate(frame["url"]):
        folder = posixpath.dirname(image_url)
        if folder not in listed:
            listed[folder] = set(storage.list_files(folder))
        normalised = image_url if "://" in image_url else storage.strip_scheme(image_url)
        if normalised not in listed[folder]:
            raise CatalogueError(f"manifest {url} row {row + 2}: listed file not found: {image_url}")


def assign_folds(frame, n_folds: int = 5, seed: int = 0):
    """Add a ``fold`` column: stratified by individual (Happywhale 1st place used StratifiedKFold on the id).

    Individuals with fewer photos than folds cannot be in every fold; the ones that land only in a validation fold
    are exactly the unseen individuals that ``split_fold`` relabels ``new_individual``.
    """
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    frame = frame.copy()
    labels = frame["individual_id"].to_numpy()
    folds = np.zeros(len(frame), dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for fold, (_, val_idx) in enumerate(splitter.split(np.zeros(len(frame)), labels)):
            folds[val_idx] = fold
    frame["fold"] = folds
    return frame


def split_fold(frame, fold: int = 0, n_folds: int = 5, seed: int = 0):
    """(train, val) for one fold; val gets ``label`` = individual_id, or ``new_individual`` if unseen in train."""
    if "fold" not in frame.columns:
        frame = assign_folds(frame, n_folds, seed)
    train = frame[frame["fold"] != fold].reset_index(drop=True)
    val = frame[frame["fold"] == fold].reset_index(drop=True)
    known = set(train["individual_id"])
    val["label"] = [i if i in known else NEW_INDIVIDUAL for i in val["individual_id"]]
    train["label"] = train["individual_id"]
    return train, val


def label_maps(frame) -> tuple[dict[str, int], dict[str, int]]:
    """Stable integer ids for individuals and species (sorted names), as saved in ``model.json``."""
    individuals = sorted(set(frame["individual_id"]) - {""})
    species = sorted(set(frame["species"]) - {""})
    return {name: i for i, name in enumerate(individuals)}, {name: i for i, name in enumerate(species)}


def fingerprint(frame) -> str:
    """A short hash of the training table (keys + labels): which data a model was trained on."""
    import hashlib

    digest = hashlib.sha256()
    for key, ind, sp in zip(frame["image_key"], frame["individual_id"], frame["species"]):
        digest.update(f"{key}\t{ind}\t{sp}\n".encode())
    return digest.hexdigest()[:16]
