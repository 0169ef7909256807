"""Forget-Me-Not: the attention processor's loss against a hand-computed softmax, the concept's token positions,
textual inversion without a tokenizer, resuming, the saved edit, and erasure on the toy world."""

import pytest
import torch
from toy_scores import arrow_scores_before_and_after

from erasers import UsageError, load_pipeline
from erasers.attention_maps import (
    ConceptAttention,
    concept_positions,
    copied_attention,
    end_and_padding_positions,
    end_positions,
)
from erasers.edits import apply_edits, read_edit
from erasers.methods.fmn import ConceptVectors, ForgetMeNot, ProjectionDrift, slotted_ids
from erasers.prompts import make_request
from erasers.registry import build_config, families_matrix, get_method
from erasers.run import erase

FAST = {"iterations": 4, "concept_images": 2, "sample_steps": 2, "lr": 1e-3}


def test_config_is_validated_before_anything_loads():
    config = build_config("fmn", toy=False)
    assert (config.lr, config.iterations, config.batch_size, config.weight_decay) == (2e-6, 35, 1, 0.01)
    assert (config.parameters, config.inversion, config.inversion_tokens, config.inversion_steps) == (
        "full", False, 4, 500)
    with pytest.raises(UsageError, match="parameters must be one of"):
        build_config("fmn", toy=False, overrides={"parameters": "noxattn"})
    with pytest.raises(UsageError, match="positions must be one of"):
        build_config("fmn", toy=False, overrides={"positions": "everything"})
    with pytest.raises(UsageError, match="concept_type must be object or style"):
        build_config("fmn", toy=False, overrides={"concept_type": "person"})
    with pytest.raises(UsageError, match="inversion_tokens=0 is out of range"):
        build_config("fmn", toy=False, overrides={"inversion_tokens": "0"})
    assert config.text_steps == 0 and build_config("fmn", toy=True).text_steps > 0
    with pytest.raises(UsageError, match="inversion and text_steps do not combine"):
        build_config("fmn", toy=True, overrides={"inversion": "true"})
    assert not families_matrix()["fmn"]["flux"] and "flux" in get_method("fmn").why_not


