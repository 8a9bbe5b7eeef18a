"""Images/s of the Ray Train loop vs a plain single-process torch loop: same model, batch size, thread count.

Both sides run ``whale_dist.train_loop.train_epoch`` (the exact step the job runs: forward, ArcFace + species loss,
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
    from whale_dist.train_loop import build_optimizer

    cfg = load_config(None, [f"model.backbone={config['backbone']}", f"model.image_size={config['size']}",
                             "model.embedding_dim=128"])
    torch.manual_seed(0)
    net = create_model(cfg, [4] * config["classes"], 1)
    optimizer = build_optimizer(net, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return net, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def timed_epochs(model, optimizer, scheduler, scaler, shard, config: dict) -> float:
    from whale_dist.train_loop import train_epoch

    rates = []
    for _ in range(config["epochs"]):
        rates.append(train_epoch(model, optimizer, scheduler, scaler, shard, config["batch"], 1.0, None)
                     ["images_per_s"])
    return float(np.mean(rates[1:]))


def plain_loop(config: dict) -> float:
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
    rate = timed_epochs(model, optimizer, scheduler, scaler, ray.train.get_dataset_shard("train"), config)
    ray.train.report({"images_per_s": rate})
    with open(config["result_file"], "w") as handle:  # Train V2 keeps metrics only with checkpoints
        handle.write(str(rate))


def ray_loop(config: dict, storage_path: str) -> float:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    arrays = make_arrays(config["n"], config["size"], config["classes"])
    dataset = ray.data.from_items([{"image": image, "label": int(label), "species": 0}
                                   for image, label in zip(arrays["image"], arrays["label"])])
    trainer = TorchTrainer(ray_worker, train_loop_config=config, datasets={"train": dataset.materialize()},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"overhead-{int(time.time())}", storage_path=storage_path))
    trainer.fit()
    with open(config["result_file"]) as handle:
        return float(handle.read())


def start_ray(attempts: int = 4) -> None:
    """``ray.init`` with retries: on an overloaded machine the raylet can miss Ray's fixed 30 s registration wait."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
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

    before = plain_loop(config)  # plain runs before and after the Ray run: load drift shows as their difference
    print(f"plain loop: {before:.1f} images/s", flush=True)
    start_ray()
    try:
        ray_rate = ray_loop(config, "/tmp/whale-bench-train-overhead")
    finally:
        ray.shutdown()
    after = plain_loop(config)
    plain_rate = (before + after) / 2
    print(f"plain loop before/after the Ray run: {before:.1f} / {after:.1f} images/s")
    print("\n| loop | backbone | size | batch | threads | images/s |\n|---|---|---|---|---|---|")
    print(f"| plain torch | {args.backbone} | {args.size} | {args.batch} | {args.threads} | {plain_rate:.1f} |")
    print(f"| Ray Train (1 worker, Ray Data) | {args.backbone} | {args.size} | {args.batch} | {args.threads} | "
          f"{ray_rate:.1f} |")
    print(f"\nratio Ray Train / plain = {ray_rate / plain_rate:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
