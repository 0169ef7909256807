"""Bad-input rows of the training attacks, `erasure attack --attack inversion | relearn`: an edit they do not apply
to (a VLM edit; inversion against a training-free edit), an --images that is not a folder of images (a file, an
empty folder, a damaged image, a caption that is not UTF-8), --images given twice or to an attack without images,
and their own options - each refused before any model loads."""

from __future__ import annotations

from apps.bad_input_fixtures import GOOD_EDIT, edit_dir, fixture, text_file
from apps.bad_inputs import Case


@fixture
def training_attack_sld_edit(root):
    return edit_dir(root, {**GOOD_EDIT, "method": "sld", "components": [], "base_family": "sd"}, components=())


@fixture
def empty_images(root):
    (root / "images").mkdir()
    return str(root / "images")


@fixture
def damaged_images(root):
    (root / "images").mkdir()
    text_file(root / "images", "a.png", b"\x89PNG\r\n\x1a\n not a picture")
    return str(root / "images")


@fixture
def latin1_caption_images(root):
    from PIL import Image

    (root / "images").mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "images" / "a.png")
    text_file(root / "images", "a.txt", "Un caf\u00e9 de fl\u00e8che".encode("latin-1"))
    return str(root / "images")


CASES = [
    Case("attack inversion: a VLM edit", "attack --attack inversion --edit {attack_vlm_edit} --out {root}/a",
         "is a vlm edit"),
    Case("attack relearn: a VLM edit", "attack --attack relearn --edit {attack_vlm_edit} --out {root}/a",
         "is a vlm edit"),
    Case("attack inversion: a training-free edit (sld)", "attack --attack inversion --edit "
         "{training_attack_sld_edit} --out {root}/a", "a training-free edit changes none"),
    Case("attack relearn: --images is a file", "attack --attack relearn --edit {edit_ok} --images {file} "
         "--out {root}/a", "--images"),
    Case("attack inversion: --images is a missing folder", "attack --attack inversion --edit {edit_ok} --images "
         "{root}/missing --out {root}/a", "does not exist"),
    Case("attack relearn: --images holds no images", "attack --attack relearn --edit {edit_ok} --images "
         "{empty_images} --out {root}/a", "holds no images"),
    Case("attack inversion: --images holds a damaged image", "attack --attack inversion --edit {edit_ok} --images "
         "{damaged_images} --out {root}/a", "not a readable image"),
    Case("attack relearn: --images caption in Latin-1", "attack --attack relearn --edit {edit_ok} --images "
         "{latin1_caption_images} --out {root}/a", "UTF-8"),
    Case("attack relearn: --images and --set images", "attack --attack relearn --edit {edit_ok} --images "
         "{empty_images} --set images={empty_images} --out {root}/a", "both give images"),
    Case("attack unlearndiffatk: --images", "attack --edit {edit_ok} --images {empty_images} --out {root}/a",
         "unlearndiffatk has no option 'images'"),
    Case("attack relearn: --set steps falling", "attack --attack relearn --edit {edit_ok} --set steps=10,5 "
         "--out {root}/a", "rising step counts"),
    Case("attack relearn: --set steps not numbers", "attack --attack relearn --edit {edit_ok} --set steps=ten "
         "--out {root}/a", "rising step counts"),
    Case("attack relearn: --set threshold=0", "attack --attack relearn --edit {edit_ok} --set threshold=0 "
         "--out {root}/a", "threshold"),
    Case("attack relearn: --set rank=0", "attack --attack relearn --edit {edit_ok} --set rank=0 --out {root}/a",
         "rank"),
    Case("attack inversion: --set steps=0", "attack --attack inversion --edit {edit_ok} --set steps=0 "
         "--out {root}/a", "steps"),
    Case("attack inversion: --set lr=nan", "attack --attack inversion --edit {edit_ok} --set lr=nan --out {root}/a",
         "finite"),
    Case("attack inversion: --set token with a space", "attack --attack inversion --edit {edit_ok} "
         "--set 'token=two words' --out {root}/a", "one word"),
]
