"""Bad input: every kind of broken or unusual photo in one batch, bad manifests, bad vectors at index build.

Each input is either handled correctly (decoded to the right pixels) or reported in one clear line with its stage,
and nothing else in the batch is lost or shifted: the embeddings of the good photos in a batch full of broken ones are
the embeddings of those same photos on their own.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
from fault_log import record
from helpers import IMAGE_SIZE, make_model
from PIL import Image

from whale_dist import cli, embed, images, storage
from whale_dist.embed import pipeline as embed_pipeline
from whale_dist.embed import sources as embed_sources


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def halves(mode: str = "RGB", size=(40, 20), left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """Left half one colour, right half another: orientation and channel mistakes become visible."""
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img.convert(mode)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png16_rgb(width: int = 8, height: int = 6) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, as raw converters write them: pure red at full scale."""
    pixel = struct.pack(">HHH", 65535, 0, 0)
    raw = b"".join(b"\x00" + pixel * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def declared_size_png(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header declares ``width`` x ``height``: a decompression bomb's calling card."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data[8:33] = png_chunk(b"IHDR", header)
    return bytes(data)


def declared_size_jpeg(width: int, height: int) -> bytes:
    """A baseline JPEG whose SOF0 header is patched to declare ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def exif_rotated() -> bytes:
    """A landscape photo stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(halves(), "JPEG", exif=exif.tobytes(), quality=95)


def palette_with_transparency() -> bytes:
    img = Image.new("P", (10, 10), 1)
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    return encode(img, "PNG", transparency=1)


GOOD_PHOTOS = {
    "good/rgb.jpg": lambda: encode(halves(), quality=95),
    "good/cmyk.jpg": lambda: encode(halves("CMYK"), quality=95),
    "good/grey.jpg": lambda: encode(halves("L"), quality=95),
    "good/grey16.png": lambda: encode(Image.fromarray(np.full((20, 40), 40000, np.uint16)), "PNG"),
    "good/rgb48.png": png16_rgb,
    "good/alpha.png": lambda: encode(halves("RGBA"), "PNG"),
    "good/palette_transparent.png": palette_with_transparency,
    "good/exif_rotated.jpg": exif_rotated,
    "good/tiff_named.jpg": lambda: encode(halves(), "TIFF"),
    "good/UPPER.JPEG": lambda: encode(halves(), quality=95),
}
BAD_PHOTOS = {  # name -> (bytes, fragment of the one-line message)
    "bad/random.jpg": (lambda: bytes(np.random.default_rng(5).integers(0, 256, 2048, dtype=np.uint8)),
                       "UnidentifiedImageError"),
    "bad/truncated.jpg": (lambda: encode(Image.effect_noise((64, 64), 60).convert("RGB"))[:600], ""),
    "bad/zero.jpg": (lambda: b"", "empty file"),
    "bad/bomb_huge.png": (lambda: declared_size_png(100_000, 100_000), "decompression bomb"),
    "bad/bomb_above_limit.png": (lambda: declared_size_png(11_000, 11_000), "above the"),
    "bad/bomb.jpg": (lambda: declared_size_jpeg(60_000, 60_000), "decompression bomb"),
    "bad/html.png": (lambda: b"<html><body>403 Forbidden</body></html>", "UnidentifiedImageError"),
}


def survey() -> dict[str, bytes]:
    files = {name: make() for name, make in GOOD_PHOTOS.items()}
    files.update({name: make() for name, (make, _) in BAD_PHOTOS.items()})
    return files


def decode_batch(root: str):
    work, _ = embed_sources.list_archive(root)
    work = embed_pipeline.plan_chunks(work, set(), 0, 100)
    return embed_pipeline.fetch_decode({c: work[c].to_numpy() for c in work.columns}, IMAGE_SIZE)


def test_one_batch_of_every_kind_of_photo(tmp_path):
    """Unusual but valid photos decode to the right pixels; broken ones are one-line decode errors; none is lost."""
    files = survey()
    for name, data in files.items():
        storage.write_bytes(str(tmp_path / name), data)
    out = decode_batch(str(tmp_path))
    keys = list(out["image_key"])
    assert Counter(keys) == Counter(list(files))  # every input exactly once
    rows = {k: i for i, k in enumerate(keys)}
    for name, (_, fragment) in BAD_PHOTOS.items():
        i = rows[name]
        assert not out["ok"][i] and out["stage"][i] == "decode", name
        assert fragment in out["message"][i] and "\n" not in out["message"][i], (name, out["message"][i])
    for name in GOOD_PHOTOS:
        i = rows[name]
        assert out["ok"][i] and out["stage"][i] == "", (name, out["message"][i])
    image = {name: out["image"][rows[name]].astype(int) for name in GOOD_PHOTOS}
    for name in ("good/rgb.jpg", "good/cmyk.jpg", "good/alpha.png", "good/tiff_named.jpg"):
        left, right = image[name][:, 4], image[name][:, -4]  # columns well inside each half
        assert (left[:, 0] > 200).all() and (left[:, 2] < 60).all(), name
        assert (right[:, 2] > 200).all() and (right[:, 0] < 60).all(), name
    top, bottom = image["good/exif_rotated.jpg"][4], image["good/exif_rotated.jpg"][-4]
    assert (top[:, 0] > 200).all() and (bottom[:, 2] > 200).all()  # the left half is now on top
    assert (image["good/rgb48.png"][..., 0] == 255).all() and (image["good/rgb48.png"][..., 1:] == 0).all()
    grey16 = image["good/grey16.png"]
    assert 150 <= grey16.min() and grey16.max() <= 160  # 40000/65535 of full scale, not clipped to 255
    assert (image["good/palette_transparent.png"] == 0).all()  # transparent composited on black
    record("bad photos in one decode batch", injected=len(BAD_PHOTOS) + len(GOOD_PHOTOS) - 1,
           lost=len(files) - len(set(keys)), duplicated=len(keys) - len(set(keys)),
           reported=int((~out["ok"]).sum()), decoded_correctly=int(out["ok"].sum()))


def test_embeddings_of_good_photos_do_not_shift_around_bad_ones(tmp_path):
    """Through the embedder actor's callable: each good photo gets the embedding it gets on its own, bad rows get
    zeros and ``ok`` False (the writer routes them to the error table), row for row."""
    files = survey()
    for name, data in files.items():
        storage.write_bytes(str(tmp_path / name), data)
    card = make_model(str(tmp_path / "model" / "model.pt"))
    embedder = embed.Embedder(str(tmp_path / "model" / "model.pt"), batch_size=4)
    out = embedder(decode_batch(str(tmp_path)))
    ok, keys = out["ok"], list(out["image_key"])
    good = [k for k, flag in zip(keys, ok) if flag]
    alone = np.concatenate([embedder.embed_images(images.load_photo(files[k], IMAGE_SIZE)[None]) for k in good])
    np.testing.assert_allclose(out["embedding"][ok], alone, atol=1e-5)
    assert set(good) == set(GOOD_PHOTOS) and not out["embedding"][~ok].any()
    assert out["embedding"].shape == (len(files), card.embedding_dim)
    record("bad photos beside good ones at the embedder", injected=len(BAD_PHOTOS), lost=len(GOOD_PHOTOS) - len(good),
           shifted=int((~np.isclose(out["embedding"][ok], alone, atol=1e-5).all(axis=1)).sum()))


MANIFESTS = {  # name -> (bytes, fragment of the one-line error)
    "utf16.csv": ("image\nphoto.jpg\n".encode("utf-16"), "not UTF-8"),
    "latin1.csv": ("image\nca\xf1on.jpg\n".encode("latin-1"), "not UTF-8"),
    "duplicates.csv": (b"image,species\nphoto.jpg,beluga\nother.jpg,x\nphoto.jpg,y\n", "row 4: duplicate image key"),
    "empty.csv": (b"", "not a readable CSV"),
    "no_image_column.csv": (b"file,species\nphoto.jpg,x\n", "missing column 'image'"),
    "ragged.csv": (b'image,species\nphoto.jpg,x,extra,more\n"unterminated\n', "not a readable CSV"),
    "bad_bbox.csv": (b"image,bbox\nphoto.jpg,10 10 5 5\n", "row 2: bad bbox"),
    "not_parquet.parquet": (b"PAR1 this is not parquet", "not a readable parquet"),
}


@pytest.fixture
def model_card_only(tmp_path) -> str:
    """``model.pt`` + ``model.json`` without weights: enough for the job to reach the manifest, which it reads first."""
    from dataclasses import asdict

    from whale_dist.model import ModelCard

    url = str(tmp_path / "model" / "model.pt")
    storage.write_bytes(url, b"")
    storage.write_json(url[:-3] + ".json", asdict(ModelCard("test_convnext", 16, IMAGE_SIZE, version="mfake")))
    return url


def test_bad_manifests_are_one_line_each_and_write_nothing(tmp_path, capsys, model_card_only):
    storage.write_bytes(str(tmp_path / "in" / "photo.jpg"), encode(halves()))
    one_line = 0
    for name, (data, fragment) in sorted(MANIFESTS.items()):
        storage.write_bytes(str(tmp_path / "in" / name), data)
        out = tmp_path / f"store-{name}"
        status = cli.run_job(embed.main, ["--manifest", str(tmp_path / "in" / name), f"root={out}",
                                          f"embed.model={model_card_only}"])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and fragment in err, (name, err)
        assert not out.exists(), name
        one_line += 1
    record("bad manifests (encodings, duplicates, empty, ragged, bad bbox, not parquet)", injected=len(MANIFESTS),
           refused_in_one_line=one_line, files_written=0)


BAD_VECTORS = {  # name -> (how to spoil a partition's vectors, fragment of the one-line error)
    "+inf": (lambda x: _set(x, 3, 5, np.inf), "NaN or inf"),
    "-inf": (lambda x: _set(x, 0, 0, -np.inf), "NaN or inf"),
    "all zero": (lambda x: _set(x, 2, slice(None), 0.0), "zero embeddings"),
    "wrong dimension": (lambda x: x[:, :8].copy(), "dimension 8, the index has 32"),
}


def _set(x: np.ndarray, row, column, value) -> np.ndarray:
    x = x.copy()
    x[row, column] = value
    return x


@pytest.mark.slow
def test_bad_vectors_at_index_build_are_one_line_and_keep_the_published_index(ray_cluster, tmp_path):
    """A partition with inf, all-zero or wrong-dimension embeddings stops the build with one line naming it; the
    published index (LATEST) stays what it was and still answers. (NaN is covered in test_index_build.py.)"""
    from helpers import clustered, write_partitions
    from helpers import index_config as config

    from whale_dist.index import Catalogue, IndexInputError, build_index

    embeddings = str(tmp_path / "embeddings")
    good = clustered(40)
    write_partitions(embeddings, "mB", good, rows_per_part=20)
    cfg = config(str(tmp_path))
    first = build_index(cfg)
    refused = 0
    for name, (spoil, fragment) in BAD_VECTORS.items():
        urls = write_partitions(embeddings, "mB", spoil(clustered(10, seed=9)), rows_per_part=10, start=40)
        with pytest.raises(IndexInputError) as info:
            build_index(cfg)
        message = str(info.value)
        assert fragment in message and "part-00004.parquet" in message and "\n" not in message, (name, message)
        refused += 1
        for url in urls:
            storage.remove(storage.done_marker(url))
            storage.remove(url)
        catalogue = Catalogue.load(cfg.index_root)
        assert catalogue.url == first and catalogue.ntotal == len(good)
    record("NaN/inf/zero/wrong-dimension vectors at index build", injected=refused, refused_in_one_line=refused,
           previous_index_kept=int(Catalogue.load(cfg.index_root).url == first), lost=0)
