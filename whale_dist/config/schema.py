"""The config schema: one dataclass tree (``Config``) with defaults in code, and the URLs derived from it.

One dataclass tree (``Config``) holds a section per job so that one YAML file describes a whole deployment
(``configs/happywhale.yaml``) and every job reads the same file. Unknown keys and wrong types are errors, not
silent defaults (timm's YAML-to-argparse habit, made strict). Credentials never live here: S3 endpoint and keys come
from the standard AWS environment, so a dumped config can be shared as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from whale_dist.errors import UserError
from whale_dist.storage import join


class ConfigError(UserError, ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclass
class CatalogueConfig:
    """Where the labelled catalogue lives and how to split it."""

    url: str = ""  # folder holding train.csv + train_images/ (Happywhale layout) or a manifest file; "" = {root}/survey
    format: str = "happywhale"  # happywhale | manifest | wildlife (a wildlife-datasets table, CSV or parquet)
    csv: str = "train.csv"
    images_dir: str = "train_images"
    root: str = ""  # wildlife: the folder its relative paths start from; "" = the table's folder
    orientation: list[str] = field(default_factory=list)  # keep only photos of these views (e.g. [left]); [] = all
    n_folds: int = 5
    fold: int = 0
    seed: int = 0
    new_fraction: float = 0.2  # share of new individuals that thresholds are calibrated for (protocol.py)


@dataclass
class StatsConfig:
    """``whale-dist stats``: what is in a catalogue (counts, plots, label problems)."""

    out: str = ""  # "" = {root}/stats
    sample_headers: int = 256  # photos whose header is read for sizes and formats (0: none)
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
    # Feature stages (timm ``feature_info`` indices, e.g. [1, 2]) whose GeM joins the top's before the neck, each
    # L2-normalised: low-level texture/colour statistics the pooled top loses. [] = the top alone.
    neck_levels: list[int] = field(default_factory=list)


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
    species_weight: float = 0.1  # species head on the embedding; exported with the model, identify's species


@dataclass
class TrainConfig:
    """Ray Train job (``jobs/train.py``): a cross-validated run (``catalogue.fold`` held out, the best epoch exported)
    or, with ``final_fit``, a run on all labelled photos for the epochs a cross-validated run chose."""

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
    freeze_bn: bool = False  # backbone BatchNorm layers keep their pretrained statistics (eval mode) while training
    augment_colour: bool = True  # colour jitter + random grayscale (off where coat colour identifies the animal)
    augment_geometric: bool = True  # random resized crop, affine, blur (with augment=true)
    augment_flip: bool = False  # random horizontal flip, p=0.5, added to the others (with augment=true); flip alone:
    # augment_geometric=false augment_colour=false
    seed: int = 0
    # Repeatable training for a given seed: seeded per-epoch shuffle and augmentation, Ray Data keeps block order
    # (preserve_order: a slow decode task holds back the ones after it). Checked with one training worker; with
    # several, how blocks are split between them is Ray Data's and not checked. Off = Ray Data's fastest.
    deterministic: bool = False
    torch_threads: int = 0  # intra-op threads per training worker; 0 = Ray's default (OMP_NUM_THREADS = CPUs)
    val_knn: int = 50  # neighbours per validation query before collapsing to individuals
    val_every: int = 1  # validate + checkpoint every N epochs (and after the last); >1 for tiny epochs (demo)
    # Final fit: train on every labelled photo (no fold held out, so no validation) and export the last epoch. The
    # epoch count is the one a cross-validated run chose: final_fit_from names that run (a run name under
    # storage_path, or its URL) and its exported epoch becomes train.epochs; empty = train.epochs as set.
    final_fit: bool = False
    final_fit_from: str = ""
    # Leave the individuals that calibrate holds out as never seen (catalogue.new_fraction, protocol.py) out of
    # training, final fit included, and record them in model.json: a threshold calibrated on animals the model trained
    # on lets real new ones through. false: train on them too (calibrate then picks trained-on stand-ins).
    hold_out_new: bool = True


@dataclass
class EmbedConfig:
    """Nightly embedding job (``jobs/embed.py``)."""

    model: str = ""  # URL of model.pt (model.json beside it); "" = {root}/runs/{train.run_name}/model.pt
    images: str = ""  # URL prefix of an archive (folders and/or .tar shards)
    manifest: str = ""  # explicit manifest of new files (then nothing is listed)
    out: str = ""  # the embedding store (embeddings/ and errors/ by model version, embed.store); "" = {root}
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
    retry_attempts: int = 6  # storage reads/publishes: tries with doubling waits from 0.5 s (6: 15.5 s of outage)
    actor_threads: int = 0  # torch intra-op threads per CPU actor; 0 = leave Ray's default (OMP_NUM_THREADS)


@dataclass
class IndexConfig:
    """Re-indexing job (``jobs/index.py``)."""

    out: str = ""  # "" = {root}/indexes
    catalogue_name: str = "default"
    model_version: str = ""  # "" = the only version present (several present is an error)
    num_shards: int = 2
    shard_max_vectors: int = 131_072  # more shards when needed so that no build task holds more (bounded memory)
    memory_budget_gb: float = 4.0
    species: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    date_from: str = ""
    date_to: str = ""
    index_key: str = ""  # faiss index_factory key; "" = chosen from (N, d, memory_budget_gb) by index_choice
    nprobe: int = 0  # IVF lists probed at search; 0 = tuned at build for target_recall
    target_recall: float = 0.99  # recall@5 vs exact search that the nprobe tuning aims for
    cpus_per_task: float = 1.0  # Ray CPUs (= faiss OpenMP threads) per shard-filling task
    train_cpus: float = 0.0  # Ray CPUs (= faiss threads) of the quantizer training task; 0 = the largest node's
    use_gpu: bool = False  # faiss GPU for training, adding and unfiltered search (needs faiss-gpu and a GPU)
    merge_shards: bool = False  # merge shards into one file when the index fits memory_budget_gb
    rebuild_growth: float = 0.5  # incremental adds until the catalogue outgrows its quantizer's training by this


@dataclass
class IdentifyConfig:
    """Identification of new photos (``jobs/identify.py``)."""

    catalogue: str = ""  # index URL (LATEST resolved); "" = {root}/indexes/{index.catalogue_name}
    images: str = ""  # URL prefix of query photos, or a manifest file
    out: str = ""  # "" = {root}/identify/{name}
    name: str = "default"
    k: int = 5
    threshold: float = -1.0  # < 0: use the calibrated threshold saved with the catalogue
    new_ratio: float = 0.0  # > 0: threshold at this quantile of the run's best similarities (ranking.ratio_threshold)
    per_species_threshold: bool = True
    encounters: bool = False
    local_copy: str = ""  # also copy human-facing outputs (report, plots) here
    min_species_queries: int = 20  # validation queries a species needs for its own threshold (else: global)
    labels: str = ""  # evaluate: truth CSV (image, individual_id[, species]); "" = {catalogue.url}/test_labels.csv
    predictions: str = ""  # evaluate: predictions.parquet to score; "" = {identify out}/predictions.parquet
    report_queries: int = 500  # at most this many query cards in the HTML report (all are in parquet and CSV)
    species: list[str] = field(default_factory=list)  # search only catalogue photos of these species ([] = all)
    locations: list[str] = field(default_factory=list)  # ... taken at these locations
    date_from: str = ""  # ... taken on or after this ISO date
    date_to: str = ""  # ... taken on or before this ISO date


@dataclass
class NightlyConfig:
    """The nightly loop (``whale-dist nightly``, ``whale-dist review``): proposals per survey night, reviews back."""

    night: str = ""  # "" = the run's UTC date (YYYY-MM-DD)
    out: str = ""  # "" = {root}/surveys: one folder per night (predictions, summary, report + decisions.csv)
    store: str = ""  # "" = {root}/queries: embedding store of survey photos (queries until a review confirms them)
    decisions: str = ""  # review: the filled-in decisions.csv
    reviewer: str = ""  # review: who decided, for rows that leave the reviewer column empty


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
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)

    def url(self, *parts: str) -> str:
        """A location under the storage root."""
        return join(self.root, *parts)

    @property
    def survey_url(self) -> str:
        return self.synth.out or self.url("survey")

    @property
    def catalogue_url(self) -> str:
        return self.catalogue.url or self.url("survey")

    @property
    def run_url(self) -> str:
        return join(self.train.storage_path or self.url("runs"), self.train.run_name)

    @property
    def model_url(self) -> str:
        return self.embed.model or join(self.run_url, "model.pt")

    @property
    def embed_out(self) -> str:
        return self.embed.out or self.root

    @property
    def index_root(self) -> str:
        return join(self.index.out or self.url("indexes"), self.index.catalogue_name)

    @property
    def identify_catalogue(self) -> str:
        return self.identify.catalogue or self.index_root

    @property
    def identify_out(self) -> str:
        return self.identify.out or self.url("identify", self.identify.name)

    @property
    def surveys_url(self) -> str:
        return self.nightly.out or self.url("surveys")

    @property
    def query_store(self) -> str:
        return self.nightly.store or self.url("queries")


RESOLVED_CONFIG = "config.yaml"  # the one name of the resolved config written next to every command's output
