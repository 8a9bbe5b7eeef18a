"""Storage: one API for local paths and S3 (loopback moto server), atomic writes, listing, markers."""

import os

import pytest

from whale_dist import storage


@pytest.fixture(params=["local", "s3"])
def base_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def test_round_trip_and_listing(base_url):
    storage.write_text(storage.join(base_url, "a", "x.txt"), "hello")
    storage.write_bytes(storage.join(base_url, "a", "b", "y.jpg"), b"\xff\xd8")
    storage.write_json(storage.join(base_url, "m.json"), {"k": 1})
    assert storage.read_text(storage.join(base_url, "a", "x.txt")) == "hello"
    assert storage.read_json(storage.join(base_url, "m.json")) == {"k": 1}
    listed = storage.list_files(base_url)
    assert len(listed) == 3
    jpgs = storage.list_files(base_url, (".jpg",))
    assert [storage.relative_key(base_url, u) for u in jpgs] == ["a/b/y.jpg"]
    assert storage.list_files(storage.join(base_url, "absent")) == []


def test_read_object_is_read_bytes_through_the_fast_client(base_url):
    url = storage.join(base_url, "photos", "p.jpg")
    payload = bytes(range(256)) * 40
    storage.write_bytes(url, payload)
    assert storage.read_object(url) == payload == storage.read_bytes(url)
    if base_url.startswith("s3://"):  # the C++ client is really the one in use on S3 (it honours the endpoint)
        assert storage._native_s3(base_url[5:].split("/")[0]) is not None
    with pytest.raises(FileNotFoundError):
        storage.read_object(storage.join(base_url, "photos", "absent.jpg"))


def test_done_markers(base_url):
    part = storage.join(base_url, "part-00000.parquet")
    storage.write_bytes(part, b"data")
    assert not storage.is_done(part)
    storage.mark_done(part, {"rows": 3})
    assert storage.is_done(part)
    assert storage.read_json(storage.done_marker(part)) == {"rows": 3}


def test_file_url_and_plain_path_are_the_same_place(tmp_path):
    storage.write_text(f"file://{tmp_path}/f.txt", "x")
    assert storage.read_text(str(tmp_path / "f.txt")) == "x"


def test_interrupted_local_write_leaves_nothing_visible(tmp_path, monkeypatch):
    target = tmp_path / "out" / "model.pt"
    storage.write_bytes(str(target), b"old")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(str(target), b"new-and-longer")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(target.parent)) == ["model.pt"]


def test_interrupted_s3_upload_leaves_nothing_visible(s3_bucket, monkeypatch):
    """A PUT that fails leaves no object and no temporary object behind (S3 never exposes a partial PUT)."""
    url = s3_bucket + "/pub/ids.parquet"
    fs = storage.filesystem(url)

    def crash(*args, **kwargs):
        raise ConnectionError("network dropped")

    monkeypatch.setattr(fs, "pipe_file", crash)
    with pytest.raises(ConnectionError):
        storage.write_bytes(url, b"x" * 1000)
    monkeypatch.undo()
    assert not storage.exists(url)
    assert storage.list_files(s3_bucket + "/pub") == []


def test_write_file_publishes_what_the_writer_made_and_nothing_else(base_url):
    """``write_file``: the writer gets a path, may read back what it wrote (a shard's sha256), and only the finished
    file appears at the URL; a writer that fails leaves the old object and no temporary file."""
    url = storage.join(base_url, "idx", "shard-000.faiss")
    sizes = []

    def write(path):
        with open(path, "wb") as handle:
            handle.write(b"v1" * 1000)
        sizes.append(os.path.getsize(path))

    storage.write_file(url, write)
    assert storage.read_bytes(url) == b"v1" * 1000 and sizes == [2000]

    def broken(path):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_file(url, broken)
    assert storage.read_bytes(url) == b"v1" * 1000
    assert [storage.relative_key(base_url, u) for u in storage.list_files(base_url)] == ["idx/shard-000.faiss"]


@pytest.mark.parametrize("key, expected", [
    ("../../etc/passwd", "etc/passwd"),
    ("/abs/path.jpg", "abs/path.jpg"),
    ("a/<script>.jpg", "a/_script_.jpg"),
    ("..", "_"),
])
def test_safe_relative_path(key, expected):
    assert storage.safe_relative_path(key) == expected


def test_redact_removes_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue")
    assert storage.redact("error talking with topsecretvalue") == "error talking with ***"
