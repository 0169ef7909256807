"""Reading a user's images (one check for every command that takes them; a folder of a concept's images, with masks
for MACE), image grids and atomic image writes, shared by `erasure generate`, compare, the benchmarks, the erasers
that take --images and the VLM commands."""

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


# A user's folder of a concept's images (`erase --images DIR`: Co-Erasing's and MACE's training images).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGES_REMEDY = "remove it from the --images folder"
MASK_SUFFIX = "_mask"  # MACE: a mask <name>_mask.png marks the concept in the image <name>.png


def image_files(folder: str) -> list[Path]:
    """The image files of a user's folder, sorted; a clear error when there are none."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UsageError(f"--images {folder} is not a folder; pass a folder of images of the concept")
    try:
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    except OSError as error:
        raise UsageError(f"--images {folder} cannot be read ({error.strerror}); check its permissions") from None
    if not files:
        raise UsageError(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images of the "
                         "concept or leave --images out to generate them")
    return files


def read_images(files: list[Path]):
    return [open_image(file, IMAGES_REMEDY) for file in files]


def images_with_masks(folder: str | Path) -> list[tuple[Path, Path | None]]:
    """The folder's images, each with its mask `<name>_mask.<ext>` when there is one (MACE's --images)."""
    files = image_files(str(folder))
    masks = {f.stem[:-len(MASK_SUFFIX)]: f for f in files if f.stem.endswith(MASK_SUFFIX)}
    images = [f for f in files if not f.stem.endswith(MASK_SUFFIX)]
    orphan = sorted(set(masks) - {f.stem for f in images})
    if not images or orphan:
        what = f"the mask {masks[orphan[0]].name} has no image beside it" if images else "it holds only masks"
        raise UsageError(f"--images {folder}: {what}; a mask <name>_mask.png marks the concept in the image <name>")
    return [(f, masks.get(f.stem)) for f in images]


def concept_folders(folder: str, concepts: list[str]) -> list[Path]:
    """Each concept's image folder: DIR/<concept>/ (spaces or underscores), or DIR itself for a single concept."""
    root = Path(folder).expanduser()
    found = []
    for concept in concepts:
        candidates = [root / name for name in (concept, concept.replace(" ", "_"), concept.replace("_", " "))]
        subfolder = next((path for path in candidates if path.is_dir()), None)
        if subfolder is None and len(concepts) > 1:
            raise UsageError(f"--images {folder}: erasing several concepts needs a folder of images per concept, "
                             f"{root / concept}/ and so on; add one for {concept!r}")
        found.append(subfolder or root)
    return found


def image_grid(images: list[Image.Image], columns: int, scale: int = 1) -> Image.Image:
    from diffusers.utils import make_image_grid

    rows = -(-len(images) // columns)
    padded = list(images) + [Image.new("RGB", images[0].size, "white")] * (rows * columns - len(images))
    grid = make_image_grid(padded, rows=rows, cols=columns)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def save_image_atomically(image: Image.Image, path: Path) -> None:
    """`image` to `path` (format by its suffix) under a temporary name, renamed into place once complete."""
    save_atomically(path, image.save)  # makes the parent folder too


# The key of `image.info` that marks an image drawn blank (drawn_images), its value saying why.
BLANK = "erasure_blank"


def drawn_images(arrays) -> list[Image.Image]:
    """A pipeline's images (output_type="np": floats in [0, 1], NaN kept) as PIL images, converted as diffusers
    converts them, each found blank marked in `image.info[BLANK]` with why: non-finite values (a diverged edit, fp16
    overflow) or one flat colour over every pixel (a collapsed model, a safety checker's black image). A classifier
    or detector reads either as the concept gone, so every scorer reports it as a failed edit (check_drawn)."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    arrays = np.asarray(arrays)
    arrays = arrays[None] if arrays.ndim == 3 else arrays
    finite = np.isfinite(arrays).reshape(len(arrays), -1).all(axis=1)
    images = VaeImageProcessor.numpy_to_pil(np.nan_to_num(arrays, nan=0.0))  # NaN reads as 0, as the cast gives
    for image, is_finite in zip(images, finite):
        pixels = np.asarray(image).reshape(image.width * image.height, -1)
        if not is_finite:
            image.info[BLANK] = "non-finite values (NaN or inf)"
        elif (pixels == pixels[0]).all():
            image.info[BLANK] = "one flat colour"
    return images


def blank_summary(marks: list[str | None]) -> str | None:
    """"3 of 100 images blank (one flat colour)" when some of `marks` (each image's BLANK mark, or None) are set,
    else None."""
    blank = [mark for mark in marks if mark]
    if not blank:
        return None
    return f"{len(blank)} of {len(marks)} images blank ({', '.join(dict.fromkeys(blank))})"


def check_drawn(images: list[Image.Image], model: str, edited: bool = True) -> None:
    """Refuse to score `images` that `model` drew when some are blank: a FailedEdit for an edited model, a
    UsageError for a base model (then its weights or precision are at fault, not an edit)."""
    from .errors import FailedEdit

    summary = blank_summary([image.info.get(BLANK) for image in images])
    if summary is None:
        return
    if edited:
        raise FailedEdit(f"{model} drew {summary}: a failed edit, not an erasure; its weights or the sampling "
                         "settings break the model (re-run the erase with a smaller lr)")
    raise UsageError(f"{model} drew {summary} without any edit: the base model fails here (its weights, or its "
                     "precision: try fp32), so no edit was scored")
