"""``whale-dist review``: a person's decisions on a night's proposals go back into the catalogue and its index.

``whale-dist review --config FILE --decisions URL [--night NAME]`` reads a filled-in copy of the night's
``report/decisions.csv`` (``image,decision,individual_id,reviewer``): ``confirm`` (a photo of the catalogue
individual named), ``new`` (a new individual: the id given, or one minted from the night and the photo), ``reject``
(the photo stays unidentified) or empty (not decided yet, skipped). The whole file is checked before anything is
written -- an unknown photo, an unknown individual on ``confirm``, a photo decided twice with different answers, a
missing column -- and a bad file fails with one line and writes nothing (Wildbook's review queue; the system only
ever proposes).

Then, in this order: confirmed and new photos become catalogue version N+1 (``catalog_versions``, with night, model
version, reviewer, decision and time); their vectors, embedded already by the nightly run, are copied with their
labels into the catalogue's embedding store (so a full rebuild indexes exactly the catalogue); the index is
refreshed (``review.refresh``). A review killed after the catalogue write is finished by running it again:
the photos are already in the catalogue, and the version's missing index record makes the refresh happen.
"""

from __future__ import annotations

import hashlib
import io
import sys

from whale_dist import catalog_versions, storage
from whale_dist.catalog import NEW_INDIVIDUAL, CatalogueError, read_table
from whale_dist.config import Config, ConfigError, config_from_argv
from whale_dist.errors import UserError

FLAGS = {"--decisions": "nightly.decisions", "--night": "nightly.night", "--reviewer": "nightly.reviewer"}
COLUMNS = ("image", "decision", "individual_id", "reviewer")
SUMMARY = "summary.json"  # the night's summary (``nightly``), written last
DECISIONS = ("confirm", "new", "reject")


class DecisionsError(UserError, ValueError):
    """A decisions file that cannot be applied: one line naming the row."""


def read_decisions(url: str):
    """The decided rows of a decisions CSV (stripped, ``decision`` lower-cased, its CSV row number in ``row``)."""
    try:
        frame = read_table(url)
    except CatalogueError as exc:
        raise DecisionsError(str(exc).replace("manifest", "decisions", 1)) from exc
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DecisionsError(f"decisions {url}: missing column '{missing[0]}' (need: {', '.join(COLUMNS)})")
    frame = frame[list(COLUMNS)].astype(str).apply(lambda column: column.str.strip())
    frame["decision"] = frame["decision"].str.lower()
    frame["row"] = range(2, len(frame) + 2)
    return frame[frame["decision"] != ""].reset_index(drop=True)


def check_decisions(decisions, night, known: set[str], url: str = "decisions"):
    """One row per decided photo, checked against the night's predictions and the catalogue's individuals."""
    bad = decisions[~decisions["decision"].isin(DECISIONS)]
    if len(bad):
        _fail(url, bad.iloc[0], f"decision '{bad.iloc[0]['decision']}' is not one of {', '.join(DECISIONS)}")
    unknown = decisions[~decisions["image"].isin(set(night["image"]))]
    if len(unknown):
        _fail(url, unknown.iloc[0], f"photo '{unknown.iloc[0]['image']}' is not among the night's ranked photos")
    decisions = decisions.drop_duplicates(["image", "decision", "individual_id"])
    twice = decisions[decisions["image"].duplicated(keep=False)]
    if len(twice):
        rows = ", ".join(str(r) for r in twice[twice["image"] == twice.iloc[0]["image"]]["row"])
        raise DecisionsError(f"{url}: photo '{twice.iloc[0]['image']}' is decided twice with different answers "
                             f"(rows {rows})")
    minted = set(decisions.loc[decisions["decision"] == "new", "individual_id"]) - {"", NEW_INDIVIDUAL}
    for _, row in decisions.iterrows():
        _check_row(url, row, known, minted)
    return decisions.reset_index(drop=True)


def _check_row(url: str, row, known: set[str], minted: set[str]) -> None:
    ident = row["individual_id"]
    if row["decision"] == "confirm" and (ident in ("", NEW_INDIVIDUAL) or ident not in known | minted):
        _fail(url, row, f"confirm names individual '{ident}', which is not in the catalogue (a new animal: 'new')")
    if row["decision"] == "new" and ident in known:
        _fail(url, row, f"new names individual '{ident}', which is in the catalogue already (use 'confirm')")


def _fail(url: str, row, message: str) -> None:
    raise DecisionsError(f"{url} row {row['row']}: {message}")


def mint_id(night: str, image: str) -> str:
    """A new individual's id: stable for the same night and photo, so applying a file twice mints it once."""
    return f"{night}-{hashlib.sha256(image.encode()).hexdigest()[:10]}"


