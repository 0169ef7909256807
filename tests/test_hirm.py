"""HiRM: only the chosen early text-encoder blocks train, the concept's final representation moves to its
designated vector while other prompts stay put, and the edited CLIP text encoder drops into SDXL and Flux."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from erasers.edits import apply_edits, read_edit
from erasers.errors import UsageError
from erasers.methods.hirm import parse_layers
from erasers.models import load_pipeline, resolve_source
from erasers.prompts import make_request
from erasers.registry import build_config, get_method
from erasers.run import erase

SIZES = {"sd": 64, "sdxl": 64, "flux": 32}


def run_hirm(concept: str, options: dict):
    loaded = load_pipeline("toy", device="cpu")
    teacher = type(loaded.text_encoder).from_pretrained(Path(resolve_source("toy")) / "text_encoder").eval()
    config = build_config("hirm", True, options)
    request = make_request([concept], loaded.tokenizer, loaded.vocabulary)
    edited = get_method("hirm").eraser(config).erase(loaded, request)
    return loaded, teacher, edited["text_encoder"], request


def final_states(loaded, encoder, prompts):
    ids = loaded.tokenizer(prompts, padding="max_length", max_length=loaded.tokenizer.model_max_length,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0], ids


def test_only_the_chosen_early_blocks_train():
    loaded, teacher, edited, _ = run_hirm("arrow", {"iterations": 3, "layers": "0,1"})
    base = teacher.state_dict()
    changed = {k for k, v in edited.state_dict().items() if not torch.equal(v, base[k].to(v.dtype))}
    assert changed and all(".layers.0." in k or ".layers.1." in k for k in changed), sorted(changed)
    assert any(".layers.1." in k for k in changed)


def test_concept_is_misdirected_and_other_prompts_stay():
    # A gentle rate, so the check is on the mechanism (misdirect + retain), not on the toy default's step size,
    # whose cost on other prompts the method table measures as IRA / CRA.
    loaded, teacher, edited, request = run_hirm("arrow", {"iterations": 60, "lr": 1e-3})
    prompt, word = "A arrow image in Flat style.", "object"
    concept_position = loaded.tokenizer(prompt).input_ids.index(loaded.tokenizer("arrow").input_ids[1])
    before, _ = final_states(loaded, teacher, [prompt, prompt.replace("arrow", word)])
    after, _ = final_states(loaded, edited, [prompt])
    target = before[1, concept_position]
    distance_before = (before[0, concept_position] - target).norm()
    distance_after = (after[0, concept_position] - target).norm()
    assert distance_after < 0.5 * distance_before, (distance_before, distance_after)

    unrelated = ["A circle image in Flat style.", "A star image in Stripes style.", "A cat image in Crayon style."]
    kept_before, _ = final_states(loaded, teacher, unrelated)
    kept_after, _ = final_states(loaded, edited, unrelated)
    drift = (kept_after - kept_before).norm(dim=-1).mean()
    moved = (after[0, concept_position] - before[0, concept_position]).norm()
    assert drift < 0.15 * moved, (drift, moved)


def test_bad_layer_choice_and_target_are_usage_errors():
    with pytest.raises(UsageError, match="block indices 0..3"):
        parse_layers("2,9", 4)
    with pytest.raises(UsageError, match="hirm target must be one of"):
        build_config("hirm", True, {"target": "nowhere"})


@pytest.fixture(scope="module")
def shared_clip_pipelines(tiny_pipeline_dirs, tmp_path_factory):
    """SD, SDXL and Flux pipelines whose CLIP text encoder is the same model, as SD 1.x's CLIP ViT-L is SDXL's
    first text encoder and Flux's pooled encoder."""
    root = tmp_path_factory.mktemp("shared_clip")
    directories = {}
    for family, source in tiny_pipeline_dirs.items():
        shutil.copytree(source, root / family)
        if family != "sd":
            shutil.rmtree(root / family / "text_encoder")
            shutil.copytree(tiny_pipeline_dirs["sd"] / "text_encoder", root / family / "text_encoder")
        directories[family] = root / family
    return directories


def test_hirm_edit_made_on_sd_transfers_to_sdxl_and_flux(shared_clip_pipelines, tmp_path):
    options = {"iterations": 100, "lr": 3e-3, "retain_weight": 10.0}
    out = erase(str(shared_clip_pipelines["sd"]), "hirm", ["a star"], tmp_path / "hirm", preserve=["a dog",
                "a cat painting", "a red car"], options=options, device="cpu")
    assert read_edit(out)["components"] == ["text_encoder"]
    for family in ("sdxl", "flux"):
        loaded = load_pipeline(str(shared_clip_pipelines[family]), device="cpu")
        size = SIZES[family]
        base_image = np.asarray(loaded.generate(["a star"], steps=2, progress=False, height=size, width=size)[0])
        base_states = loaded.pipeline.text_encoder(loaded.tokenizer(["a star", "a dog"], padding="max_length",
                                                                    return_tensors="pt").input_ids)
        with pytest.raises(UsageError, match="made for another base model .*--allow-other-base"):
            apply_edits(loaded, [out])  # a transfer is refused unless asked for
        apply_edits(loaded, [out], allow_other_base=True)
        edited_image = np.asarray(loaded.generate(["a star"], steps=2, progress=False, height=size, width=size)[0])
        assert not np.array_equal(base_image, edited_image), family
        edited_states = loaded.pipeline.text_encoder(loaded.tokenizer(["a star", "a dog"], padding="max_length",
                                                                      return_tensors="pt").input_ids)
        # The pooled output (what SDXL and Flux read from CLIP) moves for the concept, far less for a kept prompt.
        shift = (edited_states.pooler_output - base_states.pooler_output).norm(dim=-1)
        assert shift[0] > 3 * shift[1], (family, shift)


@pytest.mark.slow  # about 40 s: a comparison with ESD-u; HiRM's own direction is in test_erasure_toy
def test_hirm_leaves_unrelated_generations_closer_to_the_base_than_esd_u(tmp_path):
    """HiRM's claim is a more localised erasure: with the concept erased, images of other prompts (same seeds)
    move less from the base model's than under ESD-u, which edits the UNet every prompt goes through."""
    from benchmarks.toycanvas.world import OBJECTS, STYLES, caption

    unrelated = [caption(o, s) for o, s in zip([o for o in OBJECTS if o != "arrow"], STYLES)]
    edits = {"hirm": erase("toy", "hirm", ["arrow"], tmp_path / "hirm", device="cpu"),
             "esd-u": erase("toy", "esd-u", ["arrow"], tmp_path / "esd-u", options={"iterations": 60},
                            device="cpu")}

    def images(edit=None):
        loaded = load_pipeline("toy", device="cpu")
        if edit:
            apply_edits(loaded, [edit])
        return np.stack([np.asarray(im, dtype=np.float32) for im in loaded.generate(unrelated, seeds=0)])

    base = images()
    drift = {name: float(np.abs(images(edit) - base).mean()) for name, edit in edits.items()}
    assert drift["hirm"] < 0.5 * drift["esd-u"], drift
