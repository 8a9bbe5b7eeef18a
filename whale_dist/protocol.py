"""The one ranking protocol: neighbours -> individuals -> ``new_individual`` -> MAP@5, and where thresholds come from.

Every score in the project goes through here: training validation, ``calibrate``, ``identify``/``evaluate`` (whose
neighbours come from the published index rather than from ``knn``), the baselines and every bench. It is the
Happywhale protocol as its top solutions ran it: cosine kNN against labelled photos, neighbours collapsed to
individuals by their best-matching photo (ties broken by id, so shard order never matters), ``new_individual``
inserted at the first rank whose similarity falls below a threshold, MAP@5 with ``new_individual`` an ordinary label.

Thresholds are chosen on the catalogue side, never on the photos being scored: ``catalogue_threshold`` queries every
catalogue photo against the others, with a set of held-out individuals (all their photos removed from their own
search) standing in for the animals never seen before, so that the calibration has enough new cases at the rate
expected in a survey (``new_fraction``; 20 % of the demo's and about a fifth of Happywhale's test photos are new).
A model that trained on those individuals has learnt to keep their photos apart from everyone else's, so they look
newer than a real unseen animal does: training leaves the same set out (``train.hold_out_new``) and records it in
``model.json``, and ``calibrate`` holds out exactly that set.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.metrics import choose_threshold, evaluate_predictions, insert_new_individual

HIT_COLUMNS = ("query", "individual_id", "score", "match_key", "match_url", "species")


def knn(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` (scores, gallery rows), -1 rows padding a gallery smaller than ``k``."""
    import faiss  # exact search over a gallery that fits memory; the catalogue's own index serves production

    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), int(min(k, len(gallery))))


def neighbour_hits(scores: np.ndarray, rows: np.ndarray, labels: Sequence[str], keep=None, species=None):
    """Neighbour lists -> a hits table (``HIT_COLUMNS``); ``keep`` (n, m) bool drops neighbours (self, held out);
    ``species`` (one per gallery row) names each match's species, as the catalogue's metadata does."""
    import pandas as pd

    valid = rows >= 0 if keep is None else (rows >= 0) & keep
    query, col = np.nonzero(valid)
    picked = rows[query, col]
    labels = np.asarray(labels, dtype=object)
    empty = np.full(len(query), "", dtype=object)
    kinds = empty if species is None else np.asarray(species, dtype=object)[picked]
    return pd.DataFrame({"query": query, "individual_id": labels[picked], "score": scores[query, col].astype(float),
                         "match_key": empty, "match_url": empty, "species": kinds})


def rank_hits(hits, n_queries: int, k: int):
    """One row per query (in query order): the top-``k`` individuals by their best similarity, ties broken by id.

    Tie-breaking by id makes the output deterministic whatever order the index shards returned their results in.
    """
    import pandas as pd

    hits = hits.sort_values(["query", "score", "individual_id"], ascending=[True, False, True], kind="stable")
    hits = hits.drop_duplicates(["query", "individual_id"]).groupby("query", sort=True).head(k)
    lists = hits.groupby("query").agg({c: list for c in HIT_COLUMNS[1:]})
    lists = lists.reindex(range(n_queries))
    for column in HIT_COLUMNS[1:]:
        lists[column] = [v if isinstance(v, list) else [] for v in lists[column]]
    return pd.DataFrame({"ids": lists["individual_id"].tolist(), "scores": lists["score"].tolist(),
                         "match_keys": lists["match_key"].tolist(), "match_urls": lists["match_url"].tolist(),
                         "species": lists["species"].tolist()})


def score_matrix(ranked, k: int = 5) -> np.ndarray:
    """(n, k) similarities, descending, padded with -inf where fewer than ``k`` candidates exist."""
    out = np.full((len(ranked), k), -np.inf)
    for row, scores in enumerate(ranked["scores"]):
        values = np.asarray(scores[:k], dtype=np.float64)
        out[row, :len(values)] = values
    return out


def predict_at(ranked, threshold: float, k: int = 5) -> list[list[str]]:
    """Each query's top-``k`` with ``new_individual`` inserted at ``threshold``."""
    return [insert_new_individual(ids, scores, threshold, NEW_INDIVIDUAL, k)
            for ids, scores in zip(ranked["ids"], ranked["scores"])]


def held_out_individuals(labels: Sequence[str], new_fraction: float, seed: int = 0) -> set[str]:
    """Individuals with 2+ photos whose photos play "never seen" so that about ``new_fraction`` of queries are new.

    Singletons are new already; held-out individuals are added, in a seeded random order, until the new share
    reaches ``new_fraction`` (none when the singletons alone reach it).
    """
    names, counts = np.unique(np.asarray(labels, dtype=object), return_counts=True)
    new = int(counts[counts == 1].sum())
    target = int(round(new_fraction * len(labels)))
    held: set[str] = set()
    for i in np.random.default_rng(seed).permutation(np.flatnonzero(counts > 1)):
        if new >= target:
            break
        held.add(str(names[i]))
        new += int(counts[i])
    return held


