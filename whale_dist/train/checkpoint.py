"""What a training checkpoint holds, and how the loop reports and restores it.

A checkpoint is a folder: ``state.pt`` (model, optimizer, scheduler and scaler states, the epoch counter, the metric
history, the epochs each attempt started at), ``card.json`` (a ``ModelCard``: label maps, data fingerprint, image
size, version id of these weights) and ``config.yaml`` (the resolved config). Everything in ``state.pt`` is tensors
and plain Python values, so it loads with ``torch.load(weights_only=True)``. Ray Train uploads the folder to
``{storage_path}/{run_name}/checkpoint_*`` and hands the latest one back after a worker failure or a re-run.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from typing import Any

import torch

from whale_dist.config import dump_config
from whale_dist.failpoints import failpoint

STATE = "state.pt"
CARD = "card.json"


def part_state(model_state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One module of a ``WhaleNet`` state dict (``encoder.``, ``species_head.``) under its own names."""
    return {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``Encoder`` part of a ``WhaleNet`` state dict (what gets exported and embedded with)."""
    return part_state(model_state, "encoder.")


def report_epoch(net, state: dict[str, Any], card, cfg, metrics: dict[str, Any], rank: int) -> None:
    """``ray.train.report`` from every rank; rank 0 attaches the checkpoint folder (others have the same weights)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return

    with tempfile.TemporaryDirectory(prefix="whale-ckpt-") as folder:
        torch.save({**state, "model": {k: v.detach().cpu() for k, v in net.state_dict().items()}},
                   os.path.join(folder, STATE))
        with open(os.path.join(folder, CARD), "w") as handle:
            json.dump(asdict(card), handle, indent=2, sort_keys=True)
        dump_config(cfg, folder)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    failpoint("train.checkpoint_reported", epoch=metrics["epoch"])


def registration_callbacks() -> list:
    """Ray Train controller callbacks (``RunConfig(callbacks=...)``); none changes what training does.

    ``after_report`` of a ``UserCallback`` runs on the controller after its checkpoint manager registered the
    reported checkpoint (Ray Train V2 calls the checkpoint manager first), so the ``train.checkpoint_registered``
    failpoint marks the moment from which a restart resumes from this checkpoint; a worker's own ``report`` returns
    before that (the controller picks reports up at its next poll).
    """
    import ray.train

    class CheckpointRegistered(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                failpoint("train.checkpoint_registered", epoch=metrics[0].get("epoch"), checkpoint=checkpoint.path)

    return [CheckpointRegistered()]


def load_state(checkpoint, device: torch.device | str = "cpu") -> dict[str, Any]:
    """``state.pt`` of a Ray checkpoint (local or object storage)."""
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, STATE), map_location=device, weights_only=True)


def load_checkpoint_card(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as folder, open(os.path.join(folder, CARD)) as handle:
        return json.load(handle)


def restore(net, optimizer, scheduler, scaler, device) -> dict[str, Any]:
    """Load the latest checkpoint if Ray Train has one (worker restart or re-run of the same run name).

    Returns the loop state to continue from: ``epoch`` (epochs already done), ``history``, ``starts``.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": 0, "history": [], "starts": [0]}
    state = load_state(checkpoint, device)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return {"epoch": int(state["epoch"]), "history": list(state["history"]),
            "starts": list(state["starts"]) + [int(state["epoch"])]}
