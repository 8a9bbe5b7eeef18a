"""Helpers shared by the test modules: tiny models, generated photos and surveys, embedding partitions, configs.

One module that every test file imports from, so that no test module imports another (``test_suite_rules.py``
checks that with ``ast``). Nothing here starts Ray or a server; fixtures that do live in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from whale_dist import storage
from whale_dist.config import load_config
from whale_dist.embed import pipeline as embed_pipeline
from whale_dist.embed import store as embed_store

# --- photos, surveys and a tiny model (the embedding tests) ---------------------------------------------------------

IMAGE_SIZE = 32
GOOD = ("cam_a/img_000.jpg", "cam_a/img_001.JPG", "cam_b/deep/img_002.png", "cam_b/img_003.jpeg")
TAR_GOOD = ("m/t_000.jpg", "t_001.png", "t_002.jpg")
# name -> stage each broken input must be reported with
BROKEN = {"broken/corrupt.jpg": "decode", "broken/truncated.jpg": "decode", "broken/empty.jpg": "decode",
          "broken/notes.jpg": "decode", "shard-000.tar/t_bad.jpg": "decode"}


def photo_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (48, 40)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BILINEAR)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def survey_files(seed: int = 0) -> dict[str, bytes]:
    """Relative path -> bytes: good photos in nested folders, a tar shard (+ sidecar), broken files, a README."""
    fmt = {".png": "PNG"}
    files = {name: photo_bytes(seed + i, fmt.get(os.path.splitext(name)[1].lower(), "JPEG"))
             for i, name in enumerate(GOOD)}
    members = {name: photo_bytes(seed + 10 + i, fmt.get(name[-4:], "JPEG")) for i, name in enumerate(TAR_GOOD)}
    members["t_bad.jpg"] = photo_bytes(99)[:120]
    members["t_000.json"] = b'{"species": "x"}'
    files["shard-000.tar"] = tar_bytes(members)
    good = photo_bytes(7)
    files.update({"broken/corrupt.jpg": bytes(np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8)),
                  "broken/truncated.jpg": good[: len(good) // 2], "broken/empty.jpg": b"",
                  "broken/notes.jpg": b"field notes, not a photo\n", "README.txt": b"survey 2026-11-26\n"})
    return files


def write_files(root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(root, name), data)


def good_keys() -> set[str]:
    return set(GOOD) | {f"shard-000.tar/{name}" for name in TAR_GOOD}


def make_model(url: str):
    """A random tiny encoder exported at ``url``; returns its card."""
    import torch

    from whale_dist.model import Encoder, ModelCard, export_encoder

    torch.manual_seed(0)
    encoder = Encoder("test_convnext", 16)
    return export_encoder(encoder, ModelCard("test_convnext", 16, IMAGE_SIZE), url)


def chunk(keys: list[str], version: str = "mtest"):
    n = len(keys)
    rows = {"image_key": np.array(keys, dtype=object), "url": np.array(keys, dtype=object),
            "sha256": np.array([""] * n, dtype=object), "ok": np.array([True] * (n - 1) + [False]),
            "stage": np.array([""] * (n - 1) + ["decode"], dtype=object),
            "message": np.array([""] * (n - 1) + ["bad"], dtype=object),
            "embedding": np.eye(n, 4, dtype=np.float32)}
    rows.update({c: np.array([""] * n, dtype=object) for c in embed_store.EMBEDDING_META})
    return embed_pipeline.chunk_tables(rows, version)


# --- embedding partitions and index configs (the index tests) -------------------------------------------------------

D = 32


def clustered(n: int, d: int = D, clusters: int = 50, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` centres (photos of one individual sit close together, like real embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_partitions(root: str, version: str, vectors: np.ndarray, rows_per_part: int = 100, start: int = 0,
                     versions_in_rows: list[str] | None = None, species=None,
                     stored_as_lists: bool = False) -> list[str]:
    """Embedding partitions in the embed job's layout (docs/ARCHITECTURE.md), each published by its .done marker;
    ``stored_as_lists``: vectors as stores written before ``embed_store.stored_table`` hold them."""
    urls = []
    for p, lo in enumerate(range(0, len(vectors), rows_per_part)):
        chunk = vectors[lo:lo + rows_per_part]
        keys = [f"img{start + lo + i:06d}.jpg" for i in range(len(chunk))]
        table = pa.table({
            "image_key": keys, "url": [f"s3://photos/{k}" for k in keys], "sha256": ["0" * 64] * len(chunk),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel(), pa.float32()), chunk.shape[1]),
            "model_version": (versions_in_rows or [version])[:1] * len(chunk),
            "embedded_at": pa.array([dt.datetime(2026, 1, 1)] * len(chunk), pa.timestamp("us", tz="UTC")),
            "individual_id": [f"ind{(start + lo + i) // 5}" for i in range(len(chunk))],
            "species": [species or ("orca" if (start + lo + i) % 3 == 0 else "beluga") for i in range(len(chunk))],
            "encounter_id": [""] * len(chunk), "date": ["2024-06-01"] * len(chunk),
            "location": ["north"] * len(chunk), "bbox": [""] * len(chunk)})
        url = storage.join(root, f"model={version}", f"part-{start // rows_per_part + p:05d}.parquet")
        fs, path = storage.arrow_filesystem(url)
        storage.makedirs(url.rsplit("/", 1)[0])
        pq.write_table(table if stored_as_lists else embed_store.stored_table(table), path, filesystem=fs)
        storage.mark_done(url)
        urls.append(url)
    return urls


def index_config(root: str, *overrides: str):
    return load_config(None, [f"root={root}", "index.catalogue_name=test", "index.cpus_per_task=1", *overrides])


# --- training ---------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SURVEY_OVERRIDES = ("synth.n_individuals=8", "catalogue.n_folds=4", "train.keep_checkpoints=1")


def survey_config(root: str, *overrides: str):
    """The debug config on a tiny synthetic survey at ``root`` (written once per root)."""
    from whale_dist.synth.survey import generate_survey

    cfg = load_config(str(ROOT / "configs" / "debug.yaml"), [f"root={root}", *SURVEY_OVERRIDES, *overrides])
    if not storage.exists(storage.join(cfg.survey_url, "train.csv")):
        generate_survey(cfg.synth, cfg.survey_url)
    return cfg


# --- fault tests: a job's driver in its own process, failpoints armed in it and in every Ray worker of its job ------

DRIVER = """
import json, os, sys
import ray
ray.init(address=os.environ["WD_RAY_ADDRESS"], log_to_driver=False,
         runtime_env={"env_vars": json.loads(os.environ["WD_WORKER_ENV"])})
