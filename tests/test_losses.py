"""Sub-center ArcFace: margins from counts, max over sub-centres, float32 under autocast, a hand computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from whale_dist.config import ConfigError, LossConfig
from whale_dist.losses import SubCenterArcFace, arcface_logits, class_margins, dynamic_margins, species_loss


def test_dynamic_margins_follow_counts():
    margins = dynamic_margins([1, 16, 81, 0], a=0.5, b=0.05, lam=0.25)
    assert margins.dtype == torch.float32
    expected = [0.55, 0.5 / 2 + 0.05, 0.5 / 3 + 0.05, 0.55]  # 0 photos counts as 1
    assert torch.allclose(margins, torch.tensor(expected), atol=1e-6)
    assert margins[0] > margins[1] > margins[2], "rarer individuals get larger margins"


def test_class_margins_fixed_and_bad_option():
    fixed = class_margins(LossConfig(margin="fixed", fixed_margin=0.3), [1, 50, 7])
    assert torch.allclose(fixed, torch.full((3,), 0.3))
    with pytest.raises(ConfigError, match="loss.margin"):
        class_margins(LossConfig(margin="adaptive"), [1])


def test_arcface_logits_match_hand_computation_on_three_classes():
    cosine = torch.tensor([[0.8, 0.3, -0.2], [-0.95, 0.1, 0.5]])
    labels = torch.tensor([0, 0])
    margins = torch.tensor([0.5, 0.2, 0.3])
    logits = arcface_logits(cosine, labels, margins, scale=10.0)
    # Row 0: true class gets cos(theta + m); others stay cos(theta).
    assert logits[0, 0].item() == pytest.approx(10 * math.cos(math.acos(0.8) + 0.5), abs=1e-5)
    assert logits[0, 1:].tolist() == pytest.approx([3.0, -2.0], abs=1e-5)
    # Row 1: theta + m > pi, so the monotone fallback cos(theta) - m * sin(m) applies.
    assert logits[1, 0].item() == pytest.approx(10 * (-0.95 - 0.5 * math.sin(0.5)), abs=1e-5)
    assert logits[1, 1:].tolist() == pytest.approx([1.0, 5.0], abs=1e-5)


def test_subcenter_takes_the_max_over_subcenters():
    head = SubCenterArcFace(dim=2, margins=torch.tensor([0.3, 0.3]), subcenters=2, scale=1.0)
    with torch.no_grad():  # class 0: sub-centres +x and +y; class 1: -x twice
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]]))
    cosine = head.cosine(torch.tensor([[0.0, 2.0], [3.0, 0.0], [-1.0, 1.0]]))
    expected = torch.tensor([[1.0, 0.0], [1.0, -1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    assert torch.allclose(cosine, expected, atol=1e-6)


def test_margin_math_stays_float32_under_autocast():
    torch.manual_seed(0)
    head = SubCenterArcFace(dim=8, margins=dynamic_margins([1, 2, 5]), subcenters=2, scale=30.0)
    features, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    reference = head(features, labels)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = head(features.bfloat16(), labels)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, reference, atol=0.3), "only the bf16 rounding of the input may differ"


def test_species_loss_ignores_unlabelled_and_stays_in_graph():
    logits = torch.randn(3, 4, requires_grad=True)
    zero = species_loss(logits, torch.tensor([-1, -1, -1]))
    assert zero.item() == 0.0
    zero.backward()
    assert logits.grad is not None
    mixed = species_loss(torch.zeros(2, 4), torch.tensor([2, -1]))
    assert mixed.item() == pytest.approx(math.log(4), abs=1e-6)


def test_class_margins_from_a_config_namespace():
    cfg = SimpleNamespace(margin="dynamic", margin_a=1.0, margin_b=0.0, margin_lambda=0.5)
    assert torch.allclose(class_margins(cfg, [4, 100]), torch.tensor([0.5, 0.1]))
