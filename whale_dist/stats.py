"""``whale-dist stats --catalogue URL [--out URL]``: what is in a catalogue before anything is trained on it.

The first look every Happywhale solution took: photos, individuals, singletons, species, photos per individual, how
many validation photos of a fold show individuals the training part never saw; plus the label problems a real
download carries (species typos, duplicate keys, files listed but missing, malformed boxes), counted instead of
refused so one run shows them all. Photo sizes come from image headers of a sample (the first ``HEADER_BYTES`` of
each file, one ranged read; PIL parses the header without decoding pixels), so a 51,000-photo catalogue on S3 takes
seconds. Writes ``stats.json``, PNG plots and ``stats.html`` under ``--out``.
"""

from __future__ import annotations

import io
import posixpath
import sys
from collections import Counter

from whale_dist import catalog, storage
from whale_dist.config import config_from_argv, dump_config

FLAGS = {"--catalogue": "catalogue.url", "--format": "catalogue.format", "--out": "stats.out"}
HEADER_BYTES = 64 * 1024  # a JPEG's frame header follows its EXIF block, which is at most 64 KiB
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)



def load(cfg):
    """(normalised table, label problems) of the configured catalogue; the problems are counted, not raised."""
    c = cfg.catalogue
    raw, url = catalog.raw_catalogue(cfg.catalogue_url, c.format, c.csv, c.images_dir, c.root)
    raw = raw.fillna("")
    problems = {"species_fixed": species_fixes(raw), "duplicate_keys": duplicates(raw), "bad_bboxes": 0}
    raw = raw[raw["image_key"].astype(str).str.strip() != ""].drop_duplicates("image_key")
    if "bbox" in raw.columns:
        bad = [bool(v) and catalog.parse_bbox(str(v)) is None for v in raw["bbox"]]
        problems["bad_bboxes"] = sum(bad)
        raw = raw.assign(bbox=["" if b else str(v) for v, b in zip(raw["bbox"], bad)])
    frame = catalog.normalise(raw.reset_index(drop=True), url, check=False)
    if c.orientation and "orientation" in frame.columns:
        frame = frame[frame["orientation"].isin(c.orientation)].reset_index(drop=True)
    missing = missing_files(frame)
    problems["missing_files"] = {"count": len(missing), "examples": [storage.redact(u) for u in missing[:10]]}
    return frame, problems, set(missing)


def species_fixes(raw) -> dict[str, int]:
    """``"typo -> name": photos`` for the species names ``catalog.fix_species`` corrects."""
    if "species" not in raw.columns:
        return {}
    names = raw["species"].astype(str).str.strip()
    return {f"{n} -> {catalog.fix_species(n)}": int(k) for n, k in names.value_counts().items()
            if catalog.fix_species(n) != n}


def duplicates(raw) -> dict:
    keys = raw["image_key"].astype(str)
    repeated = keys[keys.duplicated(keep=False)]
    return {"rows": int(keys.duplicated().sum()), "examples": sorted(set(repeated))[:10]}


def missing_files(frame) -> list[str]:
    """Listed photos absent from storage: one listing per folder, not one request per photo."""
    listed: dict[str, set[str]] = {}
    missing = []
    for url in frame["url"]:
        folder = posixpath.dirname(url)
        if folder not in listed:
            listed[folder] = set(storage.list_files(folder))
        if (url if "://" in url else storage.strip_scheme(url)) not in listed[folder]:
            missing.append(url)
    return missing


def counts(frame) -> dict:
    """Photos, individuals, singletons, species and the distribution of photos per individual."""
    labelled = frame[frame["individual_id"] != ""]
    per = labelled["individual_id"].value_counts()
    spread = {f"p{round(q * 100)}": float(per.quantile(q)) for q in QUANTILES} if len(per) else {}
    return {"photos": len(frame), "labelled_photos": len(labelled), "individuals": int(len(per)),
            "singletons": int((per == 1).sum()), "species": int(frame.loc[frame["species"] != "", "species"].nunique()),
            "photos_per_individual": {"min": int(per.min()) if len(per) else 0,
                                      "max": int(per.max()) if len(per) else 0,
                                      "mean": round(float(per.mean()), 3) if len(per) else 0.0, **spread}}


def species_table(frame) -> list[dict]:
    """Per species: photos, individuals, singletons, boxes; most photos first."""
    rows = []
    for name, part in frame.groupby(frame["species"].replace("", "(none)")):
        per = part.loc[part["individual_id"] != "", "individual_id"].value_counts()
        rows.append({"species": str(name), "photos": len(part), "individuals": int(len(per)),
                     "singletons": int((per == 1).sum()), "median_photos": float(per.median()) if len(per) else 0.0,
                     "with_bbox": int((part["bbox"] != "").sum())})
    return sorted(rows, key=lambda r: (-r["photos"], r["species"]))


def fold_stats(frame, c) -> dict | None:
    """The configured validation fold: how many of its photos show individuals unseen in training (``split_fold``)."""
    labelled = frame[frame["individual_id"] != ""].reset_index(drop=True)
    if len(labelled) < 2 * c.n_folds:
        return None
    train, val = catalog.split_fold(labelled, c.fold, c.n_folds, c.seed)
    new = val[val["label"] == catalog.NEW_INDIVIDUAL]
    return {"fold": c.fold, "n_folds": c.n_folds, "train_photos": len(train), "val_photos": len(val),
            "val_known_photos": len(val) - len(new), "val_new_photos": len(new),
            "val_new_individuals": int(new["individual_id"].nunique()),
            "val_new_fraction": round(len(new) / max(1, len(val)), 4)}


