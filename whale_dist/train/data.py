"""Ray Data preprocessing for training: catalogue rows -> decoded, cropped, augmented uint8 images on CPU workers.

Decoding and augmentation run in Ray Data tasks, not in the training loop, so GPUs never wait on JPEG decoding and
the CPU work scales with the cluster's CPUs rather than with the trainer's. Images travel as uint8 NHWC (4x smaller
than float) and become float in [0, 1] on the training device. The shuffle happens on the small metadata table
(urls, labels) before decoding, so it is cheap at catalogue scale and different every epoch.

Augmentation (torchvision v2) follows the Happywhale 1st place list: random resized crop, affine, colour jitter,
grayscale, blur. No horizontal flip: a flipped fin or fluke is a different-looking animal (left/right sides differ).

Repeatable runs (``train.deterministic``): the shuffle takes Ray Data's ``RandomSeedConfig`` with
``reseed_after_execution`` (a new, seeded order each epoch: each epoch is one execution of the dataset), and each
augmentation batch draws from a generator seeded by ``train.seed`` and the batch's rows, which differ per epoch
because the order does. Block order is kept by the trainer's ``DataConfig`` (``preserve_order``), so batches hold the
same rows run to run; the training loop seeds the model. A restored run starts the epoch count of Ray Data's
execution index again, so it repeats the first epochs' orders: repeatable, not identical to an unbroken run.
"""

from __future__ import annotations

import logging

import numpy as np

from whale_dist import storage
from whale_dist.catalog import parse_bbox
from whale_dist.images import ImageError, load_photo

logger = logging.getLogger(__name__)


def photo_table(frame, individuals: dict[str, int], species: dict[str, int]):
    """Catalogue rows -> (url, bbox, label, species, row) with integer labels; -1 where unknown (val, no species)."""
    import pandas as pd

    return pd.DataFrame({
        "url": frame["url"].astype(str).to_numpy(),
        "bbox": frame["bbox"].astype(str).to_numpy(),
        "label": np.array([individuals.get(i, -1) for i in frame["individual_id"]], dtype=np.int64),
        "species": np.array([species.get(s, -1) for s in frame["species"]], dtype=np.int64),
        "row": np.arange(len(frame), dtype=np.int64),
    })


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Read + decode + bbox crop + resize; a photo that fails is logged and dropped (the rest of the batch goes on)."""

    images, keep = [], []
    for i, (url, bbox) in enumerate(zip(batch["url"], batch["bbox"])):
        try:
            images.append(load_photo(storage.read_object(str(url)), size, parse_bbox(str(bbox)) if bbox else None))
            keep.append(i)
        except (ImageError, OSError) as exc:
            logger.warning("training photo skipped: %s: %s", storage.redact(str(url)), storage.redact(str(exc)))
    out = {key: batch[key][keep] for key in ("label", "species", "row")}
    out["image"] = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return out


def augmentation(size: int, colour: bool = True, geometric: bool = True, flip: bool = False):
    """The torchvision v2 pipeline applied to each (3, H, W) uint8 tensor: ``geometric`` (crop, affine, blur),
    ``colour`` (jitter, grayscale) and ``flip`` (horizontal, p=0.5), each optional (``train.augment_*``)."""
    from torchvision.transforms import v2

    flip_ops = [v2.RandomHorizontalFlip(p=0.5)] if flip else []
    crop_ops = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
                v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1), shear=5)] if geometric else []
    colour_ops = [v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
                  v2.RandomGrayscale(p=0.1)] if colour else []
    blur_ops = [v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.2)] if geometric else []
    return v2.Compose([*flip_ops, *crop_ops, *colour_ops, *blur_ops])


def augment_batch(batch: dict[str, np.ndarray], size: int, colour: bool = True, geometric: bool = True,
                  flip: bool = False, seed: int | None = None) -> dict[str, np.ndarray]:
    """Augment each image; with a ``seed``, the draws depend only on it and the batch's ``row`` ids (torchvision v2
    draws from torch's global generator, so it is forked and seeded for the batch and left as it was)."""
    import torch

    transform = augmentation(size, colour, geometric, flip)
    images = torch.from_numpy(np.ascontiguousarray(batch["image"])).permute(0, 3, 1, 2)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            rows = [int(row) for row in batch.get("row", ())]
            torch.manual_seed(int(np.random.SeedSequence([seed, *rows]).generate_state(1, np.uint64)[0] >> 1))
        out = [transform(image).permute(1, 2, 0).numpy() for image in images]
    return {**batch, "image": np.stack(out) if out else batch["image"]}


def photo_dataset(table, size: int, augment: bool = False, shuffle: bool = False, rows_per_block: int = 64,
                  colour: bool = True, geometric: bool = True, flip: bool = False, seed: int | None = None):
    """A Ray Dataset of decoded (optionally augmented) photos for the rows of ``photo_table``; a ``seed`` makes the
    shuffle and the augmentation repeatable (a different order and draw each epoch, the same ones run to run)."""
    import ray
    from ray.data import RandomSeedConfig

    ds = ray.data.from_pandas([table.iloc[i:i + rows_per_block] for i in range(0, max(len(table), 1), rows_per_block)])
    if shuffle:
        ds = ds.random_shuffle(seed=None if seed is None else RandomSeedConfig(seed, reseed_after_execution=True))
    ds = ds.map_batches(decode_batch, batch_size=32, batch_format="numpy", fn_kwargs={"size": size})
    if augment:
        ds = ds.map_batches(augment_batch, batch_size=32, batch_format="numpy", fn_kwargs={
            "size": size, "colour": colour, "geometric": geometric, "flip": flip, "seed": seed})
    return ds


def training_datasets(train_frame, val_frame, individuals: dict[str, int], species: dict[str, int], cfg) -> dict:
    """``train`` (shuffled, augmented), ``gallery`` (the same photos plain) and ``val``, for ``TorchTrainer``; a final
    fit (``train.final_fit``) validates nothing, so it gets ``train`` alone."""
    size = cfg.model.image_size
    train = photo_table(train_frame, individuals, species)
    datasets = {"train": photo_dataset(train, size, augment=cfg.train.augment, shuffle=True,
                                       colour=cfg.train.augment_colour, geometric=cfg.train.augment_geometric,
                                       flip=cfg.train.augment_flip,
                                       seed=cfg.train.seed if cfg.train.deterministic else None)}
    if not cfg.train.final_fit:
        datasets["gallery"] = photo_dataset(train, size)
        datasets["val"] = photo_dataset(photo_table(val_frame, individuals, species), size)
    return datasets
