"""DoCo: the gradient surgery's defining property, the discriminator learning, saving/stacking/resuming on the tiny
SD pipeline, and erasure behaviour on the toy world."""

import re

import numpy as np
import pytest
import torch
from interrupted import StopsAtTwo

from erasers import UsageError, load_pipeline
from erasers.edits import apply_edits, read_edit
from erasers.methods.doco import DoCo, PatchDiscriminator, discriminator_step, project_conflicting
from erasers.prompts import make_request
from erasers.registry import build_config
from erasers.run import erase

# A few steps of everything: anchor images, warm-up, adversarial steps with surgery.
FAST = {"iterations": 4, "warmup_steps": 1, "batch_size": 2, "anchor_images": 3, "sample_steps": 2}


def test_surgery_removes_only_the_conflicting_component():
    preserve = torch.tensor([[-1.0, 0.0], [0.0, 0.0]])
    conflicting = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    adjusted = project_conflicting(conflicting, preserve)
    # <g_u, g_p> = -1 < 0: the component along g_p goes, the rest stays.
    assert torch.allclose(adjusted, torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    assert torch.sum(adjusted * preserve).abs() < 1e-6
    agreeing = torch.tensor([[-3.0, 5.0], [1.0, 1.0]])
    assert torch.equal(project_conflicting(agreeing, preserve), agreeing)
    orthogonal = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    assert torch.equal(project_conflicting(orthogonal, preserve), orthogonal)


def test_discriminator_learns_to_tell_anchor_outputs_from_concept_outputs():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(4, width=16, layers=3, size=16)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    # "real" outputs carry a pattern the "fake" ones lack, as the anchor's domain differs from the concept's.
    pattern = torch.zeros(1, 4, 16, 16)
    pattern[:, :, 4:12, 4:12] = 1.0
    accuracies = []
    for _ in range(40):
        real = torch.randn(8, 4, 16, 16) + pattern
        fake = torch.randn(8, 4, 16, 16)
        accuracies.append(discriminator_step(discriminator, optimizer, real, fake)["d_acc"])
    assert np.mean(accuracies[:3]) < 0.75 and np.mean(accuracies[-5:]) > 0.9, accuracies


def test_config_is_validated_before_anything_loads():
    assert build_config("doco", toy=False).lr == 6e-6
    assert build_config("doco", toy=False, overrides={"adversarial": "false"}).adversarial is False
    with pytest.raises(UsageError, match="batch_size must be at least 1"):
        build_config("doco", toy=False, overrides={"batch_size": "0"})
    with pytest.raises(UsageError, match="parameters must be one of"):
        build_config("doco", toy=False, overrides={"parameters": "text_encoder"})
    with pytest.raises(UsageError, match="wants a bool"):
        build_config("doco", toy=False, overrides={"surgery": "maybe"})
    with pytest.raises(UsageError, match="lr_schedule must be one of"):
        build_config("doco", toy=False, overrides={"lr_schedule": "sometimes"})
    with pytest.raises(UsageError, match="training_images must be anchor or both"):
        build_config("doco", toy=False, overrides={"training_images": "concept"})
    with pytest.raises(UsageError, match="anchor must be supercategory or empty"):
        build_config("doco", toy=False, overrides={"anchor": "dog"})
    with pytest.raises(UsageError, match="anchor_overshoot must not be negative"):
        build_config("doco", toy=False, overrides={"anchor_overshoot": "-1"})


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_anchor_overshoot_aims_past_the_anchor_away_from_the_concept(tiny_pipeline_dirs, family):
    """At the first step the trained UNet is still the frozen one, so its ablation loss is the distance to the
    target: || eps(c*) - eps(c) ||^2 for the paper's target, (1 + eta)^2 times that for
    eps(c) - eta (eps(c*) - eps(c))."""
    first_losses = {}
    for eta in (0.0, 1.0):
        loaded = load_pipeline(str(tiny_pipeline_dirs[family]), device="cpu")
        options = {**FAST, "iterations": 1, "adversarial": "false", "surgery": "false", "anchor_overshoot": str(eta)}
        eraser = DoCo(build_config("doco", toy=False, overrides=options))
        eraser.erase(loaded, make_request(["a star"], loaded.tokenizer))
        first_losses[eta] = eraser.history[0]["loss"]
    assert first_losses[0.0] > 0
    assert first_losses[1.0] == pytest.approx(4 * first_losses[0.0], rel=1e-3), first_losses


def test_doco_trains_cross_attention_and_its_discriminator(tiny_pipeline_dirs):
    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    before = {k: v.clone() for k, v in loaded.denoiser.state_dict().items()}
    eraser = DoCo(build_config("doco", toy=False, overrides={**FAST, "lr": 1e-3}))
    eraser.erase(loaded, make_request(["a star"], loaded.tokenizer))
    text_attention = tuple(f"{name}." for name in loaded.adapter.text_attention_names())
    changed = {k for k, v in loaded.denoiser.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(text_attention) for k in changed), changed
    logged = [h["d_acc"] for h in eraser.history]
    assert all(0 <= a <= 1 for a in logged) and "preserve" in eraser.history[-1]


def test_doco_edit_saves_loads_and_stacks_with_a_text_encoder_edit(tiny_pipeline_dirs, tmp_path):
    sd = str(tiny_pipeline_dirs["sd"])
    unet_edit = erase(sd, "doco", ["a star"], tmp_path / "doco", options={**FAST, "lr": 1e-3}, device="cpu")
    meta = read_edit(unet_edit)
    assert meta["method"] == "doco" and meta["components"] == ["unet"] and meta["config"]["surgery"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doco"], "no temporary or partial directory is left"
    text_edit = erase(sd, "esd-te", ["a star"], tmp_path / "te", options={"iterations": 2, "ddim_steps": 5},
                      device="cpu")
    loaded = load_pipeline(sd, device="cpu")
    base_image = np.asarray(loaded.generate(["a star"], steps=2, progress=False)[0])
    apply_edits(loaded, [text_edit])
    text_only = np.asarray(loaded.generate(["a star"], steps=2, progress=False)[0])
    apply_edits(loaded, [unet_edit])
    stacked = np.asarray(loaded.generate(["a star"], steps=2, progress=False)[0])
    assert not np.array_equal(base_image, stacked) and not np.array_equal(text_only, stacked)
    # The app finds DoCo edits as it finds every other (by their erasure.json) and applies them.
    from apps.app import AppState

    app = AppState(sd, tmp_path)
    assert set(app.edits()) == {"doco", "te"} and app.describe("doco").startswith("doco: doco erasing a star")
    from_app = app.pipeline(("doco", "te")).generate(["a star"], steps=2, progress=False)[0]
    assert np.array_equal(np.asarray(from_app), stacked), "the app applies both edits, as apply_edits does"


def test_an_interrupted_run_resumes_to_the_same_edit(tiny_pipeline_dirs, tmp_path):
    """The checkpoint holds the trained parameters, both optimisers and the discriminator: stopping after 2 of 4
    steps and resuming ends where an uninterrupted run does."""
    sd = str(tiny_pipeline_dirs["sd"])

    def run(iterations, work_dir):
        loaded = load_pipeline(sd, device="cpu")
        config = build_config("doco", toy=False, overrides={**FAST, "iterations": iterations, "lr": 1e-3})
        DoCo(config).erase(loaded, make_request(["a star"], loaded.tokenizer), work_dir)
        return loaded.denoiser.state_dict()

    run(2, tmp_path / "work")
    resumed = run(4, tmp_path / "work")
    straight = run(4, None)
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)


def test_a_run_interrupted_mid_schedule_resumes_to_the_same_edit(tiny_pipeline_dirs, tmp_path, monkeypatch):
    """With a decaying lr and concept images among the training images, a run stopped by an interrupt after a
    checkpoint at step 2 of 4 (same config) resumes to the uninterrupted edit: the lr schedule is checkpointed."""
    import erasers.methods.doco as doco

    sd = str(tiny_pipeline_dirs["sd"])
    options = {**FAST, "lr": 1e-3, "lr_schedule": "cosine", "training_images": "both"}

    def run(work_dir):
        loaded = load_pipeline(sd, device="cpu")
        DoCo(build_config("doco", toy=False, overrides=options)).erase(
            loaded, make_request(["a star"], loaded.tokenizer), work_dir)
        return loaded.denoiser.state_dict()

    monkeypatch.setattr(doco, "TrainingLoop", StopsAtTwo)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "work")
    resumed = run(tmp_path / "work")
    straight = run(None)
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)


