"""Image grids and atomic image writes, shared by `erasure generate`, compare and the benchmarks."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .files import save_atomically


def image_grid(images: list[Image.Image], columns: int, scale: int = 1) -> Image.Image:
    from diffusers.utils import make_image_grid

    rows = -(-len(images) // columns)
    padded = list(images) + [Image.new("RGB", images[0].size, "white")] * (rows * columns - len(images))
    grid = make_image_grid(padded, rows=rows, cols=columns)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def save_image_atomically(image: Image.Image, path: Path) -> None:
    """`image` to `path` (format by its suffix) under a temporary name, renamed into place once complete."""
    save_atomically(path, image.save)  # makes the parent folder too
