"""Procedural PNG images whose content a person can name: shape, colour, size, pattern, background.

Each image is one shape on a plain background.  Position, rotation, exact
size and shades jitter per image, so images with the same attributes are
near-duplicates rather than copies.
"""

from __future__ import annotations

import io
import math
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 190),
    "orange": (250, 140, 20),
    "pink": (250, 140, 190),
    "brown": (130, 80, 40),
}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {"light": (235, 235, 230), "dark": (30, 32, 38)}
# Circumradius as a share of the image side.
SIZES: Dict[str, Tuple[float, float]] = {"small": (0.17, 0.23), "large": (0.36, 0.44)}

_SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down, for smooth edges


def _polygon(shape: str, cx: float, cy: float, r: float, theta: float) -> List[Tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with circumradius r, rotated by theta (radians)."""

    def ring_points(n: int, start: float, radii) -> List[Tuple[float, float]]:
        return [(math.cos(start + 2 * math.pi * i / n) * radii[i % len(radii)],
                 math.sin(start + 2 * math.pi * i / n) * radii[i % len(radii)]) for i in range(n)]

    if shape == "square":
        pts = ring_points(4, math.pi / 4, [r * 1.05])
    elif shape == "triangle":
        pts = ring_points(3, -math.pi / 2, [r * 1.15])
        pts = [(x, y + r * 0.2) for x, y in pts]
    elif shape == "hexagon":
        pts = ring_points(6, 0.0, [r])
    elif shape == "star":
        pts = ring_points(10, -math.pi / 2, [r * 1.1, r * 0.45])
    elif shape == "diamond":
        pts = [(0.0, -r * 1.1), (r * 0.7, 0.0), (0.0, r * 1.1), (-r * 0.7, 0.0)]
    elif shape == "cross":
        w = r * 0.32
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Coverage of the shape per pixel, float32 [size, size] in [0, 1]."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    k = _SUPERSAMPLE
    if shape in ("circle", "ring"):
        draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)
        if shape == "ring":
            inner = r * 0.55
            draw.ellipse([(cx - inner) * k, (cy - inner) * k, (cx + inner) * k, (cy + inner) * k], fill=0)
    else:
        draw.polygon([(x * k, y * k) for x, y in _polygon(shape, cx, cy, r, theta)], fill=255)
    mask = mask.resize((size, size), Image.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0


def pattern_mask(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Where the pattern's second shade goes, float32 [size, size] in [0, 1] (all 0 for solid)."""
    if pattern == "solid":
        return np.zeros((size, size), np.float32)
    period = max(4.0, size / 8.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    phase = rng.uniform(0, period)
    if pattern == "striped":
        angle = math.radians(float(rng.choice([0, 45, 90, 135])) + rng.uniform(-8, 8))
        u = xx * math.cos(angle) + yy * math.sin(angle) + phase
        return (np.mod(u, period) < period / 2).astype(np.float32)
    if pattern == "dotted":
        dx = np.mod(xx + phase, period) - period / 2
        dy = np.mod(yy + phase, period) - period / 2
        return np.clip(period * 0.3 - np.sqrt(dx * dx + dy * dy) + 0.5, 0, 1).astype(np.float32)
    raise ValueError(f"unknown pattern: {pattern}")


def draw_image(attributes: Dict[str, str], size: int, rng: np.random.Generator) -> np.ndarray:
    """One image with the given attributes, uint8 RGB [size, size, 3]."""
    lo, hi = SIZES[attributes["size"]]
    r = size * rng.uniform(lo, hi)
    slack = size / 2 - r * 1.15
    cx, cy = size / 2 + rng.uniform(-0.6, 0.6, 2) * max(slack, 0.0)
    theta = math.radians(rng.uniform(-12, 12))
    coverage = shape_mask(attributes["shape"], size, cx, cy, r, theta)

    dark_background = attributes["background"] == "dark"
    background = np.array(BACKGROUNDS[attributes["background"]], np.float32) + rng.uniform(-12, 12, 3)
    gradient = np.linspace(-8, 8, size, dtype=np.float32)[:, None, None] * rng.choice([-1.0, 1.0])
    canvas = background[None, None, :] + gradient

    color = np.array(COLORS[attributes["color"]], np.float32) + rng.uniform(-15, 15, 3)
    # The pattern's second shade: lighter on dark backgrounds, darker on light ones.
    second = color + (255 - color) * 0.6 if dark_background else color * 0.4
    second_share = pattern_mask(attributes["pattern"], size, rng)[..., None]
    foreground = color * (1 - second_share) + second * second_share

    alpha = coverage[..., None]
    pixels = canvas * (1 - alpha) + foreground * alpha
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes with no metadata (no time stamp), so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def corrupt_bytes(kind: str, valid_png: bytes) -> bytes:
    """Bytes that are not a decodable image: a truncated PNG, or not an image at all."""
    if kind == "truncated":
        return valid_png[: max(16, len(valid_png) // 3)]
    if kind == "not_an_image":
        return b"<html><body>404 Not Found</body></html>\n"
    raise ValueError(f"unknown corruption: {kind}")
