"""The review report: one static HTML file plus a thumbnails folder, readable from a laptop with no server.

Each query photo sits beside its candidates (the best-matching catalogue photo of each individual, its similarity
and species) and the species the model's species head predicts for it, with its probability, so a researcher
confirms or rejects a match by eye; ``new_individual`` is a card of its own at the rank
where the similarity fell below the threshold. Every string from user data is HTML-escaped, and every file written
is named by a hash of its source URL under a fixed folder, so no id or file name can inject markup or escape the
output folder.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

from whale_dist import storage
from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.embed.sources import read_image_bytes
from whale_dist.identify.report_html import page
from whale_dist.images import decode_image

THUMB_DIR = "thumbs"
PLOT_NAME = "map5_threshold.png"
DECISIONS = "decisions.csv"
DECISION_COLUMNS = ("image", "decision", "individual_id", "reviewer")
HINT_COLUMNS = ("predicted_species", "species_probability")  # decisions.csv: for the reviewer, not read back
LIST_COLUMNS = ("predictions", "scores", "match_keys", "match_urls", "candidate_species")  # arrays after parquet


def thumb_name(url: str) -> str:
    """A thumbnail's file name: a hash of the photo URL, never the (user-supplied) key itself."""
    return f"{THUMB_DIR}/{hashlib.sha256(url.encode('utf-8')).hexdigest()[:24]}.jpg"


def make_thumbnail(url: str, size: int = 224) -> bytes | None:
    """JPEG bytes of the photo at ``url`` scaled to fit ``size``; None when it cannot be read (shown as missing)."""
    from PIL import Image

    try:
        image = Image.fromarray(decode_image(read_image_bytes(url)))
    except Exception:  # any unreadable photo: the card says so instead of failing the whole report
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return buffer.getvalue()


def thumbnails(urls, threads: int = 8) -> dict[str, bytes]:
    """relative path -> JPEG bytes for every distinct non-empty URL (fetched in parallel: S3 GETs overlap)."""
    unique = sorted({u for u in urls if u})
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(unique)))) as pool:
        images = list(pool.map(make_thumbnail, unique))
    return {thumb_name(u): data for u, data in zip(unique, images) if data is not None}


def threshold_plot(calibration: dict) -> bytes:
    """PNG of MAP@5 against the ``new_individual`` threshold on the validation fold, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = calibration.get("curve", {})
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.plot(curve.get("thresholds", []), curve.get("map5", []), color="#1f5f8b", lw=2, label="all species")
    for name, values in sorted(curve.get("per_species", {}).items())[:8]:
        ax.plot(curve["thresholds"], values, lw=1, alpha=0.6, label=name)
    if "global" in calibration:
        ax.axvline(calibration["global"], color="#c0392b", ls="--", lw=1.2,
                   label=f"chosen {calibration['global']:.3f} (MAP@5 {calibration.get('map5_global', 0):.3f})")
    ax.set_xlabel("new_individual threshold (cosine similarity)")
    ax.set_ylabel("MAP@5 on validation fold")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_threshold_plot(calibration: dict, url: str, local_copy: str = "") -> None:
    data = threshold_plot(calibration)
    storage.write_bytes(url, data)
    if local_copy:
        storage.write_bytes(storage.join(local_copy, url.rstrip("/").rsplit("/", 1)[-1]), data)


def candidate_view(row: dict, rank: int, truth: str | None, thumbs: dict) -> dict:
    """What one candidate card shows, from aligned columns of a predictions row."""
    label, url = row["predictions"][rank], row["match_urls"][rank]
    return {"label": label, "is_new": label == NEW_INDIVIDUAL, "score": float(row["scores"][rank]),
            "species": row["candidate_species"][rank], "match_key": row["match_keys"][rank],
            "thumb": thumb_name(url) if url and thumb_name(url) in thumbs else "",
            "correct": truth is not None and label == truth}


def query_view(row: dict, truth: str | None, thumbs: dict) -> dict:
    return {"image": row["image"], "encounter": row.get("encounter_id", ""), "threshold": float(row["threshold"]),
            "seen": " ".join(str(row.get(k) or "") for k in ("date", "location")).strip(),
            "species": species_text(row), "truth": truth,
            "thumb": thumb_name(row["url"]) if thumb_name(row["url"]) in thumbs else "",
            "candidates": [candidate_view(row, r, truth, thumbs) for r in range(len(row["predictions"]))]}


def species_probability(row: dict) -> float | None:
    """The species head's probability; None without one (an older model, a failed photo: NaN after parquet)."""
    value = row.get("species_probability")
    return None if value is None or value != value else float(value)


