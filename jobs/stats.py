"""Catalogue statistics from a cluster job::

    ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
        python jobs/stats.py --catalogue s3://my-whale-bucket/catalogue --out s3://my-whale-bucket/stats
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    # Under `ray job submit --working-dir .` the script's folder is sys.path[0]: put the repo root before it.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import whale_dist.cli

    return whale_dist.cli.main(["stats", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
