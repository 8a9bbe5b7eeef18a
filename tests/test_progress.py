"""Progress lines: the per-epoch line of training and the embed ticker's rate limit, on a fake clock."""

from __future__ import annotations

import io

from whale_dist.progress import Ticker, duration, epoch_line


def test_epoch_line_says_how_far_how_fast_and_how_long():
    assert epoch_line(3, 20, 4.2134, 128.44, 0.41234, 750) == \
        "train: epoch 3/20  loss 4.213  val MAP@5 0.412  128.4 images/s  ETA 12m30s"
    assert "MAP@5" not in epoch_line(1, 2, 1.0, 1.0, None, 5)
    assert [duration(s) for s in (0, 59.6, 75, 3700)] == ["0s", "1m00s", "1m15s", "1h01m"]


def test_ticker_prints_at_a_steady_interval_only():
    now = [0.0]
    out = io.StringIO()
    ticker = Ticker(100, interval_s=10, clock=lambda: now[0], out=out)
    assert ticker.add(10) is None  # nothing before the interval: short work stays quiet
    now[0] = 10.0
    assert ticker.add(10, errors=2) == "embed: 20/100 photos  2.0 photos/s  2 errors  ETA 40s"
    now[0] = 15.0
    assert ticker.add(30) is None and out.getvalue().count("\n") == 1
