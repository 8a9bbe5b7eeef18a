"""Training on Ray Train: data (Ray Data decode + augmentation), loop (the step, DDP), validate (the ranking protocol on
a held-out fold), checkpoint (report/restore), outputs (model.pt, model.json, curves) and the ``whale-dist train``
command.

The names below are this stage's public face; each is imported from its module on first use, so importing the
package pulls in no torch, Ray or faiss.
"""

from whale_dist._lazy import lazy_exports

EXPORTS = {
    "run_training": "job",
    "main": "job",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
