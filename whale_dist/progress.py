"""Progress lines for long work: one line per training epoch, and a rate-limited line while photos are embedded.

Plain lines, not redrawn bars, so they read the same in a terminal, a CI log and ``ray job logs``; a line carries
what a person waiting wants to know (how far, how fast, how long still, what went wrong so far).
"""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def epoch_line(epoch: int, epochs: int, loss: float, images_per_s: float, map5: float | None,
               eta_s: float) -> str:
    """``train: epoch 3/20  loss 4.213  val MAP@5 0.412  128.4 images/s  ETA 12m30s`` (MAP@5 only when validated)."""
    val = f"  val MAP@5 {map5:.3f}" if map5 is not None else ""
    return (f"train: epoch {epoch}/{epochs}  loss {loss:.3f}{val}  {images_per_s:.1f} images/s  "
            f"ETA {duration(eta_s)}")


class Ticker:
    """Prints ``{label}: done/total photos, rate, errors, ETA`` at most every ``interval_s`` seconds (and not at all
    for work that ends sooner), so a night of 100,000 photos shows it is alive without flooding the log."""

    def __init__(self, total: int, label: str = "embed", interval_s: float = 15.0, clock=time.monotonic, out=None):
        self.total, self.label, self.interval_s, self.clock, self.out = total, label, interval_s, clock, out
        self.started = self.last = clock()
        self.done = self.errors = 0

    def add(self, rows: int, errors: int = 0) -> str | None:
        """Count finished rows; returns the line when one was due (and printed)."""
        self.done, self.errors = self.done + rows, self.errors + errors
        now = self.clock()
        if now - self.last < self.interval_s:
            return None
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        line = (f"{self.label}: {self.done}/{self.total} photos  {rate:.1f} photos/s  {self.errors} errors  "
                f"ETA {duration((self.total - self.done) / rate) if rate > 0 else '?'}")
        print(line, file=self.out, flush=True)
        return line
