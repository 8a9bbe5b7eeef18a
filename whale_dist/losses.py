"""Sub-center ArcFace with per-class margins from class counts, plus the species head's loss.

The recipe is the Happywhale 1st place solution's (sub-center ArcFace, Deng et al. ECCV 2020, with k=2 sub-centers so
that one individual may have two looks, e.g. left and right dorsal fin), with the dynamic margins of the Google
Landmark Recognition 2020 3rd place solution (Ha et al. 2020): ``m_c = a * n_c^(-lambda) + b``, so that rare
individuals, whose few photos cannot pull a class centre into place, get a larger margin.

All angle arithmetic is done in float32 with autocast disabled: under bf16 ``cos(theta + m)`` near cos = 1 rounds to
garbage and ``sqrt(1 - cos^2)`` goes negative. Nothing here chooses a device; tensors follow their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from whale_dist.config import ConfigError


def dynamic_margins(counts: Sequence[int], a: float = 0.5, b: float = 0.05, lam: float = 0.25) -> torch.Tensor:
    """Per-class margins ``a * n_c^(-lam) + b`` (float32); a class with no photos is treated as having one."""
    n = torch.as_tensor(list(counts), dtype=torch.float32).clamp(min=1.0)
    return a * n.pow(-lam) + b


def class_margins(loss_cfg, counts: Sequence[int]) -> torch.Tensor:
    """Margins for every class from a ``LossConfig``: ``dynamic`` (from counts) or one ``fixed`` margin."""
    if loss_cfg.margin == "dynamic":
        return dynamic_margins(counts, loss_cfg.margin_a, loss_cfg.margin_b, loss_cfg.margin_lambda)
    if loss_cfg.margin == "fixed":
        return torch.full((len(counts),), float(loss_cfg.fixed_margin), dtype=torch.float32)

    raise ConfigError(f"config key 'loss.margin': expected dynamic or fixed, got {loss_cfg.margin!r}")


def arcface_logits(cosine: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor, scale: float) -> torch.Tensor:
    """``s * cos(theta + m_y)`` for the true class, ``s * cos(theta)`` for the others (float32).

    Past ``theta + m > pi`` the angle-added cosine is no longer decreasing in theta; there the usual fallback
    ``cos(theta) - m * sin(m)`` keeps it monotone (InsightFace's ``th``/``mm`` trick, as in the Happywhale code).
    """
    cosine = cosine.float().clamp(-1.0, 1.0)
    m = margins.float()[labels].unsqueeze(1)
    sine = (1.0 - cosine.pow(2)).clamp(min=0.0).sqrt()
    phi = cosine * torch.cos(m) - sine * torch.sin(m)
    phi = torch.where(cosine > torch.cos(math.pi - m), phi, cosine - torch.sin(math.pi - m) * m)
    one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
    return scale * (one_hot * phi + (1.0 - one_hot) * cosine)


class SubCenterArcFace(nn.Module):
    """Cosine similarity to the nearest of ``k`` sub-centres per class, then the additive angular margin."""

    def __init__(self, dim: int, margins: torch.Tensor, subcenters: int = 2, scale: float = 30.0):
        super().__init__()
        self.n_classes, self.k, self.scale = int(margins.numel()), int(subcenters), float(scale)
        self.weight = nn.Parameter(torch.empty(self.n_classes * self.k, dim))
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("margins", margins.detach().float().clone())

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C): max over the ``k`` sub-centres of the cosine similarity, in float32."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            sims = F.linear(F.normalize(features.float(), dim=1), F.normalize(self.weight.float(), dim=1))
        return sims.view(-1, self.n_classes, self.k).amax(dim=2)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin-applied, scaled logits (N, C) float32, ready for cross-entropy."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return arcface_logits(self.cosine(features), labels, self.margins, self.scale)


def species_loss(logits: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the auxiliary species head; photos without a species (-1) are ignored.

    A batch with no labelled species still returns a zero connected to the graph, so DDP sees a gradient for the
    head on every rank (otherwise its all-reduce would wait for a parameter that never got one).
    """
    logits = logits.float()
    if not bool((species >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, species, ignore_index=-1)
