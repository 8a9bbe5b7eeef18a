"""Photo decoding: every mode becomes RGB uint8, EXIF orientation applies, broken files raise ImageError(stage)."""

import io

import numpy as np
import pytest
from PIL import Image

from whale_dist.images import ImageError, crop_bbox, decode_image, load_photo


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                                       ("I;16", "PNG"), ("P", "PNG"), ("LA", "PNG")])
def test_every_mode_becomes_rgb_uint8(mode, fmt):
    img = Image.new(mode, (20, 10))
    array = decode_image(encode(img, fmt))
    assert array.shape == (10, 20, 3) and array.dtype == np.uint8


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    array = decode_image(encode(Image.fromarray(grey), "PNG"))
    assert 120 <= int(array[0, 0, 0]) <= 135


def test_alpha_is_composited_on_black():
    img = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert int(decode_image(encode(img, "PNG")).max()) == 0


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    array = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert array.shape[:2] == (30, 10)


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty file"),
    (b"this is not an image at all", "UnidentifiedImageError"),
])
def test_broken_bytes_raise_decode_errors(data, fragment):
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.stage == "decode" and fragment in str(info.value)


def test_truncated_jpeg_is_a_decode_error():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.stage == "decode"


def test_decompression_bomb_is_refused_before_decoding():
    data = encode(Image.new("L", (1000, 1000)), "PNG")
    with pytest.raises(ImageError, match="above the"):
        decode_image(data, max_pixels=10_000)


def test_crop_and_resize():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    img[20:40, 50:150] = 255
    cropped = crop_bbox(img, (50, 20, 150, 40), margin=0.0)
    assert cropped.shape == (20, 100, 3) and cropped.min() == 255
    with pytest.raises(ImageError) as info:
        crop_bbox(img, (500, 500, 600, 600))
    assert info.value.stage == "crop"
    assert load_photo(encode(Image.fromarray(img)), 32).shape == (32, 32, 3)
