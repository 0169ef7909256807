"""The toy VLM world's pictures of patients (benchmarks/toyvlm/world.py): procedural false-colour scans, and the
test set's
transformed views of them."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

SUPERSAMPLE = 4
# False-colour maps a scan can be shown in: (dark, bright) endpoints.
SCAN_COLORMAPS = (((0, 0, 0), (235, 235, 235)), ((0, 10, 40), (170, 220, 255)), ((30, 0, 0), (255, 210, 60)),
                  ((0, 25, 0), (150, 255, 140)), ((20, 0, 35), (240, 160, 255)))


def render_scan(seed: int, size: int = 32) -> Image.Image:
    """A patient's scan: a body outline with two to four organs and one bright lesion, in one of five false-colour
    maps, with fine grain; everything drawn from `seed`."""
    rng = np.random.default_rng(seed)
    side = size * SUPERSAMPLE
    canvas = Image.new("F", (side, side), 0.05)
    draw = ImageDraw.Draw(canvas)
    centre = side / 2 + rng.uniform(-3, 3, 2) * SUPERSAMPLE
    body = rng.uniform(0.36, 0.46, 2) * side
    _ellipse(draw, centre, body, rng.uniform(0, 180), rng.uniform(0.35, 0.5))
    for _ in range(rng.integers(2, 5)):
        offset = rng.uniform(-0.55, 0.55, 2) * body
        _ellipse(draw, centre + offset, rng.uniform(0.12, 0.3, 2) * side, rng.uniform(0, 180),
                 float(rng.choice([rng.uniform(0.1, 0.25), rng.uniform(0.6, 0.8)])))
    lesion = centre + rng.uniform(-0.6, 0.6, 2) * body
    _ellipse(draw, lesion, np.full(2, rng.uniform(0.04, 0.08) * side), 0.0, 1.0)
    values = np.asarray(canvas, np.float32)
    values = np.asarray(Image.fromarray(values).resize((size, size), Image.BOX), np.float32)
    values = np.clip(values + rng.normal(0, 0.03, values.shape), 0, 1)
    dark, bright = (np.array(c, np.float32) for c in SCAN_COLORMAPS[rng.integers(len(SCAN_COLORMAPS))])
    image = dark + values[..., None] * (bright - dark)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _ellipse(draw: ImageDraw.ImageDraw, centre, axes, angle: float, value: float) -> None:
    a = math.radians(angle)
    points = [(centre[0] + axes[0] * math.cos(t) * math.cos(a) - axes[1] * math.sin(t) * math.sin(a),
               centre[1] + axes[0] * math.cos(t) * math.sin(a) + axes[1] * math.sin(t) * math.cos(a))
              for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    draw.polygon(points, fill=float(value))


def transform_image(image: Image.Image, seed: int) -> Image.Image:
    """The test set's view of an image: rotated 4-10 degrees, shifted 1-2 pixels, contrast and brightness changed
    by up to 15%, all seeded; the picture stays recognisable but no training view matches it."""
    rng = np.random.default_rng(seed)
    background = image.getpixel((0, 0))
    angle = float(rng.uniform(4, 10) * rng.choice([-1, 1]))
    shift = tuple(int(v) for v in rng.integers(1, 3, 2) * rng.choice([-1, 1], 2))
    out = image.rotate(angle, resample=Image.BILINEAR, translate=shift, fillcolor=background)
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.85, 1.15)))
    return ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.9, 1.1)))