def when_and_where(frame) -> dict:
    """Date range and photos per year, and the busiest locations, when the catalogue has them."""
    import pandas as pd

    dates = pd.to_datetime(frame["date"].where(frame["date"] != ""), errors="coerce", format="mixed")
    out: dict = {"with_date": int(dates.notna().sum()), "with_location": int((frame["location"] != "").sum())}
    if out["with_date"]:
        out.update(first=str(dates.min().date()), last=str(dates.max().date()),
                   per_year={str(int(y)): int(n) for y, n in dates.dt.year.value_counts().sort_index().items()})
    if out["with_location"]:
        places = frame.loc[frame["location"] != "", "location"].value_counts()
        out.update(locations=int(len(places)), top_locations={str(k): int(v) for k, v in places.head(10).items()})
    return out


def header_size(url: str) -> tuple[str, int, int] | None:
    """(format, width, height) from the first bytes of a photo; None when they are not an image header."""
    from PIL import Image

    from whale_dist.embed.sources import read_range

    for size in (HEADER_BYTES, 8 * HEADER_BYTES):  # a header past 64 KiB (a large embedded thumbnail): read more
        try:
            with Image.open(io.BytesIO(read_range(url, 0, size))) as image:
                return str(image.format), int(image.width), int(image.height)
        except (OSError, ValueError):
            continue
    return None


def photo_sizes(urls, sample: int, seed: int) -> dict:
    """Width/height range and formats from the headers of up to ``sample`` of ``urls`` (photos present)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    urls = sorted(urls)
    chosen = random.Random(seed).sample(urls, min(sample, len(urls)))
    with ThreadPoolExecutor(max_workers=8) as pool:  # ranged GETs overlap on object stores
        found = [s for s in pool.map(_safe_header, chosen) if s]
    out: dict = {"sampled": len(chosen), "read": len(found), "unreadable": len(chosen) - len(found)}
    if found:
        for name, values in (("width", np.array([s[1] for s in found])), ("height", np.array([s[2] for s in found]))):
            out[name] = {k: int(np.percentile(values, p)) for k, p in (("min", 0), ("median", 50), ("max", 100))}
        out["formats"] = dict(Counter(s[0] for s in found))
    return out


def _safe_header(url: str):
    try:
        return header_size(url)
    except FileNotFoundError:
        return None


def compute(cfg):
    """(everything ``stats.json`` holds, the catalogue table) for the configured catalogue."""
    frame, problems, missing = load(cfg)
    problems["unlabelled_photos"] = int((frame["individual_id"] == "").sum())
    result = {"catalogue": storage.redact(cfg.catalogue_url), "format": cfg.catalogue.format, **counts(frame),
              "species_table": species_table(frame), "fold": fold_stats(frame, cfg.catalogue),
              "when_where": when_and_where(frame), "bbox_coverage": _share(frame["bbox"] != ""),
              "photo_sizes": photo_sizes(set(frame["url"]) - missing, cfg.stats.sample_headers, cfg.stats.seed),
              "problems": problems}
    if "orientation" in frame.columns:
        result["orientations"] = {k or "(none)": int(v) for k, v in frame["orientation"].value_counts().items()}
    return result, frame


def _share(mask) -> float:
    return round(float(mask.mean()), 4) if len(mask) else 0.0


def run_stats(cfg) -> dict:
    """Compute, then write ``stats.json``, the plots and ``stats.html`` under the output folder."""
    from whale_dist.stats_plots import plots
    from whale_dist.templating import render

    out = cfg.stats.out or cfg.url("stats")
    result, frame = compute(cfg)
    images = plots(frame, result)
    for name, data in images.items():
        storage.write_bytes(storage.join(out, name), data)
    storage.write_json(storage.join(out, "stats.json"), result)
    storage.write_text(storage.join(out, "stats.html"), render("stats.html", s=result, plots=sorted(images)))
    return {"out": out, "stats": result}


def summary_text(s: dict) -> str:
    """The lines ``whale-dist stats`` prints."""
    per, fold, problems = s["photos_per_individual"], s["fold"], s["problems"]
    lines = [f"catalogue {s['catalogue']} ({s['format']}): {s['photos']} photos, {s['individuals']} individuals "
             f"({s['singletons']} singletons), {s['species']} species",
             f"photos per individual: median {per.get('p50', 0):g}, p90 {per.get('p90', 0):g}, max {per['max']}"]
    lines += [f"  {r['species']:<28} {r['photos']:>7} photos {r['individuals']:>6} individuals"
              for r in s["species_table"][:12]]
    if fold:
        lines.append(f"fold {fold['fold']}/{fold['n_folds']}: {fold['val_photos']} validation photos, "
                     f"{fold['val_new_photos']} of unseen individuals ({fold['val_new_fraction']:.1%})")
    sizes = s["photo_sizes"]
    if sizes.get("read"):
        lines.append(f"photo sizes ({sizes['read']} headers): median {sizes['width']['median']}x"
                     f"{sizes['height']['median']}, formats {sizes['formats']}")
    lines.append(f"bbox coverage {s['bbox_coverage']:.1%}; problems: {len(problems['species_fixed'])} species typos "
                 f"fixed, {problems['duplicate_keys']['rows']} duplicate keys, {problems['missing_files']['count']} "
                 f"missing files, {problems['bad_bboxes']} bad boxes, {problems['unlabelled_photos']} unlabelled")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``whale-dist stats --catalogue URL [--format happywhale|manifest|wildlife] [--out URL] [key=value ...]``."""
    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), FLAGS)
    done = run_stats(cfg)
    dump_config(cfg, done["out"])
    print(summary_text(done["stats"]))
    print(f"stats: wrote stats.json, stats.html and plots to {storage.redact(done['out'])}")
    return 0
