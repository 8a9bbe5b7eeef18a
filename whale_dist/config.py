"""Typed configuration: defaults in code, one YAML file, ``key=value`` overrides, dumped next to every output.

One dataclass tree (``Config``) holds a section per job so that one YAML file describes a whole deployment
(``configs/happywhale.yaml``) and every job reads the same file. Unknown keys and wrong types are errors, not
silent defaults (timm's YAML-to-argparse habit, made strict). Credentials never live here: S3 endpoint and keys come
from the standard AWS environment, so a dumped config can be shared as is.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclass
class CatalogueConfig:
    """Where the labelled catalogue lives and how to split it."""

    url: str = ""  # folder holding train.csv + train_images/ (Happywhale layout) or a manifest file; "" = {root}/survey
    format: str = "happywhale"  # happywhale | manifest
    csv: str = "train.csv"
    images_dir: str = "train_images"
    n_folds: int = 5
    fold: int = 0
    seed: int = 0


@dataclass
class SynthConfig:
    """Synthetic survey generator (``whale-dist synth``)."""

    out: str = ""  # "" = {root}/survey
    seed: int = 0
    n_individuals: int = 60
    image_size: int = 128
    max_photos_per_individual: int = 16
    singleton_fraction: float = 0.35
    test_new_fraction: float = 0.2  # share of test photos showing individuals absent from train
    test_photos: int = 60
    baseline: bool = True  # after writing, print the raw-pixel and random MAP@5 on the test split


@dataclass
class ModelConfig:
    """Backbone + GeM/BN neck. Named variants are timm names; ``test_convnext`` is the tiny test variant."""

    backbone: str = "convnext_small"
    pretrained: bool = False
    backbone_weights: str = ""  # URL of a state dict / safetensors file, for clusters without internet
    embedding_dim: int = 512
    image_size: int = 384
    gem_p: float = 3.0
    drop_path_rate: float = 0.0


@dataclass
class LossConfig:
    """Sub-center ArcFace with count-based margins (Happywhale 1st place recipe)."""

    subcenters: int = 2
    scale: float = 30.0
    margin: str = "dynamic"  # dynamic | fixed
    fixed_margin: float = 0.3
    margin_a: float = 0.5
    margin_b: float = 0.05
    margin_lambda: float = 0.25
    species_weight: float = 0.1


@dataclass
class TrainConfig:
    """Ray Train job (``jobs/train.py``)."""

    run_name: str = "default"
    storage_path: str = ""  # "" = {root}/runs
    epochs: int = 20
    batch_size: int = 32  # per worker
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    amp: str = "bf16"  # bf16 | fp16 | none (GPU only; CPU runs in float32)
    sync_bn: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    keep_checkpoints: int = 2
    augment: bool = True
    seed: int = 0
    torch_threads: int = 0  # intra-op threads per training worker; 0 = Ray's default (OMP_NUM_THREADS = CPUs)
    val_knn: int = 50  # neighbours per validation query before collapsing to individuals
    val_every: int = 1  # validate + checkpoint every N epochs (and after the last); >1 for tiny epochs (demo)


@dataclass
class EmbedConfig:
    """Nightly embedding job (``jobs/embed.py``)."""

    model: str = ""  # URL of model.pt (model.json beside it); "" = {root}/runs/{train.run_name}/model.pt
    images: str = ""  # URL prefix of an archive (folders and/or .tar shards)
    manifest: str = ""  # explicit manifest of new files (then nothing is listed)
    out: str = ""  # "" = {root}
    batch_size: int = 32
    num_actors: int = 1
    actor_num_cpus: float = 0.5
    actor_num_gpus: float = 0.0
    flip_tta: bool = False
    autocast: bool = True
    gpu_decode: bool = False
    rows_per_partition: int = 256
    decode_batch_size: int = 16  # photos per fetch+decode task batch (and per input block)
    decode_num_cpus: float = 1.0  # CPUs per fetch+decode task
    actor_threads: int = 0  # torch intra-op threads per CPU actor; 0 = leave Ray's default (OMP_NUM_THREADS)


@dataclass
class IndexConfig:
    """Re-indexing job (``jobs/index.py``)."""

    embeddings: str = ""  # "" = {root}/embeddings
    out: str = ""  # "" = {root}/indexes
    catalogue_name: str = "default"
    model_version: str = ""  # "" = the only version present (several present is an error)
    num_shards: int = 2
    memory_budget_gb: float = 4.0
    species: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    date_from: str = ""
    date_to: str = ""
    index_key: str = ""  # faiss index_factory key; "" = chosen from (N, d, memory_budget_gb) by index_choice
    nprobe: int = 0  # IVF lists probed at search; 0 = tuned at build for target_recall
    target_recall: float = 0.99  # recall@5 vs exact search that the nprobe tuning aims for
    cpus_per_task: float = 1.0  # Ray CPUs (= faiss OpenMP threads) per training / shard-filling task
    use_gpu: bool = False  # faiss GPU for training and adding (needs faiss-gpu and a GPU per task)
    merge_shards: bool = False  # merge shards into one file when the index fits memory_budget_gb


@dataclass
class IdentifyConfig:
    """Identification of new photos (``jobs/identify.py``)."""

    catalogue: str = ""  # index URL (LATEST resolved); "" = {root}/indexes/{index.catalogue_name}
    images: str = ""  # URL prefix of query photos, or a manifest file
    out: str = ""  # "" = {root}/identify/{name}
    name: str = "default"
    k: int = 5
    threshold: float = -1.0  # < 0: use the calibrated threshold saved with the catalogue
    per_species_threshold: bool = True
    encounters: bool = False
    local_copy: str = ""  # also copy human-facing outputs (report, plots) here
    min_species_queries: int = 20  # validation queries a species needs for its own threshold (else: global)
    labels: str = ""  # evaluate: truth CSV (image, individual_id[, species]); "" = {catalogue.url}/test_labels.csv
    predictions: str = ""  # evaluate: predictions.parquet to score; "" = {identify out}/predictions.parquet
    report_queries: int = 500  # at most this many query cards in the HTML report (all are in parquet and CSV)


@dataclass
class Config:
    """The whole deployment: one storage root plus one section per job."""

    root: str = "demo-output/store"
    catalogue: CatalogueConfig = field(default_factory=CatalogueConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    identify: IdentifyConfig = field(default_factory=IdentifyConfig)

    def url(self, *parts: str) -> str:
        """A location under the storage root."""
        from whale_dist.storage import join

        return join(self.root, *parts)

    @property
    def survey_url(self) -> str:
        return self.synth.out or self.url("survey")

    @property
    def catalogue_url(self) -> str:
        return self.catalogue.url or self.url("survey")

    @property
    def run_url(self) -> str:
        from whale_dist.storage import join

        return join(self.train.storage_path or self.url("runs"), self.train.run_name)

    @property
    def model_url(self) -> str:
        from whale_dist.storage import join

        return self.embed.model or join(self.run_url, "model.pt")

    @property
    def embeddings_root(self) -> str:
        return self.index.embeddings or self.url("embeddings")

    @property
    def embed_out(self) -> str:
        return self.embed.out or self.root

    @property
    def index_root(self) -> str:
        from whale_dist.storage import join

        return join(self.index.out or self.url("indexes"), self.index.catalogue_name)

    @property
    def identify_catalogue(self) -> str:
        return self.identify.catalogue or self.index_root

    @property
    def identify_out(self) -> str:
        return self.identify.out or self.url("identify", self.identify.name)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(obj: Any, mapping: dict, prefix: str = "") -> None:
    """Set fields of dataclass ``obj`` from a nested mapping, strictly."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {mapping!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _parse_override(item: str) -> dict:
    """``a.b.c=value`` -> nested mapping; the value is parsed as YAML (so ``3``, ``true``, ``[a, b]`` work)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (any storage URL), then ``key=value`` overrides in order."""
    import yaml

    cfg = Config()
    if path:
        from whale_dist.storage import read_text

        try:
            data = yaml.safe_load(read_text(path)) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        _apply(cfg, data)
    for item in overrides:
        _apply(cfg, _parse_override(item))
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, url: str) -> None:
    """Write the resolved config as YAML at ``url`` (next to the output it produced)."""
    import yaml

    from whale_dist.storage import write_text

    write_text(url, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def split_argv(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Split job arguments into (--config path, key=value overrides, remaining flags)."""
    config_path, overrides, rest = None, [], []
    items = list(argv)
    while items:
        item = items.pop(0)
        if item == "--config":
            if not items:
                raise ConfigError("--config needs a path")
            config_path = items.pop(0)
        elif item.startswith("--config="):
            config_path = item.split("=", 1)[1]
        elif "=" in item and not item.startswith("-"):
            overrides.append(item)
        else:
            rest.append(item)
    return config_path, overrides, rest


def config_from_argv(argv: list[str], flags: dict[str, str] | None = None) -> Config:
    """``[--config FILE] [--flag VALUE ...] [key=value ...]`` -> resolved ``Config``.

    ``flags`` maps job-specific flags to config keys (``{"--out": "synth.out"}``) so that the documented command
    lines (``whale-dist identify --catalogue URL --images URL --out URL``) are plain overrides underneath.
    """
    flags = flags or {}
    config_path, overrides, rest = split_argv(argv)
    while rest:
        flag = rest.pop(0)
        name, _, inline = flag.partition("=")
        if name not in flags:
            known = " ".join(sorted(flags)) or "none"
            raise ConfigError(f"unknown argument '{flag}' (flags: --config {known}; or key=value overrides)")
        if not inline:
            if not rest:
                raise ConfigError(f"{name} needs a value")
            inline = rest.pop(0)
        overrides.append(f"{flags[name]}={inline}")
    return load_config(config_path, overrides)
