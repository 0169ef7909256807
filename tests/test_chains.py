"""Erasure in sequence (erase --base-edit, erasers/chains.py): the new edit names its parents, holds the chain's
weights (combined where both touched a component, the parent's carried where they differ) and reloads as A then B;
a training-free parent's guidance comes back with it; a parent for another base is refused in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from apps.cli import main
from benchmarks.compare import metrics_markdown
from erasers.chains import chain_name, chain_problems, edit_fingerprint
from erasers.edits import apply_edits
from erasers.errors import UsageError
from erasers.models import load_pipeline
from erasers.prompts import make_request
from erasers.registry import build_config, get_method
from erasers.run import erase

TEXT_EDIT = {"iterations": "2", "ddim_steps": "4"}


def own_result(model: str, parent: Path, method: str, concepts: list[str], options: dict | None = None) -> dict:
    """What `method` makes of `concepts` on `model` with `parent` loaded, in this process: B's own training result."""
    loaded = load_pipeline(model, device="cpu")
    apply_edits(loaded, [parent])
    loaded.freeze()
    eraser = get_method(method).eraser(build_config(method, False, options))
    components = eraser.erase(loaded, make_request(concepts, loaded.tokenizer, loaded.vocabulary))
    return {name: module.state_dict() for name, module in components.items()}


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value.to(got[key].dtype), msg=key)


def metadata(path: Path) -> dict:
    return json.loads((path / "erasure.json").read_text())


@pytest.fixture(scope="module")
def sd(tiny_pipeline_dirs):
    return str(tiny_pipeline_dirs["sd"])


@pytest.fixture(scope="module")
def text_parent(sd, tmp_path_factory):
    """A text-encoder edit (ESD-te) of the tiny SD pipeline: the first link of the chains below."""
    return erase(sd, "esd-te", ["a star"], tmp_path_factory.mktemp("parent") / "esd-te", options=TEXT_EDIT,
                 device="cpu")


def test_a_chain_on_another_component_carries_the_parent_and_reloads_as_a_then_b(sd, text_parent, tmp_path):
    chain = erase(sd, "uce", ["a cat"], tmp_path / "chain", device="cpu", base_edit=text_parent)
    meta = metadata(chain)
    [parent] = meta["parents"]
    assert parent["path"] == str(text_parent.resolve()) and parent["method"] == "esd-te"
    assert parent["concepts"] == ["a star"] and parent["components"] == ["text_encoder"]
    assert parent["fingerprint"] == edit_fingerprint(text_parent, ["text_encoder"])
    assert meta["concepts"] == ["a star", "a cat"] and meta["step_concepts"] == ["a cat"]
    assert meta["components"] == ["text_encoder", "unet"] and chain_name(meta) == "esd-te then uce"
    assert metadata(text_parent)["base_weights"] == meta["base_weights"]  # the base's, not the parent's weights

    expected = own_result(sd, text_parent, "uce", ["a cat"])
    # Plain from_pretrained on the chain's own directories: the parent's text encoder and B's UNet.
    assert_same_weights(UNet2DConditionModel.from_pretrained(chain / "unet").state_dict(), expected["unet"])
    parent_encoder = CLIPTextModel.from_pretrained(text_parent / "text_encoder").state_dict()
    assert_same_weights(CLIPTextModel.from_pretrained(chain / "text_encoder").state_dict(), parent_encoder)
    # B trained on top of A: UCE reads the (edited) text encoder's states, so its UNet is not UCE's on the base.
    on_base = UNet2DConditionModel.from_pretrained(erase(sd, "uce", ["a cat"], tmp_path / "base", device="cpu") /
                                                   "unet").state_dict()
    assert any(not torch.allclose(on_base[key], value) for key, value in expected["unet"].items())
    # --edit CHAIN alone, even with A gone.
    moved = tmp_path / "moved-parent"
    shutil.move(text_parent, moved)
    try:
        loaded = load_pipeline(sd, device="cpu")
        apply_edits(loaded, [chain])
        assert_same_weights(loaded.denoiser.state_dict(), expected["unet"])
        assert_same_weights(loaded.text_encoder.state_dict(), parent_encoder)
        assert chain_problems(chain) == [f"{text_parent.resolve()} (esd-te) is gone or moved"]
    finally:
        shutil.move(moved, text_parent)
    assert chain_problems(chain) == []


def test_a_chain_on_the_same_component_holds_the_combined_weights_and_names_every_ancestor(sd, tmp_path):
    first = erase(sd, "uce", ["a star"], tmp_path / "a", device="cpu")
    second = erase(sd, "uce", ["a cat"], tmp_path / "b", device="cpu", base_edit=first)
    expected = own_result(sd, first, "uce", ["a cat"])
    assert_same_weights(UNet2DConditionModel.from_pretrained(second / "unet").state_dict(), expected["unet"])
    assert metadata(second)["components"] == ["unet"]
    third = erase(sd, "esd-te", ["a dog", "a cat"], tmp_path / "c", options=TEXT_EDIT, device="cpu",
                  base_edit=second)
    meta = metadata(third)
    assert [(p["method"], p["concepts"]) for p in meta["parents"]] == [("uce", ["a star"]), ("uce", ["a cat"])]
    assert [p["path"] for p in meta["parents"]] == [str(first.resolve()), str(second.resolve())]
    assert meta["concepts"] == ["a star", "a cat", "a dog"]  # erased again in the third step: named once
    assert (third / "unet").is_dir() and chain_name(meta) == "uce then uce then esd-te"
    # A parent changed since the chain was made is detected by its fingerprint.
    (first / "erasure.json").write_text((first / "erasure.json").read_text() + " ")
    assert chain_problems(third) == [f"{first.resolve()} (uce) has changed since"]


