"""Bad-input rows for MACE: its presets and stage switches, its --images folder (images, their `<name>_mask.png`
masks, one folder per concept when erasing several), and --preserve where the preset gives it no weight."""

from __future__ import annotations

from pathlib import Path

from apps.bad_input_fixtures import fixture
from apps.bad_inputs import Case


def png_folder(root: Path, names: list[str]) -> str:
    from PIL import Image

    folder = root / "mace-images"
    folder.mkdir()
    for name in names:
        Image.new("RGB", (8, 8), "red").save(folder / name)
    return str(folder)


@fixture
def mace_images_with_orphan_mask(root):
    return png_folder(root, ["a.png", "b_mask.png"])


@fixture
def mace_images_without_concept_folders(root):
    return png_folder(root, ["a.png"])


@fixture
def mace_images_only_masks(root):
    return png_folder(root, ["a_mask.png"])


CASES = [
    Case("erase mace: unknown preset", "erase --method mace --concept arrow --set preset=landscape --out {root}/e",
         "preset must be one of object, art, celebrity, explicit"),
    Case("erase mace: both stages switched off", "erase --method mace --concept arrow --set refine=false "
         "--set suppress=false --out {root}/e", "would change nothing"),
    Case("erase mace: --preserve with no preservation weight", "erase --method mace --concept arrow --preserve "
         "circle --set preserve_scale=0 --out {root}/e", "pass --set preserve_scale"),
    Case("erase mace: --images with a mask beside no image", "erase --method mace --concept arrow --images "
         "{mace_images_with_orphan_mask} --out {root}/e", "b_mask.png has no image beside it"),
    Case("erase mace: --images holding only masks", "erase --method mace --concept arrow --images "
         "{mace_images_only_masks} --out {root}/e", "holds only masks"),
    Case("erase mace: several concepts and --images without a folder per concept", "erase --method mace --concept "
         "arrow --concept star --images {mace_images_without_concept_folders} --out {root}/e",
         "a folder of images per concept"),
    Case("erase mace: --images holding a decompression bomb", "erase --method mace --concept arrow --images "
         "{images_with_bomb} --out {root}/e", "pixels"),
]
