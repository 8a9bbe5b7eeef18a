"""Images/s of the Ray Train loop vs a plain single-process torch loop: same model, batch size, thread count.

Both sides run ``whale_dist.train.loop.train_epoch`` (the exact step the job runs: forward, ArcFace + species loss,
backward, clipping, AdamW, schedule) on the same pre-decoded uint8 images; the Ray side gets them through Ray Data
(``get_dataset_shard(...).iter_torch_batches``) inside a 1-worker ``TorchTrainer``, the plain side from an in-memory
iterator. The first epoch of each side is warm-up and not counted. Goal: Ray Train >= 0.95x the plain loop.

    .venv/bin/python bench/train_overhead.py [--backbone test_convnext] [--size 64] [--batch 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


class TensorShard:
    """The slice of the Ray ``DataIterator`` API that ``train_epoch`` uses, over in-memory arrays."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def iter_torch_batches(self, batch_size: int, drop_last: bool = True, device="cpu"):
        n = len(self.arrays["label"])
        order = np.random.permutation(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield {k: torch.from_numpy(v[idx]).to(device) for k, v in self.arrays.items()}


def make_arrays(n: int, size: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, classes, n).astype(np.int64), "species": np.zeros(n, np.int64)}


def setup(config: dict):
    from whale_dist.config import load_config
    from whale_dist.model import create_model
    from whale_dist.train.loop import build_optimizer

    cfg = load_config(None, [f"model.backbone={config['backbone']}", f"model.image_size={config['size']}",
                             "model.embedding_dim=128"])
    torch.manual_seed(0)
    net = create_model(cfg, [4] * config["classes"], 1)
    optimizer = build_optimizer(net, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return net, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def timed_epochs(model, optimizer, scheduler, scaler, shard, config: dict) -> tuple[float, float]:
    """(images/s, share of the epoch spent waiting for batches), both averaged over the epochs after the first."""
    from whale_dist.train.loop import train_epoch

    stats = [train_epoch(model, optimizer, scheduler, scaler, shard, config["batch"], 1.0, None)
             for _ in range(config["epochs"])][1:]
    return (float(np.mean([s["images_per_s"] for s in stats])),
            float(np.mean([s["data_wait_s"] / s["seconds"] for s in stats])))


def plain_loop(config: dict) -> tuple[float, float]:
    torch.set_num_threads(config["threads"])
    net, optimizer, scheduler, scaler = setup(config)
    arrays = make_arrays(config["n"], config["size"], config["classes"])
    return timed_epochs(net, optimizer, scheduler, scaler, TensorShard(arrays), config)


def ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    net, optimizer, scheduler, scaler = setup(config)
    model = ray.train.torch.prepare_model(net)
    shard = (TensorShard(make_arrays(config["n"], config["size"], config["classes"])) if config["memory_data"]
             else ray.train.get_dataset_shard("train"))
    rate, wait = timed_epochs(model, optimizer, scheduler, scaler, shard, config)
    ray.train.report({"images_per_s": rate})
    with open(config["result_file"], "w") as handle:  # Train V2 keeps metrics only with checkpoints
        handle.write(f"{rate} {wait}")


def arrow_blocks(arrays: dict[str, np.ndarray], rows: int = 32) -> list:
    """The arrays as Arrow blocks of ``rows`` rows with a tensor image column: what the job's decode step
    (``train_data.photo_dataset``, ``map_batches`` with batch size 32) hands to the trainer. (``from_items`` would
    make one Python object per row and cost ~5x more CPU per batch, measured: not what the job does.)"""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return [pa.table({"image": ArrowTensorArray.from_numpy(arrays["image"][i:i + rows]),
                      "label": arrays["label"][i:i + rows], "species": arrays["species"][i:i + rows]})
            for i in range(0, len(arrays["label"]), rows)]


def ray_loop(config: dict, storage_path: str, memory_data: bool = False) -> tuple[float, float]:
    """The same epochs in a 1-worker TorchTrainer; ``memory_data`` feeds the worker from an in-memory iterator
    instead of Ray Data, which separates the cost of the Ray Train worker from that of the data delivery."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    arrays = make_arrays(config["n"], config["size"], config["classes"])
    dataset = ray.data.from_arrow(arrow_blocks(arrays))
    trainer = TorchTrainer(ray_worker, train_loop_config={**config, "memory_data": memory_data},
                           datasets={"train": dataset.materialize()},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"overhead-{int(time.time())}", storage_path=storage_path))
    trainer.fit()
    with open(config["result_file"]) as handle:
        rate, wait = handle.read().split()
    return float(rate), float(wait)


def start_ray(attempts: int = 4, num_cpus: int = 4) -> None:
    """``ray.init`` with retries: on an overloaded machine the raylet can miss Ray's fixed 30 s registration wait."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            print(f"ray.init attempt {attempt + 1} failed: {str(exc)[:100]}", flush=True)
            ray.shutdown()
            time.sleep(5)
    raise RuntimeError("Ray did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="test_convnext")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    config = {**vars(args), "classes": 32, "result_file": f"/tmp/whale-bench-train-overhead-{os.getpid()}.txt"}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    before, plain_wait = plain_loop(config)  # plain runs before and after the Ray run: drift shows as a difference
    print(f"plain loop: {before:.1f} images/s", flush=True)
    start_ray()
    try:
        ray_rate, ray_wait = ray_loop(config, "/tmp/whale-bench-train-overhead")
        memory_rate, memory_wait = ray_loop(config, "/tmp/whale-bench-train-overhead", memory_data=True)
    finally:
        ray.shutdown()
    after, _ = plain_loop(config)
    plain_rate = (before + after) / 2
    print(f"plain loop before/after the Ray run: {before:.1f} / {after:.1f} images/s")
    print("\n| loop | backbone | size | batch | threads | images/s | waiting for data |\n|---|---|---|---|---|---|---|")
    print(f"| plain torch | {args.backbone} | {args.size} | {args.batch} | {args.threads} | {plain_rate:.1f} | "
          f"{plain_wait:.1%} |")
    print(f"| Ray Train (1 worker, Ray Data) | {args.backbone} | {args.size} | {args.batch} | {args.threads} | "
          f"{ray_rate:.1f} | {ray_wait:.1%} |")
    print(f"| Ray Train (1 worker), in-memory batches instead of Ray Data | {args.backbone} | {args.size} | "
          f"{args.batch} | {args.threads} | {memory_rate:.1f} | {memory_wait:.1%} |")
    print(f"\nratio Ray Train / plain = {ray_rate / plain_rate:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
