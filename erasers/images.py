"""Reading a user's images (one check for every command that takes them), image grids and atomic image writes,
shared by `erasure generate`, compare, the benchmarks and the VLM commands."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from .errors import UsageError
from .files import save_atomically
from .inputs import check_input


def open_image(path: str | Path | None, remedy: str = "pass a .png or .jpg file",
               header_only: bool = False) -> Image.Image | None:
    """The image at `path` in RGB (None for None). A missing file, one over Pillow's decompression-bomb limit or
    one that is not an image is one line ending in `remedy`. `header_only`: check the file without decoding
    its pixels (Pillow reads the size from the header) and return None."""
    if path is None:
        return None
    file = check_input(path, "image", remedy)  # a directory, FIFO or device is named as such
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and refuses twice that: both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                return None if header_only else image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(f"image {path} is over {Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's decompression-bomb "
                         f"limit); resize it first or {remedy}") from None
    except (OSError, ValueError):
        raise UsageError(f"{path} is not a readable image; {remedy}") from None


def image_grid(images: list[Image.Image], columns: int, scale: int = 1) -> Image.Image:
    from diffusers.utils import make_image_grid

    rows = -(-len(images) // columns)
    padded = list(images) + [Image.new("RGB", images[0].size, "white")] * (rows * columns - len(images))
    grid = make_image_grid(padded, rows=rows, cols=columns)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def save_image_atomically(image: Image.Image, path: Path) -> None:
    """`image` to `path` (format by its suffix) under a temporary name, renamed into place once complete."""
    save_atomically(path, image.save)  # makes the parent folder too
