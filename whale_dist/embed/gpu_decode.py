"""Decoding on the embedder's GPU (nvJPEG through ``torchvision.io.decode_jpeg(device=...)``).

On a GPU node the CPUs, not the GPU, limit embedding throughput once photos are large: a 12 MP JPEG takes ~100 ms to
decode on one core and ~2 ms with nvJPEG. With ``embed.gpu_decode`` the CPU tasks only fetch bytes and the actor
decodes, crops and resizes on its device. PNGs and anything nvJPEG refuses fall back to the CPU path
(``images.load_photo``), so the set of photos that fail, and their stages, is the same as with CPU decoding; pixels
differ slightly (GPU bilinear resize with antialiasing vs PIL's).
"""

from __future__ import annotations

import numpy as np

from whale_dist.catalog import parse_bbox
from whale_dist.images import ImageError, crop_bbox, load_photo


def decode_on_device(datas, bboxes, ok: np.ndarray, size: int, device):
    """Bytes -> float (N, 3, size, size) in [0, 1] on ``device``; returns (tensor, {row: (stage, message)})."""
    import torch

    images = torch.zeros((len(datas), 3, size, size), device=device)
    failures: dict[int, tuple[str, str]] = {}
    jpegs = [int(i) for i in np.flatnonzero(ok) if bytes(datas[i][:2]) == b"\xff\xd8"]
    on_device = set()
    for i, pixels in zip(jpegs, _decode_jpegs([datas[i] for i in jpegs], device)):
        if pixels is not None:
            on_device.add(i)
            try:
                images[i] = _crop_resize(pixels, parse_bbox(str(bboxes[i])), size)
            except ImageError as exc:
                failures[i] = (exc.stage, exc.message)
    for i in (int(i) for i in np.flatnonzero(ok) if int(i) not in on_device):
        try:  # PNG, or a JPEG nvJPEG refused: the CPU path decides
            photo = load_photo(bytes(datas[i]), size, parse_bbox(str(bboxes[i])))
            images[i] = torch.tensor(photo, device=device).permute(2, 0, 1).float().div_(255.0)
        except ImageError as exc:
            failures[i] = (exc.stage, exc.message)
    return images, failures


def _decode_jpegs(datas, device) -> list:
    """uint8 (3, H, W) tensors on ``device``, None where nvJPEG failed (batched call first, then one by one)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    inputs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if not inputs:
        return []
    try:
        return list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except RuntimeError:
        pass
    results = []
    for tensor in inputs:
        try:
            results.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
        except RuntimeError:
            results.append(None)
    return results


def _crop_resize(pixels, bbox, size: int):
    """uint8 (3, H, W) on the device -> float (3, size, size) in [0, 1], cropped as ``images.crop_bbox`` does."""
    import torch.nn.functional as F

    if bbox is not None:
        # crop_bbox works on (H, W, C) arrays; a zero-copy view of the shape is enough to compute the window
        height, width = pixels.shape[1:]
        window = crop_bbox(_Shape(height, width), bbox)
        pixels = pixels[:, window.top:window.bottom, window.left:window.right]
    image = pixels.float().div_(255.0).unsqueeze(0)
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


class _Shape:
    """Stands in for an (H, W, 3) array in ``crop_bbox``: slicing records the window instead of copying pixels."""

    def __init__(self, height: int, width: int):
        self.shape = (height, width, 3)

    def __getitem__(self, index):
        rows, cols = index
        return _Window(rows.start, rows.stop, cols.start, cols.stop)


class _Window:
    def __init__(self, top: int, bottom: int, left: int, right: int):
        self.top, self.bottom, self.left, self.right = top, bottom, left, right
