"""``whale-dist train``: the catalogue's training fold -> Ray Train (data-parallel) -> ``{run}/model.pt``.

The driver only prepares: it reads and splits the catalogue, builds the Ray Datasets (decoding and augmentation run
in Ray Data on the cluster's CPUs) and hands ``train_loop.train_worker`` to a ``TorchTrainer``. Checkpoints go to
``{train.storage_path}/{train.run_name}`` (local or ``s3://``); Ray Train restarts failed workers from the latest one
(``FailureConfig``) and, because it keeps a snapshot of the run in storage, submitting the same run name again
resumes that run instead of starting over. See ``train_loop`` for the recipe.

``train.final_fit=true`` holds no fold out: it trains on every labelled photo for the epoch count a cross-validated
run chose (``train.final_fit_from``), so the 1/n_folds of the labels that validation needs are not thrown away in
the model that goes to production; with nothing to validate on, it exports its last epoch.

``train.hold_out_new`` (default) keeps one set of individuals out of every run, final fit included: the ones that
``calibrate`` holds out to play animals never seen (``protocol.held_out_individuals`` over the labelled catalogue,
``catalogue.new_fraction`` and ``catalogue.seed``), recorded in ``model.json`` (``held_out``). A model that trained on
them keeps their photos apart from everyone else's, so as stand-ins they look newer than a real unseen animal and the
threshold comes out too low. A final fit keeps them out too, since the model it exports is the one calibrated; what it
gives up is their photos as training data (they stay in the catalogue and are found by search, as every animal added
after training is), the price of a threshold that means what it says. Singletons are new cases in calibration and
still train: holding them out too would cost a fifth of Happywhale's photos.
"""

from __future__ import annotations

import sys
from typing import Any

from whale_dist import catalog, ray_connect, storage
from whale_dist.config import Config, ConfigError, config_from_argv, dump_config
from whale_dist.protocol import held_out_individuals
from whale_dist.train.data import training_datasets
from whale_dist.train.outputs import write_outputs

FLAGS = {"--run-name": "train.run_name", "--storage-path": "train.storage_path", "--catalogue": "catalogue.url",
         "--epochs": "train.epochs", "--workers": "train.num_workers"}


def load_split(cfg: Config):
    """(train, val, held_out) of the configured catalogue (``training_split``)."""
    frame = catalog.catalogue_from_config(cfg)
    frame = frame[frame["individual_id"] != ""].reset_index(drop=True)
    if len(frame) < 2:
        raise catalog.CatalogueError(f"catalogue {storage.redact(cfg.catalogue_url)}: fewer than 2 labelled photos")
    return training_split(frame, cfg)


def training_split(frame, cfg: Config):
    """(train, val, held_out) of labelled photos: the configured fold held out for validation (a fold without
    validation photos is a configuration error), or with ``train.final_fit`` every photo trains and val is empty.
    Either way the ``held_out`` individuals (``train.hold_out_new``; None when off) do not train; in val they are
    ``new_individual``. The training app and the benches split the same way through here."""
    held = sorted(held_out_individuals(list(frame["individual_id"]), cfg.catalogue.new_fraction, cfg.catalogue.seed))
    if cfg.train.final_fit:
        train = frame.assign(label=frame["individual_id"])
        val = train.iloc[:0]
    else:
        train, val = catalog.split_fold(frame, cfg.catalogue.fold, cfg.catalogue.n_folds, cfg.catalogue.seed)
    if cfg.train.hold_out_new:
        train, val = leave_out(train, val, held)
    if not len(train) or not (len(val) or cfg.train.final_fit):
        raise ConfigError(f"catalogue.fold={cfg.catalogue.fold} (catalogue.new_fraction={cfg.catalogue.new_fraction} "
                          "held out) leaves an empty train or validation split")
    return train, val, held if cfg.train.hold_out_new else None


def leave_out(train, val, individuals: list[str]):
    """(train without ``individuals``' photos, val with every individual left without training photos relabelled
    ``new_individual``)."""
    train = train[~train["individual_id"].isin(individuals)].reset_index(drop=True)
    known = set(train["individual_id"])
    return train, val.assign(label=[i if i in known else catalog.NEW_INDIVIDUAL for i in val["individual_id"]])


def loop_config(cfg: Config, train, val, individuals: dict, species: dict, fail_after_epoch: int | None,
                held_out: list[str] | None = None) -> dict:
    """Everything a worker needs that is not a dataset: config, class counts, labels by row, the model card."""
    from whale_dist.model import ModelCard  # torch

    counts = train["individual_id"].value_counts()
    card = ModelCard(backbone=cfg.model.backbone, embedding_dim=cfg.model.embedding_dim,
                     image_size=cfg.model.image_size, gem_p=cfg.model.gem_p, individuals=individuals, species=species,
                     data_fingerprint=catalog.fingerprint(train), run_name=cfg.train.run_name, held_out=held_out,
                     neck_levels=list(cfg.model.neck_levels))
    return {"cfg": cfg, "card": card, "n_train": len(train), "n_species": len(species),
            "class_counts": [int(counts[name]) for name in individuals],
            "gallery_labels": list(train["individual_id"]), "val_labels": list(val["label"]),
            "fail_after_epoch": fail_after_epoch,
            "fail_marker": storage.join(cfg.run_url, "_injected_failure") if fail_after_epoch else ""}


