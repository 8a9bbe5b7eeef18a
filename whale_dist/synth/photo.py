"""One synthetic photo of an individual: random pose, framing, sea, light, occlusion, blur and JPEG noise.

These are the nuisances that make raw-pixel matching fail on real surveys (the same fin photographed twice shares
almost no pixels), so they are drawn strongly; the identity marks drawn by ``synth_draw`` are left untouched.
All randomness comes from the generators passed in, so a photo is a pure function of its seeds.
"""

from __future__ import annotations

import io

import numpy as np

WATER = np.array([(18, 52, 86), (24, 80, 96), (52, 82, 88), (70, 86, 92), (12, 34, 48), (40, 70, 60)], np.float32)


def photo_conditions(rng: np.random.Generator) -> dict:
    """The sea's colour and the light of one photo."""
    return {"water": WATER[rng.integers(len(WATER))] * rng.uniform(0.6, 1.5),
            "gain": rng.uniform(0.6, 1.35), "cast": rng.uniform(0.9, 1.1, size=3)}


def water(size: int, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A sea surface (size x size x 3 float): gradient to the horizon, swell stripes and low-frequency texture."""
    from PIL import Image

    rows = np.linspace(0, 1, size, dtype=np.float32)[:, None]
    cols = np.linspace(0, 1, size, dtype=np.float32)[None, :]
    swell = sum(np.sin(2 * np.pi * (rng.uniform(3, 14) * rows + rng.uniform(-2, 2) * cols) + rng.uniform(0, 6))
                * rng.uniform(4, 14) for _ in range(3))
    coarse = rng.normal(0, 1, size=(6, 6)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)) * rng.uniform(6, 18)
    shade = (swell + texture + rng.uniform(-40, 40) * (rows - 0.5))[:, :, None]
    return np.clip(base[None, None, :] + shade * rng.uniform(0.6, 1.2, size=3), 0, 255)


def pose_transform(template, size: int, rng: np.random.Generator) -> np.ndarray:
    """Template (PIL RGBA) -> posed RGBA float array: rotation, scale, foreshortening, shear, off-centre framing."""
    from PIL import Image

    angle, scale = np.deg2rad(rng.uniform(-22, 22)), rng.uniform(0.8, 1.3)
    squash, shear = rng.uniform(0.7, 1.0), rng.uniform(-0.2, 0.2)
    shift = rng.uniform(-0.15, 0.15, size=2) * size
    c, s = np.cos(angle), np.sin(angle)
    forward = np.array([[c, -s], [s, c]]) @ np.array([[squash, shear], [0, 1]]) * scale * size / template.size[0]
    inverse = np.linalg.inv(forward)
    centre_out, centre_in = np.array([size / 2, size / 2]) + shift, np.array(template.size) / 2
    offset = centre_in - inverse @ centre_out
    data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    posed = template.transform((size, size), Image.AFFINE, data, resample=Image.BILINEAR)
    return np.asarray(posed, dtype=np.float32)


def light(animal: np.ndarray, rng: np.random.Generator, conditions: dict) -> np.ndarray:
    """Exposure and colour cast, plus a sun-side gradient across the animal."""
    size = animal.shape[0]
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    direction = rng.uniform(-1, 1, size=2)
    gradient = 1 + 0.25 * (direction[0] * ramp[None, :] + direction[1] * ramp[:, None])
    gain = conditions["gain"] * rng.uniform(0.85, 1.15) * conditions["cast"] * rng.uniform(0.95, 1.05, size=3)
    return np.clip(animal * gradient[:, :, None] * gain[None, None, :], 0, 255)


def occlude(image: np.ndarray, alpha: np.ndarray, rng: np.random.Generator, sea: np.ndarray) -> np.ndarray:
    """Water in front of the animal: a wavy waterline, and sometimes a foam splash or wave crest."""
    size = image.shape[0]
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    occupied = np.nonzero(alpha.max(axis=1) > 0.5)[0]
    top, bottom = (occupied.min(), occupied.max()) if len(occupied) else (size, size)
    level = top + (bottom - top) * rng.uniform(0.6, 1.0)  # never hides more than 40% of the animal's height
    edge = level + rng.uniform(1, 4) * np.sin(cols * rng.uniform(0.1, 0.3) + rng.uniform(0, 6))
    cover = np.clip(rows - edge + 1, 0, 1)
    if rng.random() < 0.3:  # foam splash over part of the animal
        cy, cx = rng.uniform(0.25, 0.85) * size, rng.uniform(0.15, 0.85) * size
        r = rng.uniform(0.08, 0.2) * size
        blob = rng.uniform(0.6, 0.9) * np.exp(-(((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * r * r)) ** 2)
        foam = np.clip(230 + rng.normal(0, 12, size=image.shape), 0, 255)
        image = image * (1 - blob[:, :, None]) + foam * blob[:, :, None]
    return image * (1 - cover[:, :, None]) + sea * cover[:, :, None]


def render_photo(template, size: int, rng: np.random.Generator, conditions: dict) -> bytes:
    """One JPEG (size x size) of the individual whose canonical picture is ``template`` (PIL RGBA, any size)."""
    from PIL import Image, ImageFilter

    canvas = size * 2  # draw at twice the size, then downsample: cheap anti-aliasing
    posed = pose_transform(template, canvas, rng)
    alpha = posed[:, :, 3:] / 255.0
    sea = water(canvas, rng, conditions["water"])
    image = sea * (1 - alpha) + light(posed[:, :, :3], rng, conditions) * alpha
    image = occlude(image, alpha[:, :, 0], rng, sea)
    image = image + rng.normal(0, rng.uniform(1, 7), size=image.shape)
    photo = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize((size, size), Image.BOX)
    photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2)))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=int(rng.integers(55, 92)), subsampling=2, optimize=False)
    return buffer.getvalue()
