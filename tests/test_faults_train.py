"""Training under a real fault: the worker process SIGKILLed mid-epoch (not an exception raised by the loop).

Ray Train must notice the dead worker, start a new one from the latest checkpoint and finish the configured number of
epochs: the history holds every epoch exactly once and the restart begins at the epoch of the last checkpoint that
existed when the worker died (not at zero). ``test_train.py`` covers an exception raised inside the loop and re-runs.
"""

from __future__ import annotations

import io
import os
import signal
import threading

import pytest
import torch
from fault_log import record
from test_faults_embed import process_title, wait_for
from test_train import survey_config

from whale_dist import storage
from whale_dist.train.checkpoint import STATE

pytestmark = pytest.mark.slow
# enough epochs after the first registered checkpoint that the kill always lands mid-run: an idle machine runs an
# epoch of the tiny model in ~0.7 s, and Ray Train registered checkpoints more than 1 s after their files appeared
EPOCHS = 10


def train_worker_pids() -> list[int]:
    """Pids of this cluster's live Ray Train worker actors, checked against the process title.

    The GCS table alone once named a pid that was by then an embedder actor of an earlier test (a CI run killed that
    instead of the training worker), so a pid counts only while its process is titled ``ray::RayTrainWorker...``.
    """
    import ray

    actors = ray._private.state.actors().values()
    pids = [a["Pid"] for a in actors if a["State"] == "ALIVE" and a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]
    return [pid for pid in pids if process_title(pid).startswith("ray::RayTrainWorker")]


def latest_checkpoint_epoch(run_url: str) -> int:
    """The epoch counter of the newest checkpoint in the run folder (0 when none)."""
    epochs = [0]
    for url in storage.list_files(run_url, ("/" + STATE,)):
        try:
            epochs.append(int(torch.load(io.BytesIO(storage.read_bytes(url)), weights_only=True)["epoch"]))
        except Exception:  # a checkpoint being uploaded or deleted right now
            continue
    return max(epochs)


def registered_epoch(run_url: str) -> int:
    """The newest checkpoint epoch Ray Train's controller has registered, from the snapshot it keeps in the run
    folder; 0 when none. Only a registered checkpoint is what a restarted worker group resumes from."""
    try:
        snapshot = storage.read_json(storage.join(run_url, "checkpoint_manager_snapshot.json"))
    except Exception:  # not written yet, or being rewritten right now
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("epoch", 0))


def test_worker_sigkilled_mid_epoch_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    from whale_dist.train import run_training

    cfg = survey_config(str(tmp_path / "store"), f"train.epochs={EPOCHS}", "train.max_failures=2",
                        "train.keep_checkpoints=3", "train.run_name=sigkill")
    killed: dict = {}

    def killer():
        # A checkpoint file appears in storage before Ray Train registers it (report() uploads, the controller
        # registers it at its next poll); a kill in between resumes from the previous registered one, or from 0.
        # In a CI run two files appeared and neither was registered when the worker died 0.3 s later, so the kill
        # now waits for the controller's own record of a registered checkpoint.
        wait_for(lambda: registered_epoch(cfg.run_url), 900, "a registered checkpoint", interval=0.2)
        registered, at_epoch = registered_epoch(cfg.run_url), latest_checkpoint_epoch(cfg.run_url)
        if at_epoch >= EPOCHS:
            return
        pid = wait_for(train_worker_pids, 60, "a training worker")[0]
        killed.update(registered_epoch=registered, checkpoint_epoch=latest_checkpoint_epoch(cfg.run_url))
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run_training(cfg)
    thread.join(timeout=60)
    assert "pid" in killed, "the worker was never killed: training finished before a checkpoint was seen"
    epochs = [row["epoch"] for row in summary["history"]]
    starts = [row["attempt_start"] for row in summary["history"]]
    assert epochs == list(range(1, EPOCHS + 1)), summary["history"]
    restarts = sorted(set(starts) - {0})
    # resumed from the registered checkpoint seen before the kill, or a newer one registered in between; never 0
    assert len(restarts) == 1, (starts, killed)
    assert 1 <= killed["registered_epoch"] <= restarts[0] <= killed["checkpoint_epoch"] + 1, (starts, killed)
    assert storage.exists(summary["model_url"]) and summary["epochs"] == EPOCHS
    record("training worker SIGKILLed mid-epoch", injected=1, configured_epochs=EPOCHS, finished_epochs=len(epochs),
           epochs_repeated=len(epochs) - len(set(epochs)), resumed_from_epoch=restarts[0],
           checkpoint_epoch_at_kill=killed["checkpoint_epoch"], registered_epoch_at_kill=killed["registered_epoch"])
