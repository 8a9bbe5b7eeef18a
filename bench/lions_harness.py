"""Fast in-process lions training harness (no Ray): the library's model, loss, optimiser, schedule, augmentation
and ``train_epoch`` on photos decoded once and held in memory. For recipe checks on 1-2 CPU cores.

Reports per epoch: the internal-fold MAP@5 (what the Ray loop uses to choose the checkpoint) and lions val
leave-one-out MAP@5 (threshold never fires: every val individual has >= 4 photos, so no threshold is chosen on val;
and with the best val threshold, as bench/lions_quality.py does), each with and without flip TTA.

    PYTHONPATH=. python bench/lions_harness.py --size 128 --epochs 12 --seed 0 [key=value config overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from lions_quality import split_frame  # the lions table (bench/ is the script's folder on sys.path)

CACHE = os.environ.get("WHALE_HARNESS_CACHE", "/tmp/whale-harness")


def images_of(paths, size: int) -> np.ndarray:
    from whale_dist.images import load_photo

    return np.stack([load_photo(open(p, "rb").read(), size) for p in paths])


class MemoryShard:
    """Stands in for a Ray dataset shard: ``iter_torch_batches`` over in-memory uint8 NHWC photos, shuffled and
    augmented (the library's ``augment_batch``) afresh on each pass."""

    def __init__(self, images, labels, species, augment: bool, size: int, seed: int, colour: bool = True,
                 geometric: bool = True, flip: bool = False):
        self.images, self.labels, self.species, self.colour = images, labels, species, colour
        self.geometric, self.flip = geometric, flip
        self.augment, self.size = augment, size
        self.rng = np.random.default_rng(seed)

    def iter_torch_batches(self, batch_size: int, drop_last: bool = False, device=None):
        from whale_dist.train.data import augment_batch

        order = self.rng.permutation(len(self.images))
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            batch = {"image": self.images[idx], "label": self.labels[idx], "species": self.species[idx]}
            if self.augment:
                batch = augment_batch(batch, self.size, self.colour, self.geometric, self.flip)
            yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


@torch.no_grad()
def embed(encoder, images: np.ndarray, flip: bool = False) -> np.ndarray:
    from whale_dist.images import to_tensor_batch

    encoder.eval()
    out = []
    for i in range(0, len(images), 64):
        x = to_tensor_batch(images[i:i + 64])
        v = encoder(x)
        if flip:
            v = torch.nn.functional.normalize(v + encoder(x.flip(-1)), dim=1)
        out.append(v)
    return torch.cat(out).numpy()


def loo(embeddings, labels) -> tuple[float, float]:
    """(MAP@5 with a threshold that never fires, MAP@5 at the best threshold on these photos: an upper bound only)."""
    from whale_dist.metrics import choose_threshold
    from whale_dist.protocol import knn, leave_one_out_truths, neighbour_hits, rank_hits, score_matrix
    from whale_dist.train.validate import evaluate_leave_one_out

    fixed = evaluate_leave_one_out(embeddings, labels, threshold=-2.0)["map5"]
    scores, rows = knn(embeddings, embeddings, 51)
    ranked = rank_hits(neighbour_hits(scores, rows, labels, rows != np.arange(len(labels))[:, None]), len(labels), 5)
    return fixed, choose_threshold(leave_one_out_truths(labels), list(ranked["ids"]), score_matrix(ranked))[1]


def backbone_weights(backbone: str) -> str:
    """Offline ImageNet weights of ``backbone`` (tf_efficientnet_lite0/1/2), written once into the cache. Each
    backbone gets its own package's weights: lite1/2 differ from lite0 in depth (and lite2 in width)."""
    path = os.path.join(CACHE, f"{backbone}.safetensors")
    if not os.path.exists(path):
        from whale_dist import pretrained

        pretrained.write_efficientnet_lite_weights(path, backbone)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--all-train", action="store_true", help="train on all 594 photos (no internal fold)")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--skip-epoch0", action="store_true")
    parser.add_argument("--imagenet-norm", action="store_true", help="ImageNet mean/std whatever the backbone")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from whale_dist import catalog
    from whale_dist.config import load_config
    from whale_dist.model import create_model
    from whale_dist.train.loop import build_optimizer, freeze_unused, lr_factor, train_epoch
    from whale_dist.train.validate import evaluate

    os.makedirs(CACHE, exist_ok=True)
    weights = backbone_weights(args.backbone)
    cfg = load_config(None, [f"model.backbone={args.backbone}", f"model.backbone_weights={weights}",
                             f"model.image_size={args.size}", "model.embedding_dim=256", "train.amp=none",
                             "loss.margin=fixed", "train.lr_backbone=1e-3", "train.lr_head=1e-2",
                             f"train.epochs={args.epochs}", f"train.seed={args.seed}", *args.overrides])
    t0 = time.time()
    frame = split_frame("train")
    frame["image_key"] = frame["image"]
    cache = os.path.join(CACHE, f"lions{args.size}.npz")
    if not os.path.exists(cache):
        np.savez(cache, train=images_of(frame["image"], args.size),
                 val=images_of(split_frame("val")["image"], args.size))
    arrays = np.load(cache)
    all_train, val_images = arrays["train"], arrays["val"]
    val_labels = list(split_frame("val")["individual_id"])
    frame["row"] = np.arange(len(frame))
    if args.all_train:
        train, inner = frame, frame.iloc[:0]
    else:
        train, inner = catalog.split_fold(frame, cfg.catalogue.fold, cfg.catalogue.n_folds, cfg.catalogue.seed)
    individuals, _ = catalog.label_maps(train)
    counts = train["individual_id"].value_counts()
    train_images = all_train[train["row"].to_numpy()]
    labels = np.array([individuals[i] for i in train["individual_id"]], dtype=np.int64)
    torch.manual_seed(cfg.train.seed)
    net = create_model(cfg, [int(counts[n]) for n in individuals], 1)
    frozen = freeze_unused(net, cfg.model.image_size)
    batch_size = max(2, min(cfg.train.batch_size, len(train)))
    steps = max(1, len(train) // batch_size)
    warmup = max(1, int(cfg.train.warmup_epochs * steps))
    optimizer = build_optimizer(net, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps * cfg.train.epochs))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    shard = MemoryShard(train_images, labels, np.zeros(len(labels), np.int64), cfg.train.augment, args.size,
                        cfg.train.seed, cfg.train.augment_colour, cfg.train.augment_geometric, cfg.train.augment_flip)
    if args.imagenet_norm:  # the behaviour before the normalisation fix
        from whale_dist.model import IMAGENET_MEAN, IMAGENET_STD

        net.encoder.mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        net.encoder.std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    print(json.dumps({"norm": net.encoder.normalisation}))
    history = []

    def evaluate_now(epoch, loss):
        row = {"epoch": epoch, "loss": round(loss, 3)}
        if len(inner):
            gal = embed(net.encoder, train_images)
            row["inner"] = round(evaluate(embed(net.encoder, all_train[inner["row"].to_numpy()]),
                                          list(inner["label"]), gal, list(train["individual_id"]))["map5"], 4)
        row["val"], row["val_best_thr"] = (round(x, 4) for x in loo(embed(net.encoder, val_images), val_labels))
        row["val_flip"], _ = (round(x, 4) for x in loo(embed(net.encoder, val_images, flip=True), val_labels))
        row["s"], row["cpu_s"] = round(time.time() - t0), round(time.process_time())
        history.append(row)
        print(json.dumps(row), flush=True)

    if not args.skip_epoch0:
        evaluate_now(0, float("nan"))
    for epoch in range(cfg.train.epochs):
        stats = train_epoch(net, optimizer, scheduler, scaler, shard, batch_size, cfg.train.grad_clip, None,
                            cfg.train.freeze_bn)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            evaluate_now(epoch + 1, stats["loss"])
        else:  # the time per epoch, to size a run from its first epoch
            print(json.dumps({"epoch": epoch + 1, "loss": round(stats["loss"], 3), "s": round(time.time() - t0),
                              "cpu_s": round(time.process_time())}), flush=True)
    chosen = max([r for r in history if r["epoch"]], key=lambda r: (r.get("inner", 0), r["epoch"]))
    print(json.dumps({"summary": True, "gem_p": float(net.encoder.pool.p.detach()), "frozen": frozen,
                      "args": vars(args), "last": history[-1], "chosen_by_inner": chosen,
                      "best_val_epoch": max(history, key=lambda r: r["val"])}), flush=True)


if __name__ == "__main__":
    main()
