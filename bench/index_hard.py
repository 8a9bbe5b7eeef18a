"""Hard data: the recall each index key reaches, at what speed, and whether whale_dist's tuner says so honestly.

    nice -n 5 .venv/bin/python bench/index_hard.py --n 100000 --noise 0 --noise 1.0   # easy and hard
    .venv/bin/python bench/index_hard.py --n 5000 --d 64 --key IVF64,Flat             # a quick check

Data: ``index_bench.clustered`` (groups → identities → photos), then ``--noise`` extra Gaussian noise per photo with
``noise`` times the photo's own norm, renormalised: within-identity cosine falls from ~0.86 to ~0.86 / (1 + noise²),
so a query's neighbours are no longer close and coarse PQ codes cannot tell them from strangers. Plain faiss, no
Ray: each key is trained on the sample the build would take (``choice.training_size``), filled with every vector (one
shard, as a build of up to ``index.shard_max_vectors`` makes) and tuned on it by ``faiss_ops.fill_and_tune`` (held-out
vectors searched before they are added) and searched with 1000 held-out queries against exact search. "recall
tuner" is what the tuner measured; "recall true" is recall@5 of the full index for the outside queries at the tuned
setting; "true setting" is the smallest one at which the full index reaches the target (what a perfect tuner would
have chosen).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from index_bench import clustered  # noqa: E402  (a sibling script, not a package)

from whale_dist.index import choice, faiss_ops  # noqa: E402
from whale_dist.index.faiss_ops import set_search_parameters  # noqa: E402

K = 5


def noisy(x: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """``x`` (unit rows) plus Gaussian noise of norm ≈ ``noise``, renormalised."""
    if noise <= 0:
        return x
    rng = np.random.default_rng(seed)
    out = np.empty_like(x)
    for lo in range(0, len(x), 100_000):
        chunk = x[lo:lo + 100_000]
        y = chunk + (noise / np.sqrt(x.shape[1])) * rng.standard_normal(chunk.shape, dtype=np.float32)
        out[lo:lo + 100_000] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return out


def default_keys(n: int, d: int) -> list[str]:
    """The families ``choice.choose_index_key`` picks from, at the nlist it would use for ``n``."""
    nlist = choice.choose_nlist(n)
    m = min(64, d // 8)
    return [f"IVF{nlist},Flat", f"IVF{nlist},PQ{m}x8", f"OPQ{m}_{choice.opq_out_dim(d, m)},IVF{nlist},PQ{m}x8",
            f"HNSW{choice.HNSW_M}"]


def sample_of(x: np.ndarray, key: str) -> np.ndarray:
    """The training sample the build reads (``choice.training_size`` for IVF keys)."""
    nlist = choice.nlist_of(key)
    size = choice.training_size(len(x), nlist) if nlist else min(len(x), 65_536)
    return x[np.sort(np.random.default_rng(0).choice(len(x), size, replace=False))]


def build(key: str, x: np.ndarray, target: float) -> tuple[object, dict, dict]:
    """Train (IVF) on the sample, then fill with every vector and tune on the filled index (``fill_and_tune``); the
    index, its search dict and the stage seconds."""
    seconds, started = {}, time.perf_counter()
    needs = choice.needs_training(key)
    index = faiss_ops.train(key, x.shape[1], sample_of(x, key)) if needs else faiss_ops.make_index(key, x.shape[1])
    seconds["train"] = time.perf_counter() - started
    index, search = faiss_ops.fill_and_tune(index, [x], [np.arange(len(x), dtype=np.int64)], target,
                                            n_total=len(x))
    seconds["fill_tune"] = time.perf_counter() - started - seconds["train"]
    return index, search, seconds


def true_recall(index, name: str, value: int, queries: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """recall@5 against exact search on the full set, and batch queries/s, at ``name`` = ``value``."""
    set_search_parameters(index, {name: value})
    started = time.perf_counter()
    found = index.search(queries, K)[1]
    return choice.recall_at_k(found, truth), len(queries) / (time.perf_counter() - started)


def row(key: str, x: np.ndarray, queries: np.ndarray, truth: np.ndarray, target: float) -> str:
    index, search, seconds = build(key, x, target)
    name = "nprobe" if "nprobe" in search else "efSearch"
    recall, qps = true_recall(index, name, search[name], queries, truth)
    hi = choice.nlist_of(key) or faiss_ops.HNSW_EF_MAX
    lo = 1 if name == "nprobe" else faiss_ops.HNSW_EF_MIN
    best = choice.tune_setting(lambda v: true_recall(index, name, v, queries, truth)[0], lo, hi, target)
    best_text = f"{best.value}" if best.reached else f"none ({best.recall:.3f} at {best.value})"
    return (f"| {key} | {name} {search[name]} | {search['recall']} | {'yes' if search['target_reached'] else 'NO'} | "
            f"{recall:.3f} | {qps:,.0f} | {best_text} | {seconds['train']:.1f} | {seconds['fill_tune']:.1f} |")


def table(args, noise: float) -> str:
    n_ids = max(1, args.n // 5)
    x = noisy(clustered(args.n, args.d, n_ids, seed=1), noise, seed=11)
    queries = noisy(clustered(args.queries, args.d, n_ids, seed=2), noise, seed=12)
    exact = faiss_ops.make_index("Flat", args.d)
    exact.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    truth = exact.search(queries, K)[1]
    del exact
    lines = [f"### noise {noise} — N = {args.n:,} × d = {args.d}, {args.queries} queries, target recall {args.target}",
             "", "| key | tuned | recall tuner | target reached | recall@5 true | queries/s | true setting for target "
             "| train s | fill + tune s |", "|---|---|---:|---|---:|---:|---|---:|---:|"]
    for key in args.key or default_keys(args.n, args.d):
        lines.append(row(key, x, queries, truth, args.target))
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, action="append", help="extra noise, repeatable (default: 0 and 1)")
    parser.add_argument("--key", action="append", help="index key, repeatable (default: the families choice picks)")
    parser.add_argument("--target", type=float, default=0.99)
    args = parser.parse_args(argv)
    faiss_ops.set_threads(os.cpu_count())
    load = os.getloadavg()
    print(f"`bench/index_hard.py` {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start\n")
    for noise in args.noise or [0.0, 1.0]:
        print(table(args, noise) + "\n", flush=True)


if __name__ == "__main__":
    main()
