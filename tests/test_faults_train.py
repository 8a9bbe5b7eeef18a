"""Training under a real fault: the worker process SIGKILLed after reporting a checkpoint that Ray Train has not
registered yet, while an earlier one is registered (not an exception raised by the loop).

Ray Train V2 registers a reported checkpoint on its controller, at the controller's next poll of the worker; a
worker that dies in between resumes from the previous *registered* checkpoint. Two failpoints make that window
exact: ``train.checkpoint_registered`` pauses the controller right after it registered epoch 1, and
``train.checkpoint_reported`` pauses the worker right after its report of epoch 2 returned (the controller, paused,
cannot pick it up). The test kills the worker there and lets the controller go: the run must restart from epoch 1
exactly, finish the configured epochs, each once in the history, and export the model. ``test_train.py`` covers an
exception raised inside the loop and re-runs.
"""

from __future__ import annotations

import pandas as pd
import pytest
from fault_log import record
from helpers import ROOT, SURVEY_OVERRIDES, await_pause, finish, kill_paused, start_driver, survey_config

from whale_dist import failpoints, storage

pytestmark = pytest.mark.slow
EPOCHS = 3  # registered 1, killed after reporting 2, the restarted worker reports 2 and 3


def test_worker_sigkilled_after_an_unregistered_checkpoint_resumes_from_the_registered_one(ray_cluster, tmp_path):
    root = str(tmp_path / "store")
    overrides = [f"train.epochs={EPOCHS}", "train.max_failures=2", "train.keep_checkpoints=3", "train.run_name=sigkill"]
    cfg = survey_config(root, *overrides)  # writes the survey; the driver trains on it with the same config
    spec = "train.checkpoint_registered=1*pause;train.checkpoint_reported=1*off->1*pause"
    folder, log = tmp_path / "failpoints", tmp_path / "driver.log"
    argv = ["train", "--config", str(ROOT / "configs" / "debug.yaml"), *SURVEY_OVERRIDES, f"root={root}", *overrides]
    driver = start_driver(argv, log, spec, folder)
    try:
        controller = await_pause("train.checkpoint_registered", folder, driver, log)
        worker = await_pause("train.checkpoint_reported", folder, driver, log)
        # the exact state: epoch 1 registered (the controller stopped right after), epoch 2 reported, not registered
        assert controller.context["epoch"] == 1 and worker.context["epoch"] == 2, (controller, worker)
        assert len({controller.pid, worker.pid, driver.pid}) == 3
        kill_paused(worker)
        failpoints.resume(controller)
        # the new worker resumes from epoch 1: its 2nd report is epoch 3 (a new process: its count starts at 0)
        restarted = await_pause("train.checkpoint_reported", folder, driver, log, exclude=(worker.pid,))
        assert restarted.context["epoch"] == 3 and restarted.pid != worker.pid
        failpoints.resume(restarted)
        status, output = finish(driver, log)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert status == 0, output[-4000:]
    history = pd.read_csv(storage.join(cfg.run_url, "metrics.csv"))
    assert list(history["epoch"]) == list(range(1, EPOCHS + 1)), history
    assert list(history["attempt_start"]) == [0, 1, 1]  # epoch 1 from the start, then the restart at 1
    assert storage.exists(storage.join(cfg.run_url, "model.pt"))
    assert f"train: {EPOCHS} epochs" in output
    record("training worker SIGKILLed after reporting an unregistered checkpoint (failpoints "
           "train.checkpoint_registered, train.checkpoint_reported)", injected=1, configured_epochs=EPOCHS,
           finished_epochs=len(history), epochs_repeated=len(history) - history["epoch"].nunique(),
           registered_epoch_at_kill=1, reported_epoch_at_kill=2, resumed_from_epoch=1)
