"""``ray job submit --working-dir . -- python jobs/identify.py --config configs/happywhale.yaml --images s3://...``

Also ``calibrate`` and ``evaluate``: ``python jobs/identify.py calibrate --config ...`` (the first argument picks the
command when it is one of them; otherwise it is ``identify``).
"""

from __future__ import annotations

import os
import sys

COMMANDS = ("calibrate", "evaluate", "identify")


def main(argv: list[str] | None = None) -> int:
    # Under `ray job submit --working-dir .` the script's folder is sys.path[0]: put the repo root before it.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import whale_dist.cli

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "identify"
    return whale_dist.cli.main([command, *argv])


if __name__ == "__main__":
    sys.exit(main())
