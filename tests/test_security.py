"""Security: nothing untrusted is unpickled, no secret leaks into outputs, no key escapes the output prefix, HTML
escapes everything user-supplied.

The pipeline test runs every job (synth -> train -> embed -> index -> calibrate -> identify -> evaluate) against the
loopback S3 bucket with ``AWS_SECRET_ACCESS_KEY = conftest.TEST_SECRET`` and a catalogue doctored with hostile names,
then reads back every object and file the jobs wrote, the captured output and the Ray session logs.
"""

from __future__ import annotations

import ast
import io
import os
import pathlib

import pytest
import torch
from fault_log import record

from whale_dist import storage

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*REPO.joinpath("whale_dist").rglob("*.py"), *REPO.joinpath("jobs").glob("*.py")])


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (``torch.load``, ``pickle.loads``), '' when not a plain name chain."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner or '?'}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


UNSAFE_CALLS = {"pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads",
                "joblib.load", "pd.read_pickle", "pandas.read_pickle", "yaml.load", "yaml.unsafe_load",
                "yaml.full_load", "marshal.loads", "shelve.open", "eval", "exec"}


def unsafe_calls(path: pathlib.Path) -> list[str]:
    """Calls that can execute code from data: any unpickler, ``torch.load`` without ``weights_only=True``,
    ``np.load(allow_pickle=True)``, non-safe YAML loaders, eval/exec."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        where = f"{path.relative_to(REPO)}:{node.lineno} {name}"
        if name in UNSAFE_CALLS:
            found.append(where)
        elif name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(where + " without weights_only=True")
        elif name.endswith("np.load") or name == "numpy.load":
            if _keyword(node, "allow_pickle") is not False and _keyword(node, "allow_pickle") is not None:
                found.append(where + " with allow_pickle")
    return found


def test_static_scan_finds_no_code_executing_loader():
    assert len(SOURCES) > 20
    violations = [v for path in SOURCES for v in unsafe_calls(path)]
    assert violations == []
    # the scanner itself catches what it should
    probe = REPO / "build" / "probe_unsafe.py"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text("import torch, pickle\ntorch.load('x')\ntorch.load('x', weights_only=False)\npickle.loads(b'')\n"
                     "torch.load('x', weights_only=True)\n")
    try:
        assert len(unsafe_calls(probe)) == 3
    finally:
        probe.unlink()


class Payload:
    """Unpickling this calls ``open(marker, 'w')``: the file's existence proves code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_torch_file(marker: pathlib.Path, state: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    torch.save({**(state or {}), "evil": Payload(str(marker))}, buffer)
    return buffer.getvalue()


def test_hostile_model_file_is_refused_without_running_it(tmp_path):
    from dataclasses import asdict

    from whale_dist.model import Encoder, ModelCard, load_encoder, state_dict_bytes

    marker = tmp_path / "pwned"
    good = torch.load(io.BytesIO(state_dict_bytes(Encoder("test_convnext", 16))), weights_only=True)
    url = str(tmp_path / "model.pt")
    storage.write_bytes(url, hostile_torch_file(marker, good))
    storage.write_json(str(tmp_path / "model.json"), asdict(ModelCard("test_convnext", 16, 32)))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_encoder(url)
    assert not marker.exists()
    record("hostile pickle in model.pt", injected=1, code_executed=int(marker.exists()), loaded=0)


def test_hostile_backbone_weights_are_refused_without_running_them(tmp_path):
    from whale_dist.model import Encoder, load_backbone_weights

    marker = tmp_path / "pwned"
    url = str(tmp_path / "backbone.pth")
    storage.write_bytes(url, hostile_torch_file(marker))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_backbone_weights(Encoder("test_convnext", 16).backbone, url)
    assert not marker.exists()
    record("hostile pickle in backbone weights", injected=1, code_executed=int(marker.exists()), loaded=0)


