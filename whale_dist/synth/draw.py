"""Drawing for the synthetic survey: one canonical picture per individual, then one random photo of it per sighting.

An individual is its outline (fluke, dorsal fin or flank) with stable marks drawn once in a canonical frame, exactly
as photo-ID catalogues treat real animals: trailing-edge notches cut into the outline, scars and pigment patches on
the surface. Everything that is *not* identity (pose, scale, framing, lighting, water, blur, JPEG, occlusion) is drawn
per photo, so nearest neighbours on raw pixels mostly match photos that share a pose or a sea, not an animal.
All shapes are in unit coordinates (about -1..1) and mapped to pixels at the end, so the picture is resolution-free.
"""

from __future__ import annotations

import numpy as np

# species -> (shape family, body RGB, mark RGB, relative abundance); names as in the Happywhale catalogue.
SPECIES = {
    "humpback_whale": ("fluke", (45, 45, 52), (232, 232, 226), 0.30),
    "gray_whale": ("fluke", (100, 104, 108), (196, 196, 190), 0.08),
    "bottlenose_dolphin": ("dorsal", (112, 118, 126), (218, 218, 214), 0.22),
    "killer_whale": ("dorsal", (22, 22, 26), (170, 172, 176), 0.12),
    "spinner_dolphin": ("dorsal", (78, 84, 96), (196, 196, 200), 0.08),
    "pantropic_spotted_dolphin": ("flank", (70, 78, 92), (210, 214, 218), 0.10),
    "beluga_whale": ("flank", (222, 222, 216), (120, 122, 124), 0.10),
}
UNIT_RADIUS = 0.45  # unit coordinates span this fraction of the canvas from its centre


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def notch_profile(u: np.ndarray, rng: np.random.Generator, count: int, depth: tuple[float, float]) -> np.ndarray:
    """Sum of triangular dips along an edge parameter ``u`` in [0, 1]: the nicks a catalogue matcher looks for."""
    profile = np.zeros_like(u)
    for _ in range(count):
        centre, width, d = rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.07), rng.uniform(*depth)
        profile += d * np.clip(1 - np.abs(u - centre) / width, 0, None)
    return profile


def bezier(p0, p1, p2, n: int) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def fluke_outline(rng: np.random.Generator) -> np.ndarray:
    """A diving fluke seen from behind: trailing edge on top (scalloped, notched), tail stock going down."""
    span, bulge = rng.uniform(0.85, 0.97), rng.uniform(0.22, 0.36)
    tips, median = rng.uniform(-0.3, -0.1, size=2), rng.uniform(-0.02, 0.08)
    u = np.linspace(0, 1, 40)  # 0 at a tip, 1 at the median notch
    sides = []
    for side, tip in ((-1, tips[0]), (1, tips[1])):
        scallop = sum(rng.uniform(0.004, 0.014) * np.sin(2 * np.pi * rng.uniform(5, 12) * u + rng.uniform(0, 6))
                      for _ in range(2))
        nicks = notch_profile(u, rng, int(rng.integers(0, 3)), (0.05, 0.12))
        y = tip + (median - tip) * u - bulge * np.sin(np.pi * u) * (1 - 0.3 * u) + scallop + nicks
        sides.append(np.stack([side * span * (1 - u), y], axis=1))
    left_lead = bezier((-0.1, 0.3), (-0.55, 0.28), (-span, tips[0]), 20)
    right_lead = bezier((span, tips[1]), (0.55, 0.28), (0.1, 0.3), 20)
    stock = [(0.12, 1.2), (-0.12, 1.2)]
    return np.concatenate([left_lead, sides[0], sides[1][::-1], right_lead, stock])


