"""Regenerate the README's ToyCanvas figures: real renders and the toy pipeline's generations, objects x styles.

    python scripts/readme_figures.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from benchmarks.toycanvas.render import sample_image
from benchmarks.toycanvas.world import OBJECTS, STYLES, caption
from erasers.cli import grid
from erasers.models import load_pipeline

FIGURES = Path(__file__).resolve().parents[1] / "benchmarks" / "toycanvas" / "figures"
SCALE = 3


def labelled(image: Image.Image, cell: int) -> Image.Image:
    """Add object names above the columns and style names left of the rows."""
    left, top = 70, 16
    canvas = Image.new("RGB", (image.width + left, image.height + top), "white")
    canvas.paste(image, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(OBJECTS):
        draw.text((left + i * cell + 4, 2), name, fill="black")
    for j, name in enumerate(STYLES):
        draw.text((4, top + j * cell + cell // 2 - 5), name, fill="black")
    return canvas


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    pairs = [(o, s) for s in STYLES for o in OBJECTS]
    real = [sample_image(o, s, seed=1000 + i)[0] for i, (o, s) in enumerate(pairs)]
    labelled(grid(real, len(OBJECTS), SCALE), 32 * SCALE).save(FIGURES / "toycanvas_real.png")
    loaded = load_pipeline("toy", device="cpu")
    generated = loaded.generate([caption(o, s) for o, s in pairs], seeds=0)
    labelled(grid(generated, len(OBJECTS), SCALE), 32 * SCALE).save(FIGURES / "toycanvas_generated.png")
    print(f"wrote {FIGURES}/toycanvas_real.png and toycanvas_generated.png")


if __name__ == "__main__":
    main()