def catalogue_queries(vectors: np.ndarray, labels: Sequence[str], new_fraction: float = 0.2, seed: int = 0,
                      k: int = 50, encounters: Sequence[str] | None = None, species: Sequence[str] | None = None,
                      max_queries: int = 50_000, held: Collection[str] | None = None):
    """(truths, ranked): every catalogue photo a query against the others, as a survey photo would be (a uniform
    sample of ``max_queries`` of them in a larger catalogue: exact search of all pairs grows as N², and 50k queries
    pin a threshold far below the noise of one survey).

    Left out of a query's search: itself, every photo of a held-out individual's (``held_out_individuals``) and,
    with ``encounters``, the other photos of its encounter: a survey photo comes from a new encounter, never with a
    sibling (same light, same pose) in the catalogue, and siblings flatter the known queries (on the demo they set
    the threshold under the similarities of unseen animals). Truth: its individual while a photo of it is left to
    find, else ``new_individual``. ``held``: the held-out individuals to use instead of the seeded choice (the set a
    model's training left out, ``ModelCard.held_out``). ``ranked["row"]`` is each query's catalogue row.
    """
    import pandas as pd

    labels = np.asarray(labels, dtype=object)
    encounters = np.asarray([""] * len(labels) if encounters is None else [str(e or "") for e in encounters], object)
    held = held_out_individuals(labels, new_fraction, seed) if held is None else set(held) & set(labels)
    counts = pd.Series(labels).value_counts()
    siblings = pd.Series(list(zip(labels, encounters))).map(pd.Series(list(zip(labels, encounters))).value_counts())
    siblings = np.where(encounters != "", siblings.to_numpy(), 1)  # photos of this individual in this encounter
    widest = max([int(counts[name]) for name in held] + [1]) + int(siblings.max(initial=1)) - 1
    asked = np.arange(len(labels))
    if len(asked) > max_queries:
        asked = np.sort(np.random.default_rng(seed).choice(len(asked), max_queries, replace=False))
    scores, rows = knn(vectors[asked], vectors, k + widest)
    found = np.maximum(rows, 0)
    keep = rows != asked[:, None]
    keep &= ~((encounters[found] == encounters[asked][:, None]) & (encounters[asked][:, None] != ""))
    is_held = np.isin(labels, list(held))[asked]
    keep &= ~(is_held[:, None] & (labels[found] == labels[asked][:, None]))
    left = counts[labels[asked]].to_numpy() - siblings[asked]
    truths = [NEW_INDIVIDUAL if h or n == 0 else label for label, h, n in zip(labels[asked], is_held, left)]
    return truths, rank_hits(neighbour_hits(scores, rows, labels, keep, species), len(asked), 5).assign(row=asked)


def catalogue_threshold(vectors: np.ndarray, labels: Sequence[str], new_fraction: float = 0.2, seed: int = 0,
                        k: int = 50) -> dict:
    """The ``new_individual`` threshold from the catalogue alone (``catalogue_queries``, no encounters): returns the
    threshold, its MAP@5 and the query counts."""
    truths, ranked = catalogue_queries(vectors, labels, new_fraction, seed, k)
    threshold, best, _, _ = choose_threshold(truths, list(ranked["ids"]), score_matrix(ranked))
    return {"threshold": threshold, "map5": best, "n_queries": len(truths),
            "n_new": int(sum(t == NEW_INDIVIDUAL for t in truths)),
            "held_out": len(held_out_individuals(labels, new_fraction, seed))}


def score_queries(queries: np.ndarray, truths: Sequence[str], gallery: np.ndarray, gallery_labels: Sequence[str],
                  threshold: float, k: int = 50, exclude_self: bool = False) -> dict[str, float]:
    """MAP@5 / top-1 / top-5 / known and new top-1 of queries against a labelled gallery at a given threshold.

    ``exclude_self``: queries are the gallery itself (row i never matches itself: leave-one-out).
    """
    scores, rows = knn(queries, gallery, k + int(exclude_self))
    keep = rows != np.arange(len(queries))[:, None] if exclude_self else None
    ranked = rank_hits(neighbour_hits(scores, rows, gallery_labels, keep), len(queries), 5)
    return {**evaluate_predictions(list(truths), predict_at(ranked, threshold)), "threshold": float(threshold)}


def leave_one_out_truths(labels: Sequence[str]) -> list[str]:
    """Truth of each photo queried against the others: its individual, or ``new_individual`` if it is alone."""
    names, counts = np.unique(np.asarray(labels, dtype=object), return_counts=True)
    alone = set(names[counts == 1])
    return [NEW_INDIVIDUAL if label in alone else label for label in labels]