def dorsal_outline(rng: np.random.Generator, height: float) -> np.ndarray:
    """A dorsal fin on a surfacing back: the trailing edge carries the notches (the classic dolphin fin ID)."""
    back = 0.35
    x0, x1 = rng.uniform(-0.45, -0.3), rng.uniform(0.15, 0.3)
    tip = (rng.uniform(0.1, 0.45), back - height * rng.uniform(0.9, 1.1))
    lead = bezier((x0, back), (x0 + rng.uniform(0.0, 0.15), tip[1] + 0.35), tip, 24)
    trail = bezier(tip, (tip[0] - rng.uniform(0.05, 0.2), back - 0.2), (x1, back), 36)
    u = np.linspace(0, 1, len(trail))
    trail[:, 0] -= notch_profile(u, rng, int(rng.integers(1, 4)), (0.06, 0.14)) * (1 - u)
    left = [(-1.1, back + 0.3), (-0.7, back + 0.08)]
    right = [(0.7, back + 0.08), (1.1, back + 0.3), (1.1, 1.3), (-1.1, 1.3)]
    return np.concatenate([left, lead, trail[1:], right])


def flank_outline(rng: np.random.Generator, fin: bool) -> np.ndarray:
    """A body seen side-on, head to the left; dolphins get a small dorsal fin."""
    x = np.linspace(-0.95, 0.95, 48)
    girth = (1 - x**2) ** 0.7
    top = np.stack([x, -rng.uniform(0.24, 0.32) * girth], axis=1)
    bottom = np.stack([x, rng.uniform(0.18, 0.26) * girth], axis=1)[::-1]
    if fin:
        peak = rng.uniform(-0.05, 0.2)
        fin_pts = np.array([(peak - 0.18, -0.25), (peak + 0.12, -0.55), (peak + 0.1, -0.24)])
        top = np.concatenate([top[x < peak - 0.18], fin_pts, top[x > peak + 0.1]])
    return np.concatenate([top, bottom])


def draw_marks(draw, rng: np.random.Generator, family: str, mark, to_px) -> None:
    """Pigment patches and scars: large enough to survive a 96 px crop, random enough to be individual."""
    n_patches = {"fluke": (2, 7), "dorsal": (1, 5), "flank": (4, 12)}[family]
    size = {"fluke": (0.07, 0.24), "dorsal": (0.07, 0.16), "flank": (0.05, 0.1)}[family]
    box = {"fluke": (-0.9, 0.9, -0.45, 0.3), "dorsal": (-0.35, 0.4, -0.6, 0.55), "flank": (-0.8, 0.8, -0.25, 0.2)}
    x_lo, x_hi, y_lo, y_hi = box[family]
    for _ in range(int(rng.integers(*n_patches))):
        rx = rng.uniform(*size)
        shape = ellipse(rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi), rx, rx * rng.uniform(0.4, 1.0),
                        rng.uniform(0, np.pi))
        draw.polygon([tuple(p) for p in to_px(shape)], fill=mark)
    for _ in range(int(rng.integers(1, 4))):  # rake marks: 2-3 parallel scars
        start = np.array([rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)])
        direction = rng.uniform(-1, 1, size=2)
        direction *= rng.uniform(0.15, 0.35) / np.linalg.norm(direction)
        normal = np.array([-direction[1], direction[0]]) / np.linalg.norm(direction) * 0.04
        for k in range(int(rng.integers(2, 4))):
            line = to_px(np.stack([start + k * normal, start + k * normal + direction]))
            draw.line([tuple(p) for p in line], fill=mark, width=max(2, int(to_px.scale * 0.025)))


class _ToPixels:
    def __init__(self, canvas: int):
        self.scale, self.centre = UNIT_RADIUS * canvas, canvas / 2

    def __call__(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points) * self.scale + self.centre


def draw_individual(species: str, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """The canonical RGBA picture (canvas x canvas, uint8) of one individual of ``species``; same rng, same animal."""
    from PIL import Image, ImageDraw

    family, body, mark, _ = SPECIES[species]
    body = tuple(int(np.clip(c + rng.normal(0, 8), 0, 255)) for c in body)
    to_px = _ToPixels(canvas)
    if family == "fluke":
        outline = fluke_outline(rng)
    elif family == "dorsal":
        outline = dorsal_outline(rng, 0.95 if species == "killer_whale" else rng.uniform(0.5, 0.7))
    else:
        outline = flank_outline(rng, fin=species != "beluga_whale")
    mask = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in to_px(outline)], fill=255)
    colour = Image.new("RGB", (canvas, canvas), body)
    draw_marks(ImageDraw.Draw(colour), rng, family, mark, to_px)
    return np.dstack([np.asarray(colour), np.asarray(mask)])