def test_hostile_training_checkpoint_is_refused_without_running_it(tmp_path):
    from ray.train import Checkpoint

    from whale_dist.train import checkpoint as train_checkpoint

    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    (folder / train_checkpoint.STATE).write_bytes(hostile_torch_file(marker, {"epoch": 3}))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        train_checkpoint.load_state(Checkpoint.from_directory(str(folder)))
    assert not marker.exists()
    record("hostile pickle in training checkpoint", injected=1, code_executed=int(marker.exists()), loaded=0)


# --- the whole pipeline on the loopback bucket, with hostile names ------------------------------------------------

HOSTILE_INDIVIDUAL = '<script>alert("wd-individual")</script>'
HOSTILE_TRAIN_NAME = 'q"><img src=x onerror=alert(1)>.jpg'
HOSTILE_QUERY_KEYS = ["../../../escape-rel.jpg", "/tmp/wd-abs-escape.jpg", "..\\..\\win-escape.jpg",
                      "<svg onload=alert(2)>.jpg"]


def read_csv(url: str):
    import pandas as pd

    return pd.read_csv(io.StringIO(storage.read_text(url)), dtype=str, keep_default_na=False)


def write_csv(url: str, frame) -> None:
    storage.write_text(url, frame.to_csv(index=False))


def doctor_survey(survey: str) -> None:
    """Hostile names where users supply them: an individual id, a training photo's file name, query image keys."""
    train, manifest = read_csv(f"{survey}/train.csv"), read_csv(f"{survey}/train_manifest.csv")
    labels, queries = read_csv(f"{survey}/test_labels.csv"), read_csv(f"{survey}/test_manifest.csv")
    known = labels["individual_id"][labels["individual_id"].isin(set(train["individual_id"]))]
    victim = known.iloc[0]  # an individual that is the truth of a query, so the report must show its name
    for frame in (train, manifest, labels):
        frame.loc[frame["individual_id"] == victim, "individual_id"] = HOSTILE_INDIVIDUAL
    old = train["image"][0]
    photo = storage.read_bytes(f"{survey}/train_images/{old}")
    storage.write_bytes(f"{survey}/train_images/{HOSTILE_TRAIN_NAME}", photo)
    storage.remove(f"{survey}/train_images/{old}")
    train.loc[0, "image"] = HOSTILE_TRAIN_NAME
    manifest.loc[manifest["image"] == f"train_images/{old}", "image"] = f"train_images/{HOSTILE_TRAIN_NAME}"
    queries["image_key"] = [os.path.basename(i) for i in queries["image"]]
    extra = []
    for row, key in enumerate(HOSTILE_QUERY_KEYS):
        label = labels[labels["image"] == queries["image_key"][row]].iloc[0].to_dict()
        queries.loc[row, "image_key"] = key
        extra.append({**label, "image": key})
    import pandas as pd

    labels = pd.concat([labels, pd.DataFrame(extra)], ignore_index=True)
    for name, frame in (("train.csv", train), ("train_manifest.csv", manifest), ("test_labels.csv", labels),
                        ("test_manifest.csv", queries)):
        write_csv(f"{survey}/{name}", frame)


def secret_hits(name: str, data: bytes, secret: str) -> list[str]:
    """Where ``secret`` occurs in a file: its raw bytes, and for parquet (compressed pages) its decoded values."""
    hits = [name] if secret.encode() in data else []
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if secret in table.to_pandas().to_csv() or secret in str(table.schema.metadata or {}):
            hits.append(name + " (decoded)")
    return hits


