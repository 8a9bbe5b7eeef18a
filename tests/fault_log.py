"""What the fault suite injected and what it measured, one JSON line per test, so RELIABILITY.md quotes real counts.

Fault tests call ``record(fault, injected=..., lost=..., duplicated=..., **measured)`` after their assertions, i.e.
only a passing test writes a line. The log lives at ``$WHALE_FAULT_LOG`` (default
``.pytest_cache/whale-fault-log.jsonl`` in the repository). ``python tests/fault_log.py`` prints the latest record of
every fault as the markdown table that RELIABILITY.md carries.
"""

from __future__ import annotations

import json
import os
import sys
import time

DEFAULT_LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                           "whale-fault-log.jsonl")
_SESSION = f"{os.getpid()}-{int(time.time())}"


def log_path() -> str:
    return os.environ.get("WHALE_FAULT_LOG", DEFAULT_LOG)


def record(fault: str, injected: int, **measured) -> dict:
    """Append one line: the fault, how many times it was injected, and the measured outcome (counts)."""
    entry = {"fault": fault, "injected": int(injected), "session": _SESSION,
             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **measured}
    path = log_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
    return entry


def latest(path: str | None = None) -> list[dict]:
    """The most recent record of each fault, in first-seen order."""
    found: dict[str, dict] = {}
    try:
        with open(path or log_path(), encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    entry = json.loads(line)
                    found[entry["fault"]] = entry
    except FileNotFoundError:
        return []
    return list(found.values())


def outcome(entry: dict) -> str:
    skip = {"fault", "injected", "session", "at"}
    return ", ".join(f"{k} {entry[k]}" for k in sorted(entry) if k not in skip)


def table(entries: list[dict]) -> str:
    lines = ["| fault | injected | measured outcome | when |", "|---|---:|---|---|"]
    lines += [f"| {e['fault']} | {e['injected']} | {outcome(e)} | {e['at']} |" for e in entries]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(latest(sys.argv[1] if len(sys.argv) > 1 else None)))
