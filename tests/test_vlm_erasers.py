"""VLM erasers on tiny random-weight LLaVA / Qwen2.5-VL models: what each method must do, not how.

SAUCE changes answers where the concept's features fire and nothing elsewhere; MLLMEraser moves forget states and
leaves retain states where they were; each fine-tuning baseline makes the forget answers less likely; edits save,
load and refuse the wrong model; the CLI turns bad input into one line and exit code 2.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_vlm_models import build_llava, build_qwen

from erasers.errors import UsageError
from vlm.edits import TENSORS, applied, read_vlm_edit
from vlm.forward import Item, answer_nll, layer_states
from vlm.mllmu import QA
from vlm.models import ask_many, load_vlm
from vlm.registry import EditContent, build_vlm_config, get_vlm_method
from vlm.targets import Target


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {"llava": build_llava(root / "llava"), "qwen2.5-vl": build_qwen(root / "qwen")}


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    return load_vlm(str(tiny_dirs["llava"]), device="cpu")


def _solid(colour, size=28) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def _noise(seed: int, size=28) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _item(k: int, image, answer: str, question: str = "What colour is the star?") -> Item:
    return Item(QA(f"r{k}/gen0", f"r{k}", "generation", "Image_Textual", question, question, answer), image)


def toy_target() -> Target:
    """Concept: plain bright pictures (answer "red"); neutral: noise pictures (answer "blue")."""
    forget = [_item(k, _solid((255, 40 + 20 * k, 40)), "red") for k in range(8)]
    retain = [_item(100 + k, _noise(k), "blue") for k in range(16)]
    return Target("red", "object", forget=forget, retain_fit=retain[:8], retain=retain[8:], test=forget[:2],
                  source="test")


def _erase(loaded, method, options, tmp_path, name=None):
    from vlm.edits import save_vlm_edit, vlm_edit_metadata

    config = build_vlm_config(method, False, options)
    content = get_vlm_method(method).eraser(config).erase(loaded, toy_target())
    out = tmp_path / (name or method)
    try:
        save_vlm_edit(out, content, vlm_edit_metadata(loaded, method, config, "red"))
    finally:
        if content.adapter is not None:
            content.adapter.unload()
    return out


def test_sauce_changes_concept_answers_only(llava, tmp_path):
    target = toy_target()
    edit = _erase(llava, "sauce", {"layer": 0, "sae_steps": 100, "batch_size": 64, "features": 4,
                                   "clamp": "negative", "clamp_value": -30.0}, tmp_path)
    meta = read_vlm_edit(edit)
    assert meta["info"]["features"] and meta["config"]["clamp"] == "negative"
    concept = target.forget
    neutral = target.retain
    images = [i.image for i in concept + neutral]
    questions = [i.prompt for i in concept + neutral]
    # The first answer token depends on the prompt alone; later ones on generated text, on which a feature may
    # fire for any input (and a random model's text is arbitrary).
    base = ask_many(llava, images, questions, 1)
    with applied(llava, edit):
        edited = ask_many(llava, images, questions, 1)
    # The chosen features never fire on the neutral prompts, so their answers are exactly the base model's.
    assert edited[len(concept):] == base[len(concept):]
    assert sum(a != b for a, b in zip(edited[:len(concept)], base[:len(concept)])) >= len(concept) // 2, (base, edited)
    assert ask_many(llava, images, questions, 1) == base  # the hooks are gone after the block


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_mllmeraser_moves_forget_states_not_retain(tiny_dirs, family, tmp_path):
    loaded = load_vlm(str(tiny_dirs[family]), device="cpu")
    target = toy_target()
    # Eight retain states span eight of 32 dimensions: the exact null space of the "energy" gate has room.
    edit = _erase(loaded, "mllmeraser", {"null_space": "energy", "retain_energy": 0.999999, "pgd_steps": 3,
                                         "strength": 1.0}, tmp_path)
    layer = read_vlm_edit(edit)["info"]["layers"][0]

    def states(items):
        return layer_states(loaded, items, [layer], "last")[layer]

    before_retain, before_forget = states(target.retain_fit), states(target.forget)
    with applied(loaded, edit):
        after_retain, after_forget = states(target.retain_fit), states(target.forget)
    retain_shift = (after_retain - before_retain).norm(dim=1) / before_retain.norm(dim=1)
    forget_shift = (after_forget - before_forget).norm(dim=1) / before_forget.norm(dim=1)
    assert retain_shift.max() < 1e-3, retain_shift
    assert forget_shift.mean() > 0.05, forget_shift


def test_mllmeraser_text_pairs_perturb_prompt_embeddings(llava, tmp_path):
    from vlm.methods.mllmeraser import MLLMEraserConfig, perturb_text

    target = toy_target()
    text_items = [Item(QA(f"t{k}/gen0", f"t{k}", "generation", "Pure_Text", q, q, "red"), None)
                  for k, q in enumerate(["Which colour is Anna's star?", "What colour is the star of Ben?"])]
    cfg = MLLMEraserConfig(pgd_steps=2, pgd_text_epsilon=0.5)
    embeds = perturb_text(llava, text_items, cfg)
    prompt = llava.inputs([None, None], [i.prompt for i in text_items])["input_ids"]
    change = (embeds - llava.model.get_input_embeddings()(prompt)).abs().max()
    assert 0 < change <= 0.5 * llava.model.get_input_embeddings().weight.std() + 1e-6
    target.forget.extend(text_items)
    config = build_vlm_config("mllmeraser", False, {"text_pairs": "true", "pgd_steps": 1})
    content = get_vlm_method("mllmeraser").eraser(config).erase(llava, target)
    assert content.info["text_forget_pairs"] == 2 and content.info["forget_pairs"] == 8


def test_mllmeraser_refusal_text_enters_the_fitted_pairs(llava):
    # Without the image perturbation the two sides of a pair differ only in their answer text: the map is the
    # refusal's doing, and another refusal fits another map.
    target = toy_target()

    def steering(refusal):
        config = build_vlm_config("mllmeraser", False, {"pgd_steps": 0, "mc_map": False, "refusal": refusal,
                                                        "null_space": "energy", "retain_energy": 0.999999})
        return get_vlm_method("mllmeraser").eraser(config).erase(llava, target).tensors

    first, second = steering("I cannot share that information."), steering("No comment.")
    layer = next(iter(first))
    assert first[layer].norm() > 0
    assert (first[layer] - second[layer]).norm() > 0.05 * first[layer].norm()


def test_mllmeraser_energy_null_space_leaves_out_the_directions_holding_the_stated_energy():
    from vlm.methods.mllmeraser import MLLMEraserConfig, null_space_basis

    generator = torch.Generator().manual_seed(0)
    retain = torch.randn(200, 24, generator=generator) * torch.logspace(0, -3, 24)  # a decaying spectrum
    forget = torch.randn(20, 24, generator=generator)
    for energy in (0.9, 0.99, 0.999):
        _, singular, right = torch.linalg.svd(retain.double(), full_matrices=True)
        share = singular.pow(2).cumsum(0) / singular.pow(2).sum()
        kept = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype))) + 1  # reach `energy`
        assert share[kept - 1] >= energy and (kept == 1 or share[kept - 2] < energy)
        basis = null_space_basis(retain, forget, MLLMEraserConfig(null_space="energy", retain_energy=energy))
        expected = right[kept:].T @ right[kept:]  # projector onto the directions beyond them
        assert basis.shape == (24, 24 - kept)
        torch.testing.assert_close(basis.double() @ basis.double().T, expected, atol=1e-5, rtol=0)


def test_prompt_task_reads_the_task_from_the_prompt():
    from vlm.methods.mllmeraser import prompt_task
    from vlm.mllmu import cloze_prompt, multiple_choice_prompt

    assert prompt_task(multiple_choice_prompt("What is shown?", {"A": "star", "B": "cat"})) == "multiple_choice"
    assert prompt_task("USER: Which one?\nA. star\nB. cat\nC. dog ASSISTANT:") == "multiple_choice"
    assert prompt_task(cloze_prompt("The object is a __.")) == "cloze"
    assert prompt_task("The patient lives in [Blank]. Please ONLY provide the answer.") == "cloze"
    assert prompt_task("What object is in this image? A star, maybe.") == "generation"


def test_mllmeraser_task_strengths_steer_only_the_tasks_they_name(llava, tmp_path):
    edit = _erase(llava, "mllmeraser", {"pgd_steps": 1, "null_space": "energy", "retain_energy": 0.999999,
                                        "generation_strength": 0.0, "cloze_strength": 1.0}, tmp_path)
    layer = read_vlm_edit(edit)["info"]["layers"][-1]
    images = [item.image for item in toy_target().forget]

    def states(question):
        items = [_item(k, image, "red", question) for k, image in enumerate(images)]
        return layer_states(llava, items, [layer], "last")[layer]

    questions = {"generation": "What colour is the star?", "cloze": "Fill in the blank: the star is __."}
    before = {task: states(q) for task, q in questions.items()}
    with applied(llava, edit):
        after = {task: states(q) for task, q in questions.items()}
    torch.testing.assert_close(after["generation"], before["generation"], atol=0, rtol=0)
    assert (after["cloze"] - before["cloze"]).norm(dim=1).min() > 0


@pytest.mark.parametrize("method", ["ga", "graddiff", "kl", "npo"])
def test_baselines_make_forget_answers_less_likely(llava, method, tmp_path):
    target = toy_target()
    with torch.no_grad():
        before = answer_nll(llava, target.forget).mean()
    edit = _erase(llava, method, {"steps": 4, "batch_size": 4, "lr": 5e-3, "lora_dropout": 0.0}, tmp_path)
    assert (edit / "adapter" / "adapter_config.json").exists()
    with torch.no_grad():
        restored = answer_nll(llava, target.forget).mean()
        with applied(llava, edit):
            after = answer_nll(llava, target.forget).mean()
    torch.testing.assert_close(restored, before)  # the adapter was unloaded: the base model is intact
    assert after > before + 0.05, (before, after)


def test_edit_metadata_and_bad_edits(tiny_dirs, llava, tmp_path):
    edit = _erase(llava, "mllmeraser", {"pgd_steps": 1}, tmp_path)
    meta = json.loads((edit / "erasure.json").read_text())
    for key in ("method", "config", "concept", "base_model", "base_family", "base_weights",
                "erasure_suite_version", "info", "cost"):
        assert key in meta
    assert meta["model_kind"] == "vlm" and meta["method"] == "mllmeraser" and meta["concept"] == "red"
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    with pytest.raises(UsageError, match="already exists"):
        _erase(llava, "mllmeraser", {"pgd_steps": 1}, tmp_path)
    # Another family's model refuses it.
    qwen = load_vlm(str(tiny_dirs["qwen2.5-vl"]), device="cpu")
    with pytest.raises(UsageError, match=r"made for another base model \(.*; llava family; this model is qwen2.5-vl\), "
                       "not .*--allow-other-base"):
        with applied(qwen, edit):
            pass
    # A truncated tensor file and a corrupt erasure.json are one clear error each.
    data = (edit / TENSORS).read_bytes()
    (edit / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="corrupt"):
        with applied(llava, edit):
            pass
    (edit / "erasure.json").write_text("{not json")
    with pytest.raises(UsageError, match="corrupt"):
        read_vlm_edit(edit)
    with pytest.raises(UsageError, match="does not exist"):
        read_vlm_edit(tmp_path / "missing")


def test_config_errors():
    with pytest.raises(UsageError, match="unknown VLM method"):
        get_vlm_method("esd-x")
    with pytest.raises(UsageError, match="no option"):
        build_vlm_config("sauce", False, {"nope": "1"})
    with pytest.raises(UsageError, match="wants a int"):
        build_vlm_config("ga", False, {"steps": "many"})
    assert build_vlm_config("ga", True, {}).steps != build_vlm_config("ga", False, {}).steps
    assert isinstance(EditContent().tensors, dict)


def _cli(capsys, *argv):
    from apps.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_bad_input_is_one_line(capsys, tmp_path, tiny_dirs):
    cases = [
        (["vlm", "erase", "--method", "nope", "--concept", "star", "--out", str(tmp_path / "a")], "unknown VLM method"),
        (["vlm", "erase", "--method", "sauce", "--concept", "nothing", "--out", str(tmp_path / "a")],
         "unknown concept"),
        (["vlm", "erase", "--method", "sauce", "--concept", "forget_5", "--data", str(tmp_path / "none"), "--out",
          str(tmp_path / "a")], "does not exist"),
        (["vlm", "ask", "--model", str(tiny_dirs["llava"]), "--edit", str(tmp_path / "none"), "--question", "hi"],
         "does not exist"),
        (["vlm", "ask", "--model", str(tiny_dirs["llava"]), "--image", str(tmp_path / "none.png"), "--question",
          "hi"], "does not exist"),
        (["vlm", "ask", "--model", "not a model", "--question", "hi"], "unknown VLM"),
        (["bench", "mllmu-med", "--edit", str(tmp_path)], "not an edit"),
    ]
    for argv, message in cases:
        code, err = _cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("erasure: error:") and message in err and len(err.splitlines()) == 1, err


def test_cli_ask_before_after(capsys, tiny_dirs, llava, tmp_path):
    from apps.cli import main

    edit = _erase(llava, "sauce", {"layer": 0, "sae_steps": 50, "batch_size": 64}, tmp_path)
    image = tmp_path / "red.png"
    _solid((255, 40, 40)).save(image)
    assert main(["vlm", "ask", "--model", str(tiny_dirs["llava"]), "--edit", str(edit), "--image", str(image),
                 "--question", "What colour is the star?", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("base:") and out[1].startswith("edited:")


def test_app_vlm_tab_answers_side_by_side(tiny_dirs, llava, tmp_path):
    import gradio as gr

    from apps.vlm_tab import VLMState, answer_pair, example_image, vlm_edits

    edits = tmp_path / "edits"
    edits.mkdir()
    _erase(llava, "sauce", {"layer": 0, "sae_steps": 20, "batch_size": 64}, edits, "no-red")
    (edits / "diffusion-edit").mkdir()
    (edits / "diffusion-edit" / "erasure.json").write_text(json.dumps({"method": "uce", "components": []}))
    assert list(vlm_edits(edits)) == ["no-red"]  # diffusion edits stay in the diffusion tabs
    state = VLMState(str(tiny_dirs["llava"]), edits, loaded=llava)
    before, after = answer_pair(state, example_image(), "What colour is the star?", "no-red")
    assert isinstance(before, str) and isinstance(after, str)
    with pytest.raises(gr.Error, match="type a question"):
        answer_pair(state, None, " ", None)
    with pytest.raises(gr.Error, match="refresh the page"):
        answer_pair(state, None, "hi", "gone")


def test_an_interrupted_baseline_resumes_to_the_same_adapter(llava, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import vlm.run
    from vlm.methods.baselines import GradientAscent

    monkeypatch.setattr(vlm.run, "resolve_target", lambda concept, data=None: toy_target())
    options = {"steps": 6, "batch_size": 4, "lr": 5e-3, "lora_dropout": 0.0, "checkpoint_every": 2}
    straight = vlm.run.erase_loaded(llava, "ga", "red", tmp_path / "straight", options)

    original_loss, steps_run = GradientAscent.loss, []

    def crashing_loss(self, *args):
        steps_run.append(1)
        if len(steps_run) == 5:
            raise RuntimeError("interrupted")
        return original_loss(self, *args)

    monkeypatch.setattr(GradientAscent, "loss", crashing_loss)
    with pytest.raises(RuntimeError, match="interrupted"):
        vlm.run.erase_loaded(llava, "ga", "red", tmp_path / "resumed", options)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "ckpt").is_dir()
    assert not any("lora" in name for name, _ in llava.model.named_modules()), "the crash left LoRA layers behind"

    steps_run.clear()
    monkeypatch.setattr(GradientAscent, "loss", lambda self, *args: steps_run.append(1) or original_loss(self, *args))
    resumed = vlm.run.erase_loaded(llava, "ga", "red", tmp_path / "resumed", options)
    assert len(steps_run) == 2, "the run resumed from its step-4 checkpoint"
    before, after = (load_file(edit / "adapter" / "adapter_model.safetensors") for edit in (straight, resumed))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "resumed.partial").exists()
    assert json.loads((resumed / "erasure.json").read_text())["cost"]["peak_memory_bytes"] > 0


def _damaged(edit, tmp_path, name, metadata=None, tensors=None):
    """A copy of `edit` with erasure.json changed by `metadata` (dict -> dict) and its tensors by `tensors`."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / name
    shutil.copytree(edit, copy)
    meta = json.loads((copy / "erasure.json").read_text())
    (copy / "erasure.json").write_text(json.dumps(metadata(meta) if metadata else meta))
    if tensors:
        save_file(tensors(load_file(copy / TENSORS)), copy / TENSORS)
    return copy


