"""Named failpoints, armed by one environment variable, so that a fault test never races the machine's speed.

A failpoint is a call such as ``failpoint("embed.chunk_published", chunk=3)`` at a place where a fault matters.
Unarmed (the usual case) it is one lookup in an empty module-level dict: no parsing, no I/O, no change in behaviour.
Armed, the process raises, exits, is killed, sleeps or pauses *at that line*, after exactly N hits, so a test knows
the exact state of the work when the fault happens instead of guessing it from a timer. The design is TiKV's fail-rs
(https://docs.rs/fail: ``FAILPOINTS=name=actions;...``, terms ``[cnt*]task[(arg)]`` chained with ``->``) and etcd's
gofail (https://github.com/etcd-io/gofail: ``GOFAIL_FAILPOINTS``, a ``pause`` term), cut down to what our tests need.
The ``p%`` probability of fail-rs is left out on purpose: a test that fails by chance is what this module removes.

Syntax of ``WHALE_FAILPOINTS``::

    entry[;entry...]        entry = name=term[->term...]        term = [N*]task[(arg)]

``off`` does nothing; ``raise(msg)`` (alias ``return(msg)``) raises ``FailpointError``; ``sleep(ms)`` sleeps;
``pause`` blocks until resumed (below); ``exit(code)`` is ``os._exit(code)`` (default 1) and ``panic(msg)`` prints
``msg`` and exits with 1, both without cleanup or ``finally``, like a crash; ``kill`` sends SIGKILL to the process
itself. A term with ``N*`` handles N hits and passes later hits on to the next term; a term without it handles every
hit that reaches it; a hit that no term takes does nothing. ``2*off->1*pause`` pauses at the third hit only,
``2*off->raise`` raises at every hit from the third on. An argument may not contain ``;`` or ``->``.

``pause`` writes ``<dir>/<name>.<pid>.paused`` (JSON: name, pid, hit, the call's context) and waits until
``<dir>/<name>.<pid>.resume`` exists; ``<dir>`` is ``WHALE_FAILPOINTS_DIR`` (default ``<tmp>/whale-failpoints``).
A test in another process calls ``wait_paused``, asserts the context, then SIGKILLs ``paused.pid`` or ``resume``s it.

The variable is read once per process, at import (``reload()`` reads it again and restarts the hit counts; a bad
spec raises ``FailpointSpecError`` there, loudly). Hits are counted per process and per name, under a lock. Ray
workers see the variable only if they start with it: pass ``runtime_env={"env_vars": env_vars(spec, dir)}`` to
``ray.init`` / ``ray job submit``, or set it in the environment of ``ray start``; workers already running keep theirs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "WHALE_FAILPOINTS"
DIR_ENV = "WHALE_FAILPOINTS_DIR"
POLL_S = 0.01

# The points the library calls (name, where). Points not listed here may still be armed (a test may add its own).
POINTS: tuple[tuple[str, str], ...] = (
    ("embed.chunk_published", "embed driver: after a chunk's partition and its .done marker are published"),
    ("embed.actor_batch", "Embedder actor: before each batch is embedded"),
    ("train.checkpoint_reported", "Ray Train worker (rank 0): after ray.train.report returned with a checkpoint"),
    ("train.checkpoint_registered", "Ray Train controller: after its checkpoint manager registered a checkpoint"),
    ("index.shards_written", "index build: shard files written, ids.parquet and manifest.json not yet"),
    ("index.before_latest", "index build: manifest.json written, LATEST not yet moved"),
    ("storage.put", "storage: before an object-store PUT or a local write-and-rename"),
)

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TERM = re.compile(r"(?:([0-9]+)\*)?([a-z]+)(?:\((.*)\))?")
_DIGITS = re.compile(r"[0-9]+")
_ARG_KIND = {"off": None, "raise": "text", "return": "text", "panic": "text", "sleep": "ms", "exit": "code",
             "kill": None, "pause": None}


class FailpointError(RuntimeError):
    """The error a ``raise`` failpoint injects."""


class FailpointSpecError(ValueError):
    """A ``WHALE_FAILPOINTS`` value that does not parse; the message is one line naming the entry."""


@dataclasses.dataclass(frozen=True)
class Term:
    task: str
    arg: str | None = None
    count: int | None = None


@dataclasses.dataclass(frozen=True)
class PausedPoint:
    name: str
    pid: int
    hit: int
    context: dict
    folder: Path


def parse(spec: str) -> dict[str, tuple[Term, ...]]:
    """``{name: (term, ...)}`` for a ``WHALE_FAILPOINTS`` value; ``{}`` for an empty one."""
    points: dict[str, tuple[Term, ...]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(";"))):
        name, sep, chain = entry.partition("=")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            raise _bad(entry, "expected name=action, the name made of letters, digits, '_', '.', '-'")
        if name in points:
            raise _bad(entry, f"{name} is armed twice")
        points[name] = tuple(_term(entry, text.strip()) for text in chain.split("->"))
    return points


def _term(entry: str, text: str) -> Term:
    match = _TERM.fullmatch(text)
    if not match or match.group(2) not in _ARG_KIND:
        raise _bad(entry, f"unknown action {text!r} (tasks: {', '.join(_ARG_KIND)})")
    count, task, arg = match.groups()
    kind = _ARG_KIND[task]
    if count is not None and int(count) < 1:
        raise _bad(entry, "N* needs N >= 1")
    if kind is None and arg is not None:
        raise _bad(entry, f"{task} takes no argument")
    if kind == "ms" and not (arg and _DIGITS.fullmatch(arg)):
        raise _bad(entry, "sleep needs milliseconds, e.g. sleep(200)")
    if kind == "code" and arg is not None and not (_DIGITS.fullmatch(arg) and int(arg) <= 255):
        raise _bad(entry, "exit takes a status 0..255, e.g. exit(3)")
    return Term(task, arg, None if count is None else int(count))


def _bad(entry: str, why: str) -> FailpointSpecError:
    return FailpointSpecError(f"{ENV}: bad entry {entry!r}: {why}")


class _Point:
    """Per-process state of one armed point: its terms and how many hits each has taken (guarded by ``_LOCK``)."""

    def __init__(self, terms: tuple[Term, ...]):
        self.terms, self.used, self.hits = terms, [0] * len(terms), 0

    def take(self) -> Term | None:
        self.hits += 1
        for i, term in enumerate(self.terms):
            if term.count is None:
                return term
            if self.used[i] < term.count:
                self.used[i] += 1
                return term
        return None


_LOCK = threading.Lock()
_PAUSE_LOCK = threading.Lock()  # one pause at a time per process: the marker names carry no thread id
_ARMED: dict[str, _Point] = {}


def reload() -> dict[str, tuple[Term, ...]]:
    """Read ``WHALE_FAILPOINTS`` again (hit counts restart at 0); returns what is now armed."""
    global _ARMED
    spec = parse(os.environ.get(ENV, ""))
    with _LOCK:
        _ARMED = {name: _Point(terms) for name, terms in spec.items()}
    return spec


def failpoint(name: str, /, **context) -> None:
    """Count a hit of ``name`` and run the action armed for it, if any. ``context`` describes the state here."""
    point = _ARMED.get(name)
    if point is None:
        return None
    with _LOCK:
        term = point.take()
        hit = point.hits
    if term is not None and term.task != "off":
        _ACTIONS[term.task](name, hit, term.arg, context)
    return None


def hits(name: str) -> int:
    """How many times this process has hit ``name`` since it was armed (0 when it is not armed)."""
    point = _ARMED.get(name)
    return 0 if point is None else point.hits


def _raise(name: str, hit: int, arg: str | None, context: dict) -> None:
    where = ", ".join([f"hit {hit}"] + [f"{key}={value!r}" for key, value in context.items()])
    raise FailpointError(f"failpoint {name} ({where}): {arg or 'injected error'}")


def _sleep(name: str, hit: int, arg: str | None, context: dict) -> None:
    time.sleep(int(arg) / 1000)


def _exit(name: str, hit: int, arg: str | None, context: dict) -> None:
    code = 1 if arg is None else int(arg)
    _say(f"failpoint {name}: exit({code}) at hit {hit}")
    os._exit(code)


def _panic(name: str, hit: int, arg: str | None, context: dict) -> None:
    _say(f"failpoint {name}: panic at hit {hit}: {arg or 'injected panic'}")
    os._exit(1)


def _kill(name: str, hit: int, arg: str | None, context: dict) -> None:
    _say(f"failpoint {name}: SIGKILL at hit {hit}")
    os.kill(os.getpid(), signal.SIGKILL)


def _pause(name: str, hit: int, arg: str | None, context: dict) -> None:
    folder = failpoint_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}.{os.getpid()}"
    marker, go, tmp = folder / f"{stem}.paused", folder / f"{stem}.resume", folder / f".{stem}.paused.tmp"
    with _PAUSE_LOCK:
        go.unlink(missing_ok=True)
        tmp.write_text(json.dumps({"name": name, "pid": os.getpid(), "hit": hit, "context": context}, default=str))
        os.replace(tmp, marker)  # the waiting test never reads half a marker
        _say(f"failpoint {name}: paused at hit {hit} until {go} exists")
        while not go.exists():
            time.sleep(POLL_S)
        go.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)


def _say(line: str) -> None:
    os.write(2, (line + "\n").encode("utf-8", "replace"))  # unbuffered: the line is out before an exit or a kill


_ACTIONS = {"raise": _raise, "return": _raise, "sleep": _sleep, "exit": _exit, "panic": _panic, "kill": _kill,
            "pause": _pause}


def failpoint_dir() -> Path:
    """Where ``pause`` writes its markers: ``WHALE_FAILPOINTS_DIR`` or ``<tmp>/whale-failpoints``."""
    return Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / "whale-failpoints")


def wait_paused(name: str, folder: str | Path | None = None, timeout: float = 300.0,
                pid: int | None = None) -> PausedPoint:
    """Block until a process (``pid``, or any) is paused at ``name``; a ``TimeoutError`` after ``timeout`` s."""
    folder = Path(folder) if folder is not None else failpoint_dir()
    deadline = time.monotonic() + timeout
    while True:
        for marker in sorted(folder.glob(f"{name}.*.paused")):
            point, _, owner = marker.name[: -len(".paused")].rpartition(".")
            if point != name or not _DIGITS.fullmatch(owner) or pid not in (None, int(owner)):
                continue
            with contextlib.suppress(FileNotFoundError):  # resumed between glob and read
                record = json.loads(marker.read_text())
                return PausedPoint(name, record["pid"], record["hit"], record["context"], folder)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no process paused at failpoint {name} within {timeout} s (markers in {folder})")
        time.sleep(POLL_S)


def resume(paused: PausedPoint) -> None:
    """Let a paused process go on. Its marker goes first, so a later ``wait_paused`` sees only a new pause."""
    stem = paused.folder / f"{paused.name}.{paused.pid}"
    Path(f"{stem}.paused").unlink(missing_ok=True)
    Path(f"{stem}.resume").touch()


def env_vars(spec: str, folder: str | Path | None = None) -> dict[str, str]:
    """The variables that arm ``spec`` in another process (``subprocess`` env, Ray ``runtime_env["env_vars"]``)."""
    parse(spec)
    return {ENV: spec} | ({} if folder is None else {DIR_ENV: str(folder)})


@contextlib.contextmanager
def armed(spec: str, folder: str | Path | None = None) -> Iterator[dict[str, tuple[Term, ...]]]:
    """Arm ``spec`` in this process (and in the subprocesses it starts meanwhile); restore the variables after."""
    saved = {key: os.environ.get(key) for key in (ENV, DIR_ENV)}
    os.environ.update(env_vars(spec, folder))
    try:
        yield reload()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reload()


reload()
