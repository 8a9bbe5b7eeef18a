"""Nightly embedding: ``Embedder`` (a plain callable, no Ray) and the job that runs it over new survey photos.

``Embedder`` loads the model once and maps a batch of decoded photos to L2-normalised float32 embeddings; it is the
Ray Data actor of the nightly pipeline *and* what identification and GPU checks call directly, so every embedding in
the system comes from the same code. ``embed_source`` runs the whole pipeline (list -> skip what is done -> Ray Data
-> published parquet chunks) for one archive prefix or manifest into one output root; ``run_embed(cfg)`` and
``main(argv)`` are the job entry points (``jobs/embed.py``, ``whale-dist embed``). See ``embed_store`` for the
layout and how exactly-once and resuming work.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from whale_dist import ray_connect, storage
from whale_dist.config import Config, ConfigError, EmbedConfig, config_from_argv, dump_config
from whale_dist.embed import pipeline as embed_pipeline
from whale_dist.embed import sources as embed_sources
from whale_dist.embed import store as embed_store

FLAGS = {"--images": "embed.images", "--manifest": "embed.manifest", "--model": "embed.model", "--out": "embed.out"}
MANIFEST_SUFFIXES = (".csv", ".parquet")


class Embedder:
    """Decoded photos -> embeddings with the exported model at ``model_url``.

    ``autocast`` (bfloat16) applies on CUDA only: on CPU it would make the results depend on the device. With
    ``flip_tta`` the embedding is the normalised sum of the photo's and its mirror image's embeddings.
    """

    def __init__(self, model_url: str, device: str = "cpu", autocast: bool = True, flip_tta: bool = False,
                 threads: int = 0, batch_size: int = 64):
        import torch

        from whale_dist.model import load_encoder

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.encoder, self.card = load_encoder(model_url, self.device)
        self.autocast = autocast and self.device.type == "cuda"
        self.flip_tta, self.batch_size = flip_tta, batch_size

    @property
    def dim(self) -> int:
        return self.card.embedding_dim

    def embed_tensor(self, images) -> np.ndarray:
        """Float images (N, 3, S, S) in [0, 1] on any device -> (N, D) float32 numpy, L2-normalised."""
        import torch

        outputs = []
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            for start in range(0, len(images), self.batch_size):
                chunk = images[start:start + self.batch_size].to(self.device, non_blocking=True)
                vectors = self.encoder(chunk).float()
                if self.flip_tta:
                    vectors = vectors + self.encoder(chunk.flip(-1)).float()
                outputs.append(torch.nn.functional.normalize(vectors, dim=1).cpu())
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, self.dim), dtype=np.float32)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 photos (N, S, S, 3) as ``images.load_photo`` returns them -> (N, D) float32.

        The bytes go to the device as uint8 and become floats there (4x less to copy to a GPU); on CPU this is
        exactly ``images.to_tensor_batch``.
        """
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        return self.embed_tensor(pixels.permute(0, 3, 1, 2).float().div_(255.0))

    def __call__(self, batch: dict) -> dict:
        """A pipeline batch (``image`` or ``data`` + ``ok``) -> the same rows with ``embedding``, pixels dropped."""
        out = {k: v for k, v in batch.items() if k not in ("image", "data")}
        ok = np.asarray(batch["ok"], dtype=bool).copy()
        embedding = np.zeros((len(ok), self.dim), dtype=np.float32)
        if "data" in batch:  # GPU decode: bytes arrive undecoded
            from whale_dist.embed.gpu_decode import decode_on_device

            tensor, failures = decode_on_device(batch["data"], batch["bbox"], ok, self.card.image_size, self.device)
            out["stage"], out["message"] = np.array(out["stage"], dtype=object), np.array(out["message"], dtype=object)
            for i, (stage, message) in failures.items():
                ok[i], out["stage"][i], out["message"][i] = False, stage, message
            if ok.any():
                embedding[ok] = self.embed_tensor(tensor[torch_index(ok)])
        elif ok.any():
            embedding[ok] = self.embed_images(batch["image"][ok])
        out["ok"], out["embedding"] = ok, embedding
        return out