@pytest.mark.parametrize("method, damage, message", [
    ("sauce", {"info": {"layer": "one"}}, "info's layer is \"one\", not a decoder layer"),
    ("sauce", {"info": {"layer": 40}}, "info's layer is 40, not a decoder layer of this model (0 to 1)"),
    ("sauce", {"config": {"k": "many"}}, "config field k wants a int"),
    ("sauce", {"config": {"k": 10 ** 6}}, "not a count of 1 to"),
    ("sauce", "narrow decoder", "sae.decoder has shape"),
    ("sauce", "features past the autoencoder", "not indices of the autoencoder's"),
    ("mllmeraser", {"info": {"layers": [0], "strengths": ["strong"]}}, "not a finite number"),
    ("mllmeraser", "NaN steering", "non-finite values"),
    ("mllmeraser", {"base_model": None}, "'base_model' should be a non-empty string, not missing"),
])
def test_a_damaged_edit_is_one_line_before_any_hook_runs(llava, tmp_path, method, damage, message):
    options = {"sae_steps": 20, "batch_size": 64, "features": 4, "layer": 0} if method == "sauce" else \
        {"pgd_steps": 1}
    edit = _erase(llava, method, options, tmp_path)
    if isinstance(damage, dict):
        def metadata(meta):
            for key, value in damage.items():
                if value is None:
                    meta.pop(key)
                elif isinstance(meta.get(key), dict):
                    meta[key].update(value)
            return meta
        broken = _damaged(edit, tmp_path, "broken", metadata=metadata)
    else:
        changes = {"narrow decoder": lambda t: {**t, "sae.decoder": t["sae.decoder"][:, :8].contiguous()},
                   "features past the autoencoder": lambda t: {**t, "features": t["features"] + 1000},
                   "NaN steering": lambda t: {k: v * float("nan") for k, v in t.items()}}
        broken = _damaged(edit, tmp_path, "broken", tensors=changes[damage])
    with applied(llava, edit):  # the undamaged edit applies
        pass
    with pytest.raises(UsageError, match=re.escape(message)):
        with applied(llava, broken):
            pytest.fail("the damaged edit was applied")


