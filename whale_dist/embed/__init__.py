"""Embedding photos: the Embedder (a plain callable, no Ray), sources (folders, tar shards, manifests), the Ray Data
pipeline, the embedding store (layout, publication, done keys) and ``whale-dist embed``.

The names below are this stage's public face; each is imported from its module on first use, so importing the
package pulls in no torch, Ray or faiss.
"""

from whale_dist._lazy import lazy_exports

EXPORTS = {
    "Embedder": "embedder",
    "embed_source": "job",
    "run_embed": "job",
    "load_work": "job",
    "main": "job",
    "read_embeddings": "store",
    "read_errors": "store",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
