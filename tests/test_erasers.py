"""Eraser mechanics on a tiny random SD pipeline: registry, configs, saving, loading, stacking, errors; and the
UCE closed form's defining property. Behaviour on the toy world is in test_erasure_toy.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.toycanvas.world import VOCABULARY
from erasers import UsageError, load_pipeline
from erasers.edits import apply_edits, read_edit
from erasers.prompts import make_request
from erasers.registry import build_config, get_method
from erasers.run import erase

FAST = {"iterations": "3", "ddim_steps": "5"}


def test_registry_and_config_overrides():
    with pytest.raises(UsageError, match="unknown method 'esd-z'"):
        get_method("esd-z")
    config = build_config("esd-x", toy=False, overrides={"iterations": "7", "eta": "1.5"})
    assert (config.parameters, config.iterations, config.eta, config.lr) == ("xattn", 7, 1.5, 5e-5)
    assert build_config("esd-u", toy=False).parameters == "noxattn"
    with pytest.raises(UsageError, match="has no option 'rank'"):
        build_config("uce", toy=False, overrides={"rank": "4"})
    with pytest.raises(UsageError, match="wants a int"):
        build_config("esd-x", toy=False, overrides={"iterations": "many"})


def test_toy_concepts_are_validated(clip_tokenizer_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    request = make_request(["Star"], tokenizer, VOCABULARY)
    assert (request.concepts, request.kind) == (["star"], "object")
    assert "A star image in Dots style." in request.erase_prompts()
    assert all("star" not in p for p in request.retain_prompts())
    assert make_request(["stripes"], tokenizer, VOCABULARY).concepts == ["Stripes"]
    assert make_request(["unsafe"], tokenizer, VOCABULARY).kind == "unsafe"
    with pytest.raises(UsageError, match="does not know the concept 'dog'"):
        make_request(["dog"], tokenizer, VOCABULARY)
    with pytest.raises(UsageError, match="separate requests"):
        make_request(["star", "Dots"], tokenizer, VOCABULARY)
    with pytest.raises(UsageError, match="no concept"):
        make_request([" "], tokenizer)


@pytest.mark.parametrize("method, component", [("esd-x", "unet"), ("esd-u", "unet"), ("esd-te", "text_encoder"),
                                               ("uce", "unet")])
def test_erase_saves_a_loadable_edit_with_metadata(tiny_pipeline_dirs, tmp_path, method, component):
    options = FAST if method != "uce" else {}
    out = erase(str(tiny_pipeline_dirs["sd"]), method, ["a star"], tmp_path / "edit", options=options, device="cpu")
    meta = read_edit(out)
    assert meta["method"] == method and meta["concepts"] == ["a star"] and meta["components"] == [component]
    assert meta["base_model"] == str(tiny_pipeline_dirs["sd"]) and meta["erasure_suite_version"]
    assert meta["cost"]["seconds"] >= 0 and meta["cost"]["storage_bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit"], "no temporary or partial directory is left"
    # The edited component loads with plain from_pretrained, and differs from the base.
    base = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    edited_module = type(getattr(base.pipeline, component)).from_pretrained(out / component)
    base_state = getattr(base.pipeline, component).state_dict()
    assert any(not torch.equal(v, base_state[k]) for k, v in edited_module.state_dict().items())
    apply_edits(base, [out])
    assert not any(not torch.equal(v, getattr(base.pipeline, component).state_dict()[k])
                   for k, v in edited_module.state_dict().items())


def test_edits_stack_across_components_but_not_within(tiny_pipeline_dirs, tmp_path):
    sd = str(tiny_pipeline_dirs["sd"])
    text_edit = erase(sd, "esd-te", ["a star"], tmp_path / "te", options=FAST, device="cpu")
    unet_edit = erase(sd, "uce", ["a star"], tmp_path / "uce", device="cpu")
    other_unet_edit = erase(sd, "uce", ["a circle"], tmp_path / "uce2", device="cpu")
    loaded = load_pipeline(sd, device="cpu")
    base_image = np.asarray(loaded.generate(["a star"], steps=2, progress=False)[0])
    apply_edits(loaded, [text_edit, unet_edit])
    stacked_image = np.asarray(loaded.generate(["a star"], steps=2, progress=False)[0])
    assert not np.array_equal(base_image, stacked_image)
    with pytest.raises(UsageError, match="both edit the unet"):
        apply_edits(load_pipeline(sd, device="cpu"), [unet_edit, other_unet_edit])


def test_bad_erase_requests(tiny_pipeline_dirs, tmp_path):
    sd = str(tiny_pipeline_dirs["sd"])
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        erase(sd, "uce", ["a star"], tmp_path / "taken", device="cpu")
    with pytest.raises(UsageError, match="esd parameters must be one of"):
        erase(str(tiny_pipeline_dirs["flux"]), "esd-x", ["a star"], tmp_path / "flux",
              options={**FAST, "parameters": "everything"}, device="cpu")
    with pytest.raises(UsageError, match="not an edit"):
        read_edit(tiny_pipeline_dirs["sd"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "erasure.json").write_text("{not json")
    with pytest.raises(UsageError, match="corrupt"):
        read_edit(broken)
    assert not (tmp_path / "flux").exists()


def test_uce_maps_the_concept_to_its_guide_and_keeps_preserved_prompts(tiny_pipeline_dirs):
    """The closed form's defining property: W c_concept ~ W0 c_guide and W p ~ W0 p for preserved prompts."""
    from erasers.methods.uce import UCE, UCEConfig, token_columns

    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    request = make_request(["star"], loaded.tokenizer, preserve=["circle", "square"])
    concept = token_columns(loaded, ["star"])
    guide = token_columns(loaded, [""], lengths=[concept.shape[1] + 1])  # the default guide: the empty prompt
    preserved = token_columns(loaded, ["circle", "square"])
    name, _, to_v = loaded.adapter.cross_attention_kv()[0]
    w0 = to_v.weight.detach().double().clone()
    UCE(UCEConfig(lamb=1e-3)).erase(loaded, request)
    w = to_v.weight.detach().double()
    concept_error = (w @ concept - w0 @ guide).norm() / (w0 @ concept - w0 @ guide).norm()
    preserve_error = (w @ preserved - w0 @ preserved).norm() / (w0 @ preserved).norm()
    assert concept_error < 0.2 and preserve_error < 0.2, (concept_error, preserve_error)


