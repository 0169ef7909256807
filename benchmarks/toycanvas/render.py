"""Seeded procedural rendering of ToyCanvas images.

An image is one (or a few) of the objects, at a random position, size and rotation, in a random colour, on a
random background, with the style's texture applied to the object strongly and to the background faintly (a
style is a property of the whole picture, as a painting style is). Rendering happens at 4x the output size and is
box-filtered down, so edges and textures are anti-aliased the same way at every seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import COLORS, OBJECTS, STYLES

SUPERSAMPLE = 4
# Texture period as a fraction of the image side: 6 px at 32 px.
TEXTURE_PERIOD = 6 / 32


def _ngon(n: int, radius: float = 1.0, cx: float = 0.0, cy: float = 0.0, phase: float = 0.0):
    return [(cx + radius * math.cos(phase + 2 * math.pi * i / n), cy + radius * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)]


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star():
    points = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else 0.42
        a = -math.pi / 2 + i * math.pi / 5
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def _heart():
    points = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        points.append((x / 16.5, (y + 2.5) / 15.5))
    return points


# Each shape is a list of (polygon in unit coordinates, y pointing down, fill) drawn in order; fill 0 cuts holes.
SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "star": [(_star(), 1)],
    "circle": [(_ngon(48, 0.95), 1)],
    "square": [(_rect(-0.78, -0.78, 0.78, 0.78), 1)],
    "triangle": [([(0.0, -1.0), (0.95, 0.72), (-0.95, 0.72)], 1)],
    "heart": [(_heart(), 1)],
    "cross": [([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], 1)],
    "moon": [(_ngon(48, 1.0), 1), (_ngon(48, 0.82, 0.5, -0.25), 0)],
    "arrow": [([(-1, -0.22), (0.15, -0.22), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.22), (-1, 0.22)], 1)],
    "house": [([(-0.98, 0.02), (0.0, -1.0), (0.98, 0.02)], 1), (_rect(-0.7, 0.0, 0.7, 0.95), 1),
              (_rect(-0.18, 0.4, 0.18, 0.95), 0)],
    "skull": [(_ngon(40, 0.78, 0, -0.2), 1), (_rect(-0.45, 0.25, 0.45, 0.95), 1),
              (_ngon(20, 0.22, -0.3, -0.12), 0), (_ngon(20, 0.22, 0.3, -0.12), 0),
              ([(0, 0.18), (0.1, 0.38), (-0.1, 0.38)], 0),
              (_rect(-0.2, 0.68, -0.1, 0.95), 0), (_rect(0.1, 0.68, 0.2, 0.95), 0)],
}
assert set(SHAPES) == set(OBJECTS)


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image; rendering a Scene is deterministic."""

    object: str
    style: str
    color: str
    background: tuple[int, int, int]
    # (centre x, centre y, radius, angle in degrees) per instance, in output pixels.
    placements: tuple[tuple[float, float, float, float], ...]
    texture_phase: tuple[float, float]
    texture_seed: int

    @property
    def count(self) -> int:
        return len(self.placements)


def sample_scene(rng: np.random.Generator, object_name: str | None = None, style: str | None = None,
                 color: str | None = None, count: int = 1, size: int = 32) -> Scene:
    object_name = object_name if object_name is not None else OBJECTS[rng.integers(len(OBJECTS))]
    style = style if style is not None else STYLES[rng.integers(len(STYLES))]
    color = color if color is not None else list(COLORS)[rng.integers(len(COLORS))]
    tint = rng.uniform(0, 255, 3)
    background = tuple(int(v) for v in 0.25 * tint + 0.75 * 240)
    placements = []
    # One object fills a good part of the canvas; several share it without overlapping.
    low, high = (0.19, 0.34) if count == 1 else (0.12, 0.18)
    for _ in range(100 * count):
        if len(placements) == count:
            break
        radius = rng.uniform(low, high) * size
        margin = radius + 1
        cx, cy = rng.uniform(margin, size - margin, 2)
        if all(math.hypot(cx - x, cy - y) > radius + r + 1 for x, y, r, _ in placements):
            placements.append((float(cx), float(cy), float(radius), float(rng.uniform(-25, 25))))
    if len(placements) != count:
        raise ValueError(f"could not place {count} objects on a {size}px canvas")
    return Scene(object_name, style, color, background, tuple(placements),
                 (float(rng.uniform(0, 1)), float(rng.uniform(0, 1))), int(rng.integers(2**31)))