def test_the_loss_is_the_l2_norm_of_the_softmax_at_the_concept_positions():
    """The processor's output is the attention's own, and its loss the norm (not squared) of the explicitly
    computed probabilities at the chosen keys, over heads and queries."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    pixels, text = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    positions = torch.zeros(2, 7, dtype=torch.bool)
    positions[0, 3] = positions[1, 2:4] = True
    plain = holder.attn(pixels, encoder_hidden_states=text)
    with ConceptAttention(holder, ["attn"]) as attention:
        attention.positions = positions
        steered = holder.attn(pixels, encoder_hidden_states=text)
        loss = attention.norm()
    assert torch.allclose(plain, steered, atol=1e-6)
    assert type(holder.attn.processor).__name__ != "ConceptAttentionProcessor", "the processor is restored"
    q = holder.attn.to_q(pixels).view(2, 5, 2, 8).transpose(1, 2)
    k = holder.attn.to_k(text).view(2, 7, 2, 8).transpose(1, 2)
    probabilities = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)  # (batch, heads, queries, keys)
    expected = torch.cat([probabilities[0, :, :, 3].flatten(), probabilities[1, :, :, 2:4].flatten()]).norm()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_positions_are_the_concepts_tokens_in_each_prompt():
    toy = load_pipeline("toy", device="cpu")
    tokenizer = toy.tokenizer
    prompts = ["A arrow image in Stripes style.", "a photo of Van Gogh, by Van Gogh"]
    ids = toy.adapter.tokenize(prompts)["text_encoder"]
    found = concept_positions(tokenizer, ids, ["arrow", "Van Gogh"])
    assert found[0].nonzero().flatten().tolist() == [2]
    assert found[1].nonzero().flatten().tolist() == [4, 5, 8, 9]
    ends = end_positions(tokenizer, ids)
    assert ends.sum(dim=1).tolist() == [1, 1] and ends[0, 8] and ids[0, 9] == tokenizer.eos_token_id
    with pytest.raises(UsageError, match="does not contain the concept"):
        concept_positions(tokenizer, ids, ["arrow"])


def test_inversion_slots_replace_the_concept_and_start_as_its_embedding():
    """With one slot initialised to the concept's own word embedding the conditioning is the plain prompt's; with
    four the slots sit where the concept was and the end token is kept."""
    toy = load_pipeline("toy", device="cpu")
    request = make_request(["arrow"], toy.tokenizer, toy.vocabulary)
    prompts = ["A arrow image in Stripes style.", "arrow"]
    one = ConceptVectors(toy, request, prompts, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(one.conditioning(toy, torch.arange(2)).states, toy.encode_text(prompts).states,
                              atol=1e-6)
    ids, start = slotted_ids(toy.tokenizer, prompts[0], ["arrow"], 4, 77)
    plain = toy.tokenizer(prompts[0]).input_ids
    assert start == 2 and len(ids) == 77 and ids[:2] == plain[:2] and ids[6:12] == plain[3:]
    four = ConceptVectors(toy, request, prompts, 4, torch.Generator().manual_seed(0))
    assert four.slot_positions("text_encoder", 77)[0].nonzero().flatten().tolist() == [2, 3, 4, 5]


def test_training_lowers_the_concepts_attention_and_keeps_the_processors(tiny_pipeline_dirs):
    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    processors = {name: type(p) for name, p in loaded.denoiser.attn_processors.items()}
    before = {k: v.clone() for k, v in loaded.denoiser.state_dict().items()}
    eraser = ForgetMeNot(build_config("fmn", toy=False, overrides={**FAST, "iterations": 30, "batch_size": 2,
                                                                   "parameters": "xattn"}))
    eraser.erase(loaded, make_request(["a star"], loaded.tokenizer))
    losses = [row["loss"] for row in eraser.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert {name: type(p) for name, p in loaded.denoiser.attn_processors.items()} == processors
    text_attention = tuple(f"{name}." for name in loaded.adapter.text_attention_names())
    changed = {k for k, v in loaded.denoiser.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(text_attention) for k in changed), changed


def test_the_preservation_term_holds_the_retain_prompts_keys_while_the_concept_is_re_steered(tiny_pipeline_dirs):
    """preserve_weight (not in the paper): the drift is ||(W - W0) X^T||^2 / ||W0 X^T||^2 on the retain prompts'
    text states, and with it the key/value projections move far less on a --preserve prompt than without it, while
    the concept's attention still falls."""
    sd = str(tiny_pipeline_dirs["sd"])
    keep = ["a photo of a cat", "a painting of a house"]

    def run(weight):
        loaded = load_pipeline(sd, device="cpu")
        kv = [linear for _, k, v in loaded.adapter.cross_attention_kv() for linear in (k, v)]
        states = loaded.encode_text(keep).states.detach()
        outputs_before = [linear(states).detach() for linear in kv]
        eraser = ForgetMeNot(build_config("fmn", toy=False, overrides={
            **FAST, "iterations": 60, "parameters": "xattn-strict", "preserve_weight": weight}))
        eraser.erase(loaded, make_request(["a star"], loaded.tokenizer, preserve=keep))
        moved = sum((linear(states) - before).pow(2).sum() for linear, before in zip(kv, outputs_before))
        return eraser.history, float(moved / sum(before.pow(2).sum() for before in outputs_before))

    free_history, free_drift = run(0.0)
    kept_history, kept_drift = run(10.0)
    assert kept_history[-1]["attention"] < 0.95 * kept_history[0]["attention"], kept_history
    assert kept_drift < 0.05 * free_drift, (kept_drift, free_drift)
    assert all(row["drift"] == 0 for row in free_history)

    loaded = load_pipeline(sd, device="cpu")
    kv = [linear for _, k, v in loaded.adapter.cross_attention_kv() for linear in (k, v)]
    drift = ProjectionDrift(loaded, keep, [linear.weight for linear in kv])
    assert drift().item() == 0
    states = loaded.encode_text(keep).states.detach().reshape(-1, kv[0].in_features)
    moves = [torch.randn(linear.weight.shape, generator=torch.Generator().manual_seed(i)) * 1e-2
             for i, linear in enumerate(kv)]
    expected = (sum((states @ move.T).pow(2).sum() for move in moves)
                / sum((states @ linear.weight.detach().T).pow(2).sum() for linear in kv))
    with torch.no_grad():
        for linear, move in zip(kv, moves):
            linear.weight.add_(move)
    assert drift().item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("stage", ["inversion", "text"])
def test_an_interrupted_run_resumes_to_the_same_edit(stage, tiny_pipeline_dirs, tmp_path):
    """Both stages resume with the re-steering: the inversion's vectors, or the text stage's query/key projections,
    and the re-steering's weights and AdamW state are checkpointed, the concept images cached."""
    sd = str(tiny_pipeline_dirs["sd"])
    options = {**FAST, "inversion": True, "inversion_steps": 3} if stage == "inversion" else FAST

    def run(iterations, work_dir):
        loaded = load_pipeline(sd, device="cpu")
        steps = {"iterations": iterations, **({"text_steps": iterations} if stage == "text" else {})}
        config = build_config("fmn", toy=False, overrides={**options, **steps})
        eraser = ForgetMeNot(config)
        eraser.erase(loaded, make_request(["a star"], loaded.tokenizer), work_dir)
        weights = {**loaded.denoiser.state_dict(), **{f"text.{k}": v for k, v in
                                                      loaded.text_encoders["text_encoder"].state_dict().items()}}
        return weights, getattr(eraser, f"{stage}_history")

    run(2, tmp_path / "work")
    resumed, _ = run(4, tmp_path / "work")
    straight, history = run(4, None)
    assert len(history) == 2 and ("inversion_loss" if stage == "inversion" else "copied") in history[0]
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-7) for k in straight)
    if stage == "text":
        base = load_pipeline(sd, device="cpu").text_encoders["text_encoder"].state_dict()
        assert any(not torch.equal(straight[f"text.{k}"], v) for k, v in base.items())


