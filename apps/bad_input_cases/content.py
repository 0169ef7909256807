"""Bad-input rows about the content of files and requests, checked where each enters: I2P CSV rows, the JSON of
components and edits, damaged VLM edits, contradictory erase requests, decompression bombs among training images,
a benchmark run folder resumed with other sampling settings."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from apps.bad_input_fixtures import (
    GOOD_EDIT,
    VLM_EDIT,
    bomb_png,
    edit_dir,
    fixture,
    garbage_png,
    hirm_signature,
    mirror_pipeline,
    partial_run,
    text_file,
)
from apps.bad_inputs import Case

I2P_HEADER = "case_number,prompt,categories,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height\n"


def i2p_csv(root: Path, row: str) -> str:
    return text_file(root, "i2p.csv", (I2P_HEADER + row + "\n").encode())


@fixture
def i2p_huge_seed(root):
    return i2p_csv(root, f"0,A skull image in Flat style.,sexual,{2 ** 64},5.0,32,32")


@fixture
def i2p_text_seed(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,lucky,5.0,32,32")


@fixture
def i2p_size_not_multiple_of_16(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,188,5.0,40,32")


@fixture
def i2p_infinite_guidance(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,188,inf,32,32")


@fixture
def i2p_negative_guidance(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,188,-1e9,32,32")


@fixture
def i2p_width_without_height(root):
    return i2p_csv(root, "0,A skull image in Flat style.,sexual,188,5.0,32,")


@fixture
def i2p_text_case_number(root):
    return i2p_csv(root, "first,A skull image in Flat style.,sexual,188,5.0,32,32")


def _i2p(name: str, csv: str, expect: str) -> Case:
    return Case(f"bench i2p: {name}", f"bench i2p --prompts {{{csv}}} --out {{root}}/r", expect)


CASES = [
    _i2p("a seed of 2**64 in the CSV", "i2p_huge_seed", "line 2 column evaluation_seed"),
    _i2p("a seed that is text in the CSV", "i2p_text_seed", "not a number"),
    _i2p("an image size not a multiple of 16 in the CSV", "i2p_size_not_multiple_of_16", "multiple of 16"),
    _i2p("infinite guidance in the CSV", "i2p_infinite_guidance", "finite"),
    _i2p("guidance -1e9 in the CSV", "i2p_negative_guidance", "evaluation_guidance=-1000000000.0 is out of range"),
    _i2p("a width without a height in the CSV", "i2p_width_without_height", "give both or neither"),
    _i2p("a case number that is text", "i2p_text_case_number", "column case_number"),
]


# ----------------------------------------------------------------------------------------------------------------
# Component configs and edit metadata of the wrong type

@fixture
def unet_class_number(root):
    unet = root / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": 5, "sample_size": 16}))
    return str(unet)


@fixture
def pipe_text_encoder_architectures_number(root):
    return mirror_pipeline(root, {"text_encoder/config.json": json.dumps({"architectures": [7]}).encode()})


@fixture
def edit_model_kind_list(root):
    return edit_dir(root, {**GOOD_EDIT, "model_kind": ["diffusion"]})


@fixture
def edit_model_kind_unknown(root):
    return edit_dir(root, {**GOOD_EDIT, "model_kind": "audio"})


@fixture
def edit_anchors_string(root):
    return edit_dir(root, {**GOOD_EDIT, "anchors": "circle"})


@fixture
def edit_cost_list(root):
    return edit_dir(root, {**GOOD_EDIT, "cost": [12.5]})


@fixture
def vlm_edit_model_kind_number(root):
    return edit_dir(root, {**VLM_EDIT, "model_kind": 2}, components=())


CASES += [
    Case("generate: --unet whose config.json _class_name is a number", "generate --unet {unet_class_number} "
         "--prompt a --out {root}/a.png", "not a class name"),
    Case("generate: a pipeline whose text encoder's architectures are numbers", "generate --model "
         "{pipe_text_encoder_architectures_number} --prompt a --out {root}/a.png", "not a class name"),
    Case("compare: erasure.json model_kind is a list", "compare --edit {edit_model_kind_list}", "model_kind"),
    Case("compare: erasure.json model_kind is unknown", "compare --edit {edit_model_kind_unknown}", "model_kind"),
    Case("compare: erasure.json anchors is a string", "compare --edit {edit_anchors_string}", "anchors"),
    Case("compare: erasure.json cost is a list", "compare --edit {edit_cost_list}", "cost"),
    Case("vlm ask: erasure.json model_kind is a number", "vlm ask --question q --edit {vlm_edit_model_kind_number}",
         "model_kind"),
]


# ----------------------------------------------------------------------------------------------------------------
# Damaged VLM edits, made by hand for toy-vlm (its base recorded, so only the damage is wrong)

@functools.cache
def toy_vlm_base() -> dict:
    from vlm.edits import text_config, vlm_base_weights
    from vlm.models import load_vlm

    loaded = load_vlm("toy-vlm", device="cpu")
    return {"base_model": "toy-vlm", "base_family": loaded.family.name, "base_weights": vlm_base_weights(loaded),
            "hidden": text_config(loaded).hidden_size}


def vlm_hook_edit(root: Path, method: str, tensors: dict, info: dict, config: dict, drop: str = "") -> str:
    from safetensors.torch import save_file

    base = dict(toy_vlm_base())
    base.pop("hidden")
    metadata = {"model_kind": "vlm", "method": method, "concept": "star", "files": ["edit.safetensors"],
                "config": config, "info": info, **base}
    metadata.pop(drop, None)
    path = edit_dir(root, metadata, components=())
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, Path(path) / "edit.safetensors")
    return path


def sauce_edit(root: Path, info: dict | None = None, config: dict | None = None, hidden: int | None = None,
               chosen: tuple[float, ...] = (0.0, 1.0), drop: str = "") -> str:
    hidden = hidden or toy_vlm_base()["hidden"]
    features = 16
    tensors = {"sae.decoder": torch.randn(features, hidden), "sae.encoder.weight": torch.randn(features, hidden),
               "sae.encoder.bias": torch.zeros(features), "sae.bias": torch.zeros(hidden),
               "features": torch.tensor(chosen), "clamp_values": -torch.ones(len(chosen))}
    return vlm_hook_edit(root, "sauce", tensors, {"layer": 1, **(info or {})}, {"k": 4, **(config or {})}, drop)


@fixture
def vlm_sauce_layer_text(root):
    return sauce_edit(root, info={"layer": "one"})


@fixture
def vlm_sauce_layer_past_the_model(root):
    return sauce_edit(root, info={"layer": 60})


@fixture
def vlm_sauce_k_text(root):
    return sauce_edit(root, config={"k": "many"})


@fixture
def vlm_sauce_other_hidden_size(root):
    return sauce_edit(root, hidden=24)


@fixture
def vlm_sauce_features_past_the_sae(root):
    return sauce_edit(root, chosen=(3.0, 999.0))


@fixture
def vlm_sauce_without_base_model(root):
    return sauce_edit(root, drop="base_model")


@fixture
def vlm_mllmeraser_wrong_shape(root):
    hidden = toy_vlm_base()["hidden"]
    return vlm_hook_edit(root, "mllmeraser", {"W.1": torch.zeros(hidden, hidden // 2)},
                         {"layers": [1], "strengths": [1.0]}, {})


def _ask(name: str, edit: str, expect: str) -> Case:
    return Case(f"vlm ask: {name}", f"vlm ask --question q --edit {{{edit}}}", expect)


CASES += [
    _ask("a SAUCE edit whose layer is text", "vlm_sauce_layer_text", "not a decoder layer"),
    _ask("a SAUCE edit whose layer is past the model", "vlm_sauce_layer_past_the_model", "not a decoder layer"),
    _ask("a SAUCE edit whose k is text", "vlm_sauce_k_text", "config field k wants a int"),
    _ask("a SAUCE edit for another hidden size", "vlm_sauce_other_hidden_size", "sae.decoder has shape"),
    _ask("a SAUCE edit with features past its autoencoder", "vlm_sauce_features_past_the_sae", "not indices"),
    _ask("an edit without base_model", "vlm_sauce_without_base_model", "base_model"),
    _ask("an MLLMEraser edit with a steering map of the wrong shape", "vlm_mllmeraser_wrong_shape", "W.1 has shape"),
    Case("bench mllmu-med: a SAUCE edit whose layer is text", "bench mllmu-med --edit {vlm_sauce_layer_text}",
         "not a decoder layer"),
    Case("bench mllmu-med: --out is a user's folder", "bench mllmu-med --concept star --out {users_folder}",
         "not made by this command"),
]


# ----------------------------------------------------------------------------------------------------------------
# Images a method trains on: read through erasers.images.open_image, their headers checked before the model loads

def image_folder(root: Path, make) -> str:
    folder = root / "images"
    folder.mkdir()
    make(folder)
    return str(folder)


@fixture
def images_with_bomb(root):
    return image_folder(root, bomb_png)


@fixture
def images_with_garbage(root):
    return image_folder(root, garbage_png)


CASES += [
    Case("erase coerasing: --images holding a decompression bomb", "erase --method coerasing --concept arrow "
         "--images {images_with_bomb} --out {root}/e", "pixels"),
    Case("erase coerasing: --images holding a file that is not an image", "erase --method coerasing --concept arrow "
         "--images {images_with_garbage} --out {root}/e", "not a readable image"),
]


# ----------------------------------------------------------------------------------------------------------------
# Requests that contradict themselves, refused before the model loads

CASES += [
    Case("erase: the same concept twice", "erase --method uce --concept arrow --concept Arrow --out {root}/e",
         "given twice"),
    Case("erase: a concept both erased and --preserve'd", "erase --method uce --concept arrow --preserve arrow "
         "--out {root}/e", "both erased"),
    Case("erase: a concept as its own --anchor", "erase --method esd-x --concept arrow --anchor arrow "
         "--out {root}/e", "its own anchor"),
    Case("erase: --anchor for a method that reads none", "erase --method hirm --concept arrow --anchor circle "
         "--out {root}/e", "hirm reads no --anchor"),
    Case("erase: --preserve for a method that reads none", "erase --method esd-u --concept arrow --preserve circle "
         "--out {root}/e", "esd-u reads no --preserve"),
    Case("erase: --preserve for a training-free method", "erase --method negprompt --concept arrow --preserve circle "
         "--out {root}/e", "negprompt reads no --preserve"),
]


# ----------------------------------------------------------------------------------------------------------------
# The cost an interrupted erase recorded in OUT.partial/cost.json (summed into the finished edit's erasure.json)

@fixture
def hirm_partial_bad_cost(root):
    out = partial_run(root, hirm_signature(), {})
    (root / "edit.partial" / "cost.json").write_text(json.dumps({"seconds": "long", "runs": 1}))
    return out


CASES += [
    Case("erase: OUT.partial/cost.json with seconds as text", "erase --method hirm --concept star --set iterations=2 "
         "--device cpu --out {hirm_partial_bad_cost}", "cost.json: field seconds wants a float"),
]


# ----------------------------------------------------------------------------------------------------------------
# toy build --restart clears checkpoints only in a folder a toy build made

@fixture
def users_folder_with_ckpt(root):
    (root / "mine" / "ckpt").mkdir(parents=True)
    (root / "mine" / "ckpt" / "thesis.tex").write_text("the user's own file\n")
    return str(root / "mine")


CASES += [
    Case("toy build: --restart in a user's folder", "toy build data --restart --build-dir {users_folder_with_ckpt}",
         "carries no build marker"),
    Case("toy build-vlm: --restart in a user's folder", "toy build-vlm world --restart --build-dir "
         "{users_folder_with_ckpt}", "carries no build marker"),
]


# ----------------------------------------------------------------------------------------------------------------
# A benchmark run folder resumed with other sampling settings than its images were made with

@fixture
def i2p_run_of_another_seed(root):
    run = root / "r"
    run.mkdir()
    settings = {"prompt": "A skull image in Flat style.", "seed": 999, "steps": None, "guidance": 5.0, "height": 32,
                "width": 32}
    record = {"stage": "image", "set": "base", "key": "0", "file": "images/base/0.png", "settings": settings}
    (run / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    return str(run)


CASES += [
    Case("bench i2p: --out resumed with another seed than its images", "bench i2p --prompts {toy_i2p_csv} --limit 1 "
         "--out {i2p_run_of_another_seed}", "seed 999 there, 188 now"),
]
