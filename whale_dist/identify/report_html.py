"""HTML of the review report: ``templates/report.html`` (Jinja2, autoescape on) filled from the views of
``report.py``.

Kept apart from ``report.py`` (which gathers data and writes files) so the markup can be read in one place; the page
is self-contained (inline CSS, no script, no external fetch) so it opens from a USB stick or an e-mail attachment.
Every value reaches the page through the template's autoescape: ids, file names and error messages from user data
cannot inject markup.
"""

from __future__ import annotations

METRIC_NAMES = (("method", "method"), ("map5", "MAP@5"), ("top1", "top-1"), ("top5", "top-5"),
                ("known_top1", "top-1 known"), ("new_top1", "top-1 new"))
SUMMARY_KEYS = ("queries", "matches", "new", "errors", "hidden")


def _fmt(value) -> str:
    """A metric cell: three decimals, a dash for a missing value."""
    try:
        return "\u2013" if value is None or value != value else f"{float(value):.3f}"
    except (TypeError, ValueError):
        return str(value)


def metric_rows(metrics) -> list[list[str]]:
    if metrics is None or not len(metrics):
        return []
    return [[str(row.get("method", ""))] + [_fmt(row.get(key)) for key, _ in METRIC_NAMES[1:]]
            for row in metrics.to_dict("records")]


def page(views: dict, errors, summary: dict, metrics, has_plot: bool) -> str:
    """The whole page; ``views`` are ``report.query_view`` dicts by part (matches, new)."""
    from whale_dist.templating import render

    stats = [("queries", summary["queries"]), ("proposed matches", summary["matches"]),
             ("probably new", summary["new"]), ("could not be processed", summary["errors"])]
    return render("report.html", stats=stats, hidden=summary["hidden"], has_plot=has_plot,
                  info=[(k, v) for k, v in summary.items() if k not in SUMMARY_KEYS],
                  metric_labels=[label for _, label in METRIC_NAMES], metrics=metric_rows(metrics),
                  sections=[("Proposed matches", views["matches"]), ("Probably new individuals", views["new"])],
                  errors=[] if errors is None or not len(errors) else errors.to_dict("records"))
