"""``ray job submit --working-dir . -- python jobs/train.py --config configs/happywhale.yaml [key=value ...]``."""

import os
import sys


def main(argv=None) -> int:
    # Under `ray job submit --working-dir .` the script's folder, not the repository root, is sys.path[0].
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import whale_dist.cli

    return whale_dist.cli.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