def added_rows(decisions, night, night_info: dict, catalogue, reviewer: str):
    """Catalogue rows (with provenance) for the confirmed and new photos not in the catalogue yet.

    Species: a confirmed photo takes its individual's; a new one the night's prediction for it (the model's species
    head; empty with a model exported without one). A photo already in the catalogue under the same id is skipped
    (the file was applied before); under another id it is an error.
    """
    keep = decisions[decisions["decision"].isin(("confirm", "new"))].copy()
    keep["individual_id"] = [mint_id(night_info["night"], img) if d == "new" and i in ("", NEW_INDIVIDUAL) else i
                             for img, d, i in zip(keep["image"], keep["decision"], keep["individual_id"])]
    present = dict(zip(catalogue["image_key"], catalogue["individual_id"]))
    for _, row in keep[keep["image"].isin(present)].iterrows():
        if present[row["image"]] != row["individual_id"]:
            _fail("decisions", row, f"photo '{row['image']}' is in the catalogue as '{present[row['image']]}' already")
    keep = keep[~keep["image"].isin(present)]
    species = catalogue.groupby("individual_id")["species"].agg(lambda s: s.mode().iloc[0] if len(s) else "")
    photos = night.set_index("image")
    rows = [{"image_key": r["image"], "url": photos.at[r["image"], "url"], "individual_id": r["individual_id"],
             "species": species.get(r["individual_id"], photos.at[r["image"], "predicted_species"])
             if r["decision"] == "confirm" else photos.at[r["image"], "predicted_species"],
             "bbox": "", **{c: photos.at[r["image"], c] for c in ("encounter_id", "date", "location")},
             "reviewer": r["reviewer"] or reviewer, "decision": r["decision"]} for _, r in keep.iterrows()]
    return _with_provenance(rows, night_info)


def _with_provenance(rows: list[dict], night_info: dict):
    import pandas as pd

    from whale_dist.catalog import CATALOGUE_COLUMNS

    frame = pd.DataFrame(rows, columns=[*CATALOGUE_COLUMNS, "reviewer", "decision"])
    stamped = catalog_versions.with_provenance(frame.drop(columns=["reviewer", "decision"]),
                                               night=night_info["night"], model_version=night_info["model_version"])
    stamped["reviewer"], stamped["decision"] = frame["reviewer"].to_numpy(), frame["decision"].to_numpy()
    return stamped.fillna("").astype(str)


def load_night(cfg: Config, night: str):
    """(the night's ranked photos, its summary.json); failed photos are not reviewable and are left out."""
    import pandas as pd

    folder = storage.join(cfg.surveys_url, night)  # as ``nightly`` writes it
    if not storage.exists(storage.join(folder, SUMMARY)):
        raise ConfigError(f"no nightly run for night '{night}' at {folder} (run whale-dist nightly first)")
    table = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(folder, "predictions.parquet"))))
    return table[table["error"] == ""].reset_index(drop=True), storage.read_json(storage.join(folder, SUMMARY))


def review_night(cfg: Config) -> str:
    """``nightly.night``, or the night whose folder holds the decisions file (``.../<night>/report/...``)."""
    if cfg.nightly.night:
        return cfg.nightly.night
    prefix = storage.strip_scheme(cfg.surveys_url).rstrip("/") + "/"
    path = storage.strip_scheme(cfg.nightly.decisions)
    if path.startswith(prefix) and "/" in path[len(prefix):]:
        return path[len(prefix):].split("/", 1)[0]
    raise ConfigError("which night do these decisions belong to? set --night NAME")


def run_review(cfg: Config) -> dict:
    """Check the decisions, then write catalogue version N+1 and refresh the index (see the module docstring)."""
    from whale_dist.review import refresh

    if not cfg.nightly.decisions:
        raise ConfigError("review needs --decisions URL (a filled-in decisions.csv)")
    night = review_night(cfg)
    photos, info = load_night(cfg, night)
    number, catalogue, _written = catalog_versions.latest_version(cfg)
    decisions = check_decisions(read_decisions(cfg.nightly.decisions), photos,
                                set(catalogue["individual_id"]) - {""}, storage.redact(cfg.nightly.decisions))
    added = added_rows(decisions, photos, info, catalogue, cfg.nightly.reviewer)
    counts = decisions["decision"].value_counts().to_dict()
    if len(added):
        number, url = catalog_versions.append_version(cfg, added)
        print(f"review {night}: catalogue version {number} at {storage.redact(url)}: {len(added)} photos added "
              f"({counts.get('confirm', 0)} confirmed, {counts.get('new', 0)} new, {counts.get('reject', 0)} rejected)",
              flush=True)
    else:
        print(f"review {night}: nothing to add to catalogue version {number} ({counts})", flush=True)
    index_version = refresh.refresh_pending(cfg, info["model_version"])
    return {"night": night, "catalogue_version": number, "added": len(added), "index_version": index_version,
            **{k: int(v) for k, v in counts.items()}}


def main(argv: list[str] | None = None) -> int:
    """``whale-dist review --config FILE --decisions URL [--night NAME] [--reviewer NAME] [key=value ...]``."""
    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), FLAGS)
    run_review(cfg)
    return 0