def test_the_edit_loads_with_from_pretrained_and_holds_no_tokenizer(tiny_pipeline_dirs, tmp_path):
    sdxl = str(tiny_pipeline_dirs["sdxl"])
    out = erase(sdxl, "fmn", ["a star"], tmp_path / "fmn", options={**FAST, "inversion": True, "inversion_steps": 2},
                device="cpu")
    meta = read_edit(out)
    assert meta["method"] == "fmn" and meta["components"] == ["unet"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "erasure.json", "unet"]
    base = load_pipeline(sdxl, device="cpu")
    before = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    apply_edits(base, [out])
    assert any(not torch.equal(v, before[k]) for k, v in base.denoiser.state_dict().items())


def test_the_text_stage_stops_the_end_token_reading_the_concept_and_holds_other_prompts(tiny_pipeline_dirs,
                                                                                       tmp_path):
    """text_steps (not in the paper), on SDXL's two encoders: the end token and the padding stop attending to the
    concept's tokens in both, the retain prompts' token states stay within 10%, the concept prompt's states before its
    end token move far less than that token, and the edit holds both encoders, each loading with from_pretrained."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl = str(tiny_pipeline_dirs["sdxl"])
    keep, prompt = ["a photo of a cat", "a painting of a house"], ["a photo of a star"]
    base = load_pipeline(sdxl, device="cpu")
    ids = base.adapter.tokenize(prompt)

    def copied(loaded) -> dict[str, float]:
        with torch.no_grad():
            return {name: copied_attention(encoder, ids[name], concept_positions(tokenizer, ids[name], ["star"]),
                                           end_and_padding_positions(tokenizer, ids[name])).item()
                    for (name, encoder), tokenizer in zip(loaded.text_encoders.items(), loaded.tokenizers.values())}

    def states(loaded):
        with torch.no_grad():
            return loaded.encode_text(keep).states, loaded.encode_text(prompt).states

    before, (kept_before, prompt_before) = copied(base), states(base)
    assert set(before) == {"text_encoder", "text_encoder_2"} and min(before.values()) > 0
    out = erase(sdxl, "fmn", ["a star"], tmp_path / "fmn", device="cpu", preserve=keep,
                options={**FAST, "text_steps": 40, "text_lr": 1e-2})
    assert sorted(read_edit(out)["components"]) == ["text_encoder", "text_encoder_2", "unet"]
    edited = load_pipeline(sdxl, device="cpu")
    apply_edits(edited, [out])
    after, (kept_after, prompt_after) = copied(edited), states(edited)
    assert all(after[name] < 0.1 * before[name] for name in before), (before, after)
    end = int(end_and_padding_positions(base.tokenizers["tokenizer"], ids["text_encoder"])[0].nonzero()[0])
    moved = ((prompt_after - prompt_before).norm(dim=-1) / prompt_before.norm(dim=-1))[0]  # relative, per position
    assert moved[:end].max() < 0.5 * moved[end], moved
    assert (kept_after - kept_before).norm() < 0.1 * kept_before.norm()
    for name, model in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        reloaded, applied = model.from_pretrained(out / name).state_dict(), edited.text_encoders[name].state_dict()
        assert reloaded.keys() == applied.keys() and all(torch.equal(reloaded[k], applied[k]) for k in applied)
        assert any(not torch.equal(applied[k], base.text_encoders[name].state_dict()[k]) for k in applied)


@pytest.mark.heavy  # about 40 s of one core
def test_quick_fmn_erase_removes_arrows_and_keeps_other_objects(tmp_path):
    """The toy default with a quarter of its text stage (the arrow is the denoiser stage's to erase; the full stage,
    100 steps of 100 prompts encoded with gradients, would take a minute more): the classifier finds far fewer
    arrows, and the unrelated objects and their styles are still drawn far above chance (10%)."""
    base, edited = arrow_scores_before_and_after(tmp_path, "fmn", ("circle", "square", "moon"), {"text_steps": 25})
    assert edited["UA"] >= base["UA"] + 0.4, (base, edited)
    assert edited["IRA"] >= 0.5 and edited["CRA"] >= 0.6, (base, edited)
