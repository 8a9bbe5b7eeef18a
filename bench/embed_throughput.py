"""Images/s of the nightly embedding pipeline against (a) the model alone and (b) a hand-written DataLoader loop.

All three embed the same photos (JPEGs on a loopback S3 server, ``moto_server`` in its own process) with the same
model and the same torch thread count:
(a) model only: ``Embedder.embed_tensor`` on photos decoded beforehand — the ceiling on this machine;
(b) a plain torch ``DataLoader`` (worker processes fetch from S3 + ``images.load_photo``) feeding the same Embedder;
(c) the Ray Data job (``embed.embed_source``), timed end to end: listing, planning, actor start, model load, writes.
Goal: (c) >= 0.8 x (a) and >= 1.2 x (b).

    .venv/bin/python bench/embed_throughput.py [--n 2000] [--backbone convnext_atto] [--size 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_s3() -> subprocess.Popen:
    """A moto S3 server in its own process (so it does not share the GIL with the driver)."""
    from whale_dist.local_s3 import free_port

    port = free_port()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    for _ in range(600):  # a shared machine may take a minute to start it
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("moto_server did not start")


def photo(seed: int, size=(320, 240)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)).resize(size)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def upload(bucket: str, n: int) -> list[str]:
    import boto3

    from whale_dist import storage

    boto3.client("s3").create_bucket(Bucket=bucket)
    fs = storage.filesystem(f"s3://{bucket}")
    urls = [f"s3://{bucket}/photos/d{i % 20:02d}/p{i:05d}.jpg" for i in range(n)]
    fs.pipe({storage.strip_scheme(u): photo(i) for i, u in enumerate(urls)})
    return urls


def export_model(url: str, backbone: str, size: int) -> None:
    import torch

    from whale_dist.model import Encoder, ModelCard, export_encoder

    torch.manual_seed(0)
    export_encoder(Encoder(backbone, 128), ModelCard(backbone, 128, size), url)


def model_only(model_url: str, urls: list[str], size: int, threads: int, batch: int) -> float:
    from whale_dist import images, storage
    from whale_dist.embed import Embedder

    embedder = Embedder(model_url, threads=threads, batch_size=batch)
    tensor = images.to_tensor_batch(np.stack([images.load_photo(storage.read_bytes(u), size) for u in urls]))
    embedder.embed_tensor(tensor[:batch])  # warm-up
    start = time.perf_counter()
    embedder.embed_tensor(tensor)
    return len(urls) / (time.perf_counter() - start)


class S3Photos:
    """The hand-written baseline's Dataset: fetch + decode one photo per item in DataLoader worker processes.

    ``fast_reads`` picks the pipeline's own reader (``storage.read_object``: Arrow's C++ S3 client); without it a
    photo is read through s3fs (``storage.read_bytes``), as a hand-written loop over fsspec URLs would.
    """

    def __init__(self, urls: list[str], size: int, fast_reads: bool = False):
        self.urls, self.size, self.fast_reads = urls, size, fast_reads

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int):
        import torch

        from whale_dist import images, storage

        read = storage.read_object if self.fast_reads else storage.read_bytes
        return torch.from_numpy(images.load_photo(read(self.urls[i]), self.size).copy())


def dataloader_loop(model_url: str, urls: list[str], size: int, threads: int, batch: int, workers: int,
                    fast_reads: bool) -> float:
    import torch

    from whale_dist import images
    from whale_dist.embed import Embedder

    start = time.perf_counter()
    embedder = Embedder(model_url, threads=threads, batch_size=batch)
    loader = torch.utils.data.DataLoader(S3Photos(urls, size, fast_reads), batch_size=batch, num_workers=workers)
    for photos in loader:
        embedder.embed_tensor(images.to_tensor_batch(photos.numpy()))
    return len(urls) / (time.perf_counter() - start)


def pipeline(model_url: str, prefix: str, out: str, threads: int, batch: int) -> dict:
    import ray
    from train_overhead import start_ray

    from whale_dist.config import EmbedConfig
    from whale_dist.embed import embed_source

    start_ray(num_cpus=os.cpu_count() or 1)
    cfg = EmbedConfig(batch_size=batch, num_actors=1, actor_num_cpus=0.5, actor_threads=threads,
                      rows_per_partition=1024, decode_batch_size=32)
    summary = embed_source(prefix, out, model_url, cfg)
    ray.shutdown()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--backbone", default="convnext_atto")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--loader-workers", type=int, default=1)
    args = parser.parse_args()
    server = start_s3()
    try:
        urls = upload("bench", args.n)
        model_url = "s3://bench/model/model.pt"
        export_model(model_url, args.backbone, args.size)
        rate_a = model_only(model_url, urls, args.size, args.threads, args.batch)
        print(f"(a) model only: {rate_a:.1f} images/s", flush=True)
        rate_b = dataloader_loop(model_url, urls, args.size, args.threads, args.batch, args.loader_workers, False)
        print(f"(b) DataLoader, s3fs reads: {rate_b:.1f} images/s", flush=True)
        rate_b2 = dataloader_loop(model_url, urls, args.size, args.threads, args.batch, args.loader_workers, True)
        print(f"(b') DataLoader, the pipeline's reader: {rate_b2:.1f} images/s", flush=True)
        summary = pipeline(model_url, "s3://bench/photos", tempfile.mkdtemp(prefix="embed-bench-"), args.threads,
                           args.batch)
    finally:
        server.terminate()
    rate_c = summary["embedded"] / summary["total_s"]
    print(f"\n{args.n} JPEGs 320x240 on loopback S3, {args.backbone} @ {args.size}px, {args.threads} torch thread(s), "
          f"batch {args.batch}, {os.cpu_count()} CPUs")
    print(f"| {'method':<58} | {'images/s':>9} |\n|{'-' * 60}|{'-' * 11}|")
    for name, rate in [("(a) model only, pre-decoded tensors", rate_a),
                       (f"(b) torch DataLoader ({args.loader_workers} worker, s3fs reads) + same model", rate_b),
                       (f"(b') torch DataLoader ({args.loader_workers} worker, Arrow S3 reads) + same model", rate_b2),
                       ("(c) Ray Data job, end to end (incl. actor start, writes)", rate_c),
                       ("(c') Ray Data pipeline only (summary images_per_s)", summary["images_per_s"]),
                       (f"(c'') Ray Data after its {summary['startup_s']:.0f} s start-up (steady state)",
                        summary["steady_images_per_s"])]:
        print(f"| {name:<58} | {rate:>9.1f} |")
    print(f"\nratio (c)/(a) = {rate_c / rate_a:.2f} (goal >= 0.8); "
          f"ratio (c)/(b) = {rate_c / rate_b:.2f} (goal >= 1.2); ratio (c)/(b') = {rate_c / rate_b2:.2f}")
    steady = summary["steady_images_per_s"]
    print(f"steady state: (c'')/(a) = {steady / rate_a:.2f}; (c'')/(b) = {steady / rate_b:.2f}; "
          f"(c'')/(b') = {steady / rate_b2:.2f}")


if __name__ == "__main__":
    main()
