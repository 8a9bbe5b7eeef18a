"""One way for every stage to reach Ray: join the cluster it runs on, or start a local one.

Under ``ray job submit`` (or any process with ``RAY_ADDRESS`` set) a plain ``ray.init()`` joins that cluster; on a
laptop it starts a local Ray with the machine's CPUs, so small local runs take exactly the cluster's code path.
A connection the caller already made (the demo's local Ray, a test's cluster) is kept as it is, with whatever
resources and logging the caller chose.
"""

from __future__ import annotations


def connect(log_to_driver: bool = True) -> None:
    """Join the Ray of ``ray job submit`` / ``RAY_ADDRESS`` or start a local one; an existing connection is kept.

    ``log_to_driver=False`` keeps worker log lines out of the job's own output (the index build's workers print
    faiss progress that would bury the summary line).
    """
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=log_to_driver)
    data_progress_bars()


def data_progress_bars() -> bool:
    """Ray Data's progress bars in an interactive terminal only: in CI and job logs a redrawn bar is thousands of
    lines. ``RAY_DATA_DISABLE_PROGRESS_BARS=1`` (the cluster image, tests) keeps them off anywhere."""
    import os
    import sys

    import ray.data

    on = sys.stderr.isatty() and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") in ("", "0")
    ray.data.DataContext.get_current().enable_progress_bars = on
    return on
