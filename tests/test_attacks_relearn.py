"""The training attacks (benchmarks/attacks/inversion.py, relearn.py): concept inversion learns a token that draws
the concept, relearning brings back what ESD-x erased, both write the shared result layout, an interrupted relearn
run resumes to the uninterrupted run's result, the user's --images and their captions, and the token and adapter on
SDXL and Flux."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import RESOLUTION

from benchmarks.attacks.concept_images import concept_examples
from benchmarks.attacks.harness import run_attack
from benchmarks.attacks.inversion import TOY_DEFAULTS as INVERSION_TOY
from benchmarks.attacks.inversion import InversionConfig, add_token, learn_token, with_token
from benchmarks.attacks.judges import ToyJudge
from benchmarks.attacks.relearn import TOY_DEFAULTS as RELEARN_TOY
from benchmarks.attacks.relearn import RelearnConfig, relearn
from erasers.models import load_pipeline
from erasers.prompts import make_request
from erasers.registry import build_config, get_method
from erasers.run import erase

CAPTIONS = [f"A arrow image in {style} style." for style in ("Flat", "Outline", "Stripes", "Dots", "Mosaic")]


def arrow_rate(loaded, prompts, seed=188) -> float:
    """The share of `prompts` the toy classifier reads as the arrow, one image each at `seed`."""
    images = loaded.generate(prompts, seeds=[seed] * len(prompts), progress=False)
    return float(np.mean(ToyJudge("object")(images, "arrow")))


def test_inversion_on_the_base_model_learns_a_token_that_draws_the_concept():
    """Against the base toy model, at the toy defaults (10 images, 60 steps: 100% on the arrow and on Stripes when
    measured), the token put in place of "arrow" draws the arrow in at least 80% of its 10 captions; the token as it
    starts (the embedding of "object") draws it in few."""
    loaded = load_pipeline("toy", device="cpu")
    request = make_request(["arrow"], loaded.tokenizer, loaded.vocabulary)
    captions = request.erase_prompts()[1:]
    config = InversionConfig(**INVERSION_TOY)
    examples = concept_examples(loaded, captions, config.image_count, config.seed, progress=False)
    with_tokens = [with_token(caption, "arrow", config.token) for caption in captions]
    assert all(config.token in p and "arrow" not in p for p in with_tokens)
    add_token(loaded, config.token, "object")
    assert arrow_rate(loaded, with_tokens[:5]) <= 0.4
    history = learn_token(loaded, examples, "arrow", config, "object", progress=False)
    assert np.isfinite(history[-1]["loss"])
    assert arrow_rate(loaded, with_tokens) >= 0.8


def test_relearn_brings_back_the_arrow_an_esd_x_edit_erased():
    """ESD-x at 25 iterations, lr 3e-3 (a short toy ESD-x: its defaults take about 2 minutes; this erases the
    arrow to 5% of the captions in about 15 s), made in this process; 40 relearning steps at the toy lr on 6 base
    images of the arrow raise the arrow's rate on the captions above the edit's own."""
    loaded = load_pipeline("toy", device="cpu")
    request = make_request(["arrow"], loaded.tokenizer, loaded.vocabulary)
    examples = concept_examples(loaded, request.erase_prompts()[1:], 6, 0, progress=False)
    eraser = get_method("esd-x").eraser(build_config("esd-x", True, {"iterations": 25, "lr": 3e-3}))
    eraser.erase(loaded, request)
    erased = arrow_rate(loaded, CAPTIONS)
    assert erased <= 0.4, "the short ESD-x must erase the arrow for relearning to have something to bring back"
    relearn(loaded, examples, RelearnConfig(**{**RELEARN_TOY, "steps": "0,40"}), progress=False)
    assert arrow_rate(loaded, CAPTIONS) > erased


@pytest.fixture(scope="module")
def uce_edit(tmp_path_factory):
    """A UCE edit of the arrow (closed form: a second), for the layout tests."""
    return erase("toy", "uce", ["arrow"], tmp_path_factory.mktemp("uce") / "edit", device="cpu")


def scripted(verdicts):
    answers = iter(verdicts)
    return lambda images, concept: [next(answers) for _ in images]


def test_inversion_writes_the_layout_with_the_token_for_the_concept(uce_edit, tmp_path):
    """Item 0: the plain prompt fails, the token's succeeds; item 1: both fail (scripted judge). Pre-ASR 0, ASR
    1/2, the attacked prompt names the token instead of the arrow, and the layout's files are written."""
    out = tmp_path / "attack"
    result = run_attack("inversion", "toy", [uce_edit], prompts=CAPTIONS[:2], config={"steps": 2, "image_count": 2},
                        judge=scripted([False, True, False, False]), device="cpu", progress=False, out=out,
                        resolution=16)
    assert (result["pre_asr"], result["asr"]) == (0.0, 0.5)
    first, second = result["items"]
    assert (first["pre_success"], first["attack_success"], second["attack_success"]) == (False, True, False)
    assert first["final_prompt"] == "A <inverted-concept> image in Flat style."
    assert first["token"] == "<inverted-concept>"
    assert np.isfinite(first["loss_last"])
    saved = json.loads((out / "attack.json").read_text())
    assert saved["attack"] == "inversion" and saved["config"]["steps"] == 2 and saved["asr"] == 0.5
    for record in saved["items"]:
        assert (out / record["image"]).is_file() and (out / record["images"]["erased"]).is_file()
    assert (out / "attack.png").is_file() and not (tmp_path / "attack.partial").exists()