def test_edit_metadata_is_json_with_the_method_config(tiny_pipeline_dirs, tmp_path):
    out = erase(str(tiny_pipeline_dirs["sd"]), "uce", ["a star"], tmp_path / "e", options={"lamb": "0.25"},
                device="cpu")
    assert json.loads((out / "erasure.json").read_text())["config"]["lamb"] == 0.25


def test_text_reading_attention_is_found_by_what_it_reads_not_by_its_name(tiny_pipeline_dirs, tmp_path):
    """In blocks built with only_cross_attention (the toy UNet's 16x16 blocks) attn1 reads the text too: UCE must
    edit it and ESD-x must train it, or the concept keeps a path through it."""
    from diffusers import UNet2DConditionModel

    from erasers.parameters import trainable_parameters

    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    config = dict(loaded.denoiser.config)
    config["only_cross_attention"] = [True, False]
    loaded.pipeline.unet = UNet2DConditionModel.from_config(config)
    names = loaded.adapter.text_attention_names()
    assert {n.rsplit(".", 1)[-1] for n in names} == {"attn1", "attn2"}
    assert all(loaded.denoiser.get_submodule(n).is_cross_attention for n in names)
    text_reading = {id(p) for n in names for p in loaded.denoiser.get_submodule(n).parameters()}
    assert {id(p) for p in trainable_parameters(loaded, "xattn")} == text_reading
    assert not text_reading & {id(p) for p in trainable_parameters(loaded, "noxattn")}

    from erasers.methods.uce import UCE, UCEConfig

    attn1 = next(n for n in names if n.endswith("attn1"))
    before = loaded.denoiser.get_submodule(attn1).to_v.weight.detach().clone()
    UCE(UCEConfig()).erase(loaded, make_request(["star"], loaded.tokenizer))
    assert not torch.allclose(loaded.denoiser.get_submodule(attn1).to_v.weight, before)


@pytest.mark.parametrize("method", ["esd-x", "advunlearn"])
def test_esd_contrast_must_be_known(tmp_path, method):
    with pytest.raises(UsageError, match="contrast must be one of empty, neutral, not 'nowhere'"):
        erase("toy", method, ["arrow"], tmp_path / "edit", options={"contrast": "nowhere", **FAST}, device="cpu")
    assert not (tmp_path / "edit").exists() and not (tmp_path / "edit.partial").exists()


