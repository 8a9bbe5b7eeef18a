"""``train.final_fit``: every labelled photo trains (no fold held out), for the epoch count the cross-validated run
exported (read back from its metrics.csv + model.json), and the last epoch is exported with the species head."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import survey_config

from whale_dist import storage
from whale_dist.config import ConfigError, load_config
from whale_dist.train.job import check_config, final_fit_epochs, load_split
from whale_dist.train.outputs import chosen_epoch, curve_png, exported_row

HISTORY = [{"epoch": 1, "loss": 3.0, "map5": 0.2, "version": "m1"},
           {"epoch": 2, "loss": 2.0, "map5": 0.5, "version": "m2"},
           {"epoch": 3, "loss": 1.0, "map5": 0.5, "version": "m3"}]


def finished_run(url: str, history: list[dict], exported: str) -> str:
    """What a cross-validated run leaves for a final fit to read: metrics.csv and model.json."""
    storage.write_text(storage.join(url, "metrics.csv"), pd.DataFrame(history).to_csv(index=False))
    storage.write_json(storage.join(url, "model.json"), {"backbone": "test_convnext", "embedding_dim": 16,
                                                         "image_size": 32, "version": exported})
    return url


def test_final_fit_trains_on_every_labelled_photo(tmp_path):
    """... but the held-out individuals that calibrate uses as never seen (``train.hold_out_new``)."""
    cfg = survey_config(str(tmp_path / "store"), "train.hold_out_new=false")
    train, val, held = load_split(cfg)
    cfg.train.final_fit = True
    every, none, _ = load_split(cfg)
    assert len(every) == len(train) + len(val) and len(none) == 0 and held is None
    assert list(every["label"]) == list(every["individual_id"]) and "label" in none.columns
    cfg.train.hold_out_new = True
    kept, _, held = load_split(cfg)
    assert held and set(kept["individual_id"]) == set(every["individual_id"]) - set(held)
    assert len(kept) == (~every["individual_id"].isin(held)).sum()


def test_a_cross_validated_run_never_trains_on_the_held_out_individuals():
    """Calibration's stand-ins for new animals must be ones the model never saw: training leaves the same seeded
    set out (``protocol.held_out_individuals`` over the labelled catalogue), and in val they are new animals."""
    from whale_dist.catalog import NEW_INDIVIDUAL
    from whale_dist.config import Config
    from whale_dist.protocol import held_out_individuals
    from whale_dist.train.job import loop_config, training_split

    ids = [f"ind{i}" for i in range(8) for _ in range(4)] + ["one0", "one1"]
    frame = pd.DataFrame({"image_key": [f"p{i}.jpg" for i in range(len(ids))], "individual_id": ids, "species": "orca"})
    cfg = Config()
    cfg.catalogue.n_folds, cfg.catalogue.new_fraction = 2, 0.4
    train, val, held = training_split(frame, cfg)
    assert held == sorted(held_out_individuals(ids, 0.4, cfg.catalogue.seed)) and len(held) == 3
    assert not set(held) & set(train["individual_id"]) and len(train) + len(val) == len(frame) - len(held) * 2
    held_val = val[val["individual_id"].isin(held)]
    assert len(held_val) == 6 and set(held_val["label"]) == {NEW_INDIVIDUAL}
    assert set(val["label"]) - {NEW_INDIVIDUAL} <= set(train["individual_id"])
    assert loop_config(cfg, train, val, {}, {}, None, held)["card"].held_out == held


def test_chosen_epoch_is_the_one_the_run_exported(tmp_path):
    assert chosen_epoch(finished_run(str(tmp_path / "cv"), HISTORY, "m2")) == 2
    assert chosen_epoch(finished_run(str(tmp_path / "cv"), HISTORY, "m3")) == 3
    assert exported_row(HISTORY, "m9") is None


@pytest.mark.parametrize("history, exported, message", [
    (HISTORY, "m9", "has the exported version m9"),
    ([{k: v for k, v in row.items() if k != "map5"} for row in HISTORY], "m3", "is a final fit itself"),
])
def test_a_run_that_cannot_tell_its_epoch_is_refused(tmp_path, history, exported, message):
    with pytest.raises(ConfigError, match=message):
        chosen_epoch(finished_run(str(tmp_path / "cv"), history, exported))
    with pytest.raises(ConfigError, match="holds no finished run"):
        chosen_epoch(str(tmp_path / "nothing"))


def test_final_fit_from_a_run_name_sets_the_epochs(tmp_path):
    cfg = load_config("configs/debug.yaml", [f"root={tmp_path}", "train.final_fit=true", "train.final_fit_from=cv",
                                             "train.run_name=final", "train.epochs=30"])
    finished_run(cfg.url("runs", "cv"), HISTORY, "m2")
    final_fit_epochs(cfg)
    assert cfg.train.epochs == 2


def test_final_fit_needs_its_own_run_name_and_the_switch(tmp_path):
    cfg = load_config("configs/debug.yaml", [f"root={tmp_path}", "train.final_fit=true", "train.final_fit_from=debug"])
    with pytest.raises(ConfigError, match="a run name of its own"):
        final_fit_epochs(cfg)
    with pytest.raises(ConfigError, match="train.final_fit_from"):
        check_config(load_config("configs/debug.yaml", ["train.final_fit_from=cv"]))


def test_curve_of_a_final_fit_has_no_map5():
    assert curve_png([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}]).startswith(b"\x89PNG")


@pytest.mark.slow
def test_final_fit_after_a_cross_validated_run(ray_cluster, tmp_path):
    """A cross-validated run exported its epoch 2 (its metrics.csv and model.json, as tests/test_train.py's real
    runs leave them); the final fit trains that many epochs on every photo through Ray Train (but the held-out
    individuals, recorded in model.json), validates nothing and exports its last epoch, with a species head identify
    can use."""
    import numpy as np

    from whale_dist import catalog
    from whale_dist.model import load_card, load_encoder, predict_species
    from whale_dist.train import run_training

    root = str(tmp_path / "store")
    cv_url = finished_run(survey_config(root).run_url, HISTORY[:2], exported="m2")  # its epoch 2 was exported
    final_cfg = survey_config(root, "train.epochs=9", "train.final_fit=true", f"train.final_fit_from={cv_url}",
                              "train.run_name=final", "train.max_failures=0")
    final = run_training(final_cfg)
    assert final["epochs"] == final["best_epoch"] == 2 == final_cfg.train.epochs
    assert final["best_map5"] is None and all("map5" not in row for row in final["history"])
    assert final["version"] == final["history"][-1]["version"], "the last epoch is exported"
    frame = catalog.catalogue_from_config(final_cfg)
    labelled = frame[frame["individual_id"] != ""]
    card = load_card(final["model_url"])
    trained = labelled[~labelled["individual_id"].isin(card.held_out)]  # but calibration's stand-ins for new animals
    assert card.held_out and card.data_fingerprint == catalog.fingerprint(trained.reset_index(drop=True))
    assert len(card.individuals) == trained["individual_id"].nunique()
    assert "map5" not in storage.read_text(storage.join(final_cfg.run_url, "metrics.csv")).splitlines()[0]
    load_encoder(final["model_url"])
    species, probability = predict_species(final["model_url"], np.eye(2, card.embedding_dim, dtype=np.float32))
    assert set(species) <= set(card.species) and len(card.species) > 0 and (probability > 0).all()
