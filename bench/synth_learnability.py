"""Is the synthetic survey learnable?  A few CPU minutes of plain torch (no Ray) vs the raw-pixel baseline.

The survey is only a useful test bed if raw pixels fail on it while a small CNN, trained briefly, succeeds: that
gap is what says the identity cues are real and survive a 96 px input, and that the nuisances are what defeat
pixel matching. The head is a minimal normalised-softmax with an additive angular margin (ArcFace) written inline;
the production loss lives in whale_dist/losses.py. Same evaluation protocol for both: cosine k-NN over the whole
training catalogue, ``new_individual`` threshold calibrated on validation fold 0.

    .venv/bin/python bench/synth_learnability.py [--survey DIR] [--seconds 180] [--size 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from whale_dist import storage
from whale_dist.catalog import read_happywhale, split_fold
from whale_dist.config import SynthConfig
from whale_dist.identify.baselines import nearest_neighbour_scores, raw_pixel_map5, read_test_split
from whale_dist.images import load_photo, to_tensor_batch
from whale_dist.model import Encoder
from whale_dist.synth.survey import generate_survey


class ArcFaceHead(nn.Module):
    """cos(theta + m) on the target class, scaled by s: the smallest angular-margin head that trains."""

    def __init__(self, dim: int, classes: int, scale: float = 30.0, margin: float = 0.3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1 + 1e-6, 1 - 1e-6)
        target = torch.cos(torch.acos(cosine) + self.margin)
        onehot = F.one_hot(labels, cosine.shape[1]).bool()
        return F.cross_entropy(self.scale * torch.where(onehot, target, cosine), labels)


def load(urls, size: int) -> np.ndarray:
    return np.stack([load_photo(storage.read_bytes(url), size) for url in urls])


def augment(batch: torch.Tensor) -> torch.Tensor:
    """Light extra jitter (the survey already varies pose): random shift by padding + crop, and colour cast."""
    size = batch.shape[-1]
    pad = size // 8
    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    dx, dy = np.random.randint(0, 2 * pad + 1, size=2)
    out = padded[:, :, dy:dy + size, dx:dx + size]
    return (out * torch.empty(len(out), 3, 1, 1).uniform_(0.75, 1.25)).clamp(0, 1)


def train(images: np.ndarray, labels: np.ndarray, steps: int, seconds: float, margin: float,
          batch_size: int = 32) -> Encoder:
    """Train until ``steps`` optimiser steps or ``seconds`` of wall time, whichever comes first."""
    torch.manual_seed(0)
    np.random.seed(0)
    encoder = Encoder("test_convnext", 128)
    head = ArcFaceHead(128, int(labels.max()) + 1, margin=margin)
    optimiser = torch.optim.AdamW([{"params": encoder.parameters(), "lr": 2e-3},
                                   {"params": head.parameters(), "lr": 2e-2}], weight_decay=1e-4)
    tensors, targets = to_tensor_batch(images), torch.from_numpy(labels)
    start, step = time.time(), 0
    while step < steps and time.time() - start < seconds:
        encoder.train()
        for chunk in torch.randperm(len(tensors)).split(batch_size):
            if len(chunk) < 2 or step >= steps:
                continue
            loss = head(encoder.features(augment(tensors[chunk])), targets[chunk])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
        print(f"  {time.time() - start:5.0f} s  step {step}  loss {loss.item():.3f}", flush=True)
    return encoder.eval()


@torch.no_grad()
def embed(encoder: Encoder, images: np.ndarray) -> np.ndarray:
    return torch.cat([encoder(to_tensor_batch(images[i:i + 64])) for i in range(0, len(images), 64)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survey", default="", help="existing survey folder; default: generate the demo survey")
    parser.add_argument("--seconds", type=float, default=180.0, help="wall-time cap on training")
    parser.add_argument("--steps", type=int, default=300, help="step cap (about 3 min on an idle 2-core CPU)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=0.2)
    args = parser.parse_args()
    survey = args.survey or tempfile.mkdtemp(prefix="synth-bench-")
    if not args.survey:
        print(generate_survey(SynthConfig(seed=args.seed), survey))
    catalogue, queries = read_happywhale(survey, check=False), read_test_split(survey)
    print("raw pixels:", raw_pixel_map5(catalogue, queries))
    fold_train, _ = split_fold(catalogue.assign(_row=np.arange(len(catalogue))))  # calibration photos stay unseen
    names = {name: i for i, name in enumerate(sorted(set(fold_train["individual_id"])))}
    images = load(catalogue["url"], args.size)
    labels = np.array([names[i] for i in fold_train["individual_id"]])
    encoder = train(images[fold_train["_row"]], labels, args.steps, args.seconds, args.margin)
    query_vectors = embed(encoder, load(queries["url"], args.size))
    scores = nearest_neighbour_scores(embed(encoder, images), catalogue, query_vectors, list(queries["individual_id"]))
    print("trained test_convnext:", scores)


if __name__ == "__main__":
    main()
