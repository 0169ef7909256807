"""Concept Ablation: config validation, the two targets and prior preservation on a case computed here, what each
parameter group trains (the embedding rows of the concept's tokens alone), resuming, loading the edit with plain
`from_pretrained`, and erasure behaviour on the toy world."""

import re

import pytest
import torch
import torch.nn.functional as F

from erasers import UsageError, load_pipeline
from erasers.anchors import anchor_prompts, draw_anchor_latents, noised_anchors, prompt_of_each_image
from erasers.edits import apply_edits, read_edit
from erasers.losses import predict_noise
from erasers.methods.ca import ConceptAblation, concept_token_ids
from erasers.parameters import trainable_parameters
from erasers.prompts import make_request
from erasers.registry import build_config
from erasers.run import erase

# A few steps on 3 anchor images drawn in 2 sampling steps.
FAST = {"iterations": 4, "batch_size": 2, "anchor_images": 3, "sample_steps": 2, "lr": 1e-2}


def erase_with(loaded, options: dict, concept: str | list[str] = "a star", work_dir=None
               ) -> tuple[ConceptAblation, dict]:
    eraser = ConceptAblation(build_config("ca", toy=False, overrides={**FAST, **options}))
    concepts = [concept] if isinstance(concept, str) else concept
    components = eraser.erase(loaded, make_request(concepts, loaded.tokenizer), work_dir)
    return eraser, components


def test_every_concept_of_a_list_gets_its_anchor_images(tiny_pipeline_dirs, tmp_path):
    """The image count is per concept: two concepts draw twice the images, each concept's prompts as many as one
    concept alone. (A fixed total in turn over a long list's prompts, concept by concept, left the last concepts
    without images: 44 toy images over 9 styles' 99 prompts reached only the first 4 styles.)"""
    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    erase_with(loaded, {"iterations": 1}, ["a star", "a moon"], work_dir=tmp_path)
    from safetensors.torch import load_file
    index = load_file(tmp_path / "ca_anchor_latents.safetensors")["anchor_index"]
    assert len(index) == 2 * FAST["anchor_images"]
    assert index.bincount().tolist() == [FAST["anchor_images"]] * 2


