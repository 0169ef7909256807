"""SalUn: the saliency mask's share and threshold, the masked weights staying bit-identical, random labelling's
targets, resuming, the saved edit, and erasure on the toy world."""

import pytest
import torch
from toy_scores import arrow_scores_before_and_after

from erasers import UsageError, load_pipeline
from erasers.edits import apply_edits, read_edit
from erasers.methods.salun import SalUn, concept_targets, kth_largest, saliency_mask
from erasers.prompts import make_request
from erasers.registry import build_config, get_method
from erasers.run import erase

FAST = {"forget_images": 4, "retain_images": 4, "batch_size": 2, "epochs": 2, "sample_steps": 2, "lr": 1e-2}


def test_config_is_validated_before_anything_loads():
    config = build_config("salun", toy=False)
    assert (config.saliency_share, config.mask_guidance, config.alpha, config.lr) == (0.5, 7.5, 0.1, 1e-5)
    assert (config.batch_size, config.epochs, config.parameters) == (8, 5, "full")
    with pytest.raises(UsageError, match="saliency_share=.* out of range"):
        build_config("salun", toy=False, overrides={"saliency_share": "0"})
    with pytest.raises(UsageError, match="saliency_share=.* out of range"):
        build_config("salun", toy=False, overrides={"saliency_share": "1.5"})
    with pytest.raises(UsageError, match="parameters must be one of"):
        build_config("salun", toy=False, overrides={"parameters": "text_encoder"})
    with pytest.raises(UsageError, match="target must be one of"):
        build_config("salun", toy=False, overrides={"target": "dog"})
    with pytest.raises(UsageError, match="alpha=-0.1 is out of range"):
        build_config("salun", toy=False, overrides={"alpha": "-0.1"})
    with pytest.raises(UsageError, match="epochs"):
        build_config("salun", toy=False, overrides={"epochs": "0"})


def test_kth_largest_is_exact_without_concatenating():
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(7, 5, generator=generator), torch.rand(13, generator=generator) * 1e-3,
              torch.rand(3, 2, 2, generator=generator) * 50]
    flat = torch.cat([s.flatten() for s in scores])
    for k in (1, 7, 30, len(flat)):
        assert kth_largest(scores, k) == float(torch.topk(flat, k).values[-1])


def test_mask_keeps_the_top_share_by_gradient_magnitude():
    gradients = [torch.tensor([[0.1, -5.0], [2.0, 0.0]]), torch.tensor([-3.0, 0.5, 1.0, -0.2])]
    masks, threshold, share = saliency_mask(gradients, 0.5)
    # |g| sorted: 5, 3, 2, 1, 0.5, 0.2, 0.1, 0: the top half is 5, 3, 2, 1.
    assert threshold == 1.0 and share == 0.5
    assert masks[0].tolist() == [[False, True], [True, False]]
    assert masks[1].tolist() == [True, False, True, False]
    # A weight without gradient is never salient, even when the share would reach it.
    masks, threshold, share = saliency_mask(gradients, 1.0)
    assert threshold == 0.0 and share == 7 / 8 and not masks[0][1, 1]


def test_random_labelling_targets_are_other_concepts_of_the_same_kind():
    from benchmarks.toycanvas import world

    toy = load_pipeline("toy", device="cpu")
    request = make_request(["arrow"], toy.tokenizer, toy.vocabulary)
    prompts = request.erase_prompts()
    targets = concept_targets(request, prompts, "other")
    assert len(targets) == len(prompts) and all(len(row) == len(world.OBJECTS) - 1 for row in targets)
    assert "A circle image in Stripes style." in targets[prompts.index("A arrow image in Stripes style.")]
    assert not any("arrow" in text for row in targets for text in row)
    style = make_request(["Stripes"], toy.tokenizer, toy.vocabulary)
    style_targets = concept_targets(style, style.erase_prompts(), "other")
    assert "Dots style" in style_targets[0] and not any("Stripes" in t for row in style_targets for t in row)
    # Off the vocabulary: --anchor, else the supercategory prompt.
    free = make_request(["a star"], toy.tokenizer)
    assert concept_targets(free, ["a star"], "other") == [["thing"]]
    anchored = make_request(["a star"], toy.tokenizer, anchors=["a moon"])
    assert concept_targets(anchored, ["a star"], "other") == [["a moon"]]
    assert concept_targets(free, ["a star"], "empty") == [[""]]


