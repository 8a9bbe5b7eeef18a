"""Photo decoding shared by training, embedding and identification: one code path, so one set of failure modes.

A photo that cannot be used raises ``ImageError`` with a stage (``read``, ``decode``, ``crop``) and a one-line
message; callers record it in the error table and go on with the rest of the batch.
"""

from __future__ import annotations

import io

import numpy as np

from whale_dist.errors import UserError

# Larger than any survey photo we know of (a 100 MP medium-format frame) yet far below what a decompression bomb
# declares; PIL's own guard (Image.MAX_IMAGE_PIXELS, 89 MP warn / 179 MP error) is applied on top.
MAX_PIXELS = 120_000_000


class ImageError(UserError, ValueError):
    """A photo that cannot be used; ``stage`` says where it failed."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes -> RGB uint8 array (H, W, 3), EXIF orientation applied, any mode/bit depth converted."""
    return _decode(data, max_pixels)[0]


def _decode(data: bytes, max_pixels: int = MAX_PIXELS, draft_to: int = 0, bbox=None) -> tuple[np.ndarray, float]:
    """``decode_image``, plus the scale of the decoded photo against its full size (1.0 unless drafted).

    With ``draft_to`` a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's ``draft``) as far
    as the photo, or its ``bbox`` region, keeps at least ``draft_to`` pixels on each side. A 12 MP survey photo
    bound for 512 px decodes several times faster this way, and DCT-domain scaling averages pixels, as a good
    downscale should.
    """
    from PIL import Image, ImageOps

    if not data:
        raise ImageError("decode", "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError("decode", f"image declares {width}x{height} pixels, above the {max_pixels} limit")
            reduce = draft_reduction(img.size, bbox, draft_to) if img.format == "JPEG" else 1
            if reduce > 1:
                img.draft("RGB", (-(-width // reduce), -(-height // reduce)))
            img.load()
            scale = img.size[0] / width  # the same on both axes, so EXIF rotation below does not change it
            return _to_rgb(ImageOps.exif_transpose(img)), scale
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("decode", f"decompression bomb refused: {exc}") from exc
    except Exception as exc:  # PIL raises many types for broken files
        detail = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise ImageError("decode", f"{type(exc).__name__}: {detail}") from exc


def draft_reduction(size: tuple[int, int], bbox, target: int) -> int:
    """The largest of 1, 2, 4, 8 that leaves the photo (or the bbox region) at least ``target`` px on each side.

    The bbox is in either orientation (EXIF may swap the axes), so the region's shorter side is what counts.
    """
    if target <= 0:
        return 1
    if bbox is not None:
        x0, y0, x1, y1 = bbox
        shorter = min(x1 - x0, y1 - y0)
    else:
        shorter = min(size)
    reduce = 1
    while reduce < 8 and shorter / (reduce * 2) >= target:
        reduce *= 2
    return reduce


def _to_rgb(img) -> np.ndarray:
    """Any PIL mode -> RGB uint8; 16-bit greyscale is scaled, alpha is composited on black."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float32)
        peak = max(float(array.max()), 1.0)
        scale = 65535.0 if peak > 255 else 255.0
        grey = np.clip(array / scale * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def crop_bbox(image: np.ndarray, bbox: tuple[float, float, float, float] | None, margin: float = 0.05) -> np.ndarray:
    """Crop to ``bbox`` (x0, y0, x1, y1 pixels) widened by ``margin``; a box outside the photo is an error."""
    if bbox is None:
        return image
    height, width = image.shape[:2]
    x0, y0, x1, y1 = bbox
    pad_x, pad_y = (x1 - x0) * margin, (y1 - y0) * margin
    left, top = int(max(0, x0 - pad_x)), int(max(0, y0 - pad_y))
    right, bottom = int(min(width, x1 + pad_x)), int(min(height, y1 + pad_y))
    if right - left < 2 or bottom - top < 2:
        raise ImageError("crop", f"bbox {bbox} lies outside the {width}x{height} photo")
    return image[top:bottom, left:right]


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` without keeping aspect (as the Happywhale top solutions did)."""
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_photo(data: bytes, size: int, bbox: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8: decode (a JPEG at reduced scale where that keeps ``size``), crop, resize."""
    image, scale = _decode(data, draft_to=size, bbox=bbox)
    if bbox is not None and scale != 1.0:
        bbox = tuple(coordinate * scale for coordinate in bbox)
    return resize(crop_bbox(image, bbox), size)


def to_tensor_batch(images: np.ndarray):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]; the model normalises itself."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images))
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)