def test_fewer_images_than_prompts_reach_every_concept_and_one_concept_keeps_its_turn():
    index = prompt_of_each_image(27, 99, groups=9)  # 9 concepts of 11 prompts, 3 images each
    assert (index // 11).bincount().tolist() == [3] * 9
    assert index[index // 11 == 8].tolist() == [88, 89, 90]  # the last concept's prompts in turn
    assert prompt_of_each_image(4, 11).tolist() == [0, 1, 2, 3]  # one concept: the plain turn, as before
    assert prompt_of_each_image(44, 11).bincount().tolist() == [4] * 11  # every prompt drawn: in turn, as before


def test_config_defaults_are_the_papers_and_bad_values_are_refused():
    config = build_config("ca", toy=False)
    assert (config.target, config.parameters, config.lr, config.iterations, config.batch_size) == \
        ("model", "xattn-strict", 2e-6, 100, 4)
    assert (config.weight_decay, config.max_grad_norm, config.prior_weight, config.anchor_images) == \
        (1e-2, 1.0, 0.0, 1000)
    assert build_config("ca", toy=False, overrides={"parameters": "embedding"}).parameters == "embedding"
    with pytest.raises(UsageError, match="target must be model or noise"):
        build_config("ca", toy=False, overrides={"target": "anchor"})
    with pytest.raises(UsageError, match="parameters must be one of xattn-strict, attn, full, embedding"):
        build_config("ca", toy=False, overrides={"parameters": "noxattn"})
    with pytest.raises(UsageError, match="anchor must be supercategory or empty"):
        build_config("ca", toy=False, overrides={"anchor": "dog"})
    for key in ("prior_weight", "weight_decay", "max_grad_norm"):
        with pytest.raises(UsageError, match=f"{key}=-1.0 is out of range"):
            build_config("ca", toy=False, overrides={key: "-1"})
    with pytest.raises(UsageError, match="anchor_images=0 is out of range"):
        build_config("ca", toy=False, overrides={"anchor_images": "0"})


@pytest.mark.parametrize("target", ["model", "noise"])
def test_first_step_losses_are_the_distances_to_the_papers_targets(tiny_pipeline_dirs, target):
    """Before its first update the trained UNet is the frozen one, so the logged losses at step 0 can be computed
    here from the same anchor images and x_t: the concept's prediction against the frozen model's anchor prediction
    (model) or the noise that made x_t (noise), and the prior term, the anchor prediction against that noise."""
    sd = str(tiny_pipeline_dirs["sd"])
    eraser, _ = erase_with(load_pipeline(sd, device="cpu"), {"iterations": 1, "target": target, "prior_weight": 1.0})
    first = eraser.history[0]

    loaded = load_pipeline(sd, device="cpu")
    request = make_request(["a star"], loaded.tokenizer)
    prompts = request.erase_prompts()
    anchors = anchor_prompts(request, prompts, "supercategory")
    assert anchors == ["thing"]  # the whole concept replaced by its supercategory word
    images, index = draw_anchor_latents(loaded, anchors, 3, 2, 6.0, 0)
    x_t, t, picked, noise = noised_anchors(loaded, images, 2, torch.Generator().manual_seed(0))  # step 0's draw
    k = index[picked].tolist()
    with torch.no_grad():
        concept = predict_noise(loaded.denoiser, x_t, t, loaded.encode_text([prompts[i] for i in k]))
        anchor = predict_noise(loaded.denoiser, x_t, t, loaded.encode_text([anchors[i] for i in k]))
    expected = anchor if target == "model" else noise
    assert first["loss"] == pytest.approx(F.mse_loss(concept, expected).item(), rel=1e-4)
    assert first["prior"] == pytest.approx(F.mse_loss(anchor, noise).item(), rel=1e-4)
    assert F.mse_loss(concept, anchor) < F.mse_loss(concept, noise)  # the two targets differ here


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_embedding_trains_only_the_rows_of_the_concepts_tokens(bases, family):
    """Every other row of each text encoder's token embedding, and the denoiser, end exactly as they were, although
    AdamW's weight decay acts on the whole matrix; the edit is the text encoders."""
    loaded = bases(family)
    encoders = loaded.trained_text_encoders
    before = {name: encoder.get_input_embeddings().weight.detach().clone() for name, encoder in encoders.items()}
    denoiser = {key: value.clone() for key, value in loaded.denoiser.state_dict().items()}
    _, components = erase_with(loaded, {"parameters": "embedding", "prior_weight": 1.0}, concept="star")
    assert set(components) == set(encoders)
    rows = concept_token_ids(loaded, make_request(["star"], loaded.tokenizer))
    for name, encoder in components.items():
        changed = (encoder.get_input_embeddings().weight != before[name]).any(dim=1).nonzero().flatten()
        assert changed.tolist() == rows[name].tolist() and len(changed) >= 1, (name, changed, rows[name])
    assert all(torch.equal(value, denoiser[key]) for key, value in loaded.denoiser.state_dict().items())


def test_embedding_rows_are_the_concepts_words_as_captions_spell_them(tiny_pipeline_dirs):
    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    ids = concept_token_ids(loaded, make_request(["Van_Gogh"], loaded.tokenizer))["text_encoder"].tolist()
    assert ids == sorted(loaded.tokenizer("van gogh", add_special_tokens=False).input_ids) and len(ids) >= 2
    assert not set(loaded.tokenizer("_", add_special_tokens=False).input_ids) & set(ids)


def changed_keys(loaded, options: dict) -> set[str]:
    before = {key: value.clone() for key, value in loaded.denoiser.state_dict().items()}
    erase_with(loaded, options)
    return {key for key, value in loaded.denoiser.state_dict().items() if not torch.equal(value, before[key])}


def test_parameter_groups_train_the_keys_and_values_or_every_attention(bases):
    loaded = bases("sd")
    strict = changed_keys(loaded, {})
    text_attention = tuple(f"{name}." for name in loaded.adapter.text_attention_names())
    assert strict and all(key.startswith(text_attention) and re.search(r"\.to_[kv]\.", key) for key in strict)
    every = changed_keys(bases("sd"), {"parameters": "attn"})
    assert all(re.search(r"\.attn[12]\.", key) for key in every), every
    assert any(".attn1.to_q." in key for key in every) and any(".attn2.to_out." in key for key in every)


def test_the_attn_group_is_every_attention_of_each_family(bases):
    """trainable_parameters' "attn": SD's and SDXL's attn1/attn2, Flux's joint and single blocks' attentions."""
    for family, pattern in [("sd", r"\.attn[12]\."), ("sdxl", r"\.attn[12]\."),
                            ("flux", r"^(single_)?transformer_blocks\.\d+\.attn\.")]:
        loaded = bases(family)
        chosen = {id(p) for p in trainable_parameters(loaded, "attn")}
        names = [name for name, p in loaded.denoiser.named_parameters() if id(p) in chosen]
        assert names and all(re.search(pattern, name) for name in names), (family, names)
        others = [name for name, p in loaded.denoiser.named_parameters() if id(p) not in chosen]
        assert not any(re.search(pattern, name) for name in others), (family, others)
    assert any(name.startswith("single_transformer_blocks.") for name in names)


@pytest.mark.parametrize("parameters", ["xattn-strict", "embedding"])
def test_an_interrupted_run_resumes_to_the_same_edit(tiny_pipeline_dirs, tmp_path, parameters):
    """Stopped after 2 of 4 steps and resumed (the same cached anchor images, parameters and AdamW state), the edit
    is the uninterrupted run's."""
    sd = str(tiny_pipeline_dirs["sd"])

    def run(iterations, work_dir):
        loaded = load_pipeline(sd, device="cpu")
        _, components = erase_with(loaded, {"iterations": iterations, "parameters": parameters, "prior_weight": 1.0},
                                   work_dir=work_dir)
        (component,) = components.values()
        return component.state_dict()

    run(2, tmp_path / "work")
    assert (tmp_path / "work" / "ca_anchor_latents.safetensors").exists()
    assert (tmp_path / "work" / "ckpt" / "ca.safetensors").exists()
    resumed = run(4, tmp_path / "work")
    straight = run(4, None)
    assert all(torch.allclose(resumed[key], straight[key], atol=1e-6) for key in straight)


def test_edits_load_with_plain_from_pretrained(tiny_pipeline_dirs, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    sd = str(tiny_pipeline_dirs["sd"])
    unet_edit = erase(sd, "ca", ["a star"], tmp_path / "unet-edit", options=FAST, device="cpu")
    text_edit = erase(sd, "ca", ["a star"], tmp_path / "text-edit", options={**FAST, "parameters": "embedding"},
                      device="cpu")
    assert read_edit(unet_edit)["components"] == ["unet"] and read_edit(unet_edit)["method"] == "ca"
    assert read_edit(text_edit)["components"] == ["text_encoder"]
    base = load_pipeline(sd, device="cpu")
    unet = UNet2DConditionModel.from_pretrained(unet_edit / "unet")
    text_encoder = CLIPTextModel.from_pretrained(text_edit / "text_encoder")
    assert not torch.equal(unet.state_dict()["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
                           base.denoiser.state_dict()["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"])
    rows = concept_token_ids(base, make_request(["a star"], base.tokenizer))["text_encoder"]
    changed = (text_encoder.get_input_embeddings().weight != base.text_encoder.get_input_embeddings().weight)
    assert changed.any(dim=1).nonzero().flatten().tolist() == rows.tolist()
    apply_edits(base, [unet_edit, text_edit])  # the two stack: different components
    assert torch.equal(base.text_encoder.get_input_embeddings().weight, text_encoder.get_input_embeddings().weight)


@pytest.mark.heavy  # about 40 s of one core
def test_quick_ca_erase_removes_arrows_and_keeps_other_objects(tmp_path):
    """A shortened toy default (fewer anchor images drawn in fewer steps, fewer iterations) on a small answer set:
    the arrow in every style, three unrelated objects in three styles, one seed. The classifier finds far fewer
    arrows, and the unrelated objects and their styles are still drawn far above chance (10%)."""
    from toy_scores import arrow_scores_before_and_after

    base, edited = arrow_scores_before_and_after(tmp_path, "ca", ("circle", "square", "moon"),
                                                 {"iterations": 60, "anchor_images": 6, "sample_steps": 8})
    # Measured (2-core CPU, one thread): UA 0.0 -> 1.0, IRA 1.0 -> 1.0, CRA 1.0 -> 1.0; 34 s.
    assert edited["UA"] >= base["UA"] + 0.4, (base, edited)
    assert edited["IRA"] >= 0.5 and edited["CRA"] >= 0.6, (base, edited)
