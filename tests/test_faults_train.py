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
from test_faults_embed import wait_for
from test_train import survey_config

from whale_dist import storage
from whale_dist.train_checkpoint import STATE

pytestmark = pytest.mark.slow
# enough epochs after the first checkpoint that the kill always lands mid-run (3 raced the end on an idle machine)
EPOCHS = 6


def train_worker_pids() -> list[int]:
    """Pids of this cluster's live Ray Train worker actors."""
    import ray

    actors = ray._private.state.actors().values()
    return [a["Pid"] for a in actors if a["State"] == "ALIVE" and a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]


def latest_checkpoint_epoch(run_url: str) -> int:
    """The epoch counter of the newest checkpoint in the run folder (0 when none)."""
    epochs = [0]
    for url in storage.list_files(run_url, ("/" + STATE,)):
        try:
            epochs.append(int(torch.load(io.BytesIO(storage.read_bytes(url)), weights_only=True)["epoch"]))
        except Exception:  # a checkpoint being uploaded or deleted right now
            continue
    return max(epochs)


def test_worker_sigkilled_mid_epoch_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    from whale_dist.train import run_training

    cfg = survey_config(str(tmp_path / "store"), f"train.epochs={EPOCHS}", "train.max_failures=2",
                        "train.keep_checkpoints=3", "train.run_name=sigkill")
    killed: dict = {}

    def killer():
        # A checkpoint file appears in storage a moment before Ray Train registers it (report() uploads, then
        # registers): wait for the second one, so that the first is surely registered when the worker dies.
        at_epoch = wait_for(lambda: latest_checkpoint_epoch(cfg.run_url) >= 2 and latest_checkpoint_epoch(cfg.run_url),
                            900, "the second checkpoint", interval=0.2)
        if at_epoch >= EPOCHS:
            return
        pid = wait_for(train_worker_pids, 60, "a training worker")[0]
        killed["checkpoint_epoch"] = latest_checkpoint_epoch(cfg.run_url)
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
    # resumed from the last registered checkpoint, not 0: the newest file seen, or the one before it if that file
    # was still being registered when the worker died (or one written between our read and the kill)
    seen = killed["checkpoint_epoch"]
    assert len(restarts) == 1 and restarts[0] in (seen - 1, seen, seen + 1) and restarts[0] >= 1, (starts, killed)
    assert storage.exists(summary["model_url"]) and summary["epochs"] == EPOCHS
    record("training worker SIGKILLed mid-epoch", injected=1, configured_epochs=EPOCHS, finished_epochs=len(epochs),
           epochs_repeated=len(epochs) - len(set(epochs)), resumed_from_epoch=restarts[0],
           checkpoint_epoch_at_kill=killed["checkpoint_epoch"])
