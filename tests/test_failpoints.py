"""Failpoints: the spec syntax, hit counting, every action, and the pause protocol across processes.

No test here waits for a duration to pass: a paused process is awaited through its marker file (with a generous
timeout that only bounds a failure), and exits are awaited with ``wait``. No Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from whale_dist import failpoints as fp
from whale_dist.failpoints import FailpointError, FailpointSpecError, Term, failpoint

ROOT = Path(__file__).resolve().parents[1]
GENEROUS_S = 120

# A child that counts chunks at a failpoint and records each finished chunk in a file, so a test can read the
# exact progress at a pause or after a kill.
CHILD = textwrap.dedent("""
    import sys
    from whale_dist.failpoints import failpoint
    progress = open(sys.argv[1], "a", buffering=1)
    for chunk in range(int(sys.argv[2])):
        failpoint("embed.chunk_published", chunk=chunk, published=chunk + 1)
        progress.write(f"{chunk}\\n")
    progress.write("done\\n")
""")


@pytest.fixture(autouse=True)
def unarmed(monkeypatch):
    """Each test starts and ends with nothing armed in this process."""
    monkeypatch.delenv(fp.ENV, raising=False)
    monkeypatch.delenv(fp.DIR_ENV, raising=False)
    fp.reload()
    yield
    monkeypatch.delenv(fp.ENV, raising=False)
    fp.reload()


@pytest.fixture
def spawn(tmp_path):
    """Start ``CHILD`` with a spec armed; every child still running at the end is killed."""
    children = []

    def start(spec: str, chunks: int = 5) -> tuple[subprocess.Popen, Path]:
        progress = tmp_path / f"progress-{len(children)}.txt"
        env = {**os.environ, **fp.env_vars(spec, tmp_path), "PYTHONPATH": str(ROOT)}
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(progress), str(chunks)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        children.append(child)
        return child, progress

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=GENEROUS_S)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_the_registry_names_each_point_once_with_a_one_line_description():
    names = [name for name, _ in fp.POINTS]
    assert len(names) == len(set(names)) >= 6
    assert {"embed.chunk_published", "train.checkpoint_reported", "index.before_latest", "storage.put"} <= set(names)
    for name, description in fp.POINTS:
        assert fp.parse(f"{name}=off") == {name: (Term("off"),)}
        assert description and "\n" not in description


@pytest.mark.parametrize("spec, expected", [
    ("", {}),
    ("  ;  ", {}),
    ("a=off", {"a": (Term("off"),)}),
    (" embed.chunk_published = 2*off -> 1*pause ; storage.put=sleep(5);",
     {"embed.chunk_published": (Term("off", count=2), Term("pause", count=1)), "storage.put": (Term("sleep", "5"),)}),
    ("x=raise(boom);y=return;z=exit(3);w=panic(oh no);v=kill;u=exit",
     {"x": (Term("raise", "boom"),), "y": (Term("return"),), "z": (Term("exit", "3"),),
      "w": (Term("panic", "oh no"),), "v": (Term("kill"),), "u": (Term("exit"),)}),
    ("t_1.a-b=3*sleep(0)->raise", {"t_1.a-b": (Term("sleep", "0", 3), Term("raise"))}),
])
def test_good_specs_parse_to_their_terms(spec, expected):
    assert fp.parse(spec) == expected


@pytest.mark.parametrize("spec, says", [
    ("a", "expected name=action"),
    ("=off", "expected name=action"),
    ("a b=off", "expected name=action"),
    ("a=", "unknown action"),
    ("a=explode", "unknown action"),
    ("a=off->", "unknown action"),
    ("a=-1*off", "unknown action"),
    ("a=Raise", "unknown action"),
    ("a=raise\nboom", "unknown action"),
    ("a=0*off", "N >= 1"),
    ("a=off(1)", "takes no argument"),
    ("a=pause(1)", "takes no argument"),
    ("a=sleep", "sleep needs milliseconds"),
    ("a=sleep(1.5)", "sleep needs milliseconds"),
    ("a=exit(256)", "exit takes a status"),
    ("a=exit(x)", "exit takes a status"),
    ("a=off;a=raise", "armed twice"),
    ("a=raise(disk full -> retry)", "unknown action"),  # '->' always splits the chain
])
def test_a_bad_spec_fails_with_one_line_naming_the_entry(spec, says):
    with pytest.raises(FailpointSpecError) as caught:
        fp.parse(spec)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert says in message and fp.ENV in message and "\n" not in message
    assert repr(spec.split(";")[-1].strip()) in message


def test_a_bad_spec_is_refused_before_anything_is_armed():
    with pytest.raises(FailpointSpecError), fp.armed("a=explode"):
        pass
    assert fp.ENV not in os.environ


def test_n_star_takes_n_hits_then_passes_them_on():
    with fp.armed("p=2*off->raise(boom)"):
        failpoint("p")
        failpoint("p")
        for _ in range(2):  # a term without a count takes every hit that reaches it
            with pytest.raises(FailpointError, match="boom"):
                failpoint("p")
        assert fp.hits("p") == 4


def test_a_counted_last_term_fires_once_and_then_the_point_does_nothing():
    with fp.armed("p=2*off->1*raise"):
        outcomes = []
        for _ in range(5):
            try:
                failpoint("p")
                outcomes.append("ok")
            except FailpointError:
                outcomes.append("raised")
        assert outcomes == ["ok", "ok", "raised", "ok", "ok"]


def test_raise_is_a_runtime_error_naming_the_point_hit_and_context():
    with fp.armed("embed.chunk_published=raise"), pytest.raises(RuntimeError) as caught:
        failpoint("embed.chunk_published", chunk=3, url="s3://b/x")
    assert str(caught.value) == "failpoint embed.chunk_published (hit 1, chunk=3, url='s3://b/x'): injected error"


def test_points_are_counted_per_name_and_unarmed_names_do_nothing():
    with fp.armed("p=1*off->raise;q=off"):
        for _ in range(3):
            failpoint("q")
            failpoint("other")
        failpoint("p")
        assert (fp.hits("p"), fp.hits("q"), fp.hits("other")) == (1, 3, 0)


def test_rearming_restarts_the_counts():
    with fp.armed("p=1*off->raise"):
        failpoint("p")
    with fp.armed("p=1*off->raise"):
        failpoint("p")  # the first hit again: no raise
        assert fp.hits("p") == 1


def test_hits_from_many_threads_are_counted_exactly_once_each():
    threads, calls = 8, 50
    raised = []
    start = threading.Barrier(threads)

    def work():
        start.wait()
        for _ in range(calls):
            try:
                failpoint("p")
            except FailpointError:
                raised.append(1)

    with fp.armed(f"p={threads * calls - 1}*off->1*raise"):
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert fp.hits("p") == threads * calls
    assert len(raised) == 1


def test_sleep_blocks_at_least_the_given_milliseconds():
    with fp.armed("p=sleep(30)"):
        began = time.monotonic()
        failpoint("p")
        assert time.monotonic() - began >= 0.03  # a lower bound only: a slow machine only makes it longer


def test_unset_means_nothing_armed_and_no_parsing_per_call(monkeypatch):
    assert fp.reload() == {}
    monkeypatch.setenv(fp.ENV, "")
    assert fp.reload() == {}

    def no_parse(spec):
        raise AssertionError("parsed during a call")

    with monkeypatch.context() as patch:
        patch.setattr(fp, "parse", no_parse)
        for name, _ in fp.POINTS:
            for _ in range(100):
                assert failpoint(name, chunk=1) is None
            assert fp.hits(name) == 0


def test_armed_restores_the_environment_and_disarms(tmp_path, monkeypatch):
    monkeypatch.setenv(fp.DIR_ENV, "/somewhere")
    with fp.armed("p=raise", tmp_path) as spec:
        assert spec == {"p": (Term("raise"),)}
        assert (os.environ[fp.ENV], os.environ[fp.DIR_ENV]) == ("p=raise", str(tmp_path))
    assert fp.ENV not in os.environ and os.environ[fp.DIR_ENV] == "/somewhere"
    assert failpoint("p") is None


def test_env_vars_are_what_a_ray_runtime_env_needs(tmp_path):
    assert fp.env_vars("p=kill") == {fp.ENV: "p=kill"}
    assert fp.env_vars("p=kill", tmp_path) == {fp.ENV: "p=kill", fp.DIR_ENV: str(tmp_path)}
    with pytest.raises(FailpointSpecError):
        fp.env_vars("p=kil")


@pytest.mark.parametrize("spec, status, says", [
    ("embed.chunk_published=2*off->exit(7)", 7, "exit(7) at hit 3"),
    ("embed.chunk_published=2*off->panic(disk on fire)", 1, "panic at hit 3: disk on fire"),
    ("embed.chunk_published=2*off->kill", -signal.SIGKILL, "SIGKILL at hit 3"),
])
def test_exit_panic_and_kill_end_the_process_at_the_exact_hit(spawn, spec, status, says):
    child, progress = spawn(spec)
    _, stderr = child.communicate(timeout=GENEROUS_S)
    assert child.returncode == status
    assert f"failpoint embed.chunk_published: {says}" in stderr
    assert lines(progress) == ["0", "1"]  # no cleanup, no 'done'


def test_a_paused_process_shows_its_exact_state_and_goes_on_when_resumed(spawn, tmp_path):
    child, progress = spawn("embed.chunk_published=2*off->1*pause")
    paused = fp.wait_paused("embed.chunk_published", tmp_path, timeout=GENEROUS_S)
    assert (paused.pid, paused.hit, paused.context) == (child.pid, 3, {"chunk": 2, "published": 3})
    marker = tmp_path / f"embed.chunk_published.{child.pid}.paused"
    assert json.loads(marker.read_text()) == {"name": "embed.chunk_published", "pid": child.pid, "hit": 3,
                                              "context": {"chunk": 2, "published": 3}}
    assert lines(progress) == ["0", "1"]  # it stays paused: nothing moves until resumed
    assert child.poll() is None
    fp.resume(paused)
    child.communicate(timeout=GENEROUS_S)
    assert child.returncode == 0
    assert lines(progress) == ["0", "1", "2", "3", "4", "done"]
    assert not list(tmp_path.glob("embed.chunk_published.*"))


def test_a_paused_process_can_be_sigkilled_there(spawn, tmp_path):
    child, progress = spawn("embed.chunk_published=1*off->pause")
    paused = fp.wait_paused("embed.chunk_published", tmp_path, timeout=GENEROUS_S, pid=child.pid)
    os.kill(paused.pid, signal.SIGKILL)
    child.communicate(timeout=GENEROUS_S)
    assert child.returncode == -signal.SIGKILL
    assert lines(progress) == ["0"]


def test_a_point_that_pauses_every_hit_is_awaited_hit_by_hit(spawn, tmp_path):
    child, progress = spawn("embed.chunk_published=pause", chunks=3)
    for hit in (1, 2, 3):
        paused = fp.wait_paused("embed.chunk_published", tmp_path, timeout=GENEROUS_S)
        assert (paused.hit, lines(progress)) == (hit, [str(chunk) for chunk in range(hit - 1)])
        fp.resume(paused)
    child.communicate(timeout=GENEROUS_S)
    assert child.returncode == 0 and lines(progress)[-1] == "done"


def test_a_pause_in_a_thread_of_this_process(tmp_path):
    with fp.armed("storage.put=pause", tmp_path):
        writer = threading.Thread(target=failpoint, args=("storage.put",), kwargs={"url": "s3://b/k"}, daemon=True)
        writer.start()
        paused = fp.wait_paused("storage.put", tmp_path, timeout=GENEROUS_S)
        assert (paused.pid, paused.context) == (os.getpid(), {"url": "s3://b/k"})
        assert writer.is_alive()
        fp.resume(paused)
        writer.join(timeout=GENEROUS_S)
        assert not writer.is_alive()


def test_wait_paused_gives_up_with_one_line_when_nothing_pauses(tmp_path):
    with pytest.raises(TimeoutError, match="no process paused at failpoint storage.put"):
        fp.wait_paused("storage.put", tmp_path, timeout=0)
