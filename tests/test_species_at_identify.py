"""Species at identify time: the species head reads the embedding, travels in model.pt, and identify's predictions,
report and decisions.csv show its answer and probability (not the top candidate's species); models without a head
still load and show no species. Per-species thresholds are keyed on the head's answer in calibrate and identify alike
(the top candidate's species without a head), and calibrate holds out the individuals the model's training left out."""

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
NEW = "new_individual"


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


def test_identify_takes_species_from_the_head_not_the_top_candidate(tmp_path):
    from whale_dist.identify.ranking import head_species

    url = str(tmp_path / "model.pt")
    card = export_with_head(url, head_for(torch.eye(2, 16) * 20.0))
    cfg = Config(root=str(tmp_path))
    cfg.embed.model = url
    vectors = np.eye(2, 16, dtype=np.float32)  # along beluga's then orca's weight row
    species, probability = head_species(cfg, card.version, vectors)
    assert species == ["beluga", "orca"] and (probability > 0.99).all()
    other, unknown = head_species(cfg, "mother-model", vectors)
    assert other == ["", ""] and np.isnan(unknown).all()


def test_thresholds_are_keyed_on_the_head_species_else_the_top_candidates():
    from whale_dist.identify.ranking import predict, predicted_species

    ranked = pd.DataFrame({"ids": [["ann"], ["bob"]], "scores": [[0.9], [0.8]], "species": [["orca"], ["orca"]]})
    assert predicted_species(ranked) == ["orca", "orca"]  # no head (older model, baseline): the best candidate's
    assert predicted_species(ranked, ["beluga", ""]) == ["beluga", "orca"]
    calibration = {"global": 0.95, "per_species": {"beluga": 0.5}}
    assert predict(ranked, calibration, head=["beluga", "beluga"]) == ([["ann", NEW], ["bob", NEW]], [0.5, 0.5])
    assert predict(ranked, calibration) == ([[NEW, "ann"], [NEW, "bob"]], [0.95, 0.95])


def test_calibration_keys_per_species_thresholds_on_the_head():
    """Every candidate is an orca, but the head tells belugas (matches >= 0.45, new <= 0.3) from orcas (matches >= 0.8,
    new <= 0.6): keyed on the head, each species gets the threshold that separates its own queries."""
    from whale_dist.identify.calibrate import calibrate_ranked

    orca = [q < 20 for q in range(40)]
    scores = [(0.8 if o else 0.45) + 0.002 * q if q % 2 == 0 else (0.6 if o else 0.3) - 0.002 * q
              for q, o in enumerate(orca)]
    ranked = pd.DataFrame({"ids": [[f"ind{q}", "other"] for q in range(40)],
                           "scores": [[s, s - 0.25] for s in scores], "species": [["orca", "orca"]] * 40})
    truths = [f"ind{q}" if q % 2 == 0 else NEW for q in range(40)]
    head = ["orca" if o else "beluga" for o in orca]
    calibration = calibrate_ranked(truths, ranked, min_species_queries=10, head=head)
    assert set(calibration["per_species"]) == {"beluga", "orca"} and calibration["species_key"] == "head"
    assert calibration["map5_per_species"] == pytest.approx(1.0) and calibration["map5_global"] < 1.0
    by_candidate = calibrate_ranked(truths, ranked, min_species_queries=10)
    assert set(by_candidate["per_species"]) == {"orca"} and by_candidate["species_key"] == "candidate"


