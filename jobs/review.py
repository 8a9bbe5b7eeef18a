"""Apply a night's reviewed decisions to the catalogue and refresh the index, as submitted to a cluster::

    ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
        python jobs/review.py --config configs/happywhale.yaml --decisions s3://my-whale-bucket/reviews/2026-11-26.csv
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    # Under `ray job submit --working-dir .` the script's folder is sys.path[0]: put the repo root before it.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import whale_dist.cli

    return whale_dist.cli.main(["review", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
