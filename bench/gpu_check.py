"""One prepared script for a GPU machine: checks and times the GPU paths without Ray (Ray is not installed there).

1. an AMP training step of the real training module (``model.create_model``: backbone + GeM/BN neck + sub-center
   ArcFace + species head) in bf16 autocast — images/s and peak memory;
2. the embedder (``embed.Embedder``, the class the Ray Data actors wrap) on pre-decoded tensors, and with nvJPEG
   decoding through ``embed_gpu.decode_on_device`` on real JPEG bytes — images/s;
3. faiss on the GPU (when the faiss build has GPU support): IVF build and search vs exact search — seconds, qps,
   recall@5;
4. whale_dist's own index path with ``index.use_gpu``: ``faiss_ops`` train + fill on the GPU, ``Catalogue`` search on
   a GPU clone — qps, one-query latency, and agreement with the same catalogue searched on the CPU.

    python bench/gpu_check.py [--quick] [--device cuda]     # prints a markdown table; --out FILE also writes it

On a machine without a GPU it runs the same code on the CPU with ``--quick`` sizes (what the test machine checks).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, repeats: int, sync) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) / repeats


def training_step(device, backbone: str, size: int, batch: int, repeats: int) -> dict:
    import torch

    from whale_dist.config import load_config
    from whale_dist.model import create_model

    cfg = load_config(None, [f"model.backbone={backbone}", f"model.image_size={size}"])
    net = create_model(cfg, class_counts=[3] * 1000, n_species=30).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    species = torch.randint(0, 30, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = net(images, labels, species)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(step, repeats, lambda: sync(device))
    return {"check": f"AMP train step {backbone} {size}px bs{batch}", "images/s": batch / seconds,
            "detail": f"{seconds * 1000:.0f} ms/step, peak {peak_gib(device):.1f} GiB"}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def exported_model(backbone: str, size: int, folder: str) -> str:
    from whale_dist.model import Encoder, ModelCard, export_encoder

    url = os.path.join(folder, "model.pt")
    export_encoder(Encoder(backbone, 512), ModelCard(backbone=backbone, embedding_dim=512, image_size=size), url)
    return url


def jpeg_batch(n: int, width: int, height: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(np.roll(base, i, axis=1)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def embedder_rates(device, model_url: str, size: int, batch: int, n_jpegs: int, jpeg_px: tuple[int, int]) -> list:
    import torch

    from whale_dist.embed import Embedder
    from whale_dist.embed.gpu_decode import decode_on_device

    embedder = Embedder(model_url, device=str(device), autocast=True, batch_size=batch)
    tensors = torch.rand(batch * 4, 3, size, size, device=device)
    per_call = timed(lambda: embedder.embed_tensor(tensors), 3, lambda: sync(device))
    datas = jpeg_batch(n_jpegs, *jpeg_px)
    ok = np.ones(len(datas), dtype=bool)
    bboxes = np.array([""] * len(datas), dtype=object)

    def decode_and_embed():
        pixels, failures = decode_on_device(datas, bboxes, ok, size, device)
        assert not failures, failures
        embedder.embed_tensor(pixels)

    with_decode = timed(decode_and_embed, 2, lambda: sync(device))
    return [{"check": f"embedder, pre-decoded tensors ({size}px, bs{batch})", "images/s": len(tensors) / per_call,
             "detail": "Embedder.embed_tensor, bf16 autocast on CUDA"},
            {"check": f"embedder incl. decode of {jpeg_px[0]}x{jpeg_px[1]} JPEGs", "images/s": n_jpegs / with_decode,
             "detail": "nvJPEG via torchvision.io.decode_jpeg" if device.type == "cuda" else "CPU fallback path"}]


def clustered_data(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue, 2000 queries): unit vectors around n/200 centres, queries near catalogue photos."""
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(n // 200, 10), d)).astype(np.float32)
    data = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    faiss.normalize_L2(data)
    queries = data[rng.choice(n, 2000, replace=False)] + 0.05 * rng.standard_normal((2000, d)).astype(np.float32)
    faiss.normalize_L2(queries)
    return data, queries


def catalogue_rates(n: int, d: int, use_gpu: bool) -> list:
    """whale_dist's own path: ``faiss_ops.train``/``fill_and_tune`` build, then ``Catalogue(use_gpu)`` search (issue 16
    item 7), checked against the same catalogue searched on the CPU."""
    import pandas as pd

    from whale_dist.index import Catalogue, choice, faiss_ops

    data, queries = clustered_data(n, d)
    key = f"IVF{int(4 * np.sqrt(n))},Flat"
    started = time.perf_counter()
    sample = data[np.random.default_rng(1).choice(n, choice.training_size(n, choice.nlist_of(key)), replace=False)]
    template = faiss_ops.train(key, d, sample, use_gpu=use_gpu)
    index, search = faiss_ops.fill_and_tune(template, [data], [np.arange(n, dtype=np.int64)], 0.99, n_total=n,
                                            use_gpu=use_gpu)
    build = time.perf_counter() - started
    keys = [f"p{i}" for i in range(n)]
    meta = pd.DataFrame({"id": np.arange(n), "image_key": keys, "url": keys, "individual_id": keys, "species": "",
                         "encounter_id": "", "date": "", "location": ""})
    manifest = {"model_version": "gpu-check", "dim": d, "index_key": key, "version": "v", "search": search}
    rows = []
    for where, gpu in (("CPU", False), ("GPU", use_gpu)) if use_gpu else (("CPU", False),):
        catalogue = Catalogue("memory://", manifest, meta, [index], use_gpu=gpu)
        started = time.perf_counter()
        ids = catalogue.search(queries, 5).ids
        qps = len(queries) / (time.perf_counter() - started)
        single = np.median([_timed(lambda q=q, c=catalogue: c.search(q[None], 5)) for q in queries[:300]]) * 1e3
        same = "" if where == "CPU" else f"; same top-5 as CPU for {np.mean((ids == rows[0]['ids']).all(1)):.3f}"
        rows.append({"check": f"whale_dist Catalogue {where} search, {key} nprobe={search.get('nprobe')}",
                     "images/s": qps, "ids": ids,
                     "detail": f"queries/s; build {build:.1f} s (train/fill on {'GPU' if use_gpu else 'CPU'}); "
                               f"1 query {single:.2f} ms{same}"})
    return rows


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def faiss_rates(n: int, d: int, use_gpu: bool) -> list:
    import faiss

    rng = np.random.default_rng(0)
    data, queries = clustered_data(n, d)
    resources = faiss.StandardGpuResources() if use_gpu else None
    place = (lambda index: faiss.index_cpu_to_gpu(resources, 0, index)) if use_gpu else (lambda index: index)
    exact = place(faiss.IndexFlatIP(d))
    exact.add(data)
    started = time.perf_counter()
    _, truth = exact.search(queries, 5)
    exact_qps = len(queries) / (time.perf_counter() - started)
    nlist = int(4 * np.sqrt(n))
    ivf = place(faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT))
    started = time.perf_counter()
    ivf.train(data[rng.choice(n, min(n, nlist * 64), replace=False)])
    ivf.add(data)
    build = time.perf_counter() - started
    if use_gpu:
        faiss.GpuParameterSpace().set_index_parameter(ivf, "nprobe", 16)
    else:
        ivf.nprobe = 16
    started = time.perf_counter()
    _, found = ivf.search(queries, 5)
    ivf_qps = len(queries) / (time.perf_counter() - started)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(truth, found)])
    where = "GPU" if use_gpu else "CPU"
    return [{"check": f"faiss {where} exact search {n}x{d}", "images/s": exact_qps, "detail": "queries/s, k=5"},
            {"check": f"faiss {where} IVF{nlist},Flat nprobe=16", "images/s": ivf_qps,
             "detail": f"queries/s; build {build:.1f} s; recall@5 {recall:.3f}"}]


def main(argv: list[str] | None = None) -> int:
    import faiss
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick or device.type != "cuda"
    backbone, size, batch = ("test_convnext", 64, 8) if quick else ("convnext_small", 384, 32)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = [training_step(device, backbone, size, batch, repeats=2 if quick else 10)]
    with tempfile.TemporaryDirectory() as folder:
        rows += embedder_rates(device, exported_model(backbone, size, folder), size, batch if quick else 128,
                               n_jpegs=16 if quick else 512, jpeg_px=(320, 240) if quick else (1920, 1280))
    use_gpu = device.type == "cuda" and hasattr(faiss, "StandardGpuResources")
    rows += faiss_rates(20_000 if quick else 1_000_000, 64 if quick else 512, use_gpu)
    rows += catalogue_rates(20_000 if quick else 1_000_000, 64 if quick else 512, use_gpu)
    table = [f"GPU check on {card} (torch {torch.__version__}, faiss {faiss.__version__})", "",
             "| check | rate | detail |", "|---|---:|---|"]
    table += [f"| {r['check']} | {r['images/s']:.1f} | {r['detail']} |" for r in rows]
    print("\n".join(table))
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