def _object_mask(scene: Scene, side: int) -> np.ndarray:
    scale = SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy, radius, angle in scene.placements:
        a = math.radians(angle)
        cos_a, sin_a = math.cos(a), math.sin(a)
        for polygon, fill in SHAPES[scene.object]:
            points = [((cx + radius * (x * cos_a - y * sin_a)) * scale, (cy + radius * (x * sin_a + y * cos_a)) * scale)
                      for x, y in polygon]
            draw.polygon(points, fill=255 * fill)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _texture(scene: Scene, side: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The style as (object shade, background shade): per-pixel multipliers in [0, 1] of how much the object's
    colour (resp. a darker background) shows; 1 everywhere means a flat fill."""
    period = TEXTURE_PERIOD * side
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    px, py = scene.texture_phase[0] * period, scene.texture_phase[1] * period
    xs, ys = x + px, y + py
    ones = np.ones((side, side), np.float32)
    zeros = np.zeros((side, side), np.float32)
    style = scene.style
    if style == "Flat":
        return ones, zeros
    if style == "Outline":
        eroded = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(
            ImageFilter.MinFilter(2 * SUPERSAMPLE + 1)), dtype=np.float32) / 255.0
        return np.clip(mask - eroded, 0, 1) / np.maximum(mask, 1e-6), zeros
    if style == "Stripes":
        band = ((ys % period) < period / 2).astype(np.float32)
        return band, 0.5 * band
    if style == "Hatch":
        line = (((xs + ys) % period) < period / 3).astype(np.float32)
        return line, 0.5 * line
    if style == "Dots":
        dx, dy = (xs % period) - period / 2, (ys % period) - period / 2
        dot = (dx * dx + dy * dy < (0.3 * period) ** 2).astype(np.float32)
        return 1 - dot, 0.6 * dot
    if style == "Checker":
        cell = (((xs // (period / 2)) + (ys // (period / 2))) % 2).astype(np.float32)
        return 0.35 + 0.65 * cell, 0.3 * cell
    if style == "Gradient":
        rows = mask.sum(1) > 0
        top, bottom = (np.argmax(rows), side - np.argmax(rows[::-1])) if rows.any() else (0, side)
        fade = np.clip((y - top) / max(bottom - top, 1), 0, 1)
        return 1.0 - 0.8 * fade, 0.8 * y / side
    if style == "Speckle":
        rng = np.random.default_rng(scene.texture_seed)
        grain = rng.uniform(0, 1, (side // (2 * SUPERSAMPLE), side // (2 * SUPERSAMPLE))).astype(np.float32)
        grain = np.kron(grain, np.ones((2 * SUPERSAMPLE, 2 * SUPERSAMPLE), np.float32))
        return 0.25 + 0.75 * (grain > 0.5), 0.45 * (grain > 0.6)
    if style == "Rings":
        cx, cy = (scene.placements[0][0] * SUPERSAMPLE, scene.placements[0][1] * SUPERSAMPLE)
        ring = ((np.hypot(x - cx, y - cy) % period) < period / 2).astype(np.float32)
        return ring, zeros
    if style == "Mosaic":
        tile = period * 2 / 3
        grout = ((xs % tile) < SUPERSAMPLE) | ((ys % tile) < SUPERSAMPLE)
        rng = np.random.default_rng(scene.texture_seed)
        shades = rng.uniform(0.45, 1.0, (int(side / tile) + 2, int(side / tile) + 2)).astype(np.float32)
        shade = shades[(ys // tile).astype(int), (xs // tile).astype(int)]
        return np.where(grout, 0.0, shade), 0.5 * grout
    raise KeyError(style)


def render(scene: Scene, size: int = 32) -> Image.Image:
    side = size * SUPERSAMPLE
    mask = _object_mask(scene, side)
    object_shade, background_shade = _texture(scene, side, mask)
    color = np.array(COLORS[scene.color], np.float32)
    background = np.array(scene.background, np.float32)
    # Where the object's texture is "off" it shows a dark version of its colour, never the background, so the
    # silhouette stays readable against the light background in every style except Outline, whose interior is
    # meant to be background.
    off_color = background if scene.style == "Outline" else 0.45 * color
    obj = object_shade[..., None] * color + (1 - object_shade[..., None]) * off_color
    bg = background * (1 - 0.35 * background_shade[..., None])
    image = mask[..., None] * obj + (1 - mask[..., None]) * bg
    image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.BOX)


def sample_image(object_name: str | None, style: str | None, seed: int, size: int = 32,
                 **kwargs) -> tuple[Image.Image, Scene]:
    scene = sample_scene(np.random.default_rng(seed), object_name, style, size=size, **kwargs)
    return render(scene, size), scene


def make_dataset(count: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` images as uint8 (N, H, W, 3) with object and style indices; each object x style pair appears
    equally often and image i depends only on (seed, i)."""
    images = np.empty((count, size, size, 3), np.uint8)
    objects = np.empty(count, np.int64)
    styles = np.empty(count, np.int64)
    pairs = len(OBJECTS) * len(STYLES)
    for i in range(count):
        pair = i % pairs
        objects[i], styles[i] = pair % len(OBJECTS), pair // len(OBJECTS)
        scene = sample_scene(np.random.default_rng([seed, i]), OBJECTS[objects[i]], STYLES[styles[i]], size=size)
        images[i] = np.asarray(render(scene, size))
    return images, objects, styles
