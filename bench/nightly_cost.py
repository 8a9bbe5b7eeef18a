"""What a night costs as the catalogue grows: a nightly run with 100 new photos, and the index refresh after review.

    .venv/bin/python bench/nightly_cost.py                                # 10k and 100k (minutes)
    .venv/bin/python bench/nightly_cost.py --sizes 10000,100000,1000000   # the issue's sizes (a quiet machine)

For each size N the catalogue store and the query store (earlier nights) get N embeddings written straight in
(published chunks with their keys files, as the embed job leaves them; a tiny random model), the catalogue is indexed
(``index.build_index`` on a local Ray: the full re-index, timed), then ``nightly.run_nightly`` embeds and identifies
100 new photos (timed; Ray is started once before and a 1k warm-up run goes first, so neither start-up is in any
row), and finally the refresh of a review that adds 1% of N to the index (``index.add_vectors``) is timed against
the full rebuild. The nightly column should stay flat with N (it reads keys files and the night's partitions only;
the index load and search grow a little), the full re-index grows with N.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DIM = 32
CHUNK = 8192
NEW_PHOTOS = 100


def write_store(out: str, version: str, n: int, prefix: str, labelled: bool, seed: int) -> np.ndarray:
    """``n`` unit vectors as published chunks of ``out`` (keys files included, then compacted); returns them."""
    import pandas as pd

    from whale_dist.embed import store as embed_store
    from whale_dist.review.refresh import chunk_table, empty_errors

    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for number, lo in enumerate(range(0, n, CHUNK)):
        keys = [f"{prefix}{i:08d}.jpg" for i in range(lo, min(n, lo + CHUNK))]
        rows = pd.DataFrame({"image_key": keys, "url": [f"s3://archive/{k}" for k in keys], "sha256": "",
                             "model_version": version, "individual_id": [f"ind{i // 5}" if labelled else ""
                                                                         for i in range(lo, lo + len(keys))],
                             "species": "humpback_whale", "encounter_id": "", "date": "2025-07-01",
                             "location": "", "bbox": "", "fingerprint": ""})
        embed_store.publish_chunk(out, version, number, chunk_table(rows, x[lo:lo + len(keys)]), empty_errors())
    embed_store.compact_keys(out, version, every=1)
    return x


def write_photos(folder: str, n: int = NEW_PHOTOS) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(f"{folder}/new{i:03d}.jpg")


def make_config(root: str, model_url: str):
    from whale_dist.config import load_config

    return load_config(None, [f"root={root}", f"embed.model={model_url}", "embed.actor_num_cpus=0.25",
                              "embed.batch_size=50", "identify.threshold=0.5", "index.catalogue_name=bench",
                              "index.cpus_per_task=1", "identify.report_queries=20"])


def one_size(n: int, work: str) -> dict:
    """The timings of one catalogue size in a fresh store under ``work``."""
    import copy

    from whale_dist import index, nightly
    from whale_dist.model import Encoder, ModelCard, export_encoder

    root = os.path.join(work, f"n{n}-{time.time_ns()}")
    model_url = os.path.join(work, "model.pt")
    version = export_encoder(Encoder("test_convnext", DIM), ModelCard("test_convnext", DIM, 32), model_url).version
    cfg = make_config(root, model_url)
    write_store(cfg.embed_out, version, n, "cat/", labelled=True, seed=n)
    write_store(cfg.query_store, version, n, "old-night/", labelled=False, seed=n + 1)
    start = time.perf_counter()
    index.build_index(copy.deepcopy(cfg))
    full = time.perf_counter() - start
    write_photos(os.path.join(root, "night"))
    cfg.embed.images, cfg.nightly.night = os.path.join(root, "night"), f"n{n}"
    start = time.perf_counter()
    summary = nightly.run_nightly(cfg)
    night_s = time.perf_counter() - start
    assert summary["embedded"] == NEW_PHOTOS, summary
    import pandas as pd

    add = max(1, n // 100)
    x = np.random.default_rng(7).standard_normal((add, DIM)).astype(np.float32)
    meta = pd.DataFrame({"image_key": [f"added/{i:08d}.jpg" for i in range(add)], "url": "", "individual_id": "x",
                         "species": "", "encounter_id": "", "date": "", "location": ""})
    start = time.perf_counter()
    index.add_vectors(cfg.index_root, x, meta)
    refresh_s = time.perf_counter() - start
    return {"n": n, "nightly_s": night_s, "full_reindex_s": full, "refresh_1pct_s": refresh_s}


def table(rows: list[dict]) -> str:
    base = rows[0]["nightly_s"]
    lines = ["| catalogue | nightly, 100 new photos (s) | ÷ smallest | full re-index (s) | refresh +1% (s) | "
             "refresh ÷ full |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['n']:,} | {r['nightly_s']:.1f} | {r['nightly_s'] / base:.2f} | {r['full_reindex_s']:.1f} | "
              f"{r['refresh_1pct_s']:.2f} | {r['refresh_1pct_s'] / r['full_reindex_s']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="catalogue sizes, comma-separated")
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    work = args.work or tempfile.mkdtemp(prefix="nightly-cost-")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        one_size(1000, work)  # warm-up, not reported: the first Ray Data run in a process pays its imports
        rows = [one_size(int(n), work) for n in args.sizes.split(",")]
    finally:
        ray.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
