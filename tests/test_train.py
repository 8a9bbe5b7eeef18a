"""Training: schedule and optimiser groups, validation scoring, outputs, and real Ray Train runs (2 workers on gloo
with loopback-S3 storage; a run that loses a worker and resumes from its checkpoint)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import survey_config

from whale_dist import storage
from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.config import load_config
from whale_dist.train.loop import build_optimizer, lr_factor
from whale_dist.train.outputs import curve_png, history_csv
from whale_dist.train.validate import evaluate, evaluate_leave_one_out, leave_one_out_truths


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(step, warmup_steps=4, total_steps=20) for step in range(20)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and factors[-1] < 0.05


def test_optimizer_gives_heads_their_own_learning_rate():
    from whale_dist.model import create_model

    cfg = load_config("configs/debug.yaml", ["train.lr_backbone=0.001", "train.lr_head=0.01"])
    net = create_model(cfg, class_counts=[2, 3], n_species=1)
    optimizer = build_optimizer(net, cfg.train)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(net.encoder.backbone.stem[0].weight)] == 0.001
    assert lr_of[id(net.arcface.weight)] == lr_of[id(net.encoder.neck[0].weight)] == 0.01
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))


def test_parameters_the_forward_skips_are_frozen_for_ddp():
    from whale_dist.model import create_model
    from whale_dist.train.loop import freeze_unused

    net = create_model(load_config("configs/debug.yaml"), class_counts=[2, 3], n_species=1)
    unused = freeze_unused(net, 32)
    assert unused == ["encoder.backbone.head.norm.weight", "encoder.backbone.head.norm.bias"]
    assert not net.encoder.backbone.head.norm.weight.requires_grad and net.arcface.weight.requires_grad
    assert all(id(p) != id(net.encoder.backbone.head.norm.weight)
               for g in build_optimizer(net, load_config().train).param_groups for p in g["params"])


def test_validation_scores_known_and_new_individuals():
    gallery = np.array([[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0]], dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    result = evaluate(queries, ["a", "b", NEW_INDIVIDUAL], gallery, ["a", "b", "a"], k=3)
    assert result["map5"] == pytest.approx(1.0) and result["top1"] == pytest.approx(1.0)
    assert 0.0 < result["threshold"] <= 1.0, "the unseen query (similarity 0) needs a positive threshold"


def test_leave_one_out_never_matches_a_photo_with_itself():
    assert leave_one_out_truths(["a", "a", "b"]) == ["a", "a", NEW_INDIVIDUAL]
    # The lone "b" would find itself (similarity 1) first if self-matches were not excluded.
    embeddings = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float32)
    result = evaluate_leave_one_out(embeddings, ["a", "a", "b"], threshold=0.3, k=2)
    assert result["map5"] == pytest.approx(1.0) and result["new_top1"] == 1.0


def test_history_outputs():
    history = [{"epoch": 1, "loss": 2.0, "map5": 0.2, "top1": 0.1, "top5": 0.3, "threshold": 0.5, "version": "m1"},
               {"epoch": 2, "loss": 1.0, "map5": 0.4, "top1": 0.3, "top5": 0.5, "threshold": 0.6, "version": "m2"}]
    frame = pd.read_csv(__import__("io").StringIO(history_csv(history)))
    assert list(frame["epoch"]) == [1, 2] and list(frame["map5"]) == [0.2, 0.4]
    assert curve_png(history).startswith(b"\x89PNG")


def test_bad_config_is_one_line_before_any_work(capsys):
    from whale_dist.cli import run_job
    from whale_dist.train import main

    assert run_job(main, ["--config", "configs/debug.yaml", "train.amp=fp8"]) == 2
    assert "train.amp" in capsys.readouterr().err


def checkpoint_encoder_state(run_url: str) -> dict:
    """Encoder weights of the checkpoint that the run exported (found through the version in model.json)."""
    from whale_dist.model import load_card, state_dict_bytes, version_of
    from whale_dist.train.checkpoint import STATE, encoder_state

    version = load_card(storage.join(run_url, "model.pt")).version
    for url in storage.list_files(run_url, (STATE,)):
        state = torch.load(__import__("io").BytesIO(storage.read_bytes(url)), weights_only=True)
        encoder = encoder_state(state["model"])
        from whale_dist.model import Encoder

        probe = Encoder("test_convnext", 32, gem_p=3.0)
        probe.load_state_dict(encoder)
        if version_of(state_dict_bytes(probe)) == version:
            return encoder
    raise AssertionError(f"no checkpoint under {run_url} has version {version}")


@pytest.mark.slow
def test_two_worker_run_on_s3_reports_map5_and_checkpoint_reloads(ray_cluster, s3_bucket):
    from whale_dist.model import load_encoder
    from whale_dist.train import run_training

    cfg = survey_config(f"{s3_bucket}/store", "train.num_workers=2", "train.cpus_per_worker=1", "train.epochs=1",
                        "train.max_failures=0")
    summary = run_training(cfg)
    assert summary["epochs"] == 1 and 0.0 < summary["best_map5"] <= 1.0
    assert summary["model_url"] == f"{s3_bucket}/store/runs/debug/model.pt"
    for name in ("config.yaml", "metrics.csv", "curve.png", "model.json"):
        assert storage.exists(storage.join(cfg.run_url, name)), name
    encoder, card = load_encoder(summary["model_url"])
    assert card.version == summary["version"] and card.image_size == 32 and len(card.individuals) > 0
    reference = checkpoint_encoder_state(cfg.run_url)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.slow
def test_worker_failure_resumes_from_checkpoint_and_rerun_continues(ray_cluster, tmp_path):
    from whale_dist.train import run_training

    cfg = survey_config(str(tmp_path / "store"), "train.epochs=2", "train.max_failures=1")
    summary = run_training(cfg, fail_after_epoch=1)
    assert storage.exists(storage.join(cfg.run_url, "_injected_failure")), "the failure really happened"
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    assert [row["attempt_start"] for row in summary["history"]] == [0, 1], "restarted at epoch 2, not 1"
    rerun = survey_config(str(tmp_path / "store"), "train.epochs=3")
    history = run_training(rerun)["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3] and history[-1]["attempt_start"] == 2


class _MemoryShard:
    """A stand-in for a Ray dataset shard: fixed batches of uint8 NHWC photos."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def iter_torch_batches(self, batch_size, drop_last=False, device=None):
        for start in range(0, len(self.images) - batch_size + 1, batch_size):
            part = slice(start, start + batch_size)
            yield {"image": torch.from_numpy(self.images[part]), "label": torch.from_numpy(self.labels[part]),
                   "species": torch.zeros(batch_size, dtype=torch.long)}


