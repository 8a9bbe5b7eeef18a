"""The review report of an identify output: what the page shows about the catalogue, model and threshold.

``identify`` renders it after ranking, ``evaluate`` again with the labels and metrics; both go through here so the
page says the same thing whichever command wrote it last.
"""

from __future__ import annotations

import time

from whale_dist import storage
from whale_dist.identify.calibrate import calibration_url
from whale_dist.identify.report import build_report, write_report


def render_report(cfg, table, truths=None, metrics=None, calibration=None, model_version: str = "") -> str:
    """Write the review report for an identify output (again, with labels and metrics, after ``evaluate``)."""
    if calibration is None and storage.exists(calibration_url(cfg.identify_catalogue)):
        calibration = storage.read_json(calibration_url(cfg.identify_catalogue))
    calibration = calibration or {}
    failed = table[table["error"] != ""]
    errors = failed.assign(image_key=failed["image"], stage=failed["error"].str.split(":").str[0],
                           message=failed["error"].str.split(": ", n=1).str[-1])
    info = {"catalogue": storage.redact(cfg.identify_catalogue),
            "model": model_version or calibration.get("model_version", ""),
            "threshold": threshold_summary(cfg, calibration),
            "encounters pooled": "yes" if cfg.identify.encounters else "no",
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    files = build_report(table[table["error"] == ""], errors, calibration, truths, metrics, info,
                         cfg.identify.report_queries)
    return write_report(files, cfg.identify_out, cfg.identify.local_copy)


def threshold_summary(cfg, calibration: dict) -> str:
    if cfg.identify.threshold >= 0:
        return f"fixed {cfg.identify.threshold:.3f}"
    if "global" not in calibration:
        return "none"
    per_species = len(calibration.get("per_species", {}))
    text = f"calibrated {calibration['global']:.3f}"
    if "map5_global" in calibration:
        text += f" (validation MAP@5 {calibration['map5_global']:.3f})"
    return text + (f", {per_species} per-species" if per_species and cfg.identify.per_species_threshold else "")
