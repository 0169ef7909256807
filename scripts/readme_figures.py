"""Regenerate the figures of the READMEs: ToyCanvas real renders and the toy pipeline's generations (objects x
styles; benchmarks/toycanvas/README.md), and the main job's before/after grid (README.md's first command: erase
arrow with ESD-x, then compare).

    python scripts/readme_figures.py            # all
    python scripts/readme_figures.py compare    # only the before/after grid
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.compare import compare
from benchmarks.figures import labelled_grid
from benchmarks.toycanvas.render import sample_image
from benchmarks.toycanvas.world import OBJECTS, STYLES, caption
from erasers.models import load_pipeline
from erasers.run import erase

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "benchmarks" / "toycanvas" / "figures"
SCALE = 3


def world_figures() -> None:
    pairs = [(o, s) for s in STYLES for o in OBJECTS]
    real = [sample_image(o, s, seed=1000 + i)[0] for i, (o, s) in enumerate(pairs)]
    labelled_grid(real, len(OBJECTS), STYLES, OBJECTS, SCALE).save(FIGURES / "toycanvas_real.png")
    loaded = load_pipeline("toy", device="cpu")
    generated = loaded.generate([caption(o, s) for o, s in pairs], seeds=0)
    labelled_grid(generated, len(OBJECTS), STYLES, OBJECTS, SCALE).save(FIGURES / "toycanvas_generated.png")
    print(f"wrote {FIGURES}/toycanvas_real.png and toycanvas_generated.png")


def compare_figure() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        edit = erase("toy", "esd-x", ["arrow"], Path(tmp) / "no-arrow", device="cpu")
        compare("toy", [str(edit)], Path(tmp) / "compare", device="cpu")
        shutil.copyfile(Path(tmp) / "compare" / "compare.png", FIGURES / "compare_esd-x_arrow.png")
        shutil.copyfile(Path(tmp) / "compare" / "metrics.md", FIGURES / "compare_esd-x_arrow.md")
    print(f"wrote {FIGURES}/compare_esd-x_arrow.png and .md")


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    which = sys.argv[1:] or ["world", "compare"]
    if "world" in which:
        world_figures()
    if "compare" in which:
        compare_figure()


if __name__ == "__main__":
    main()
