"""Identification: ranking (the one protocol), calibrate (the new_individual threshold), evaluate (scores against
labels), baselines (random, raw pixels), report (the review page) and the ``identify`` / ``calibrate`` / ``evaluate``
/ ``baselines`` commands.

The names below are this stage's public face; each is imported from its module on first use, so importing the
package pulls in no torch, Ray or faiss.
"""

from whale_dist._lazy import lazy_exports

EXPORTS = {
    "run_identify": "job",
    "main": "job",
    "run_calibration": "calibrate",
    "calibrate_main": "calibrate",
    "run_evaluation": "evaluate",
    "evaluate_main": "evaluate",
    "open_catalogue": "ranking",
    "rank_queries": "ranking",
    "survey_baselines": "baselines",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