def test_doco_on_flux_trains_the_text_projections_and_saves_a_loadable_edit(tiny_pipeline_dirs, tmp_path):
    """On Flux the discriminator reads the x_0 the velocity implies, the packed patches laid out as their grid, and
    "xattn" is the joint blocks' text projections; the anchor images are drawn at the training resolution."""
    from erasers.edits import apply_edits

    before = load_pipeline(str(tiny_pipeline_dirs["flux"]), device="cpu").denoiser.state_dict()
    out = erase(str(tiny_pipeline_dirs["flux"]), "doco", ["a star"], tmp_path / "flux",
                options={**FAST, "lr": 1e-2}, device="cpu", resolution=16)
    assert read_edit(out)["base_family"] == "flux"
    loaded = load_pipeline(str(tiny_pipeline_dirs["flux"]), device="cpu")
    apply_edits(loaded, [out])
    after = loaded.denoiser.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(re.search(r"^transformer_blocks\.\d+\.attn\.add_[qkv]_proj\.", k) for k in changed)


def test_doco_on_sdxl_trains_cross_attention_and_saves_a_loadable_edit(tiny_pipeline_dirs, tmp_path):
    from erasers.edits import apply_edits

    before = load_pipeline(str(tiny_pipeline_dirs["sdxl"]), device="cpu").denoiser.state_dict()
    out = erase(str(tiny_pipeline_dirs["sdxl"]), "doco", ["a star"], tmp_path / "sdxl",
                options={**FAST, "lr": 1e-2}, device="cpu")
    loaded = load_pipeline(str(tiny_pipeline_dirs["sdxl"]), device="cpu")
    apply_edits(loaded, [out])
    after = loaded.denoiser.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".attn2." in k for k in changed)