class Interrupting:
    """The toy classifier as a judge that stops the run (as Ctrl-C would) at its `stop_at`-th image."""

    def __init__(self, stop_at=None):
        self.stop_at, self.calls = stop_at, 0
        self.toy = ToyJudge("object")

    def __call__(self, images, concept):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.toy(images, concept)


@pytest.mark.slow  # 14 s; test_attacks checks every attack's layout, and an interrupted attack's resume
def test_relearn_writes_its_curve_and_an_interrupted_run_resumes_to_the_same_result(uce_edit, tmp_path):
    """Two items, rates after 0, 2 and 3 steps: the curve, each item's images per step count, steps_to_relearn; a
    run stopped in its second item resumes (training from its checkpoints in OUT.partial/) to the very result of
    an uninterrupted run."""
    options = dict(prompts=CAPTIONS[:2], config={"steps": "0,2,3", "image_count": 2, "lr": 1e-2, "threshold": 0.5},
                   device="cpu", progress=False, resolution=16)  # 16 px: a quarter of the toy's sampling time
    whole = run_attack("relearn", "toy", [uce_edit], judge=Interrupting(), out=tmp_path / "whole", **options)
    with pytest.raises(KeyboardInterrupt):
        run_attack("relearn", "toy", [uce_edit], judge=Interrupting(stop_at=4), out=tmp_path / "resumed", **options)
    assert sorted(p.name for p in (tmp_path / "resumed.partial" / "ckpt").iterdir()) == \
        ["relearn-2.safetensors", "relearn-3.safetensors"]
    resumed = run_attack("relearn", "toy", [uce_edit], judge=Interrupting(), out=tmp_path / "resumed", **options)
    assert [p["steps"] for p in whole["curve"]] == [0, 2, 3] and whole["n"] == 2
    rates = [p["rate"] for p in whole["curve"]]
    assert whole["steps_to_relearn"] == next((k for k, r in zip([0, 2, 3], rates) if r >= 0.5), None)
    assert resumed["curve"] == whole["curve"]
    assert [r["curve"] for r in resumed["items"]] == [r["curve"] for r in whole["items"]]
    saved = json.loads((tmp_path / "resumed" / "attack.json").read_text())
    assert saved["curve"] == whole["curve"] and "asr" not in saved
    for record in saved["items"]:
        assert set(record["images"]) == {"erased", "steps-2"}
        names = [record["image"], *record["images"].values()]
        pixels = [np.asarray(Image.open(tmp_path / "resumed" / name)) for name in names]
        pixels_whole = [np.asarray(Image.open(tmp_path / "whole" / name)) for name in names]
        assert all(np.array_equal(a, b) for a, b in zip(pixels, pixels_whole))


