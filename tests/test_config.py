"""Config: defaults in code, YAML, key=value overrides, strict errors, dump round trip."""

import pytest
import yaml

from whale_dist.config import Config, ConfigError, config_from_argv, dump_config, load_config


def test_defaults_are_typed_dataclasses():
    cfg = Config()
    assert cfg.train.epochs == 20 and cfg.model.backbone == "convnext_small"
    assert cfg.run_url.endswith("runs/default")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("root: s3://bucket/x\ntrain:\n  epochs: 3\n  lr_head: 0.5\nindex:\n  species: [a, b]\n")
    cfg = load_config(str(path), ["train.epochs=7", "model.backbone=test_convnext", "train.lr_backbone=1",
                                  "train.weight_decay=1e-3"])
    assert cfg.train.weight_decay == 0.001
    assert cfg.train.epochs == 7
    assert cfg.train.lr_head == 0.5
    assert cfg.train.lr_backbone == 1.0 and isinstance(cfg.train.lr_backbone, float)
    assert cfg.model.backbone == "test_convnext"
    assert cfg.index.species == ["a", "b"]
    assert cfg.run_url == "s3://bucket/x/runs/default"
    assert cfg.model_url == "s3://bucket/x/runs/default/model.pt"


@pytest.mark.parametrize("override, fragment", [
    ("train.epocs=3", "unknown config key 'train.epocs'"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.epochs=three", "config key 'train.epochs': expected int"),
    ("train.lr_head=fast", "config key 'train.lr_head': expected float"),
    ("train.use_gpu=3", "config key 'train.use_gpu': expected bool"),
    ("index.species=abc", "config key 'index.species': expected a list"),
    ("train=3", "config section 'train' must be a mapping"),
    ("epochs", "is not key=value"),
])
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.batchsize'"):
        load_config(str(path))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_flags_map_to_keys_and_unknown_flags_fail():
    cfg = config_from_argv(["--out", "s3://b/o", "--seed=4", "synth.n_individuals=5"],
                           {"--out": "synth.out", "--seed": "synth.seed"})
    assert (cfg.synth.out, cfg.synth.seed, cfg.synth.n_individuals) == ("s3://b/o", 4, 5)
    with pytest.raises(ConfigError, match="unknown argument '--bogus'"):
        config_from_argv(["--bogus", "1"], {"--out": "synth.out"})


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=2", "index.species=[x]"])
    assert dump_config(cfg, str(tmp_path)) == str(tmp_path / "config.yaml")
    reloaded = load_config(str(tmp_path / "config.yaml"))
    assert reloaded == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 2


@pytest.mark.parametrize("name", ["demo", "debug", "happywhale"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.backbone
    if name == "happywhale":
        assert cfg.model.backbone == "convnext_small" and cfg.model.image_size == 384
        assert cfg.train.num_workers == 8 and cfg.train.use_gpu
        assert cfg.catalogue.url.startswith("s3://")


def test_a_date_given_to_a_text_key_stays_its_iso_text():
    cfg = load_config(None, ["nightly.night=2026-11-28", "identify.date_from=2024-01-31"])
    assert cfg.nightly.night == "2026-11-28" and cfg.identify.date_from == "2024-01-31"
