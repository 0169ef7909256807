"""Bad-input rows about edits loaded where they do not belong, on every command that loads edits: an edit made for
another base model (another family, another checkpoint's weights, or an old fingerprint that differs), refused
unless --allow-other-base asks for it (erasers.edits.check_base, vlm.edits.check_base); and an edit whose weights
are NaN, a failed erase, refused before it loads (erasers.edits.check_edits)."""

from __future__ import annotations

from pathlib import Path

import torch

from apps.bad_input_fixtures import GOOD_EDIT, VLM_EDIT, edit_dir, fixture
from apps.bad_inputs import Case

# A record of another checkpoint's UNet (erasers/fingerprint.py): its layout hash is not the toy UNet's.
OTHER_UNET = {"unet": {"layout": "0123456789abcdef", "norms": "1.0"}}


@fixture
def edit_for_sdxl(root):
    return edit_dir(root, {**GOOD_EDIT, "base_model": "path/to/sdxl", "base_family": "sdxl"})


@fixture
def edit_for_other_weights(root):
    return edit_dir(root, {**GOOD_EDIT, "base_model": "my-fine-tune", "base_family": "sd", "base_weights": OTHER_UNET})


@fixture
def edit_for_old_fingerprint(root):
    # From before base_weights: an fp32 fingerprint, which the toy pipeline on the CPU (fp32) recomputes.
    return edit_dir(root, {**GOOD_EDIT, "base_model": "another-sd", "base_family": "sd",
                           "training": {"precision": "fp32"}, "base_fingerprint": "0123456789abcdef"})


@fixture
def edit_with_nan_weights(root):
    from safetensors.torch import save_file

    path = edit_dir(root, {**GOOD_EDIT, "base_family": "sd"})
    save_file({"conv_in.weight": torch.full((2, 2), float("nan"))},
              Path(path) / "unet" / "diffusion_pytorch_model.safetensors")
    return path


@fixture
def vlm_edit_for_another_base(root):
    path = edit_dir(root, {**VLM_EDIT, "base_model": "another-llava", "base_fingerprint": "0123456789abcdef"},
                    components=())
    (Path(path) / "edit.safetensors").write_bytes(b"")
    return path


OTHER_BASE = "made for another base model"

CASES = [
    Case("generate: an edit made for another family", "generate --edit {edit_for_sdxl} --prompt a "
         "--out {root}/a.png", "sdxl family; this pipeline is sd"),
    Case("generate: an edit made for another checkpoint of the family", "generate --edit {edit_for_other_weights} "
         "--prompt a --out {root}/a.png", f"{OTHER_BASE} (my-fine-tune"),
    Case("generate: an old edit whose fingerprint is another model's", "generate --edit {edit_for_old_fingerprint} "
         "--prompt a --out {root}/a.png", "differ from the ones it records"),
    Case("generate: an edit with NaN weights", "generate --edit {edit_with_nan_weights} --prompt a "
         "--out {root}/a.png", "failed erase, not an erasure"),
    Case("compare: an edit made for another base model", "compare --edit {edit_for_other_weights} --out {root}/c",
         OTHER_BASE),
    Case("compare: an edit with NaN weights", "compare --edit {edit_with_nan_weights} --out {root}/c",
         "failed erase, not an erasure"),
    Case("attack: an edit made for another base model", "attack --edit {edit_for_other_weights} --out {root}/a",
         OTHER_BASE),
    Case("attack: an edit with NaN weights", "attack --edit {edit_with_nan_weights} --out {root}/a",
         "failed erase, not an erasure"),
    Case("bench toycanvas: an --edit made for another base model", "bench toycanvas --edit {edit_for_other_weights} "
         "--out {root}/r", OTHER_BASE),
    Case("bench i2p: an --edit made for another base model", "bench i2p --prompts {toy_i2p_csv} "
         "--edit {edit_for_other_weights} --out {root}/r", OTHER_BASE),
    Case("vlm ask: an edit made for another base model", "vlm ask --edit {vlm_edit_for_another_base} --question hi",
         OTHER_BASE),
    Case("bench mllmu-med: an edit made for another base model", "bench mllmu-med "
         "--edit {vlm_edit_for_another_base}", OTHER_BASE),
]