def test_a_vlm_edit_for_other_weights_is_refused_unless_the_override_asks(tiny_dirs, llava, tmp_path, capsys):
    edit = _erase(llava, "mllmeraser", {"pgd_steps": 1}, tmp_path)
    other = load_vlm(str(tiny_dirs["llava"]), device="cpu")  # the same family with other weights, as a fine-tune
    with torch.no_grad():
        other.model.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(UsageError, match=r"made for another base model .*weights differ.*--allow-other-base"):
        with applied(other, edit):
            pass
    other.allow_other_base = True
    with applied(other, edit) as metadata:
        assert metadata["method"] == "mllmeraser"
    assert "loading it anyway (--allow-other-base)" in capsys.readouterr().err


def test_a_vlm_edit_loads_in_another_precision_but_not_onto_other_weights(tiny_dirs, llava, tmp_path):
    from vlm.edits import legacy_vlm_fingerprint

    half = load_vlm(str(tiny_dirs["llava"]), device="cpu", dtype=torch.bfloat16)
    made_in_fp32 = _erase(llava, "mllmeraser", {"pgd_steps": 1}, tmp_path, "fp32")
    made_in_bf16 = _erase(half, "mllmeraser", {"pgd_steps": 1}, tmp_path, "bf16")
    for loaded, edit in ((half, made_in_fp32), (llava, made_in_bf16)):
        with applied(loaded, edit) as metadata:
            assert metadata["method"] == "mllmeraser"
    other = load_vlm(str(tiny_dirs["llava"]), device="cpu")  # a fine-tune that left the token embedding as it was
    with torch.no_grad():
        other.layers[-1].mlp.down_proj.weight.mul_(1.5)
    for edit in (made_in_fp32, made_in_bf16):
        with pytest.raises(UsageError, match=r"another base model .*weights differ \(first .*down_proj"):
            with applied(other, edit):
                pass
    # An edit from before base_weights: its fingerprint, taken in bf16, is recomputed from the fp32 model cast
    # down; a fingerprint of other weights is refused in fp32 and cannot be compared in bf16 (family only).
    legacy = {k: v for k, v in json.loads((made_in_bf16 / "erasure.json").read_text()).items() if k != "base_weights"}
    (made_in_bf16 / "erasure.json").write_text(json.dumps({**legacy, "base_fingerprint": legacy_vlm_fingerprint(
        half, torch.bfloat16)}))
    with applied(llava, made_in_bf16):
        pass
    (made_in_bf16 / "erasure.json").write_text(json.dumps({**legacy, "base_fingerprint": "0123456789abcdef"}))
    with pytest.raises(UsageError, match="its weights differ from the ones it records"):
        with applied(llava, made_in_bf16):
            pass
    with applied(half, made_in_bf16):
        pass