def torch_index(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.flatnonzero(mask))


def load_work(source: str, manifest: bool | None = None):
    """(work table, ignored files) of an archive prefix or a manifest (by suffix when ``manifest`` is None)."""
    if manifest is None:
        manifest = source.lower().endswith(MANIFEST_SUFFIXES)
    return (embed_sources.from_manifest(source), 0) if manifest else embed_sources.list_archive(source)


def embed_source(source: str, out: str, model_url: str, cfg: EmbedConfig, manifest: bool | None = None,
                 work=None) -> dict:
    """Embed every photo of ``source`` (or of a ready ``work`` table) not yet embedded by this model into ``out``."""
    from whale_dist.model import load_card

    start = time.perf_counter()
    card = load_card(model_url)
    work, ignored = load_work(source, manifest) if work is None else (work, 0)
    done = embed_store.published(out, card.version)
    embed_store.remove_unpublished(out, card.version, done)
    todo = embed_pipeline.plan_chunks(work, embed_store.done_keys(out, card.version, done),
                                      max(done, default=-1) + 1, cfg.rows_per_partition)
    if len(todo):
        ray_connect.connect()
    run = embed_pipeline.run_pipeline(todo, out, model_url, card.version, card.image_size, cfg)
    seconds = run["pipeline_s"]
    return {"model_version": card.version, "source": source, "out": out, "seen": len(work),
            "skipped": len(work) - len(todo), "ignored_files": ignored,
            "partitions": int(todo["partition"].nunique()), **run,
            "images_per_s": round(len(todo) / seconds, 1) if seconds > 0 and len(todo) else 0.0,
            "total_s": round(time.perf_counter() - start, 2)}


def run_embed(cfg: Config) -> dict:
    """The nightly job on a resolved config: embed, print one summary line, save config + summary beside the output."""
    if cfg.embed.images and cfg.embed.manifest:
        raise ConfigError("set at most one of embed.images (archive prefix) or embed.manifest (manifest file)")
    work = None
    if not (cfg.embed.images or cfg.embed.manifest):  # neither: the labelled catalogue of the config
        cat = cfg.catalogue
        work = embed_sources.from_catalogue(cfg.catalogue_url, cat.format, cat.csv, cat.images_dir)
    source = cfg.embed.manifest or cfg.embed.images or cfg.catalogue_url
    summary = embed_source(source, cfg.embed_out, cfg.model_url, cfg.embed, manifest=bool(cfg.embed.manifest),
                           work=work)
    run_dir = storage.join(embed_store.embeddings_dir(cfg.embed_out, summary["model_version"]), "_runs",
                           time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    dump_config(cfg, storage.join(run_dir, "config.yaml"))
    storage.write_json(storage.join(run_dir, "summary.json"), summary)
    print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: dict) -> str:
    return ("embed: seen {seen}, embedded {embedded}, skipped (already done) {skipped}, errors {errors}, "
            "{images_per_s} images/s (start-up {startup_s} s, then {steady_images_per_s} images/s; "
            "model {model_version}, {partitions} new partitions)").format(**summary)


def main(argv: list[str] | None = None) -> int:
    """``whale-dist embed [--config FILE] [--images URL | --manifest URL] [--model URL] [--out URL] [key=value]``."""
    cfg = config_from_argv(list(argv or []), FLAGS)
    if not storage.exists(cfg.model_url):
        raise FileNotFoundError(f"model not found: {cfg.model_url} (train first, or set --model)")
    try:
        run_embed(cfg)
    except _interruptions() as exc:  # storage outage, lost workers: what is published stays, a re-run resumes
        from whale_dist.cli import user_error_types

        if isinstance(exc, user_error_types()):
            raise
        cause = getattr(exc, "cause", None) or exc
        text = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        print(storage.redact(f"whale-dist: error: embedding stopped ({type(cause).__name__}: {text}); "
                             "published partitions are kept, re-run to resume"), file=sys.stderr)
        return 1
    return 0


def _interruptions() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayError

    return (RayError, ConnectionError, TimeoutError, OSError)


read_embeddings = embed_store.read_embeddings
read_errors = embed_store.read_errors