def identify_once(tmp_path, calibration: dict) -> pd.DataFrame:
    """``identify_embedded`` end to end (no Ray) on one query whose top candidate is an orca and whose embedding the
    head calls a beluga; returns predictions.parquet."""
    from types import SimpleNamespace

    from whale_dist.identify.job import identify_embedded

    url = str(tmp_path / "model.pt")
    card = export_with_head(url, head_for(torch.eye(2, 16) * 20.0))
    cfg = Config(root=str(tmp_path))
    cfg.embed.model, cfg.identify.out = url, str(tmp_path / "out")
    catalogue = SimpleNamespace(model_version=card.version, version="v1", metadata=pd.DataFrame(
        {"individual_id": ["ann"]}))
    queries = pd.DataFrame({"image_key": ["q0.jpg"], "url": [""]})
    errors = pd.DataFrame(columns=["image_key", "url", "stage", "message"])
    ranked = pd.DataFrame({"ids": [["ann"]], "scores": [[0.9]], "match_keys": [["c.jpg"]], "match_urls": [[""]],
                           "species": [["orca"]]})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("whale_dist.identify.job.rank_queries", lambda *args, **kwargs: ranked)
        identify_embedded(cfg, catalogue, calibration, queries, np.eye(1, 16, dtype=np.float32), errors)
    return pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(cfg.identify_out, "predictions.parquet"))))


def test_identify_command_writes_head_species_to_predictions(tmp_path):
    written = identify_once(tmp_path, {"global": 0.5, "per_species": {}})
    assert written.loc[0, "predicted_species"] == "beluga" and written.loc[0, "species_probability"] > 0.99


@pytest.mark.parametrize("key, threshold, first", [("head", 0.5, "ann"), (None, 0.95, NEW)])
def test_identify_keys_thresholds_as_its_calibration_did(tmp_path, key, threshold, first):
    """A calibration keyed on the head gets the head's species (beluga: 0.5); one made before (no ``species_key``)
    keyed on the top candidate, so identify does too (orca: 0.95)."""
    calibration = {"global": 0.7, "per_species": {"beluga": 0.5, "orca": 0.95}, **({"species_key": key} if key else {})}
    written = identify_once(tmp_path, calibration)
    assert written.loc[0, "threshold"] == threshold and written.loc[0, "predictions"][0] == first


def test_calibrate_uses_the_catalogue_models_head_and_held_out_individuals(tmp_path, monkeypatch):
    """``run_calibration`` reads the model the index names: its head keys the thresholds and the individuals its
    training left out (``held_out``) are the new ones, though ``new_fraction=0`` would hold out none."""
    from types import SimpleNamespace

    from whale_dist.identify.calibrate import run_calibration

    url = str(tmp_path / "run" / "model.pt")
    torch.manual_seed(0)
    card = export_encoder(Encoder("test_convnext", 16).eval(), ModelCard("test_convnext", 16, 32, species=dict(SPECIES),
                          held_out=["cid"]), url, species_head=head_for(torch.eye(2, 16) * 20.0))
    rng = np.random.default_rng(0)
    axis = np.repeat([0, 0, 1], 4)  # aid, bid along beluga's weight row, cid along orca's
    vectors = np.eye(16, dtype=np.float32)[axis] + 0.1 * rng.standard_normal((12, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    frame = pd.DataFrame({"individual_id": np.repeat(["aid", "bid", "cid"], 4), "encounter_id": "", "species": "whale"})
    catalogue = SimpleNamespace(model_version=card.version, manifest={"model_url": url})
    monkeypatch.setattr("whale_dist.identify.calibrate.open_catalogue", lambda _: catalogue)
    monkeypatch.setattr("whale_dist.identify.calibrate.catalogue_embeddings", lambda cfg, version: (frame, vectors))
    monkeypatch.setattr("whale_dist.identify.calibrate.write_threshold_plot", lambda *args: None)
    cfg = Config(root=str(tmp_path))
    cfg.identify.catalogue, cfg.identify.min_species_queries, cfg.catalogue.new_fraction = str(tmp_path / "i"), 1, 0.0
    calibration = run_calibration(cfg)
    assert calibration["n_new"] == 4 and calibration["held_out_from"] == "model.json"
    assert calibration["species_key"] == "head" and set(calibration["per_species"]) == {"beluga", "orca"}
