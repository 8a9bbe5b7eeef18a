"""The multi-level neck (``model.neck_levels``): off by default (today's encoder exactly), exported and reloaded
from its card to the same embeddings, and trained end to end."""

from __future__ import annotations

import json

import torch

from whale_dist.config import load_config
from whale_dist.model import ModelCard, create_encoder, create_model, export_encoder, load_card, load_encoder


def tiny_model_config(*overrides: str):
    return load_config(None, ["model.backbone=test_convnext", "model.embedding_dim=16", "model.image_size=32",
                              *overrides]).model


def test_default_neck_is_the_top_alone():
    """No level modules, no new state-dict keys, and the embedding is GeM(top) -> neck as before the option."""
    torch.manual_seed(0)
    encoder = create_encoder(tiny_model_config()).eval()
    assert encoder.neck_levels == [] and not any(k.startswith("level_pools") for k in encoder.state_dict())
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        top = encoder.backbone.forward_features((images - encoder.mean) / encoder.std)
        expected = torch.nn.functional.normalize(encoder.neck(encoder.pool(top)), dim=1)
        assert torch.equal(encoder(images), expected)


def test_neck_levels_export_and_reload_to_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder(tiny_model_config("model.neck_levels=[1,0]")).eval()
    assert encoder.neck_levels == [0, 1]
    assert encoder.neck[0].in_features == encoder.backbone.num_features + sum(
        encoder.backbone.feature_info[i]["num_chs"] for i in (0, 1))
    url = str(tmp_path / "model.pt")
    export_encoder(encoder, ModelCard("test_convnext", 16, 32), url)
    assert load_card(url).neck_levels == [0, 1]
    reloaded, _ = load_encoder(url)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(images), encoder(images))


def test_card_without_neck_levels_still_loads(tmp_path):
    """A model.json written before the field rebuilds the top-only encoder."""
    url = str(tmp_path / "model.pt")
    export_encoder(create_encoder(tiny_model_config()).eval(), ModelCard("test_convnext", 16, 32), url)
    card = json.loads((tmp_path / "model.json").read_text())
    del card["neck_levels"]
    (tmp_path / "model.json").write_text(json.dumps(card))
    assert load_encoder(url)[0].neck_levels == []


def test_neck_levels_train_their_pooling():
    cfg = load_config(None, ["model.backbone=test_convnext", "model.embedding_dim=16", "model.image_size=32",
                             "model.neck_levels=[0,2]"])
    net = create_model(cfg, class_counts=[2, 2], n_species=1)
    net(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long))["loss"].backward()
    for name in ("encoder.level_pools.0.p", "encoder.level_pools.1.p", "encoder.backbone.stem.0.weight"):
        assert dict(net.named_parameters())[name].grad is not None, name