def species_text(row: dict) -> str:
    """The species head's answer as the page shows it, e.g. ``humpback_whale (p = 0.93)``; '' when there is none."""
    name, probability = row.get("predicted_species") or "", species_probability(row)
    return f"{name} (p = {probability:.2f})" if name and probability is not None else name


def order_queries(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(proposed matches, probably new): matches most confident first, new ones closest call first."""
    def best_match(row):
        scores = [s for s, p in zip(row["scores"], row["predictions"]) if p != NEW_INDIVIDUAL]
        return max(scores, default=-1.0)

    matches = [r for r in rows if r["predictions"] and r["predictions"][0] != NEW_INDIVIDUAL]
    new = [r for r in rows if not r["predictions"] or r["predictions"][0] == NEW_INDIVIDUAL]
    key = lambda r: (-best_match(r), r["image"])  # noqa: E731
    return sorted(matches, key=key), sorted(new, key=key)


def build_report(table, errors, calibration: dict | None, truths: dict | None = None, metrics=None,
                 info: dict | None = None, max_queries: int = 500) -> dict[str, bytes]:
    """relative path -> bytes of the whole report folder (``index.html``, thumbnails, the threshold plot)."""
    rows = [{k: list(v) if k in LIST_COLUMNS else v for k, v in row.items()} for row in table.to_dict("records")]
    matches, new = order_queries(rows)
    shown = (matches + new)[:max_queries] if max_queries > 0 else matches + new
    urls = [r["url"] for r in shown] + [u for r in shown for u in r["match_urls"]]
    files = thumbnails(urls)
    if calibration and calibration.get("curve"):
        files[PLOT_NAME] = threshold_plot(calibration)
    shown_ids = {id(r) for r in shown}
    views = {name: [query_view(r, (truths or {}).get(r["image"]), files) for r in part if id(r) in shown_ids]
             for name, part in (("matches", matches), ("new", new))}
    summary = {"queries": len(rows), "matches": len(matches), "new": len(new), "errors": len(errors),
               "hidden": len(rows) - len(shown), **(info or {})}
    files[DECISIONS] = decisions_csv(rows).encode("utf-8")
    files["index.html"] = page(views, errors, summary, metrics, PLOT_NAME in files).encode("utf-8")
    return files


def decisions_csv(rows: list[dict]) -> str:
    """The review template beside the page: one row per ranked photo, ``individual_id`` pre-filled with the top-1
    proposal ('' when that is ``new_individual``), ``decision`` and ``reviewer`` left for the person to fill in
    (confirm | new | reject); ``whale-dist review`` reads the filled-in copy back into the catalogue. The predicted
    species and its probability follow as hints (review reads only its own columns)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(DECISION_COLUMNS + HINT_COLUMNS)
    for row in sorted(rows, key=lambda r: r["image"]):
        top = row["predictions"][0] if len(row["predictions"]) else ""
        probability = species_probability(row)
        writer.writerow([row["image"], "", "" if top == NEW_INDIVIDUAL else top, "", row.get("predicted_species") or "",
                         "" if probability is None else f"{probability:.3f}"])
    return buffer.getvalue()


def write_report(files: dict[str, bytes], out_url: str, local_copy: str = "") -> str:
    """Write the report folder at ``{out_url}/report`` (and ``{local_copy}/report``); returns the index URL.

    Paths are the fixed names built here (``index.html``, the plot, ``thumbs/<hash>.jpg``); any other name is refused.
    """
    for relative, data in files.items():
        if relative != storage.safe_relative_path(relative) or relative.startswith(".."):
            raise ValueError(f"refusing report path {relative!r}")
        storage.write_bytes(storage.join(out_url, "report", relative), data)
        if local_copy:
            storage.write_bytes(storage.join(local_copy, "report", relative), data)
    return storage.join(local_copy or out_url, "report", "index.html")
