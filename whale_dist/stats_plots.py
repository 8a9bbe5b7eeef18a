"""The plots of ``whale-dist stats``: photos per individual (log scale), photos and individuals per species, photos
per year. PNG bytes from matplotlib's Agg backend (no display), imported when a plot is drawn.
"""

from __future__ import annotations

import io


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return buffer.getvalue()


def per_individual_histogram(frame) -> bytes:
    """How many individuals have 1, 2, ... photos: log-spaced bins and a log count axis, because the tail is long
    (most Happywhale individuals have one or two photos, a few have hundreds)."""
    import numpy as np

    plt = _pyplot()
    per = frame.loc[frame["individual_id"] != "", "individual_id"].value_counts().to_numpy()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if len(per):
        bins = np.unique(np.round(np.logspace(0, np.log10(per.max() + 1), 30)))
        ax.hist(per, bins=bins, color="#1f5f8b")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("photos per individual")
    ax.set_ylabel("individuals")
    ax.grid(alpha=0.3)
    return _png(fig)


def species_bars(species_rows: list[dict]) -> bytes:
    """Photos and individuals per species, side by side, most photographed first."""
    import numpy as np

    plt = _pyplot()
    rows = species_rows[:30]
    fig, ax = plt.subplots(figsize=(7.2, 0.9 + 0.28 * max(1, len(rows))), dpi=100)
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["photos"] for r in rows], height=0.4, color="#1f5f8b", label="photos")
    ax.barh(y + 0.2, [r["individuals"] for r in rows], height=0.4, color="#f0b429", label="individuals")
    ax.set_yticks(y, [r["species"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def year_bars(per_year: dict[str, int]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=100)
    ax.bar(list(per_year), list(per_year.values()), color="#1f5f8b")
    ax.set_ylabel("photos")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def plots(frame, stats: dict) -> dict[str, bytes]:
    """File name -> PNG for every plot the catalogue has data for."""
    out = {"photos_per_individual.png": per_individual_histogram(frame)}
    if stats["species_table"]:
        out["species.png"] = species_bars(stats["species_table"])
    if stats["when_where"].get("per_year"):
        out["dates.png"] = year_bars(stats["when_where"]["per_year"])
    return out
