"""The faiss index: choice (pure functions of N, d, memory), faiss_ops (create, train, tune), inputs (embedding
partitions, filters), build (Ray), publish (manifest, checksums, LATEST), search (``Catalogue``), add (incremental
add to a published version) and ``whale-dist index``.

The names below are this stage's public face; each is imported from its module on first use, so importing the
package pulls in no torch, Ray or faiss.
"""

from whale_dist._lazy import lazy_exports

EXPORTS = {
    "add_partitions": "add",
    "add_vectors": "add",
    "should_rebuild": "add",
    "needs_rebuild": "choice",
    "build_index": "job",
    "main": "job",
    "choose_index_key": "choice",
    "choose_nlist": "choice",
    "index_memory_bytes": "choice",
    "training_size": "choice",
    "IndexInputError": "inputs",
    "filter_mask": "inputs",
    "IndexIntegrityError": "publish",
    "list_versions": "publish",
    "read_manifest": "publish",
    "resolve_version_url": "publish",
    "Catalogue": "search",
    "IndividualMatch": "search",
    "Neighbours": "search",
    "aggregate_individuals": "search",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
