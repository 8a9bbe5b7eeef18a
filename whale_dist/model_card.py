"""``model.json``: what an exported model is (backbone, sizes, version, label maps, normalisation), readable
without torch.

Job drivers (embed, nightly, identify, index) only need the card -- the model's version, whether it matches the
catalogue's -- while the network itself runs in Ray workers. Keeping the card apart from ``whale_dist.model`` keeps
``import torch`` (~1.5 s of CPU here) out of every driver's start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from whale_dist import storage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelCard:
    """What ``model.json`` holds: enough to rebuild the encoder and to know what it was trained on."""

    backbone: str
    embedding_dim: int
    image_size: int
    gem_p: float = 3.0
    version: str = ""
    individuals: dict[str, int] = field(default_factory=dict)
    species: dict[str, int] = field(default_factory=dict)
    data_fingerprint: str = ""
    run_name: str = ""
    # Individuals training left out for calibrate to hold out as never seen (train.hold_out_new); None: the run
    # recorded none (a model from before this field, or hold_out_new=false), and calibrate picks its own.
    held_out: list[str] | None = None
    # Input normalisation the encoder was trained with. Cards written before this field existed always used
    # ImageNet's (it was hard-coded), so that is the default when a card lacks it.
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Backbone feature levels pooled beside the top (``ModelConfig.neck_levels``); [] = the top alone, which is
    # what every card written before this field describes.
    neck_levels: list[int] = field(default_factory=list)


def card_url(model_url: str) -> str:
    """``model.json`` beside ``model.pt`` (or ``<url>.json`` for a URL without the suffix)."""
    return model_url[: -len(".pt")] + ".json" if model_url.endswith(".pt") else model_url + ".json"


def load_card(model_url: str) -> ModelCard:
    return ModelCard(**storage.read_json(card_url(model_url)))