def arrow_scores_before_and_after(tmp_path, other_objects, options: dict) -> tuple[dict, dict]:
    """UA/IRA/CRA of the arrow on every arrow caption and `other_objects` in three styles (one seed), before and
    after a DoCo erase of the arrow with `options`."""
    from benchmarks.toycanvas import CLASSIFIER_DIR, world
    from benchmarks.toycanvas.classifier import ToyClassifier
    from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score

    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    pairs = [("arrow", s) for s in world.STYLES]
    pairs += [(o, s) for o in other_objects for s in ("Flat", "Stripes", "Dots")]
    answers = AnswerSet(seeds=(188,), pairs=pairs)
    base_records, _ = classify_answer_set(load_pipeline("toy", device="cpu"), classifier, answers, progress=False)
    out = erase("toy", "doco", ["arrow"], tmp_path / "edit", device="cpu", options=options)
    loaded = load_pipeline("toy", device="cpu")
    apply_edits(loaded, [out])
    records, _ = classify_answer_set(loaded, classifier, answers, progress=False)
    return score(base_records, ["arrow"], "object"), score(records, ["arrow"], "object")


@pytest.mark.slow  # about 100 s on 2 cores: the issue keeps DoCo's behaviour test out of the default suite's budget
def test_short_doco_erase_removes_arrows_and_keeps_other_objects(tmp_path):
    """A shortened toy default (fewer anchor images, drawn in fewer steps; fewer iterations): the classifier finds
    fewer arrows, and the other objects and styles are still drawn far above chance (10%); 37 images per model."""
    from benchmarks.toycanvas import world

    base, edited = arrow_scores_before_and_after(
        tmp_path, [o for o in world.OBJECTS if o != "arrow"],
        {"iterations": 120, "anchor_images": 11, "sample_steps": 10, "warmup_steps": 30})
    assert edited["UA"] >= base["UA"] + 0.3, (base, edited)
    assert edited["IRA"] >= 0.5 and edited["CRA"] >= 0.5, (base, edited)


@pytest.mark.heavy  # about 40 s of one core (55 s wall on the loaded 2-core machine): DoCo's default-suite check
def test_quick_doco_erase_removes_arrows_and_keeps_other_objects(tmp_path):
    """A shorter run than the slow test's (60 iterations on 6 anchor images drawn in 8 steps) on a smaller answer set:
    the arrow in every style, three unrelated objects in three styles, one seed. The classifier finds far fewer
    arrows, and the unrelated objects and their styles are still drawn far above chance (10%)."""
    base, edited = arrow_scores_before_and_after(
        tmp_path, ("circle", "square", "moon"),
        {"iterations": 60, "anchor_images": 6, "sample_steps": 8, "warmup_steps": 15})
    # Measured (2-core CPU): UA 0.0 -> 0.8, IRA 1.0 -> 0.89, CRA 1.0 -> 1.0 (training seed 1: UA 0.7, IRA 0.78).
    assert edited["UA"] >= base["UA"] + 0.4, (base, edited)
    assert edited["IRA"] >= 0.5 and edited["CRA"] >= 0.6, (base, edited)
