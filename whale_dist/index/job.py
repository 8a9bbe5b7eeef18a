"""``whale-dist index``: build and publish a sharded faiss index of one model version's embeddings.

The package's modules split the roles (see ``whale_dist/index/__init__.py``); this one holds the command. It imports
neither Ray nor faiss until a build is run.
"""

from __future__ import annotations

import logging

from whale_dist import ray_connect
from whale_dist.config import config_from_argv
from whale_dist.index.publish import read_manifest

FLAGS = {
    "--embeddings": "embed.out",
    "--out": "index.out",
    "--catalogue-name": "index.catalogue_name",
    "--model-version": "index.model_version",
    "--shards": "index.num_shards",
    "--memory-gb": "index.memory_budget_gb",
    "--index-key": "index.index_key",
}


def build_index(cfg) -> str:
    """Build and publish an index from ``cfg`` on the connected Ray cluster; returns the published version URL."""
    from whale_dist.index.build import build_index as build  # imports Ray and faiss

    return build(cfg)


def main(argv: list[str] | None = None) -> int:
    """``[--config FILE] [--embeddings URL] [--out URL] [--catalogue-name NAME] [--model-version V] [key=value]``."""
    cfg = config_from_argv(list(argv or []), FLAGS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ray_connect.connect(log_to_driver=False)
    url = build_index(cfg)
    manifest = read_manifest(url)
    print(f"published {url}: {manifest['index_key']} over {manifest['n']} photos in {len(manifest['shards'])} "
          f"shard(s), model {manifest['model_version']}, built in {manifest['build_seconds']:.1f} s")
    return 0
