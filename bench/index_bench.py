"""Index benchmark: whale_dist's Ray build vs autofaiss on the same clustered vectors and memory budget.

    .venv/bin/python bench/index_bench.py --n 1000000 --budget-gb 4      # the issue's size
    .venv/bin/python bench/index_bench.py --n 20000 --no-results         # a quick check

Measures build time, peak memory (RSS of the whole process tree: driver + Ray workers, or the autofaiss
subprocess), recall@5 against exact search, and queries/s against an exact Flat index. autofaiss runs from its own
virtual environment (``.venv-bench``, created here on first use, never the project's ``.venv``) in a subprocess of
this same script (``--autofaiss-worker``), so both builds are measured in one run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BENCH_VENV = os.path.join(REPO, ".venv-bench")
BUILD_RAM = "16G"  # autofaiss's build-time RAM allowance (its index must still fit the budget); ours is unbounded
BENCH_PACKAGES = ["autofaiss==2.18.0", "faiss-cpu==1.15.1", "numpy<2", "pyarrow<17"]


def clustered(n: int, d: int, n_ids: int, seed: int) -> np.ndarray:
    """Unit vectors with the structure of photo-ID embeddings: groups (species/populations, ~100 identities each)
    → identities (~5 photos each) → photos. Cosine ≈ 0.86 within an identity, ≈ 0.57 within a group, ≈ 0 across."""
    base = np.random.default_rng(0)
    groups = base.standard_normal((max(1, n_ids // 100), d), dtype=np.float32)
    identities = groups[base.integers(0, len(groups), n_ids)] + 0.7 * base.standard_normal((n_ids, d), np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        x = identities[rng.integers(0, n_ids, hi - lo)] + 0.5 * rng.standard_normal((hi - lo, d), dtype=np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_inputs(x: np.ndarray, work: str, rows: int = 100_000) -> None:
    """The same vectors as embedding partitions (whale_dist's input) and as .npy files (autofaiss's input)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from whale_dist import storage

    os.makedirs(os.path.join(work, "npy"), exist_ok=True)
    for p, lo in enumerate(range(0, len(x), rows)):
        chunk = x[lo:lo + rows]
        np.save(os.path.join(work, "npy", f"part-{p:05d}.npy"), chunk)
        keys = [f"img{lo + i:08d}.jpg" for i in range(len(chunk))]
        empty = [""] * len(chunk)
        table = pa.table({"image_key": keys, "url": keys, "sha256": empty, "model_version": ["mbench"] * len(chunk),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel()), chunk.shape[1]),
                          "individual_id": keys, "species": empty, "encounter_id": empty, "date": empty,
                          "location": empty, "bbox": empty})
        url = os.path.join(work, "embeddings", "model=mbench", f"part-{p:05d}.parquet")
        os.makedirs(os.path.dirname(url), exist_ok=True)
        pq.write_table(table, url)
        storage.mark_done(url)


class PeakRSS:
    """Peak resident memory of a process and all its descendants, sampled from /proc every 0.2 s."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, tree_rss(self.pid))


def tree_rss(root: int) -> int:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    return sum(_rss(p) for p in tree)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def timed_search(search, queries: np.ndarray, k: int = 5):
    started = time.perf_counter()
    ids = search(queries, k)
    return ids, len(queries) / (time.perf_counter() - started)


def exact_search(x: np.ndarray, queries: np.ndarray):
    """Ground truth and the exact baseline's speed: faiss ``IndexFlatIP`` with every core."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count())
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    return timed_search(lambda q, k: exact.search(q, k)[1], queries)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def run_whale_dist(work: str, budget_gb: float, queries: np.ndarray) -> dict:
    import ray

    from whale_dist.config import load_config
    from whale_dist.index import Catalogue, build_index

    start_ray()
    cfg = load_config(None, [f"root={work}", "index.catalogue_name=bench", f"index.memory_budget_gb={budget_gb}",
                             f"index.num_shards={os.cpu_count()}", "index.cpus_per_task=1"])
    with PeakRSS(os.getpid()) as memory:
        base = tree_rss(os.getpid())
        started = time.perf_counter()
        url = build_index(cfg)
        build_s = time.perf_counter() - started
    ray.shutdown()
    catalogue = Catalogue.load(url)
    ids, qps = timed_search(lambda q, k: catalogue.search(q, k).ids, queries)
    return {"name": "whale_dist (Ray)", "key": catalogue.index_key, "build_s": build_s, "qps": qps, "ids": ids,
            "peak_gb": (memory.peak - base) / 2**30, "params": json.dumps(catalogue.manifest["search"])}