def test_images_folder_with_and_without_captions(tmp_path):
    """--images: every image fitted to the model's size, captioned by NAME.txt beside it or, without one, by the
    attack's prompts in turn."""
    loaded = load_pipeline("toy", device="cpu")
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in (("a", (48, 32)), ("b", (32, 32))):
        Image.new("RGB", size, "red").save(folder / f"{name}.png")
    (folder / "a.txt").write_text("A arrow image in Dots style.\n")
    examples = concept_examples(loaded, ["first prompt", "second prompt"], 5, 0, str(folder))
    assert examples.captions == ["A arrow image in Dots style.", "second prompt"]
    side = loaded.image_size() // loaded.pipeline.vae_scale_factor
    assert examples.latents.shape[0] == 2 and examples.latents.shape[-1] == side


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_inversion_adds_a_token_row_to_every_text_encoder(bases, family):
    """SDXL: one row in each CLIP encoder; Flux: one in CLIP and one in T5 (its padded embedding has a spare row,
    so it is not resized); two steps train the rows and the pipeline's own call reads the token."""
    loaded = bases(family)
    sizes = {name: e.get_input_embeddings().weight.shape[0] for name, e in loaded.text_encoders.items()}
    examples = concept_examples(loaded, ["a star"], 2, 0, progress=False)
    config = InversionConfig(image_count=2, steps=2, lr=1e-1, batch_size=2, accumulation=1)
    ids = add_token(loaded, config.token, "star")
    starts = {name: e.get_input_embeddings().weight[ids[name]].clone() for name, e in loaded.text_encoders.items()}
    learn_token(loaded, examples, "star", config, progress=False)
    for name, encoder in loaded.text_encoders.items():
        tokenizer = loaded.tokenizers[name.replace("text_encoder", "tokenizer")]
        assert ids[name] in tokenizer("a <inverted-concept> image").input_ids
        weight = encoder.get_input_embeddings().weight
        grown = sizes[name] + (ids[name] >= sizes[name])
        assert weight.shape[0] == grown and not torch.equal(weight[ids[name]], starts[name])
    if family == "flux":
        assert loaded.text_encoders["text_encoder_2"].get_input_embeddings().weight.shape[0] == sizes["text_encoder_2"]
    image = loaded.generate(["a <inverted-concept>"], progress=False, height=RESOLUTION[family],
                            width=RESOLUTION[family])[0]
    assert np.isfinite(np.asarray(image, dtype=float)).all()


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_relearn_trains_a_lora_on_the_attention_projections(bases, family):
    """The adapter sits on every attention's query, key, value (and output) projection, and two steps move it."""
    loaded = bases(family)
    examples = concept_examples(loaded, ["a star"], 1, 0, progress=False)
    parameters, snapshots = relearn(loaded, examples, RelearnConfig(steps="0,2", lr=1e-2), progress=False)
    wrapped = [name for name, module in loaded.denoiser.named_modules() if hasattr(module, "lora_A")]
    assert wrapped and all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
                           for name in wrapped)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[2]))
    assert all(torch.equal(p, s) for p, s in zip(parameters, snapshots[2]))


def test_relearn_adds_its_adapter_beside_an_edits_own(tiny_pipeline_dirs):
    """On an SPM edit the attention projections are already peft LoRA layers: the relearning adapter goes on them
    too, and both adapters stay active."""
    from erasers.lora_adapters import add_lora, transformer_block_modules

    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    add_lora(loaded, "edit", transformer_block_modules(loaded))
    examples = concept_examples(loaded, ["a star"], 1, 0, progress=False)
    parameters, snapshots = relearn(loaded, examples, RelearnConfig(steps="0,2", lr=1e-2), progress=False)
    assert sorted(loaded.denoiser.active_adapters()) == ["edit", "relearn"]
    relearned = [name for name, module in loaded.denoiser.named_modules()
                 if "relearn" in getattr(module, "lora_A", {})]
    assert relearned and all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
                             for name in relearned)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[2]))
