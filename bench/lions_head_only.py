"""Head-only lions check (seconds per run): the backbone frozen, its feature maps computed once, the library's
GeM + BN neck + (sub-center) ArcFace + optimiser + schedule trained on them. Isolates head-side settings (sub-centers,
margin, species head, learning rate, epochs) from backbone fine-tuning and augmentation, with many seeds.

    PYTHONPATH=. python bench/lions_head_only.py --seeds 0,1,2 loss.subcenters=1 ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from lions_harness import CACHE, frame_of, loo  # noqa: E402


def feature_maps(size: int, imagenet_norm: bool) -> dict:
    path = os.path.join(CACHE, f"maps{size}{'-imagenet' if imagenet_norm else ''}.pt")
    if os.path.exists(path):
        return torch.load(path)
    from whale_dist.config import ModelConfig
    from whale_dist.images import to_tensor_batch
    from whale_dist.model import IMAGENET_MEAN, IMAGENET_STD, create_encoder

    enc = create_encoder(ModelConfig(backbone="tf_efficientnet_lite0", embedding_dim=8,
                                     backbone_weights=os.path.join(CACHE, "tf_efficientnet_lite0.safetensors"))).eval()
    if imagenet_norm:
        enc.mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        enc.std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    arrays = np.load(os.path.join(CACHE, f"lions{size}.npz"))
    out = {}
    with torch.no_grad():
        for split in ("train", "val"):
            x = to_tensor_batch(arrays[split])
            out[split] = torch.cat([enc.backbone.forward_features((x[i:i + 64] - enc.mean) / enc.std)
                                    for i in range(0, len(x), 64)])
            out[split + "_flip"] = torch.cat([enc.backbone.forward_features((x[i:i + 64].flip(-1) - enc.mean) / enc.std)
                                              for i in range(0, len(x), 64)])
    torch.save(out, path)
    return out


def run(maps: dict, overrides: list[str], seed: int, epochs: int, all_train: bool) -> dict:
    from whale_dist import catalog
    from whale_dist.config import load_config
    from whale_dist.model import create_model
    from whale_dist.train.loop import build_optimizer, lr_factor
    from whale_dist.train.validate import evaluate

    cfg = load_config(None, ["model.backbone=tf_efficientnet_lite0", "model.embedding_dim=256", "loss.margin=fixed",
                             f"train.epochs={epochs}", f"train.seed={seed}", *overrides])
    frame = frame_of("train")
    frame["image_key"], frame["row"] = frame["image"], np.arange(len(frame))
    train, inner = (frame, frame.iloc[:0]) if all_train else catalog.split_fold(frame, 0, 5, 0)
    individuals, _ = catalog.label_maps(train)
    counts = train["individual_id"].value_counts()
    torch.manual_seed(seed)
    net = create_model(cfg, [int(counts[n]) for n in individuals], 1)
    net.encoder.backbone.forward_features = lambda x: x  # inputs are the cached feature maps
    net.encoder.mean = torch.zeros(())
    net.encoder.std = torch.ones(())
    x = maps["train"][train["row"].to_numpy()]
    y = torch.tensor([individuals[i] for i in train["individual_id"]])
    bs = cfg.train.batch_size
    steps = len(x) // bs
    opt = build_optimizer(net, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, max(1, int(cfg.train.warmup_epochs * steps)), steps * epochs))
    g = torch.Generator().manual_seed(seed)
    val_labels = list(frame_of("val")["individual_id"])
    history = []
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(steps):
            idx = order[i * bs:(i + 1) * bs]
            loss = net(x[idx], y[idx], torch.zeros(len(idx), dtype=torch.long))["loss"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            v = net.encoder(maps["val"])
            vf = torch.nn.functional.normalize(v + net.encoder(maps["val_flip"]), dim=1)
            row = {"epoch": epoch + 1, "loss": round(float(loss), 3), "val": round(loo(v.numpy(), val_labels)[0], 4),
                   "val_flip": round(loo(vf.numpy(), val_labels)[0], 4)}
            if len(inner):
                gal = net.encoder(x).numpy()
                q = net.encoder(maps["train"][inner["row"].to_numpy()]).numpy()
                row["inner"] = round(evaluate(q, list(inner["label"]), gal, list(train["individual_id"]))["map5"], 4)
        history.append(row)
    return {"last": history[-1], "chosen_by_inner": max(history, key=lambda r: (r.get("inner", 0), r["epoch"])),
            "best_val": max(history, key=lambda r: r["val"]), "history": history}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--imagenet-norm", action="store_true")
    parser.add_argument("--all-train", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    maps = feature_maps(args.size, args.imagenet_norm)
    results = [run(maps, args.overrides, int(s), args.epochs, args.all_train) for s in args.seeds.split(",")]
    if args.verbose:
        for r in results:
            print(json.dumps(r["history"]))
    mean = {k: round(float(np.mean([r[sel][k] for r in results])), 4)
            for sel in ("last",) for k in ("val", "val_flip")}
    print(json.dumps({"overrides": args.overrides, "imagenet_norm": args.imagenet_norm, "all_train": args.all_train,
                      "epochs": args.epochs, "last_mean": mean,
                      "last": [(r["last"]["val"], r["last"]["val_flip"]) for r in results],
                      "chosen_by_inner": [(r["chosen_by_inner"]["epoch"], r["chosen_by_inner"]["val"])
                                          for r in results],
                      "best_val": [(r["best_val"]["epoch"], r["best_val"]["val"]) for r in results]}), flush=True)


if __name__ == "__main__":
    main()