def start_ray(attempts: int = 3) -> None:
    """A local Ray; retried, because a loaded shared machine can miss the GCS start-up deadline."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise


def run_autofaiss(work: str, budget_gb: float, queries_path: str, index_key: str | None) -> dict:
    ensure_bench_venv()
    out = os.path.join(work, f"autofaiss-{index_key or 'auto'}.json")
    cmd = [os.path.join(BENCH_VENV, "bin", "python"), __file__, "--autofaiss-worker", work, str(budget_gb),
           queries_path, out, index_key or ""]
    with PeakRSS(os.getpid()) as memory:
        base = tree_rss(os.getpid())
        subprocess.run(cmd, check=True)
    result = json.load(open(out))
    result.update(ids=np.array(result["ids"]), peak_gb=(memory.peak - base) / 2**30,
                  name="autofaiss" + (" (same key)" if index_key else ""))
    return result


def ensure_bench_venv() -> None:
    if not os.path.exists(os.path.join(BENCH_VENV, "bin", "python")):
        subprocess.run([sys.executable, "-m", "venv", BENCH_VENV], check=True)
        subprocess.run([os.path.join(BENCH_VENV, "bin", "pip"), "install", "-q", *BENCH_PACKAGES], check=True)


def autofaiss_worker(work: str, budget_gb: str, queries_path: str, out: str, index_key: str) -> None:
    """Runs inside .venv-bench: build with autofaiss, then search the queries."""
    import faiss
    from autofaiss import build_index

    budget = f"{int(float(budget_gb) * 1024)}M"
    started = time.perf_counter()
    index, _ = build_index(embeddings=os.path.join(work, "npy"), index_path=os.path.join(work, "autofaiss.index"),
                           index_infos_path=os.path.join(work, "autofaiss.json"), max_index_memory_usage=budget,
                           current_memory_available=BUILD_RAM, metric_type="ip", nb_cores=os.cpu_count(),
                           min_nearest_neighbors_to_retrieve=5, index_key=index_key or None, verbose=30)
    build_s = time.perf_counter() - started
    faiss.omp_set_num_threads(os.cpu_count())
    ids, qps = timed_search(lambda q, k: index.search(q, k)[1], np.load(queries_path))
    key = open(os.path.join(work, "autofaiss.json")).read()
    json.dump({"key": json.loads(key).get("index_key", "?"), "build_s": build_s, "qps": qps, "ids": ids.tolist(),
               "params": json.loads(key).get("index_param", "")}, open(out, "w"))


def _scratch() -> str:
    path = os.path.join(HERE, "out")  # git-ignored
    os.makedirs(path, exist_ok=True)
    return path


def table(rows: list[dict], n: int, d: int, budget_gb: float, exact_qps: float) -> str:
    lines = [f"N = {n:,} × d = {d} float32 (groups → identities → photos, ~5 photos per identity), "
             f"memory budget {budget_gb} GiB, "
             f"{os.cpu_count()} CPU cores, 1000 queries, k = 5", "",
             "| build | index key | search params | build s | peak mem GiB | recall@5 | queries/s | × exact |",
             "|---|---|---|---:|---:|---:|---:|---:|",
             f"| exact (IndexFlatIP) | Flat | – | – | – | 1.000 | {exact_qps:,.0f} | 1.0 |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['key']} | {r['params']} | {r['build_s']:.1f} | {r['peak_gb']:.2f} | "
                     f"{r['recall']:.3f} | {r['qps']:,.0f} | {r['qps'] / exact_qps:.1f} |")
    return "\n".join(lines)


def save_results(text: str, path: str = os.path.join(HERE, "RESULTS.md")) -> None:
    """Replace (or add) the ``## Index`` section of bench/RESULTS.md, leaving the other sections alone."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    section = f"## Index\n\n`bench/index_bench.py` ({time.strftime('%Y-%m-%d')}):\n\n{text}\n"
    start = old.find("## Index\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + section
    else:
        end = old.find("\n## ", start + 1)
        new = old[:start] + section + (old[end:] if end >= 0 else "")
    open(path, "w").write(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--no-results", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--no-same-key", action="store_true", help="skip autofaiss forced to whale_dist's key")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="index-bench-", dir=_scratch()) as work:
        x = clustered(args.n, args.d, max(1, args.n // 5), seed=1)
        queries = clustered(1000, args.d, max(1, args.n // 5), seed=2)
        write_inputs(x, work)
        np.save(os.path.join(work, "queries.npy"), queries)
        truth, exact_qps = exact_search(x, queries)
        del x
        rows = [run_whale_dist(work, args.budget_gb, queries)]
        rows.append(run_autofaiss(work, args.budget_gb, os.path.join(work, "queries.npy"), None))
        if not args.no_same_key and rows[1]["key"] != rows[0]["key"]:
            rows.append(run_autofaiss(work, args.budget_gb, os.path.join(work, "queries.npy"), rows[0]["key"]))
        for row in rows:
            row["recall"] = recall_at_k(row["ids"], truth)
    text = table(rows, args.n, args.d, args.budget_gb, exact_qps)
    print(text)
    if not args.no_results:
        save_results(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--autofaiss-worker":
        autofaiss_worker(*sys.argv[2:7])
    else:
        main()
