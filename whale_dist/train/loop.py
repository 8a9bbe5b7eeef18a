"""The per-worker training loop that ``TorchTrainer`` runs: epochs of ArcFace training, validation, a checkpoint.

Optimiser and schedule follow the Happywhale 1st place recipe: AdamW with the head's learning rate about 10x the
backbone's (the heads start from random while the backbone may be pretrained), linear warmup then cosine decay,
stepped per batch. AMP only on GPU (bf16, or fp16 with a GradScaler); CPU runs in float32.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from whale_dist import storage
from whale_dist.model import create_model, state_dict_bytes, version_of
from whale_dist.progress import epoch_line
from whale_dist.train.checkpoint import report_epoch, restore
from whale_dist.train.validate import evaluate


def build_optimizer(net, train_cfg) -> torch.optim.Optimizer:
    """Two learning rates (backbone, heads); no weight decay on 1-D parameters (norms, biases, GeM p)."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        part = "backbone" if name.startswith("encoder.backbone.") else "head"
        groups.setdefault((part, param.ndim <= 1), []).append(param)
    lrs = {"backbone": train_cfg.lr_backbone, "head": train_cfg.lr_head}
    return torch.optim.AdamW([
        {"params": params, "lr": lrs[part], "weight_decay": 0.0 if flat else train_cfg.weight_decay}
        for (part, flat), params in sorted(groups.items())
    ])


def freeze_unused(net, image_size: int) -> list[str]:
    """Stop gradients for parameters the forward pass never uses (e.g. a timm classifier-head norm that
    ``forward_features`` skips): DDP otherwise aborts waiting for their gradients, and ``find_unused_parameters``
    would cost a graph traversal every step. Found with one probe forward/backward on a copy of the model."""
    import copy

    probe = copy.deepcopy(net).train()
    size = min(image_size, 64)
    out = probe(torch.rand(2, 3, size, size), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    out["loss"].backward()
    unused = [name for name, param in probe.named_parameters() if param.requires_grad and param.grad is None]
    for name, param in net.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    return unused


def lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.01) -> float:
    """Linear warmup to 1, then cosine down to ``floor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_dtype(train_cfg, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or train_cfg.amp == "none":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[train_cfg.amp]


def freeze_batchnorm(module) -> int:
    """Put the backbone's BatchNorm layers in eval mode: they normalise with their (pretrained) running statistics,
    as at embedding time, instead of the batch's. Returns how many layers. Their affine weights still train."""
    frozen = 0
    for name, layer in module.named_modules():
        if ".backbone." in f".{name}." and isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.eval()
            frozen += 1
    return frozen


