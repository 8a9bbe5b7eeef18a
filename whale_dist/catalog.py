"""Catalogue reading: the Happywhale layout, a generic manifest or a wildlife-datasets table -> one typed table,
validated before any work.

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
EXTRA_COLUMNS = ("orientation",)  # kept when the source has them (wildlife-datasets tables): metadata and a filter
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
WILDLIFE_UNKNOWN = "unknown"  # wildlife-datasets' WildlifeDataset.unknown_name: a photo of an unidentified animal

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
            frame = _read_csv(text, url)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise CatalogueError(f"manifest {url}: not a readable CSV ({_first_line(exc)})") from exc
    return frame


def _read_csv(text: str, url: str):
    """The CSV as strings, its columns where its header puts them. Rows one field longer than the header (a
    trailing comma, as spreadsheet exports write) make pandas take the first column for an index and shift every
    other one left; an empty extra field is dropped, a filled one refused (it would be lost)."""
    import io

    import numpy as np
    import pandas as pd

    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    if isinstance(frame.index, pd.RangeIndex):
        return frame
    filled = np.flatnonzero(frame.iloc[:, -1].str.strip().to_numpy() != "")  # the extra field, shifted last
    if len(filled):
        raise CatalogueError(f"manifest {url} row {int(filled[0]) + 2}: more fields than the header's "
                             f"{frame.shape[1]}")
    with warnings.catch_warnings():  # pandas warns of the dropped column, checked empty above
        warnings.simplefilter("ignore", pd.errors.ParserWarning)
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_happywhale(folder_url: str, csv: str = "train.csv", images_dir: str = "train_images", check: bool = True):
    """The Kaggle layout: ``train.csv`` (image, species, individual_id) + an image folder."""
    return normalise(*raw_happywhale(folder_url, csv, images_dir), check)


def raw_happywhale(folder_url: str, csv: str = "train.csv", images_dir: str = "train_images"):
    csv_url = storage.join(folder_url, csv)
    frame = read_table(csv_url)
    _require_columns(frame, ("image", "species", "individual_id"), csv_url)
    frame = frame.rename(columns={"image": "image_key"})
    frame["url"] = [storage.join(folder_url, images_dir, key) for key in frame["image_key"]]
    return frame, csv_url


def read_manifest(url: str, check: bool = True):
    """A generic manifest (CSV or parquet): ``image`` (URL or path relative to the manifest) + optional columns."""
    return normalise(*raw_manifest(url), check)


def raw_manifest(url: str):
    frame = read_table(url)
    _require_columns(frame, ("image",), url)
    base = posixpath.dirname(url.rstrip("/"))
    frame["url"] = [_resolve(base, str(ref)) for ref in frame["image"]]
    if "image_key" not in frame.columns:
        frame["image_key"] = [str(ref) for ref in frame["image"]]
    return frame.drop(columns=["image"]), url


def read_catalogue(url: str, fmt: str = "happywhale", csv: str = "train.csv", images_dir: str = "train_images",
                   root: str = "", orientations=(), check: bool = True):
    """The catalogue in any supported format as the normalised table; ``orientations`` keeps only those views."""
    frame = normalise(*raw_catalogue(url, fmt, csv, images_dir, root), check)
    if orientations:
        if "orientation" not in frame.columns:
            raise CatalogueError(f"catalogue {url}: an orientation filter needs an orientation column")
        frame = frame[frame["orientation"].isin(list(orientations))].reset_index(drop=True)
    return frame


def catalogue_from_config(cfg, check: bool = True):
    """The configured catalogue (``cfg.catalogue`` of a ``Config``): the one call every job reads it with."""
    c = cfg.catalogue
    return read_catalogue(cfg.catalogue_url, c.format, c.csv, c.images_dir, c.root, c.orientation, check)


def raw_catalogue(url: str, fmt: str = "happywhale", csv: str = "train.csv", images_dir: str = "train_images",
                  root: str = ""):
    """(table with ``image_key`` and ``url``, the table's URL) before normalising: what ``stats`` inspects for label
    problems that ``normalise`` would refuse (duplicate keys) or silently fix (species typos)."""
    if fmt == "happywhale":
        return raw_happywhale(url, csv, images_dir)
    if fmt == "manifest":
        return raw_manifest(url)
    if fmt == "wildlife":
        return raw_wildlife(url, root)
    raise CatalogueError(f"unknown catalogue format '{fmt}' (happywhale | manifest | wildlife)")


def raw_wildlife(url: str, root: str = ""):
    """A ``wildlife-datasets`` table (``WildlifeDataset.df`` saved as CSV or parquet; the library is not needed).

    Columns ``image_id, identity, path`` and optionally ``species, bbox, date, orientation`` (``position`` in older
    releases). Paths are relative to ``root`` (default: the table's folder); the library's ``unknown`` identity is an
    unlabelled photo; bbox is ``[x, y, w, h]`` (a list, or its string form after a CSV round trip).
    """
    frame = read_table(url)
    _require_columns(frame, ("image_id", "identity", "path"), url)
    frame = frame.rename(columns={"image_id": "image_key", "identity": "individual_id", "position": "orientation"})
    base = root or posixpath.dirname(url.rstrip("/"))
    frame["url"] = [_resolve(base, str(ref)) for ref in frame["path"]]
    frame["image_key"] = frame["image_key"].astype(str)
    frame["individual_id"] = ["" if _missing(v) or str(v) == WILDLIFE_UNKNOWN else str(v)
                              for v in frame["individual_id"]]
    for column, convert in (("bbox", wildlife_bbox), ("species", _first_name), ("date", _text)):
        if column in frame.columns:
            frame[column] = [convert(v) for v in frame[column]]
    return frame.drop(columns=["path"]), url


def wildlife_bbox(value) -> str:
    """``[x, y, w, h]`` (list, array or "[x, y, w, h]") -> ``"x0 y0 x1 y1"``; unparseable values pass through so the
    bbox check names the row."""
    if _missing(value):
        return ""
    parts = value.strip("[]() ").replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        x, y, w, h = (float(p) for p in parts)
    except (TypeError, ValueError):
        return str(value)
    return f"{x:g} {y:g} {x + w:g} {y + h:g}"


def _missing(value) -> bool:
    if value is None or (isinstance(value, float) and value != value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _first_name(value) -> str:
    """A species cell: a name, or a list of names for a multi-species entry (the first is kept)."""
    if _missing(value):
        return ""
    if not isinstance(value, str):
        return str(list(value)[0]) if len(value) else ""
    return value.strip("[]'\" ").split("', '")[0]


def _text(value) -> str:
    return "" if _missing(value) else str(value)


def _resolve(base: str, ref: str) -> str:
    if "://" in ref or ref.startswith("/"):
        return ref
    return storage.join(base, ref)


def _require_columns(frame, columns, url: str) -> None:
    for column in columns:
        if column not in frame.columns:
            present = ", ".join(map(str, frame.columns))
            raise CatalogueError(f"manifest {url}: missing column '{column}' (has: {present})")


def normalise(frame, url: str, check: bool = True):
    """The catalogue columns (plus ``EXTRA_COLUMNS`` when present) as strings, species fixed, keys and bboxes
    checked, and with ``check`` every listed file present."""
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
    extra = [c for c in EXTRA_COLUMNS if c in frame.columns]
    frame[extra] = frame[extra].fillna("").astype(str)
    return frame[[*CATALOGUE_COLUMNS, *extra]].reset_index(drop=True)


def _check_keys(frame, url: str) -> None:
    """Row numbers by position (a parquet manifest may carry any pandas index)."""
    import numpy as np

    keys = frame["image_key"]
    empty = np.flatnonzero((keys.str.strip() == "").to_numpy())
    if len(empty):
        raise CatalogueError(f"manifest {url} row {int(empty[0]) + 2}: empty image key")
    duplicated = np.flatnonzero(keys.duplicated().to_numpy())
    if len(duplicated):
        row = int(duplicated[0])
        raise CatalogueError(f"manifest {url} row {row + 2}: duplicate image key '{keys.iloc[row]}'")


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