def test_neutral_contrast_replaces_only_the_concept():
    from erasers.losses import contrast_states

    loaded = load_pipeline("toy", device="cpu")
    request = make_request(["arrow"], loaded.tokenizer, VOCABULARY)
    prompts = request.erase_prompts()[:3]
    assert request.neutral_prompts(prompts) == [p.replace("arrow", "object") for p in prompts]
    neutral = contrast_states(loaded, request, prompts, "neutral")
    assert torch.allclose(neutral, loaded.encode_text(request.neutral_prompts(prompts)))
    empty = contrast_states(loaded, request, prompts, "empty")
    assert torch.allclose(empty, loaded.encode_text([""]).expand(3, -1, -1))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_an_erase_in_a_fresh_process_reports_its_own_peak_memory_not_its_parents():
    """Benchmarks run each erase in a process forked from a preloaded server; ru_maxrss survives exec on Linux and
    a plain fork copies the parent's pages, so either would report the parent's peak as the erase's."""
    from benchmarks.erasure_bench import run_in_fresh_process
    from erasers.files import peak_memory_bytes

    ballast = torch.ones(2 * 2**30 // 4)  # 2 GiB held by this (parent) process while the child runs
    ballast += 1
    child_peak = run_in_fresh_process(peak_memory_bytes, torch.device("cpu"))
    assert child_peak < ballast.numel() * 4, child_peak


def test_a_request_that_contradicts_itself_is_refused(clip_tokenizer_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    with pytest.raises(UsageError, match="--concept Stripes is given twice"):
        make_request(["Stripes", "STRIPES"], tokenizer, VOCABULARY)  # the same concept once canonical
    with pytest.raises(UsageError, match="both erased .* and preserved"):
        make_request(["Van_Gogh"], tokenizer, preserve=["van gogh"])
    with pytest.raises(UsageError, match="its own anchor"):
        make_request(["a star"], tokenizer, anchors=["A Star"])
    preserved = "A circle image in Flat style."
    request = make_request(["star"], tokenizer, VOCABULARY, preserve=[preserved])
    assert preserved in request.retain_prompts(), "--preserve counts on a model with a vocabulary too"


@pytest.mark.parametrize("method, option", [("hirm", "--anchor"), ("esd-x", "--preserve"), ("sld", "--preserve")])
def test_anchor_or_preserve_for_a_method_that_reads_none_is_refused(method, option, tmp_path, capsys):
    from apps.cli import main
    from erasers.registry import available_methods

    code = main(["erase", "--method", method, "--concept", "star", option, "circle", "--out", str(tmp_path / "e")])
    readers = [name for name, entry in available_methods().items()
               if getattr(entry, "reads_anchors" if option == "--anchor" else "reads_preserve")]
    err = capsys.readouterr().err
    assert code == 2 and f"{method} reads no {option}" in err and all(name in err for name in readers)
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_erase_records_the_cost_of_every_run(tiny_pipeline_dirs, tmp_path, monkeypatch):
    """Interrupted at step 2 of 4 and resumed: erasure.json's cost is both runs' seconds (a clock that moves 100 s
    per reading) and the larger peak, not the last run's alone."""
    import itertools
    import types

    from interrupted import StopsAtTwo

    import erasers.core as core
    import erasers.methods.hirm as hirm

    clock = itertools.count(0, 100)
    monkeypatch.setattr(core, "time", types.SimpleNamespace(time=lambda: next(clock)))  # erasers.core's clock only
    peaks = iter([7_000, 5_000])
    monkeypatch.setattr(core, "peak_memory_bytes", lambda device: next(peaks))
    monkeypatch.setattr(hirm, "TrainingLoop", StopsAtTwo)
    out = tmp_path / "edit"
    options = {"iterations": 4}
    with pytest.raises(KeyboardInterrupt):
        erase(str(tiny_pipeline_dirs["sd"]), "hirm", ["a star"], out, options=options, device="cpu")
    assert json.loads((tmp_path / "edit.partial" / "cost.json").read_text()) == {
        "seconds": 100, "peak_memory_bytes": 7_000, "runs": 1}
    erase(str(tiny_pipeline_dirs["sd"]), "hirm", ["a star"], out, options=options, device="cpu")
    cost = read_edit(out)["cost"]
    assert (cost["seconds"], cost["peak_memory_bytes"], cost["runs"]) == (200, 7_000, 2)