def test_freeze_bn_trains_with_the_statistics_used_at_embedding_time():
    """In train mode the backbone's BatchNorm normalises with batch statistics: on a batch of lions photos the
    pretrained lite0's pooled features then have cosine 0.38 with the eval-mode ones the embedder uses.
    ``train.freeze_bn`` keeps backbone BN in eval mode (running statistics untouched) while everything trains."""
    from whale_dist.model import create_model
    from whale_dist.train.loop import train_epoch

    cfg = load_config(None, ["model.backbone=tf_efficientnet_lite0", "model.embedding_dim=8", "model.image_size=32",
                             "train.freeze_bn=true"])
    torch.manual_seed(0)
    net = create_model(cfg, class_counts=[2, 2], n_species=1)
    backbone_bn = [m for m in net.encoder.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(backbone_bn) == 49
    before = [m.running_mean.clone() for m in backbone_bn]
    neck_before = net.encoder.neck[1].running_mean.clone()
    weight_before = net.encoder.backbone.conv_stem.weight.detach().clone()
    rng = np.random.default_rng(0)
    shard = _MemoryShard(rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), np.array([0, 1] * 4))
    optimizer = build_optimizer(net, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train_epoch(net, optimizer, scheduler, scaler, shard, 4, 1.0, None, cfg.train.freeze_bn)
    assert stats["images"] == 8 and net.training and not any(m.training for m in backbone_bn)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(backbone_bn, before))
    assert not torch.equal(net.encoder.neck[1].running_mean, neck_before)  # the neck's BN still learns its stats
    assert not torch.equal(net.encoder.backbone.conv_stem.weight, weight_before)  # and the backbone still trains