def negative_texts(loaded) -> list[str]:
    return [edit.text for edit in getattr(loaded.pipeline, "call_edits", [])]


def test_a_training_free_parent_comes_back_with_the_chain_with_its_own_concepts(sd, tmp_path):
    guidance = erase(sd, "negprompt", ["a star"], tmp_path / "neg", device="cpu")
    chain = erase(sd, "uce", ["a cat"], tmp_path / "chain", device="cpu", base_edit=guidance)
    loaded = load_pipeline(sd, device="cpu")
    apply_edits(loaded, [chain])
    assert negative_texts(loaded) == ["a star"]  # A's guidance, from the chain's record of it
    assert_same_weights(loaded.denoiser.state_dict(), own_result(sd, guidance, "uce", ["a cat"])["unet"])
    # A training-free step on the chain: the weights carried, every guidance told only its own step's concepts.
    last = erase(sd, "negprompt", ["a dog"], tmp_path / "last", device="cpu", base_edit=chain)
    assert metadata(last)["components"] == ["unet"]
    loaded = load_pipeline(sd, device="cpu")
    apply_edits(loaded, [last])
    assert negative_texts(loaded) == ["a star", "a dog"]


def test_a_base_edit_for_another_base_is_refused_in_one_line_and_writes_nothing(tiny_pipeline_dirs, sd, tmp_path,
                                                                                  capsys):
    foreign = erase(str(tiny_pipeline_dirs["sdxl"]), "uce", ["a star"], tmp_path / "sdxl-edit", device="cpu")
    out = tmp_path / "chain"
    before = sorted(tmp_path.rglob("*"))
    code = main(["erase", "--model", sd, "--method", "uce", "--concept", "a cat", "--base-edit", str(foreign),
                 "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("erasure: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "made for another base model" in errors[0] and "sdxl family" in errors[0]
    assert sorted(tmp_path.rglob("*")) == before


def test_reports_name_a_chain_by_its_methods(tmp_path):
    from benchmarks.erasure_bench import Benchmark, plan_edits

    chain = tmp_path / "b"
    chain.mkdir()
    parent = {"path": "/runs/a", "method": "uce", "concepts": ["star"], "kind": "object", "components": ["unet"],
              "fingerprint": "0123456789abcdef"}
    (chain / "erasure.json").write_text(json.dumps({"method": "esd-x", "concepts": ["star", "arrow"],
                                                    "step_concepts": ["arrow"], "kind": "object", "components": [],
                                                    "parents": [parent]}))
    bench = Benchmark("toy", "toy", ("star", "arrow", "circle"), ("Flat",), (188,))
    [edit] = plan_edits(bench, [], [], [str(chain)], tmp_path / "run")
    assert (edit.name, edit.method, edit.concepts) == ("b", "uce then esd-x", ("star", "arrow"))
    table = {"kind": "object", "erased": ["star", "arrow"], "images_per_model": 4, "seeds": [188],
             "edits": [str(chain)], "chains": {str(chain): "uce then esd-x"},
             **{name: {"UA": 1.0, "IRA": 1.0, "CRA": 1.0, "accuracy": {"object": 1.0, "style": 1.0}}
                for name in ("base", "edited")}}
    assert "b is a chain: uce then esd-x" in metrics_markdown(table)


def test_an_spm_step_trains_its_adapter_on_the_parent_and_saves_it_beside_the_parent_weights(sd, text_parent,
                                                                                               tmp_path):
    quick = {key: str(value) for key, value in get_method("spm").quick.items()}
    chain = erase(sd, "spm", ["a cat"], tmp_path / "spm", options=quick, device="cpu", base_edit=text_parent)
    assert metadata(chain)["components"] == ["adapter", "text_encoder"]
    loaded = load_pipeline(sd, device="cpu")
    apply_edits(loaded, [chain])
    assert list(loaded.denoiser.peft_config) == ["spm_a_cat"]
    parent_encoder = CLIPTextModel.from_pretrained(text_parent / "text_encoder").state_dict()
    assert_same_weights(loaded.text_encoder.state_dict(), parent_encoder)
    # An adapter cannot be the parent of a chain: refused before any model loads.
    with pytest.raises(UsageError, match="holds an adapter"):
        erase(sd, "uce", ["a dog"], tmp_path / "next", device="cpu", base_edit=chain)
    assert not (tmp_path / "next").exists() and not (tmp_path / "next.partial").exists()