def train_epoch(model, optimizer, scheduler, scaler, shard, batch_size: int, grad_clip: float, amp,
                freeze_bn: bool = False) -> dict:
    """One pass over this worker's shard; returns the mean loss, images seen, images/s and the data wait.

    ``data_wait_s`` is the time the step spent waiting for its next batch: near 0 means the model is the limit,
    a large share of the epoch means the input pipeline is (add CPUs for decoding, or lower ``train.augment``).
    """
    model.train()
    if freeze_bn:
        freeze_batchnorm(model)
    device = next(model.parameters()).device
    losses, images_seen, waited, start = [], 0, 0.0, time.perf_counter()
    batches = iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device))
    while True:
        asked = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        images = batch["image"].permute(0, 3, 1, 2).float().div_(255.0)
        with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(images, batch["label"], batch["species"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(optimizer)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(out["loss"].detach())  # no .item() per step: that would sync the GPU every step
        images_seen += len(images)
    seconds = time.perf_counter() - start
    return {"loss": float(torch.stack(losses).float().mean()) if losses else float("nan"), "images": images_seen,
            "images_per_s": images_seen / max(seconds, 1e-9), "data_wait_s": waited, "seconds": seconds}


@torch.no_grad()
def embed_shard(encoder, shard, batch_size: int, amp) -> tuple[np.ndarray, np.ndarray]:
    """(rows, embeddings) of this worker's part of a dataset, with the encoder in eval mode."""
    encoder.eval()
    device = next(encoder.parameters()).device
    rows, embeddings = [np.zeros(0, np.int64)], [np.zeros((0, encoder.neck[1].num_features), np.float32)]
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        images = batch["image"].permute(0, 3, 1, 2).float().div_(255.0)
        with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
            embeddings.append(encoder(images).float().cpu().numpy())
        rows.append(batch["row"].cpu().numpy())
    return np.concatenate(rows), np.concatenate(embeddings)


def gather_rows(rows: np.ndarray, embeddings: np.ndarray, world_size: int) -> np.ndarray:
    """All workers' embeddings in row order (every worker embedded a different split)."""
    parts = [(rows, embeddings)]
    if world_size > 1:
        import torch.distributed as dist

        parts = [None] * world_size
        dist.all_gather_object(parts, (rows, embeddings))
    all_rows = np.concatenate([p[0] for p in parts])
    all_emb = np.concatenate([p[1] for p in parts])
    return all_emb[np.argsort(all_rows, kind="stable")], np.sort(all_rows)


def validate(encoder, config: dict, batch_size: int, amp, world_size: int) -> dict[str, float]:
    """Embed gallery and val (split over workers), gather, kNN MAP@5 on every rank (cheap next to embedding)."""
    import ray.train

    gallery, g_rows = gather_rows(*embed_shard(encoder, ray.train.get_dataset_shard("gallery"), batch_size, amp),
                                  world_size)
    val, v_rows = gather_rows(*embed_shard(encoder, ray.train.get_dataset_shard("val"), batch_size, amp), world_size)
    g_labels = [config["gallery_labels"][i] for i in g_rows]
    v_labels = [config["val_labels"][i] for i in v_rows]
    cfg = config["cfg"]
    return evaluate(val, v_labels, gallery, g_labels, k=cfg.train.val_knn, new_fraction=cfg.catalogue.new_fraction)


def maybe_fail(config: dict, epochs_done: int, rank: int) -> None:
    """Test hook: fail once, after ``fail_after_epoch`` epochs, to exercise Ray Train's restart from a checkpoint."""

    marker = config.get("fail_marker")
    if rank != 0 or config.get("fail_after_epoch") != epochs_done or not marker or storage.exists(marker):
        return
    storage.write_text(marker, f"failed after epoch {epochs_done}\n")
    raise RuntimeError(f"injected worker failure after epoch {epochs_done}")


def print_epoch(rank: int, epoch: int, epochs: int, stats: dict, world: int, map5, since: tuple[float, int]) -> None:
    """Rank 0's line per epoch (``progress.epoch_line``): Ray forwards a worker's stdout to the driver
    (``log_to_driver``), so whoever started the run sees it between start and end. ETA from this attempt's epochs.

    Written to ``sys.__stdout__``: Ray Train V2 patches ``print`` to go both to the wrapped stdout and to its logger,
    which shows every line twice on the driver."""
    import sys

    if rank != 0:
        return
    per_epoch = (time.perf_counter() - since[0]) / max(1, epoch - since[1])
    print(epoch_line(epoch, epochs, stats["loss"], stats["images_per_s"] * world, map5, per_epoch * (epochs - epoch)),
          file=sys.__stdout__ or sys.stdout, flush=True)


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: build, restore, then epochs of train -> validate -> report with checkpoint (a final
    fit has no fold to validate on: its checkpoints carry the loss alone)."""
    import ray.train
    import ray.train.torch

    cfg, card = config["cfg"], config["card"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    if cfg.train.torch_threads > 0:
        torch.set_num_threads(cfg.train.torch_threads)
    net = create_model(cfg, config["class_counts"], config["n_species"])
    card.mean, card.std = net.encoder.normalisation  # the checkpoint's card rebuilds the encoder the same way
    freeze_unused(net, cfg.model.image_size)
    if cfg.train.sync_bn and world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(device)
    batch_size = max(2, min(cfg.train.batch_size, config["n_train"] // world))
    steps = max(1, config["n_train"] // (batch_size * world))
    warmup = max(1, int(cfg.train.warmup_epochs * steps))
    optimizer = build_optimizer(net, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, steps * cfg.train.epochs))
    amp = autocast_dtype(cfg.train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    state = restore(net, optimizer, scheduler, scaler, device)
    model = ray.train.torch.prepare_model(net)
    shard = ray.train.get_dataset_shard("train")
    started, first = time.perf_counter(), state["epoch"]
    for epoch in range(state["epoch"], cfg.train.epochs):
        stats = train_epoch(model, optimizer, scheduler, scaler, shard, batch_size, cfg.train.grad_clip, amp,
                            cfg.train.freeze_bn)
        if (epoch + 1) % max(1, cfg.train.val_every) and epoch + 1 < cfg.train.epochs:
            print_epoch(rank, epoch + 1, cfg.train.epochs, stats, world, None, (started, first))
            continue  # no validation, so no checkpoint: a restart repeats at most val_every - 1 epochs
        scores = {} if cfg.train.final_fit else validate(net.encoder, config, batch_size, amp, world)
        print_epoch(rank, epoch + 1, cfg.train.epochs, stats, world, scores.get("map5"), (started, first))
        card.version = version_of(state_dict_bytes(net.encoder))
        metrics = {"epoch": epoch + 1, **scores, "loss": stats["loss"], "images_per_s": stats["images_per_s"] * world,
                   "data_wait_share": round(stats["data_wait_s"] / max(stats["seconds"], 1e-9), 3),
                   "lr_backbone": optimizer.param_groups[0]["lr"], "version": card.version, "attempt_start":
                   state["starts"][-1]}
        state["history"].append(metrics)
        state.update(epoch=epoch + 1, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict())
        report_epoch(net, state, card, cfg, metrics, rank)
        maybe_fail(config, epoch + 1, rank)
