"""``whale-dist synth [--out URL] [--seed N] [synth.key=value ...]``: write a survey, then print its statistics.

How hard the survey is (random and raw-pixel MAP@5 on its test split) is the identify stage's to say:
``whale-dist baselines --survey URL``.
"""

from __future__ import annotations

import sys

from whale_dist import storage
from whale_dist.config import config_from_argv
from whale_dist.synth.survey import generate_survey

FLAGS = {"--out": "synth.out", "--seed": "synth.seed"}


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), FLAGS)
    out_url = cfg.survey_url
    stats = generate_survey(cfg.synth, out_url)
    print(f"synth: wrote {stats['photos']} train photos of {stats['individuals']} individuals "
          f"({stats['singletons']} singletons) and {stats['test_photos']} test photos "
          f"({stats['test_new_fraction']:.0%} new individuals) to {storage.redact(out_url)}")
    for name, counts in stats["species"].items():
        print(f"  {name:<28} {counts['individuals']:>4} individuals {counts['photos']:>5} photos")
    return 0