from whale_dist import cli
sys.exit(cli.main(sys.argv[1:]))
"""
GENEROUS_S = 900  # bounds a failure only: no test waits for a duration to pass


def start_driver(argv: list[str], log_path, spec: str = "", folder=None, env: dict | None = None):
    """``whale-dist <argv>`` as a Ray job driver attached to the session's cluster (as ``ray job submit`` attaches
    one), with ``spec`` armed in the driver and, through the job's runtime_env, in every worker and actor it starts.
    ``env`` (e.g. an S3 endpoint) goes to the driver and the workers too. Output goes to ``log_path``."""
    import json
    import subprocess
    import sys

    import ray

    from whale_dist import failpoints

    job_env = {**(failpoints.env_vars(spec, folder) if spec else {}), **(env or {})}
    child_env = {**os.environ, **job_env, "WD_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                 "WD_WORKER_ENV": json.dumps(job_env)}
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-c", DRIVER, *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=child_env)


def await_pause(name: str, folder, driver, log_path, exclude: tuple[int, ...] = ()):
    """The process paused at failpoint ``name`` (not one of ``exclude``); fails at once if the driver exits first."""
    import time

    from whale_dist import failpoints

    deadline = time.monotonic() + GENEROUS_S
    while time.monotonic() < deadline:
        for marker in sorted(Path(folder).glob(f"{name}.*.paused")):
            pid = int(marker.name[len(name) + 1:-len(".paused")])
            if pid not in exclude:
                return failpoints.wait_paused(name, folder, GENEROUS_S, pid=pid)
        if driver.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.returncode}) before pausing at {name}:\n"
                                 + Path(log_path).read_text()[-4000:])
        time.sleep(failpoints.POLL_S)
    raise AssertionError(f"no process paused at {name} within {GENEROUS_S} s")


def kill_paused(paused) -> None:
    """SIGKILL a process paused at a failpoint (a crash exactly there) and clear its marker."""
    import signal

    os.kill(paused.pid, signal.SIGKILL)
    (Path(paused.folder) / f"{paused.name}.{paused.pid}.paused").unlink(missing_ok=True)


def finish(driver, log_path) -> tuple[int, str]:
    """Wait for the driver to exit (killing it if it outlives ``GENEROUS_S``); (exit status, its output)."""
    try:
        status = driver.wait(timeout=GENEROUS_S)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    return status, Path(log_path).read_text()


class S3Switch:
    """A loopback TCP proxy in front of the S3 server: ``stop()`` closes its port and drops every open connection
    (the server is gone, as far as clients can tell), ``start()`` reopens the same port."""

    def __init__(self, endpoint: str):
        host, port = endpoint.rsplit("/", 1)[-1].split(":")
        self.target, self.port, self.listener, self.dropped = (host, int(port)), 0, None, 0
        self.connections: list = []
        self.lock = threading.Lock()
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port, self.listener = listener.getsockname()[1], listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        self.listener.close()
        with self.lock:
            dropped, self.connections = self.connections, []
        self.dropped += len(dropped)
        for sock in dropped:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# --- catalogues -------------------------------------------------------------------------------------------------------


def lions_wildlife_table(root: Path):
    """The lions as wildlife-datasets' ``LionData.create_catalogue`` builds them: image_id from the file name,
    identity from the folder, path relative to the root; the view (left/right) read from the file name."""
    import hashlib

    import pandas as pd

    from whale_dist import catalog

    rows = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in catalog.IMAGE_SUFFIXES):
        name = path.stem.lower()
        view = "left" if "_left" in name else "right" if "_right" in name else ""
        rows.append({"image_id": hashlib.md5(str(path.relative_to(root)).encode()).hexdigest()[:16],
                     "identity": path.parent.name, "path": str(path.relative_to(root)), "species": "lion",
                     "orientation": view})
    return pd.DataFrame(rows)


def copy_tree(source: str, target: str) -> int:
    """Copy every object under ``source`` to the same key under ``target`` (a test's own copy of a shared store);
    returns how many."""
    files = storage.list_files(source)
    for url in files:
        storage.write_bytes(storage.join(target, storage.relative_key(source, url)), storage.read_bytes(url))
    return len(files)
