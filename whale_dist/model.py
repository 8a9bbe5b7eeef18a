"""Embedding network: any timm backbone -> GeM pooling -> BatchNorm neck -> L2-normalised embedding.

GeM + BN neck is the Happywhale 1st place recipe (and the standard re-identification neck, Luo et al. 2019 "Bag of
Tricks"); ``neck_levels`` optionally pools earlier backbone stages beside the top (a multi-level neck). The network
takes float images in [0, 1] and normalises them itself, so every caller (training, the embedder, identification, a
GPU check) feeds the same thing. The exported form is a plain state dict (``model.pt``,
loadable with ``torch.load(weights_only=True)``) plus ``model.json`` describing how to rebuild it.

The species head reads the embedding itself (not the pre-normalisation neck output), so identification applies it to
the query embeddings it already stored, with no second pass over the photos; ``model.pt`` carries it under
``species_head.*`` beside the encoder's weights, its class names are the card's ``species``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from whale_dist import storage
from whale_dist.losses import SubCenterArcFace, class_margins, species_loss
from whale_dist.model_card import IMAGENET_MEAN, IMAGENET_STD, ModelCard, card_url, load_card

SPECIES_PREFIX = "species_head."  # keys of the species head in model.pt; the rest is the encoder


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018) with a learnable exponent."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.float().clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / self.p)


def backbone_normalisation(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's pretrained weights expect, from timm's ``pretrained_cfg`` (ImageNet's if unset).

    They differ between families: ``tf_efficientnet_lite*`` (TF ports) expect mean = std = 0.5, ConvNeXt ImageNet's.
    """
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class Encoder(nn.Module):
    """Image batch (N, 3, H, W) in [0, 1] -> L2-normalised embeddings (N, D).

    ``mean``/``std`` normalise the input; None = what the backbone's pretrained weights expect (timm's
    ``pretrained_cfg``). An exported encoder is rebuilt with the values recorded in its ``ModelCard``.
    """

    def __init__(self, backbone: str, embedding_dim: int, pretrained: bool = False, gem_p: float = 3.0,
                 drop_path_rate: float = 0.0, mean=None, std=None, neck_levels=()):
        super().__init__()
        import timm

        kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, global_pool="", **kwargs)
        self.pool = GeM(gem_p)
        self.neck_levels = sorted({int(i) for i in neck_levels})
        self.level_pools = nn.ModuleList(GeM(gem_p) for _ in self.neck_levels)
        width = self.backbone.num_features + sum(self.backbone.feature_info[i]["num_chs"] for i in self.neck_levels)
        self.neck = nn.Sequential(nn.Linear(width, embedding_dim, bias=False),
                                  nn.BatchNorm1d(embedding_dim))
        default_mean, default_std = backbone_normalisation(self.backbone)
        self.register_buffer("mean", torch.tensor(mean or default_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or default_std).view(1, 3, 1, 1), persistent=False)

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) as plain floats, for the ``ModelCard``."""
        return tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())

    def nchw(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The top feature map channels-first: some timm families (e.g. some ConvNeXt ports) return NHWC."""
        if feature_map.ndim == 4 and getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":
            return feature_map.permute(0, 3, 1, 2)
        return feature_map

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """GeM of the top feature map; with ``neck_levels``, concatenated with GeM of those earlier stages.

        Early stages keep the texture and colour statistics that the top loses (untrained lite0 on lions: 0.35-0.37
        MAP@5 from stages 0-2, 0.21 from the top). Each level is L2-normalised so that at initialisation each has
        the same share of the neck's projection, however few channels it has (16-40 against ~1280 at the top).
        """
        x = (images - self.mean) / self.std
        if not self.neck_levels:
            return self.pool(self.nchw(self.backbone.forward_features(x)))
        top, levels = self.backbone.forward_intermediates(x, indices=self.neck_levels)
        parts = [self.pool(self.nchw(top))] + [pool(level) for pool, level in zip(self.level_pools, levels)]
        return torch.cat([F.normalize(part, dim=1) for part in parts], dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised neck output, what the ArcFace head sees before its own normalisation."""
        return self.neck(self.pooled(images).to(self.neck[0].weight.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(images).float(), dim=1)


def create_encoder(model_cfg) -> Encoder:
    """An ``Encoder`` from a ``ModelConfig``; ``backbone_weights`` (URL) loads backbone weights without a hub."""
    encoder = Encoder(model_cfg.backbone, model_cfg.embedding_dim, pretrained=model_cfg.pretrained,
                      gem_p=model_cfg.gem_p, drop_path_rate=model_cfg.drop_path_rate,
                      neck_levels=model_cfg.neck_levels)
    if model_cfg.backbone_weights:
        load_backbone_weights(encoder.backbone, model_cfg.backbone_weights)
    return encoder


class SpeciesHead(nn.Linear):
    """Species logits from the L2-normalised embedding, scaled by sqrt(D) on the way in: the BN neck's output (what
    the head read before it read the embedding) has about unit variance per dimension, so this keeps the head's
    learning speed, which a unit-length input would cut by sqrt(D). Training and ``predict_species`` share it."""

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return super().forward(embedding * self.in_features ** 0.5)


class WhaleNet(nn.Module):
    """Encoder + sub-center ArcFace head + species head in one module, so DDP wraps (and syncs) all of them.

    ``forward`` returns the training loss and its parts; the encoder and the species head are what gets exported.
    """

    def __init__(self, encoder: Encoder, arcface: nn.Module, n_species: int, species_weight: float = 0.1):
        super().__init__()
        self.encoder, self.arcface = encoder, arcface
        self.species_head = SpeciesHead(encoder.neck[1].num_features, max(int(n_species), 1))
        self.species_weight = float(species_weight)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, species: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder.features(images)
        arc = F.cross_entropy(self.arcface(features, labels), labels)
        spc = species_loss(self.species_head(F.normalize(features.float(), dim=1)), species)
        return {"loss": arc + self.species_weight * spc, "arcface": arc.detach(), "species": spc.detach()}


def create_model(cfg, class_counts: list[int], n_species: int) -> WhaleNet:
    """The training module from a ``Config``: ``create_encoder(cfg.model)`` + heads sized by the training data."""

    encoder = create_encoder(cfg.model)
    arcface = SubCenterArcFace(cfg.model.embedding_dim, class_margins(cfg.loss, class_counts),
                               subcenters=cfg.loss.subcenters, scale=cfg.loss.scale)
    return WhaleNet(encoder, arcface, n_species, cfg.loss.species_weight)


def load_backbone_weights(backbone: nn.Module, url: str) -> None:
    """Load a state dict (``.pt``/``.pth``) or safetensors file from any storage URL into a timm backbone.

    Classifier weights are dropped (we replace the head); any other missing or unexpected key is an error, since a
    silently half-loaded backbone trains to a worse model with no visible failure.
    """

    data = storage.read_bytes(url)
    if url.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    classifier_names = ("classifier.", "head.fc.", "fc.", "head.")
    state = {k: v for k, v in state.items() if not k.startswith(classifier_names)}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier_names)]
    if missing or unexpected:
        raise ValueError(f"backbone weights {url} do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")


def state_dict_bytes(encoder: Encoder) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, buffer)
    return buffer.getvalue()


def version_of(weights: bytes) -> str:
    """A model version id derived from the weights: same weights, same version, whatever the run."""
    return "m" + hashlib.sha256(weights).hexdigest()[:12]


def export_encoder(encoder: Encoder, card: ModelCard, model_url: str,
                   species_head: dict[str, torch.Tensor] | None = None) -> ModelCard:
    """Write ``model.pt`` (state dict) then ``model.json`` (the card, which names the version) beside it.

    ``species_head`` (its state dict) goes into ``model.pt`` when it has one output per ``card.species``. The version
    names the encoder's weights alone: embeddings depend on nothing else, so the head never re-keys a store.
    """
    weights = state_dict_bytes(encoder)
    card.version = version_of(weights)
    card.mean, card.std = encoder.normalisation  # the card describes how to feed this encoder
    card.neck_levels = list(encoder.neck_levels)  # ... and how to rebuild its neck
    if species_head and card.species and len(species_head["bias"]) == len(card.species):
        state = torch.load(io.BytesIO(weights), weights_only=True)
        state.update({SPECIES_PREFIX + k: v.detach().cpu() for k, v in species_head.items()})
        buffer = io.BytesIO()
        torch.save(state, buffer)
        weights = buffer.getvalue()
    storage.write_bytes(model_url, weights)
    storage.write_text(card_url(model_url), json.dumps(asdict(card), indent=2, sort_keys=True))
    return card


def encoder_from_card(card: ModelCard) -> Encoder:
    """The (untrained) encoder a card describes; export and reload both rebuild it here, so they cannot drift."""
    return Encoder(card.backbone, card.embedding_dim, pretrained=False, gem_p=card.gem_p, mean=card.mean,
                   std=card.std, neck_levels=card.neck_levels)


def load_encoder(model_url: str, device: str | torch.device = "cpu") -> tuple[Encoder, ModelCard]:
    """Rebuild the encoder from ``model.json`` and load ``model.pt`` without executing code (weights_only)."""
    card = load_card(model_url)
    encoder = encoder_from_card(card)
    state = read_model_state(model_url)
    encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith(SPECIES_PREFIX)})
    return encoder.to(device).eval(), card


def read_model_state(model_url: str) -> dict[str, torch.Tensor]:
    """``model.pt`` as tensors, without executing code (weights_only)."""
    return torch.load(io.BytesIO(storage.read_bytes(model_url)), map_location="cpu", weights_only=True)


def predict_species(model_url: str, embeddings: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(species, probability) of each embedding from the exported species head: softmax of its logits, arg max.

    A model exported without a head (before heads were exported, or trained without species) gives ``""`` and NaN.
    """
    card, state = load_card(model_url), read_model_state(model_url)
    weight, bias = state.get(SPECIES_PREFIX + "weight"), state.get(SPECIES_PREFIX + "bias")
    if weight is None or bias is None or not len(embeddings):
        return [""] * len(embeddings), np.full(len(embeddings), np.nan)
    names = sorted(card.species, key=card.species.get)
    head = SpeciesHead(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    with torch.no_grad():
        best, index = head(torch.as_tensor(np.asarray(embeddings, np.float32))).softmax(1).max(dim=1)
    return [names[i] for i in index.tolist()], best.numpy().astype(np.float64)
