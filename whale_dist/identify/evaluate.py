"""``whale-dist evaluate``: score predictions against labels, beside baselines computed on the same split.

A MAP@5 figure means little alone: on a survey where most test individuals are new, answering ``new_individual``
first everywhere already scores well. So every evaluation prints the random and raw-pixel nearest-neighbour rows
next to the model, and splits top-1 accuracy into known and new individuals.
"""

from __future__ import annotations

import posixpath
import sys

from whale_dist import storage
from whale_dist.catalog import read_catalogue, read_table
from whale_dist.config import ConfigError, config_from_argv, dump_config
from whale_dist.identify import baselines
from whale_dist.identify.render import render_report
from whale_dist.metrics import evaluate_predictions

FLAGS = {"--predictions": "identify.predictions", "--labels": "identify.labels", "--out": "identify.out",
         "--catalogue": "identify.catalogue"}


def read_labels(url: str) -> dict[str, str]:
    """image -> truth (an individual id or ``new_individual``) from ``test_labels.csv`` (image, individual_id)."""

    frame = read_table(url)
    for column in ("image", "individual_id"):
        if column not in frame.columns:
            raise ConfigError(f"labels {url}: missing column '{column}'")
    return dict(zip(frame["image"].astype(str), frame["individual_id"].astype(str)))


def align_truths(images, labels: dict[str, str], labels_url: str = "labels") -> list[str]:
    """The truth of each predicted image: by key, else by file name (manifests key ``test_images/x.jpg``)."""
    by_name = {posixpath.basename(k): v for k, v in labels.items()}
    truths = [labels.get(image, by_name.get(posixpath.basename(image))) for image in images]
    missing = [image for image, truth in zip(images, truths) if truth is None]
    if missing:
        raise ConfigError(f"{len(missing)} predicted images have no label in {labels_url}, e.g. '{missing[0]}'")
    return truths


def evaluation_rows(table, truths: list[str], cfg, with_pixels: bool = True):
    """One row per method (model, raw-pixel nearest neighbours, random) on the same queries and catalogue."""
    import pandas as pd

    rows = [{"method": "model", **evaluate_predictions(truths, [list(p) for p in table["predictions"]])}]
    c = cfg.catalogue
    catalogue = read_catalogue(cfg.catalogue_url, c.format, c.csv, c.images_dir, c.root, c.orientation)
    readable = [i for i, p in enumerate(table["predictions"]) if len(p)]  # failed photos have no pixels either
    if with_pixels and readable:
        query_vectors = baselines.pixel_vectors(list(table["url"].iloc[readable]))
        scores = baselines.nearest_neighbour_scores(baselines.pixel_vectors(list(catalogue["url"])), catalogue,
                                                    query_vectors, [truths[i] for i in readable], seed=c.seed)
        rows.append({"method": "raw-pixel nearest neighbours", **scores, "n_queries": float(len(readable))})
    guesses = baselines.random_predictions(catalogue["individual_id"], len(truths), seed=c.seed)
    rows.append({"method": "random", **evaluate_predictions(truths, guesses)})
    return pd.DataFrame(rows)


def summary_lines(rows) -> list[tuple[str, str]]:
    """What the demo and the command print: MAP@5 of every method, then the model's detail."""
    lines = [(f"MAP@5 {r['method']}", f"{r['map5']:.3f}") for r in rows.to_dict("records")]
    model = rows.iloc[0]
    lines.append(("model top-1 / top-5", f"{model['top1']:.3f} / {model['top5']:.3f}"))
    lines.append(("model top-1 on known / new individuals", f"{model['known_top1']:.3f} / {model['new_top1']:.3f}"))
    return lines


def run_evaluation(cfg, labels_url: str = "") -> dict:
    """Score the identify output of ``cfg``, write ``evaluation.csv`` and re-render the report with the labels."""
    import io

    import pandas as pd

    out = cfg.identify_out
    labels_url = labels_url or cfg.identify.labels or storage.join(cfg.catalogue_url, "test_labels.csv")
    predictions_url = cfg.identify.predictions or storage.join(out, "predictions.parquet")
    if not storage.exists(predictions_url):
        raise FileNotFoundError(f"no predictions at {predictions_url}: run `whale-dist identify` first")
    table = pd.read_parquet(io.BytesIO(storage.read_bytes(predictions_url)))
    truths = align_truths(list(table["image"]), read_labels(labels_url), labels_url)
    rows = evaluation_rows(table, truths, cfg)
    storage.write_text(storage.join(out, "evaluation.csv"), rows.to_csv(index=False))
    report = render_report(cfg, table, truths=dict(zip(table["image"], truths)), metrics=rows)
    lines = summary_lines(rows)
    for name, value in lines:
        print(f"evaluate: {name:<40} {value}")
    print(f"evaluate: review report {report}")
    return {"rows": rows, "summary_lines": lines, "report": report}


def evaluate_main(argv: list[str] | None = None) -> int:
    """``whale-dist evaluate [--predictions URL] [--labels URL] [--out URL] [--config FILE] [key=value ...]``."""

    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), FLAGS)
    run_evaluation(cfg)
    dump_config(cfg, storage.join(cfg.identify_out, "evaluation"))
    return 0
