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


def smooth_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like image (smooth colour fields) so that downscaling methods agree up to rounding."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
    return np.array(coarse.resize((width, height), Image.BICUBIC))


def full_decode_then_resize(data: bytes, size: int, bbox=None) -> np.ndarray:
    from whale_dist.images import resize

    return resize(crop_bbox(decode_image(data), bbox), size)


def test_draft_reduction_keeps_the_target_size():
    from whale_dist.images import draft_reduction

    assert draft_reduction((4000, 3000), None, 384) == 4  # 3000 / 8 = 375 would go below 384
    assert draft_reduction((4000, 3000), None, 0) == 1
    assert draft_reduction((640, 480), None, 128) == 2
    assert draft_reduction((4000, 3000), (0, 0, 1000, 900), 384) == 2  # the bbox region must keep 384 px


def test_large_jpeg_decodes_at_reduced_scale_like_a_full_decode():
    big = smooth_photo(1600, 1200)
    data = encode(Image.fromarray(big), quality=95)
    fast, slow = load_photo(data, 128), full_decode_then_resize(data, 128)
    assert fast.shape == slow.shape == (128, 128, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 3.0


def test_bbox_crop_is_the_same_region_at_reduced_scale():
    big = smooth_photo(1600, 1200, seed=1)
    big[600:1000, 300:900] = (255, 0, 0)  # the animal: a red box the crop must find at any decode scale
    data = encode(Image.fromarray(big), quality=95)
    bbox = (300.0, 600.0, 900.0, 1000.0)
    fast, slow = load_photo(data, 64, bbox), full_decode_then_resize(data, 64, bbox)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 4.0
    centre = fast[8:56, 8:56].reshape(-1, 3).mean(axis=0)
    assert centre[0] > 230 and centre[1] < 30 and centre[2] < 30


def test_rotated_jpeg_with_bbox_crops_the_same_at_reduced_scale():
    stored = smooth_photo(1600, 1000, seed=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 1000 wide, 1600 high; the bbox is in displayed pixels
    data = encode(Image.fromarray(stored), quality=95, exif=exif.tobytes())
    bbox = (100.0, 200.0, 900.0, 1400.0)
    fast, slow = load_photo(data, 96, bbox), full_decode_then_resize(data, 96, bbox)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 4.0
