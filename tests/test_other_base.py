"""An edit loads only onto the base model it was made for (erasure.json's base_weights, erasers/fingerprint.py):
another family, or another checkpoint of the same layout, is refused in one line wherever an edit loads, unless
--allow-other-base asks for a deliberate transfer; the same base in another precision loads."""

import json
import shutil

import pytest
import torch

from apps.cli import main
from erasers.edits import apply_edits
from erasers.errors import UsageError
from erasers.fingerprint import legacy_fingerprint
from erasers.models import load_pipeline
from erasers.run import erase

TEXT_EDIT = {"iterations": "2", "ddim_steps": "4"}


@pytest.fixture(scope="module")
def edits(tiny_pipeline_dirs, tmp_path_factory):
    """A UNet edit (UCE) and a text-encoder edit (ESD-te), both made on the tiny SD pipeline."""
    root, sd = tmp_path_factory.mktemp("edits"), str(tiny_pipeline_dirs["sd"])
    return {"unet": erase(sd, "uce", ["a star"], root / "uce", device="cpu"),
            "text": erase(sd, "esd-te", ["a star"], root / "esd-te", options=TEXT_EDIT, device="cpu")}


@pytest.fixture(scope="module")
def fine_tune(tiny_pipeline_dirs, tmp_path_factory):
    """The tiny SD pipeline with other UNet weights: its layout, another checkpoint (as a fine-tune is)."""
    directory = tmp_path_factory.mktemp("fine-tune") / "sd"
    shutil.copytree(tiny_pipeline_dirs["sd"], directory)
    loaded = load_pipeline(str(directory), device="cpu")
    with torch.no_grad():
        loaded.denoiser.conv_in.weight.mul_(1.5)
    loaded.denoiser.save_pretrained(directory / "unet")
    return directory


def test_another_family_or_checkpoint_is_refused_and_the_same_base_loads_in_any_precision(
        edits, fine_tune, tiny_pipeline_dirs):
    with pytest.raises(UsageError, match=r"made for another base model \(.*sd; sd family; this pipeline is sdxl\), "
                       r"not .*sdxl: load it onto the model it was made from, or pass --allow-other-base"):
        apply_edits(load_pipeline(str(tiny_pipeline_dirs["sdxl"]), device="cpu"), [edits["text"]])
    with pytest.raises(UsageError, match=r"the unet's weights differ \(first conv_in.weight\)"):
        apply_edits(load_pipeline(str(fine_tune), device="cpu"), [edits["unet"]])
    # The record is of the base as loaded: a text-encoder edit stacked first does not make the UNet edit foreign.
    same = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu", dtype=torch.bfloat16)
    apply_edits(same, [edits["text"]])
    apply_edits(same, [edits["unet"]])


def test_the_override_loads_a_deliberate_transfer(edits, tiny_pipeline_dirs, capsys):
    sdxl = load_pipeline(str(tiny_pipeline_dirs["sdxl"]), device="cpu")
    apply_edits(sdxl, [edits["text"]], allow_other_base=True)
    assert "made for another base model" in capsys.readouterr().err
    edited = sdxl.text_encoder.state_dict()
    from transformers import CLIPTextModel

    saved = CLIPTextModel.from_pretrained(edits["text"] / "text_encoder").state_dict()
    assert all(torch.equal(edited[key], value) for key, value in saved.items())


def test_an_edit_from_before_base_weights_is_compared_where_its_fingerprint_can_be(edits, tiny_pipeline_dirs,
                                                                                    tmp_path):
    """Its base_fingerprint summed the weights in the erase's precision: recomputed on a pipeline holding that
    precision (or fp32), not on one holding less."""
    sd = str(tiny_pipeline_dirs["sd"])
    old = tmp_path / "old"
    shutil.copytree(edits["unet"], old)
    meta = json.loads((old / "erasure.json").read_text())
    del meta["base_weights"]
    meta["base_fingerprint"] = legacy_fingerprint(load_pipeline(sd, device="cpu"), torch.float32)
    (old / "erasure.json").write_text(json.dumps(meta))
    apply_edits(load_pipeline(sd, device="cpu"), [old])
    meta["base_fingerprint"] = "0123456789abcdef"
    (old / "erasure.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="made for another base model .*differ from the ones it records"):
        apply_edits(load_pipeline(sd, device="cpu"), [old])
    apply_edits(load_pipeline(sd, device="cpu", dtype=torch.bfloat16), [old])  # fp32 sums: not comparable in bf16


def _errors(capsys) -> tuple[list[str], str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("erasure: error:")], err


def test_the_commands_refuse_another_base_in_one_line_and_take_the_override(edits, tiny_pipeline_dirs, tmp_path,
                                                                            capsys):
    sdxl, out = str(tiny_pipeline_dirs["sdxl"]), tmp_path / "star.png"
    generate = ["generate", "--model", sdxl, "--edit", str(edits["text"]), "--prompt", "a star", "--steps", "1",
                "--device", "cpu", "--out", str(out)]
    assert main(generate) == 2
    errors, err = _errors(capsys)
    assert len(errors) == 1 and str(tiny_pipeline_dirs["sd"]) in errors[0] and sdxl in errors[0], err
    assert "--allow-other-base" in errors[0] and "Traceback" not in err and not out.exists()
    assert main([*generate, "--allow-other-base"]) == 0 and out.exists()
    # compare runs on the toy model: an edit of the tiny SD pipeline (of a toy object) is refused before any image.
    foreign = tmp_path / "foreign"
    shutil.copytree(edits["unet"], foreign)
    meta = json.loads((foreign / "erasure.json").read_text())
    (foreign / "erasure.json").write_text(json.dumps({**meta, "concepts": ["star"], "kind": "object"}))
    compared = tmp_path / "compare"
    assert main(["compare", "--edit", str(foreign), "--device", "cpu", "--out", str(compared)]) == 2
    errors, err = _errors(capsys)
    assert len(errors) == 1 and "made for another base model" in errors[0] and not compared.exists(), err