def test_only_salient_weights_change_and_the_rest_stay_bit_identical(tiny_pipeline_dirs, tmp_path):
    """Every weight outside the mask (read back from the run's cache) is bit-identical after training with weight
    decay; most salient ones moved."""
    from safetensors.torch import load_file

    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    before = {k: v.clone() for k, v in loaded.denoiser.named_parameters()}
    eraser = SalUn(build_config("salun", toy=False, overrides=FAST))
    eraser.erase(loaded, make_request(["a star"], loaded.tokenizer), tmp_path)
    assert eraser.history[0]["mask_share"] == pytest.approx(0.5, abs=0.01) and eraser.history[0]["mask_threshold"] > 0
    saved = load_file(tmp_path / "saliency_mask.safetensors")
    masks = {name: saved[str(i)].bool() for i, (name, _) in enumerate(loaded.denoiser.named_parameters())}
    after = dict(loaded.denoiser.named_parameters())
    assert sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) == eraser.mask_share
    for name, mask in masks.items():
        assert torch.equal(after[name][~mask], before[name][~mask]), name
    moved = sum(int((after[n] != before[n])[masks[n]].sum()) for n in masks)
    assert moved > 0.8 * sum(int(m.sum()) for m in masks.values())


def test_an_interrupted_run_resumes_to_the_same_edit(tiny_pipeline_dirs, tmp_path):
    """The checkpoint holds the trained weights and Adam's state, the work directory the images and the mask:
    stopping after one of two epochs and resuming ends where an uninterrupted run does."""
    sd = str(tiny_pipeline_dirs["sd"])

    def run(epochs, work_dir):
        loaded = load_pipeline(sd, device="cpu")
        config = build_config("salun", toy=False, overrides={**FAST, "epochs": epochs})
        SalUn(config).erase(loaded, make_request(["a star"], loaded.tokenizer), work_dir)
        return loaded.denoiser.state_dict()

    run(1, tmp_path / "work")
    assert (tmp_path / "work" / "saliency_mask.safetensors").exists()
    resumed = run(2, tmp_path / "work")
    straight = run(2, None)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_the_edit_loads_with_from_pretrained(tiny_pipeline_dirs, tmp_path):
    sd = str(tiny_pipeline_dirs["sd"])
    out = erase(sd, "salun", ["a star"], tmp_path / "salun", options=FAST, device="cpu")
    meta = read_edit(out)
    assert meta["method"] == "salun" and meta["components"] == ["unet"] and meta["config"]["saliency_share"] == 0.5
    assert get_method("salun").apply is None
    base = load_pipeline(sd, device="cpu")
    before = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    apply_edits(base, [out])
    after = base.denoiser.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)


@pytest.mark.heavy  # about 35 s of one core
def test_quick_salun_erase_removes_arrows_and_keeps_other_objects(tmp_path):
    """A shortened toy default (16 + 16 images drawn in 8 steps, 12 epochs: 24 steps): the classifier finds far
    fewer arrows, and the unrelated objects and their styles are still drawn far above chance (10%)."""
    base, edited = arrow_scores_before_and_after(
        tmp_path, "salun", ("circle", "square", "moon"),
        {"forget_images": 16, "retain_images": 16, "epochs": 12, "sample_steps": 8})
    assert edited["UA"] >= base["UA"] + 0.4, (base, edited)
    assert edited["IRA"] >= 0.5 and edited["CRA"] >= 0.6, (base, edited)
