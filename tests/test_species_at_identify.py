"""Species at identify time: the species head reads the embedding, travels in model.pt, and identify's predictions,
report and decisions.csv show its answer and probability (not the top candidate's species); models without a head
still load and show no species."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch

from whale_dist import storage
from whale_dist.config import Config
from whale_dist.model import Encoder, ModelCard, create_model, export_encoder, load_encoder, predict_species

SPECIES = {"beluga": 0, "orca": 1}


def head_for(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight": weight, "bias": torch.zeros(len(weight))}


def export_with_head(url: str, head: dict | None) -> ModelCard:
    torch.manual_seed(0)
    card = ModelCard("test_convnext", 16, 32, species=dict(SPECIES))
    return export_encoder(Encoder("test_convnext", 16).eval(), card, url, species_head=head)


def test_species_head_reads_the_exported_embedding():
    """The training module's species logits are the head applied to ``Encoder.forward`` (what the store keeps)."""
    cfg = Config()
    cfg.model.backbone, cfg.model.embedding_dim, cfg.model.image_size = "test_convnext", 16, 32
    net = create_model(cfg, class_counts=[2, 2], n_species=2).eval()
    images, seen = torch.rand(3, 3, 32, 32), []
    net.species_head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        net(images, torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1]))
        assert torch.allclose(seen[0], net.encoder(images), atol=1e-6)


def test_head_travels_in_model_pt_without_changing_the_version(tmp_path):
    weight = torch.randn(2, 16)
    with_head = export_with_head(str(tmp_path / "a" / "model.pt"), head_for(weight))
    without = export_with_head(str(tmp_path / "b" / "model.pt"), None)
    assert with_head.version == without.version, "embeddings depend on the encoder alone"
    encoder, _ = load_encoder(str(tmp_path / "a" / "model.pt"))
    embeddings = encoder(torch.rand(4, 3, 32, 32)).detach()
    species, probability = predict_species(str(tmp_path / "a" / "model.pt"), embeddings.numpy())
    expected = (embeddings @ weight.T * 16 ** 0.5).softmax(1)  # the head scales the unit embedding by sqrt(D)
    assert species == [["beluga", "orca"][i] for i in expected.argmax(1).tolist()]
    assert np.allclose(probability, expected.max(1).values.numpy(), atol=1e-6)


def test_model_without_head_predicts_no_species(tmp_path):
    url = str(tmp_path / "model.pt")
    export_with_head(url, None)
    species, probability = predict_species(url, np.eye(2, 16, dtype=np.float32))
    assert species == ["", ""] and np.isnan(probability).all()


def test_head_of_the_wrong_size_is_not_exported(tmp_path):
    """A head trained without species (one dummy output) is no species classifier."""
    url = str(tmp_path / "model.pt")
    export_with_head(url, head_for(torch.randn(1, 16)))
    assert not any(k.startswith("species_head.") for k in torch.load(url, weights_only=True))


def identify_table() -> pd.DataFrame:
    """Two queries whose top candidates are both orcas."""
    return pd.DataFrame({"image": ["q0.jpg", "q1.jpg"], "url": ["", ""], "threshold": [0.5, 0.5],
                         "predictions": [["ann"], ["bob"]], "scores": [[0.9], [0.8]], "match_keys": [[""], [""]],
                         "match_urls": [[""], [""]], "candidate_species": [["orca"], ["orca"]],
                         "predicted_species": ["orca", "orca"]})


def test_identify_takes_species_from_the_head_not_the_top_candidate(tmp_path):
    from whale_dist.identify.job import with_species

    url = str(tmp_path / "model.pt")
    card = export_with_head(url, head_for(torch.eye(2, 16) * 20.0))
    cfg = Config(root=str(tmp_path))
    cfg.embed.model = url
    vectors = np.eye(2, 16, dtype=np.float32)  # along beluga's then orca's weight row
    table = with_species(identify_table(), cfg, card.version, vectors)
    assert list(table["predicted_species"]) == ["beluga", "orca"]
    assert (table["species_probability"] > 0.99).all()
    other = with_species(identify_table(), cfg, "mother-model", vectors)
    assert list(other["predicted_species"]) == ["", ""] and other["species_probability"].isna().all()


def test_report_and_decisions_show_species_and_probability(tmp_path):
    from whale_dist.identify.report import build_report

    table = identify_table().assign(predicted_species=["beluga", ""], species_probability=[0.934, math.nan])
    files = build_report(table, pd.DataFrame(columns=["image_key", "stage", "message"]), None)
    page = files["index.html"].decode()
    assert "predicted species: beluga (p = 0.93)" in page and "predicted species: unknown" in page
    decisions = pd.read_csv(io.BytesIO(files["decisions.csv"]), dtype=str, keep_default_na=False)
    assert list(decisions.columns)[:4] == ["image", "decision", "individual_id", "reviewer"]
    assert decisions.set_index("image").loc["q0.jpg", ["predicted_species", "species_probability"]].tolist() == [
        "beluga", "0.934"]


def test_identify_command_writes_head_species_to_predictions(tmp_path):
    """``identify_embedded`` end to end (no Ray): predictions.parquet carries the head's species."""
    from types import SimpleNamespace

    from whale_dist.identify.job import identify_embedded

    url = str(tmp_path / "model.pt")
    card = export_with_head(url, head_for(torch.eye(2, 16) * 20.0))
    cfg = Config(root=str(tmp_path))
    cfg.embed.model, cfg.identify.threshold, cfg.identify.out = url, 0.5, str(tmp_path / "out")
    catalogue = SimpleNamespace(model_version=card.version, version="v1", metadata=pd.DataFrame(
        {"individual_id": ["ann"]}))
    queries = pd.DataFrame({"image_key": ["q0.jpg"], "url": [""]})
    errors = pd.DataFrame(columns=["image_key", "url", "stage", "message"])
    ranked = pd.DataFrame({"ids": [["ann"]], "scores": [[0.9]], "match_keys": [["c.jpg"]], "match_urls": [[""]],
                           "species": [["orca"]]})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("whale_dist.identify.job.rank_queries", lambda *args, **kwargs: ranked)
        identify_embedded(cfg, catalogue, {"global": 0.5, "per_species": {}}, queries,
                          np.eye(1, 16, dtype=np.float32), errors)
    written = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(cfg.identify_out, "predictions.parquet"))))
    assert written.loc[0, "predicted_species"] == "beluga" and written.loc[0, "species_probability"] > 0.99
