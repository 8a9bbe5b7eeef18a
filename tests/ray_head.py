"""A real Ray head on loopback ports, started with ``ray start --head`` and stopped without ``ray stop``.

Tests that exercise the user's path (``ray job submit --working-dir .``) need a cluster with a job server, not
``ray.init()`` in the test process. The machine is shared: ``ray stop`` would kill every Ray process on the host, so
the head here owns everything it starts and stops only that:

* every port is chosen free on 127.0.0.1 (GCS, dashboard/job server, node manager, object manager, agents, metrics,
  client server) and workers bind OS-chosen ports, so two heads never collide;
* ``--temp-dir`` is a fresh short directory (Unix socket paths are limited to ~107 bytes) unique to this head;
* ``ray start --block`` runs in its own session/process group: stopping sends SIGTERM to it (its exit handler shuts
  the node down), then SIGKILL to its process group, then SIGKILL to any straggler whose command line names our
  temp dir (Ray workers carry the session dir in their arguments) — never a process of another cluster.

The head's environment is the cluster's environment: whatever ``env`` holds (e.g. the AWS endpoint and credentials,
as an instance profile would provide them on a real cluster) is inherited by job drivers and workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from whale_dist.local_s3 import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")


@dataclass
class RayHead:
    """A running head: where to reach it, and what to stop."""

    gcs_address: str
    dashboard_url: str  # the job server: ``ray job submit --address <this>``
    temp_dir: str
    process: subprocess.Popen
    env: dict = field(repr=False, default_factory=dict)  # the head's environment (may hold credentials)
    log_path: str = ""

    def client_env(self, drop: tuple[str, ...] = ()) -> dict:
        """Environment for CLI clients (``ray job ...``): auth mode as the head, without ``drop`` variables."""
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update({"RAY_AUTH_MODE": self.env.get("RAY_AUTH_MODE", "disabled"), "RAY_ADDRESS": self.dashboard_url})
        return env


def head_command(temp_dir: str, num_cpus: int, object_store_bytes: int) -> tuple[list[str], str, str]:
    """``ray start --head`` with every port chosen free on loopback; returns (argv, gcs address, dashboard url)."""
    gcs, dashboard = free_port(), free_port()
    ports = {
        "--port": gcs, "--dashboard-port": dashboard, "--node-manager-port": free_port(),
        "--object-manager-port": free_port(), "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(), "--ray-client-server-port": free_port(),
    }
    argv = [RAY_BIN, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--object-store-memory={object_store_bytes}", "--disable-usage-stats"]
    argv += [f"{flag}={port}" for flag, port in ports.items()]
    return argv, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"


def _term_with_parent() -> None:
    """In the child before exec: get SIGTERM if the test process dies (even by SIGKILL), so no head outlives it.

    ``ray start --block`` shuts its node down on SIGTERM; its children die with it (Ray's fate sharing).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _http_json(url: str, payload: dict | None = None) -> dict | None:
    """GET (or POST ``payload``) and decode JSON; None when the server is not (yet) answering."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _accepts_jobs(dashboard_url: str) -> bool:
    """Run a no-op job (shell ``true``) to completion: the job server *and* the node's job agent are up.

    The dashboard answers before the raylet's agent registers; a submission in between fails with "No available
    agent to submit job", so readiness is proven the way it is used.
    """
    if _http_json(f"{dashboard_url}/api/version") is None:
        return False
    submitted = _http_json(f"{dashboard_url}/api/jobs/", {"entrypoint": "true"})
    if not submitted or "submission_id" not in submitted:
        return False
    for _ in range(60):
        info = _http_json(f"{dashboard_url}/api/jobs/{submitted['submission_id']}") or {}
        if info.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info["status"] == "SUCCEEDED"
        time.sleep(1.0)
    return False


def start_head(env: dict | None = None, num_cpus: int = 4, object_store_bytes: int = 512 * 1024**2,
               timeout_s: float = 180.0, attempts: int = 3) -> RayHead:
    """Start a head and wait until it runs jobs; on a busy machine try again (fresh ports and temp dir).

    ``ray start`` gives the raylet a fixed 30 s to register with the GCS; on an overloaded shared machine that can
    pass, and a port chosen free may be taken before Ray binds it. Both are worth a fresh attempt, not a failure.
    """
    errors = []
    for _ in range(attempts):
        try:
            return _start_once(env, num_cpus, object_store_bytes, timeout_s)
        except RuntimeError as exc:
            errors.append(str(exc))
    raise RuntimeError(f"Ray head did not start in {attempts} attempts; last:\n{errors[-1]}")


def _start_once(env: dict | None, num_cpus: int, object_store_bytes: int, timeout_s: float) -> RayHead:
    temp_dir = tempfile.mkdtemp(prefix="wdray-", dir="/tmp")
    argv, gcs_address, dashboard_url = head_command(temp_dir, num_cpus, object_store_bytes)
    head_env = {k: v for k, v in (os.environ if env is None else env).items() if k != "RAY_ADDRESS"}
    head_env.setdefault("RAY_AUTH_MODE", "disabled")
    head_env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray turns --node-ip-address=127.0.0.1 into the host's routable IP unless "cluster mode" is off; off, every
    # component (GCS, raylet, drivers, workers) advertises and dials 127.0.0.1 only.
    head_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # The raylet aborts when its dashboard agent (a Python process) has not written its port file in time; on a
    # loaded machine importing the agent alone can take longer than the default.
    head_env.setdefault("RAY_agent_register_timeout_ms", "180000")
    log_path = os.path.join(temp_dir, "ray-start.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_term_with_parent)
    head = RayHead(gcs_address, dashboard_url, temp_dir, process, head_env, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _accepts_jobs(dashboard_url):
            return head
        time.sleep(1.0)
    log_text = diagnose(head)
    stop_head(head)
    raise RuntimeError(f"Ray head did not become ready (exit {process.returncode}):\n{log_text}")


def diagnose(head: RayHead) -> str:
    """Why a head may have gone: ``ray start``'s log, Ray's process-exit log and the raylet's fatal lines."""
    found = {name: os.path.join(folder, name) for folder, _, names in os.walk(head.temp_dir) for name in names
             if name in ("ray_process_exit.log", "raylet.out")}
    fatal = [line for line in _tail(found.get("raylet.out", ""), 100_000).splitlines() if "] (raylet) " in line
             and (" C " in line[:40] or " E " in line[:40])]
    state = "running" if head.process.poll() is None else f"exited with {head.process.returncode}"
    return "\n".join([f"ray start --head: {state}", _tail(head.log_path), _tail(found.get("ray_process_exit.log", "")),
                      *fatal[-5:]])


def _tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()[-chars:]
    except OSError:
        return ""


def _pids_naming(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (our unique temp dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_head(head: RayHead, grace_s: float = 3.0, keep_temp: bool = False) -> None:
    """Stop exactly the processes of this head: graceful first (`ray start --block` seldom ends within the grace
    anyway; nothing of a test head needs saving), then by process group, then by temp-dir marker."""
    pgid = head.process.pid  # start_new_session: the group id is the leader's pid
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(pgid, signal.SIGKILL)
    if head.process.poll() is None:
        head.process.wait(timeout=10)
    for pid in _pids_naming(head.temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if not keep_temp:
        shutil.rmtree(head.temp_dir, ignore_errors=True)


@contextmanager
def ray_head(env: dict | None = None, **kwargs):
    """``with ray_head(env) as head:`` — a head for the block, stopped (only it) on the way out."""
    head = start_head(env, **kwargs)
    try:
        yield head
    finally:
        stop_head(head)


AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
JOB_TIMEOUT_S = 600


def job_cli(head: RayHead, *args: str) -> str:
    """``ray job <args>`` against ``head`` from the repository root, without any storage credential."""
    result = subprocess.run([RAY_BIN, "job", *args, "--address", head.dashboard_url], cwd=REPO, text=True,
                            capture_output=True, env=head.client_env(drop=AWS_VARS), timeout=120)
    return result.stdout + result.stderr


def submit_job(head: RayHead, name: str, job: list[str], transcript: list[str]) -> str:
    """The documented submit line, ``ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- python
    <job>``, from the repository root and without any storage credential (the cluster's environment has them);
    waited for, and required to succeed. Returns the job's log as ``submit`` printed it (it follows the log to the
    end, then prints the status: one CLI start per job, each costs seconds of a 2-core machine)."""
    submission_id = f"wd-{name}-{uuid.uuid4().hex[:6]}"
    argv = [RAY_BIN, "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
            "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", "--", "python", *job]
    try:
        result = subprocess.run(argv, cwd=REPO, text=True, capture_output=True, env=head.client_env(drop=AWS_VARS),
                                timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job_cli(head, "stop", submission_id)
        raise AssertionError(f"job {name} did not finish in {JOB_TIMEOUT_S} s:\n"
                             f"{job_cli(head, 'logs', submission_id)[-6000:]}") from None
    output = result.stdout + result.stderr
    transcript.append(output)
    assert result.returncode == 0 and f"Job '{submission_id}' succeeded" in output, (
        f"job {name} failed:\n{output[-8000:]}\n{job_cli(head, 'status', submission_id)}\n{diagnose(head)}")
    return output
