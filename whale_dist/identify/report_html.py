"""HTML of the review report: plain strings, no template engine, every dynamic value through ``esc``.

Kept apart from ``report.py`` (which gathers data and writes files) so the markup can be read in one place; the page
is self-contained (inline CSS, no script, no external fetch) so it opens from a USB stick or an e-mail attachment.
"""

from __future__ import annotations

import html

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
header{background:#153b55;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;opacity:.85}main{padding:12px 28px 40px}
.stats{display:flex;gap:14px;flex-wrap:wrap;margin:14px 0}
.stat{background:#fff;border-radius:8px;padding:10px 16px;box-shadow:0 1px 2px #0002;min-width:110px}
.stat b{display:block;font-size:22px}.note{background:#fff8e1;border-left:4px solid #f0b429;padding:8px 14px;
margin:10px 0;border-radius:4px}.top{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
table.metrics{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
table.metrics td,table.metrics th{padding:5px 12px;border-bottom:1px solid #e3e8ee;text-align:right}
table.metrics td:first-child,table.metrics th:first-child{text-align:left}
img.plot{background:#fff;border-radius:8px;box-shadow:0 1px 2px #0002;max-width:520px}
h2{margin:26px 0 8px;font-size:18px}.query{display:flex;gap:16px;background:#fff;border-radius:10px;padding:12px;
margin:12px 0;box-shadow:0 1px 3px #0002}.qphoto{width:210px;flex:none}.qphoto img{width:210px;border-radius:6px}
.name{font-weight:600;word-break:break-all}.muted{color:#5b6b7b;font-size:12px}
.cands{display:flex;gap:10px;flex-wrap:wrap;align-items:stretch}
.cand{width:150px;overflow-wrap:anywhere;border:2px solid #dfe5ea;border-radius:8px;padding:6px;position:relative;
background:#fbfcfd}
.cand img{width:150px;height:112px;object-fit:cover;border-radius:4px;display:block}
.rank{position:absolute;top:8px;left:8px;background:#153b55;color:#fff;border-radius:10px;padding:0 7px;
font-size:12px}.bar{height:5px;background:#e3e8ee;border-radius:3px;margin:4px 0}
.bar i{display:block;height:5px;border-radius:3px;background:#2f80b7}
.cand.new{border:2px dashed #c0392b;background:#fff5f4}.newbox{height:112px;display:flex;align-items:center;
justify-content:center;text-align:center;color:#c0392b;font-weight:700}.cand.ok{border-color:#27ae60;
box-shadow:0 0 0 2px #27ae6055}.tag{font-size:11px;font-weight:700;color:#27ae60}
.missing{height:112px;background:#e3e8ee;display:flex;align-items:center;justify-content:center;color:#5b6b7b}
.truth{margin-top:6px;font-size:12px;color:#8e44ad}table.errors{border-collapse:collapse;background:#fff}
table.errors td,table.errors th{padding:4px 10px;border-bottom:1px solid #e3e8ee;text-align:left}
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _img(thumb: str, alt: str, css: str = "") -> str:
    if not thumb:
        return '<div class="missing">photo unavailable</div>'
    return f'<img src="{esc(thumb)}" alt="{esc(alt)}" loading="lazy"{css}>'


def candidate_card(cand: dict, rank: int, threshold: float) -> str:
    if cand["is_new"]:
        why = ("no catalogue individual reached" if rank == 1 else "the individuals ranked below fall under")
        body = (f'<div class="newbox">NEW INDIVIDUAL?</div><div class="muted">{why} the similarity threshold '
                f"{threshold:.3f}</div>")
        klass = "cand new"
    else:
        width = max(0.0, min(1.0, cand["score"])) * 100
        body = (f'{_img(cand["thumb"], cand["match_key"])}<div class="name">{esc(cand["label"])}</div>'
                f'<div class="bar"><i style="width:{width:.0f}%"></i></div>'
                f'<div>similarity <b>{cand["score"]:.3f}</b></div><div class="muted">{esc(cand["species"])}</div>'
                f'<div class="muted" title="{esc(cand["match_key"])}">best photo: {esc(cand["match_key"])}</div>')
        klass = "cand"
    if cand["correct"]:
        klass += " ok"
        body += '<div class="tag">&#10003; matches the label</div>'
    return f'<div class="{klass}"><span class="rank">{rank}</span>{body}</div>'


def query_block(view: dict) -> str:
    cards = "".join(candidate_card(c, i + 1, view["threshold"]) for i, c in enumerate(view["candidates"]))
    truth = ""
    if view["truth"] is not None and not any(c["correct"] for c in view["candidates"]):
        truth = f'<div class="truth">label: {esc(view["truth"])} (not among the candidates)</div>'
    encounter = f'<div class="muted">encounter {esc(view["encounter"])}</div>' if view["encounter"] else ""
    encounter += f'<div class="muted">{esc(view["seen"])}</div>' if view.get("seen") else ""
    return (f'<section class="query"><div class="qphoto">{_img(view["thumb"], view["image"])}'
            f'<div class="name">{esc(view["image"])}</div>{encounter}'
            f'<div class="muted">predicted species: {esc(view["species"] or "unknown")}</div>'
            f'<div class="muted">threshold {view["threshold"]:.3f}</div>{truth}</div>'
            f'<div class="cands">{cards}</div></section>')


def metrics_table(metrics) -> str:
    if metrics is None or not len(metrics):
        return ""
    names = [("method", "method"), ("map5", "MAP@5"), ("top1", "top-1"), ("top5", "top-5"),
             ("known_top1", "top-1 known"), ("new_top1", "top-1 new")]
    head = "".join(f"<th>{esc(label)}</th>" for _, label in names)
    body = ""
    for row in metrics.to_dict("records"):
        cells = [esc(row.get("method", ""))] + [_fmt(row.get(key)) for key, _ in names[1:]]
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    return f'<div><h2>Evaluation on labelled queries</h2><table class="metrics"><tr>{head}</tr>{body}</table></div>'


def _fmt(value) -> str:
    try:
        return "&ndash;" if value is None or value != value else f"{float(value):.3f}"
    except (TypeError, ValueError):
        return esc(value)


def errors_section(errors) -> str:
    if errors is None or not len(errors):
        return ""
    rows = "".join(f"<tr><td>{esc(r.get('image_key'))}</td><td>{esc(r.get('stage'))}</td>"
                   f"<td>{esc(r.get('message'))}</td></tr>" for r in errors.to_dict("records"))
    return (f'<h2 id="errors">Photos that could not be processed ({len(errors)})</h2><p class="muted">These were not '
            f'searched; fix or replace them and run again.</p><table class="errors"><tr><th>photo</th><th>stage</th>'
            f"<th>problem</th></tr>{rows}</table>")


def page(views: dict, errors, summary: dict, metrics, has_plot: bool) -> str:
    stats = [("queries", summary["queries"]), ("proposed matches", summary["matches"]),
             ("probably new", summary["new"]), ("could not be processed", summary["errors"])]
    stat_html = "".join(f'<div class="stat"><b>{esc(v)}</b>{esc(k)}</div>' for k, v in stats)
    hidden = (f'<div class="note">{summary["hidden"]} further queries are in predictions.parquet and '
              f"submission.csv but not shown here.</div>") if summary["hidden"] else ""
    plot = '<img class="plot" src="map5_threshold.png" alt="MAP@5 against the threshold">' if has_plot else ""
    info = " &middot; ".join(f"{esc(k)}: {esc(v)}" for k, v in summary.items()
                             if k not in ("queries", "matches", "new", "errors", "hidden"))
    sections = "".join(f"<h2>{title} ({len(views[part])})</h2>"
                       + ("".join(query_block(v) for v in views[part]) or '<p class="muted">none</p>')
                       for title, part in (("Proposed matches", "matches"), ("Probably new individuals", "new")))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>whale_dist review</title>'
            f"<style>{CSS}</style></head><body><header><h1>Photo-ID review</h1><p>{info}</p></header><main>"
            f'<div class="stats">{stat_html}</div><div class="note">Each row is a proposal: confirm a match by '
            f"comparing the photos; nothing is assigned until a person does. Candidates are ranked by the "
            f"similarity of each individual's best-matching catalogue photo.</div>{hidden}"
            f'<div class="top">{metrics_table(metrics)}{plot}</div>{sections}{errors_section(errors)}</main></body>'
            f"</html>")
