"""Regenerate the README's ToyCanvas figures: real renders and the toy pipeline's generations, objects x styles.

    python scripts/readme_figures.py
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.figures import labelled_grid
from benchmarks.toycanvas.render import sample_image
from benchmarks.toycanvas.world import OBJECTS, STYLES, caption
from erasers.models import load_pipeline

FIGURES = Path(__file__).resolve().parents[1] / "benchmarks" / "toycanvas" / "figures"
SCALE = 3


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    pairs = [(o, s) for s in STYLES for o in OBJECTS]
    real = [sample_image(o, s, seed=1000 + i)[0] for i, (o, s) in enumerate(pairs)]
    labelled_grid(real, len(OBJECTS), STYLES, OBJECTS, SCALE).save(FIGURES / "toycanvas_real.png")
    loaded = load_pipeline("toy", device="cpu")
    generated = loaded.generate([caption(o, s) for o, s in pairs], seeds=0)
    labelled_grid(generated, len(OBJECTS), STYLES, OBJECTS, SCALE).save(FIGURES / "toycanvas_generated.png")
    print(f"wrote {FIGURES}/toycanvas_real.png and toycanvas_generated.png")


if __name__ == "__main__":
    main()
