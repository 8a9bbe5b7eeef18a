"""Synthetic surveys in the Happywhale layout: plan (who, when), draw (each animal's marks), photo (conditions,
rendering), survey (tables, statistics) and the ``whale-dist synth`` command.

The names below are this stage's public face; each is imported from its module on first use, so importing the
package pulls in no torch, Ray or faiss.
"""

from whale_dist._lazy import lazy_exports

EXPORTS = {
    "generate_survey": "survey",
    "main": "job",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
