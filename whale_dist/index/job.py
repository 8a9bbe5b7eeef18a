"""``whale-dist index``: build and publish a sharded faiss index of one model version's embeddings.

Roles are split by module: ``index_choice`` (pure index-choice heuristics), ``index_input`` (embedding partitions,
filters), ``index_train`` (faiss create/train/tune), ``index_build`` (Ray orchestration), ``index_publish``
(manifest, checksums, ``LATEST``), ``index_search`` (``Catalogue``). This module holds ``main`` and re-exports the
public API; it imports neither Ray nor faiss until a build or a search is run.
"""

from __future__ import annotations

import logging

from whale_dist.index.choice import choose_index_key, choose_nlist, index_memory_bytes, training_size
from whale_dist.index.inputs import IndexInputError, filter_mask
from whale_dist.index.publish import IndexIntegrityError, list_versions, read_manifest, resolve_version_url
from whale_dist.index.search import Catalogue, IndividualMatch, Neighbours, aggregate_individuals

__all__ = ["Catalogue", "IndexInputError", "IndexIntegrityError", "IndividualMatch", "Neighbours",
           "aggregate_individuals", "build_index", "choose_index_key", "choose_nlist", "filter_mask",
           "index_memory_bytes", "list_versions", "main", "read_manifest", "resolve_version_url", "training_size"]

FLAGS = {
    "--embeddings": "index.embeddings",
    "--out": "index.out",
    "--catalogue-name": "index.catalogue_name",
    "--model-version": "index.model_version",
    "--shards": "index.num_shards",
    "--memory-gb": "index.memory_budget_gb",
    "--index-key": "index.index_key",
}


def build_index(cfg) -> str:
    """Build and publish an index from ``cfg`` on the connected Ray cluster; returns the published version URL."""
    from whale_dist.index.build import build_index as build

    return build(cfg)


def main(argv: list[str] | None = None) -> int:
    """``[--config FILE] [--embeddings URL] [--out URL] [--catalogue-name NAME] [--model-version V] [key=value]``."""
    from whale_dist import ray_connect
    from whale_dist.config import config_from_argv

    cfg = config_from_argv(list(argv or []), FLAGS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ray_connect.connect(log_to_driver=False)
    url = build_index(cfg)
    manifest = read_manifest(url)
    print(f"published {url}: {manifest['index_key']} over {manifest['n']} photos in {len(manifest['shards'])} "
          f"shard(s), model {manifest['model_version']}, built in {manifest['build_seconds']:.1f} s")
    return 0