def test_secret_scan_decodes_compressed_parquet(tmp_path):
    """The scanner can fail: a secret inside a compressed parquet page is found although its raw bytes are not there."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    values = [rng.bytes(24).hex() + "s3cr3t" + rng.bytes(24).hex() for _ in range(200)]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"message": values}), buffer, compression="gzip", write_statistics=False,
                   use_dictionary=False)
    assert b"s3cr3t" not in buffer.getvalue()
    assert secret_hits("a.parquet", buffer.getvalue(), "s3cr3t") == ["a.parquet (decoded)"]


def bucket_objects(bucket: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def local_files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def ray_session_logs() -> dict[str, bytes]:
    import ray

    session = pathlib.Path(ray._private.worker._global_node.get_session_dir_path())
    return {str(p): p.read_bytes() for p in (session / "logs").rglob("*") if p.is_file() and p.stat().st_size < 50e6}


def tags_and_attributes(html_text: str) -> tuple[set[str], set[str]]:
    from html.parser import HTMLParser

    tags, attributes = set(), set()

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.add(tag)
            attributes.update(name for name, _ in attrs)

    Collect().feed(html_text)
    return tags, attributes


@pytest.mark.slow
def test_whole_pipeline_leaks_no_secret_escapes_no_prefix_and_escapes_html(ray_cluster, s3_bucket, tmp_path, capfd):
    import csv

    from conftest import TEST_SECRET

    from whale_dist import demo
    from whale_dist.config import load_config

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == TEST_SECRET  # the jobs really run with the secret in reach
    local = tmp_path / "local"
    cfg = load_config(str(REPO / "configs" / "debug.yaml"),
                      [f"root={s3_bucket}/store", "synth.n_individuals=8", "train.epochs=1",
                       "catalogue.n_folds=4", f"identify.local_copy={local}", "identify.min_species_queries=2"])
    stages = dict(demo.STAGES)
    results: dict = {}
    stages["synth"](cfg, results)
    doctor_survey(cfg.survey_url)
    for _, stage in demo.STAGES[1:]:
        stage(cfg, results)
    out, err = capfd.readouterr()

    written = {f"{s3_bucket}/{k}": v for k, v in bucket_objects(s3_bucket.removeprefix("s3://")).items()}
    captured = {"<stdout>": out.encode(), "<stderr>": err.encode()}
    scanned = {**written, **local_files(local), **ray_session_logs(), **captured}
    leaks = [hit for name, data in scanned.items() for hit in secret_hits(name, data, TEST_SECRET)]
    assert leaks == []
    assert len(written) > 50 and any(k.endswith(".parquet") for k in written) and any("LATEST" in k for k in written)

    outside = [k for k in written if not k.startswith(f"{s3_bucket}/store/")]
    dotted = [k for k in written if ".." in k.split("/") or "\\" in k]
    assert outside == [] and dotted == []
    assert [p for p in local.rglob("*") if p.is_file() and not str(p).startswith(str(local / "report"))
            and p.suffix != ".png"] == []
    names = ("escape-rel.jpg", "win-escape.jpg", "wd-abs-escape.jpg")
    escaped = [p for p in [pathlib.Path("/tmp/wd-abs-escape.jpg"), *tmp_path.parent.rglob("*")] if p.name in names
               and p.exists()]
    assert escaped == []

    html_text = (local / "report" / "index.html").read_text()
    tags, attributes = tags_and_attributes(html_text)
    assert "script" not in tags and not [a for a in attributes if a.startswith("on")], (tags, attributes)
    assert "svg" not in tags and "<svg onload" not in html_text and "onerror=alert" not in html_text.replace(
        "onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&quot;wd-individual&quot;)&lt;/script&gt;" in html_text  # shown, escaped
    assert "&lt;svg onload=alert(2)&gt;.jpg" in html_text

    rows = list(csv.DictReader(io.StringIO(written[f"{s3_bucket}/store/identify/debug/submission.csv"].decode())))
    assert set(HOSTILE_QUERY_KEYS) <= {r["image"] for r in rows}
    record("secret + hostile names through every job (synth..evaluate)", injected=1 + 1 + 1 + len(HOSTILE_QUERY_KEYS),
           files_scanned=len(scanned), secret_found=len(leaks), objects_outside_prefix=len(outside),
           files_escaped=len(escaped), script_tags=int("script" in tags),
           event_handler_attributes=len([a for a in attributes if a.startswith("on")]))