def run_config(cfg: Config):
    """Storage (local path or object store through our fsspec filesystem), failure and checkpoint policies."""
    import ray.train

    from whale_dist.train.checkpoint import registration_callbacks  # torch

    root = cfg.train.storage_path or cfg.url("runs")
    score = "epoch" if cfg.train.final_fit else "map5"  # a final fit has no MAP@5: keep its latest checkpoints
    filesystem, path = (None, storage.strip_scheme(root)) if storage.is_local(root) else storage.arrow_filesystem(root)
    return ray.train.RunConfig(
        name=cfg.train.run_name, storage_path=path, storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=registration_callbacks(),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints),
                                                     checkpoint_score_attribute=score,
                                                     checkpoint_score_order="max"))


def make_trainer(cfg: Config, fail_after_epoch: int | None = None):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from whale_dist.train.loop import train_worker  # torch

    train, val, held_out = load_split(cfg)
    individuals, species = catalog.label_maps(train)
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    return TorchTrainer(
        train_worker, train_loop_config=loop_config(cfg, train, val, individuals, species, fail_after_epoch, held_out),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=run_config(cfg), datasets=training_datasets(train, val, individuals, species, cfg),
        dataset_config=dataset_config(cfg))


def dataset_config(cfg: Config):
    """Train's default ingest, or for a repeatable run (``train.deterministic``) the driver's Ray Data execution
    options with the block order kept: otherwise the order in which decode tasks finish decides which photos share a
    batch. (A copy of the context's options, not ``DataConfig.default_ingest_options()``, which warns that it sets a
    deprecated option.)"""
    import copy

    from ray.data import DataContext
    from ray.train import DataConfig

    if not cfg.train.deterministic:
        return DataConfig()
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(execution_options=options)


def check_config(cfg: Config) -> None:
    if cfg.train.amp not in ("bf16", "fp16", "none"):
        raise ConfigError(f"config key 'train.amp': expected bf16, fp16 or none, got {cfg.train.amp!r}")
    if cfg.loss.margin not in ("dynamic", "fixed"):
        raise ConfigError(f"config key 'loss.margin': expected dynamic or fixed, got {cfg.loss.margin!r}")
    if cfg.train.epochs < 1 or cfg.train.num_workers < 1 or cfg.loss.subcenters < 1:
        raise ConfigError("train.epochs, train.num_workers and loss.subcenters must be at least 1")
    if cfg.train.final_fit_from and not cfg.train.final_fit:
        raise ConfigError("config key 'train.final_fit_from': only read with train.final_fit=true")


def final_fit_epochs(cfg: Config) -> None:
    """Set ``train.epochs`` to the epoch that ``train.final_fit_from`` exported (before the config is written, so the
    run's config.yaml says how many epochs it really trained)."""
    from whale_dist.train.outputs import chosen_epoch

    source = cfg.train.final_fit_from
    if not (cfg.train.final_fit and source):
        return
    url = source if "/" in source else storage.join(cfg.train.storage_path or cfg.url("runs"), source)
    if url.rstrip("/") == cfg.run_url.rstrip("/"):
        raise ConfigError("config key 'train.final_fit_from': the final fit needs a run name of its own "
                          f"(train.run_name={cfg.train.run_name} would resume the cross-validated run)")
    cfg.train.epochs = chosen_epoch(url)
    print(f"train: final fit on every labelled photo for {cfg.train.epochs} epochs, the epoch "
          f"{storage.redact(url)} exported", flush=True)


def run_training(cfg: Config, fail_after_epoch: int | None = None) -> dict[str, Any]:
    """Train (or resume) ``cfg.train.run_name``; returns model_url, version, best_map5, ... (see ``write_outputs``).

    Attaches to a running Ray cluster if there is one (``ray.init()`` otherwise). ``fail_after_epoch`` is a test
    hook: one worker failure injected after that many epochs.
    """

    check_config(cfg)
    final_fit_epochs(cfg)
    ray_connect.connect()
    dump_config(cfg, cfg.run_url)
    result = make_trainer(cfg, fail_after_epoch).fit()
    return write_outputs(result, cfg.run_url)


def main(argv: list[str] | None = None) -> int:
    """``whale-dist train [--config FILE] [--run-name N] [--epochs E] [key=value ...]``."""
    cfg = config_from_argv(list(sys.argv[1:] if argv is None else argv), FLAGS)
    summary = run_training(cfg)
    print(f"train: {summary['epochs']} epochs, {score_text(summary)}; model {summary['version']} at "
          f"{storage.redact(summary['model_url'])}")
    return 0


def score_text(summary: dict) -> str:
    if summary["best_map5"] is None:
        return f"final fit on all labelled photos (no validation), epoch {summary['best_epoch']} exported"
    return (f"best val MAP@5 {summary['best_map5']:.3f} (top-1 {summary['best_top1']:.3f}, "
            f"epoch {summary['best_epoch']})")
