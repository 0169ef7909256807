"""VLM loading, greedy asking and decoder-layer hooks on tiny random-weight LLaVA and Qwen2.5-VL models built from
configs, with tokenizers trained offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erasers.errors import UsageError
from vlm.hooks import hook_layers
from vlm.models import ask, ask_many, decoder_layers, load_vlm
from vlm.tokenizer import LLAVA_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, train_bpe

HIDDEN = 32
CORPUS = ["What is the name of the patient in the image? Anna Berg, 54, lives at 12 Elm Street.",
          "USER: ASSISTANT: <|im_start|>user assistant What colour is the star? red blue green"] * 4


def build_llava(directory: Path) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = train_bpe(CORPUS, 300, ["<image>"], LLAVA_CHAT_TEMPLATE, image_token="<image>")
    vision = CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=HIDDEN, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=HIDDEN)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(
        "<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(directory)
    return directory


def build_qwen(directory: Path) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = train_bpe(CORPUS, 300, QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, image_token="<|image_pad|>",
                          video_token="<|video_pad|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    vision = dict(depth=2, hidden_size=HIDDEN, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=HIDDEN, window_size=56, fullatt_block_indexes=[1])
    text = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tokenizer.bos_token_id, eos_token_id=ids["<|im_end|>"],
                pad_token_id=tokenizer.pad_token_id)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(directory)
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                        video_processor=Qwen2VLVideoProcessor(**pixels),
                        chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {"llava": build_llava(root / "llava"), "qwen2.5-vl": build_qwen(root / "qwen")}


@pytest.fixture(scope="module", params=["llava", "qwen2.5-vl"])
def loaded(request, tiny_vlm_dirs):
    return load_vlm(str(tiny_vlm_dirs[request.param]), device="cpu")


def _image(seed: int = 0, size: int = 28) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_loads_family_and_layers(loaded):
    assert loaded.family.name in ("llava", "qwen2.5-vl")
    layers = decoder_layers(loaded.model)
    assert len(layers) == 2 and layers is loaded.model.model.language_model.layers


def test_ask_matches_plain_generate(loaded):
    image = _image()
    answer = ask(loaded, image, "What is the name of the patient in the image?", max_new_tokens=6)
    inputs = loaded.inputs([image], ["What is the name of the patient in the image?"])
    plain = loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = loaded.tokenizer.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == expected
    # Text-only questions and batches of both.
    batch = ask_many(loaded, [image, None], ["What colour is the star?", "Where does Anna Berg live?"], 4)
    assert len(batch) == 2 and all(isinstance(a, str) for a in batch)


def _logits(loaded, image, question):
    with torch.no_grad():
        return loaded.model(**loaded.inputs([image], [question])).logits


def test_hooks_read_and_edit(loaded):
    image, question = _image(1), "What is the name of the patient in the image?"
    base = _logits(loaded, image, question)
    # A hook that edits nothing changes nothing, and captures the layer's output.
    with hook_layers(loaded.model, edit={0: lambda h: None}, capture=[0, -1]) as hooks:
        same = _logits(loaded, image, question)
    torch.testing.assert_close(same, base)
    inputs = loaded.inputs([image], [question])
    with torch.no_grad():
        states = loaded.model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hooks.last(0), states[1])
    assert hooks.last(1).shape == (1, inputs["input_ids"].shape[1], HIDDEN)
    # An edit changes the logits; leaving the block removes the hook.
    with hook_layers(loaded.model, edit={1: lambda h: h + 3.0 * torch.randn_like(h[:, :1])}):
        edited = _logits(loaded, image, question)
    assert not torch.allclose(edited, base, atol=1e-3)
    torch.testing.assert_close(_logits(loaded, image, question), base)


def test_generation_with_edit(loaded):
    image, question = _image(2), "What is the name of the patient in the image?"
    plain = ask(loaded, image, question, max_new_tokens=8)
    calls = []

    def push(h):
        calls.append(h.shape[1])
        return h + 50.0 * torch.sign(torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(3)))

    with hook_layers(loaded.model, edit={-1: push}):
        edited = ask(loaded, image, question, max_new_tokens=8)
    # Prefill sees the whole prompt, then one position per new token.
    assert calls[0] > 1 and all(c == 1 for c in calls[1:])
    assert edited != plain
    assert ask(loaded, image, question, max_new_tokens=8) == plain


def test_bad_layer_and_inputs(loaded):
    with pytest.raises(UsageError, match="layer 5"):
        with hook_layers(loaded.model, edit={5: lambda h: h}):
            pass
    with pytest.raises(UsageError, match="empty"):
        ask(loaded, None, "  ")


def test_load_errors(tmp_path, tiny_vlm_dirs):
    with pytest.raises(UsageError, match="unknown VLM"):
        load_vlm("not a model")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        load_vlm(str(tmp_path / "file.txt"))
    with pytest.raises(UsageError, match="no config.json"):
        load_vlm(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(UsageError, match="not a supported VLM"):
        load_vlm(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_vlm_dirs["llava"] / "config.json").read_text())
    with pytest.raises(UsageError, match="could not load"):
        load_vlm(str(broken), device="cpu")


def test_precision_auto_is_bf16_on_a_bf16_gpu_fp16_on_an_older_one_fp32_on_cpu(monkeypatch):
    from vlm.models import vlm_dtype

    assert vlm_dtype("auto", "cpu") == vlm_dtype(None, "cpu") == torch.float32
    assert vlm_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        vlm_dtype("fp16", "cpu")
    with pytest.raises(UsageError, match="--precision must be one of auto, fp32, fp16, bf16"):
        vlm_dtype("fp64", "cpu")
    # The GPU's answer is asked of torch, so both kinds of GPU are told apart here without one.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert vlm_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert vlm_dtype("auto", "cuda") == torch.float16
    with pytest.raises(UsageError, match="does not support bf16"):
        vlm_dtype("bf16", "cuda")


def test_precision_loads_the_model_in_it_and_the_edit_records_it(tiny_vlm_dirs, tmp_path, monkeypatch):
    from test_vlm_erasers import toy_target

    import vlm.run

    loaded = load_vlm(str(tiny_vlm_dirs["llava"]), device="cpu", precision="bf16")
    assert loaded.precision == "bf16" and next(loaded.model.parameters()).dtype == torch.bfloat16
    assert load_vlm(str(tiny_vlm_dirs["llava"]), device="cpu").precision == "fp32"
    target = toy_target()
    monkeypatch.setattr(vlm.run, "resolve_target", lambda concept, data=None: target)
    edit = vlm.run.erase_loaded(loaded, "mllmeraser", "red", tmp_path / "edit", {"pgd_steps": 1})
    assert json.loads((edit / "erasure.json").read_text())["precision"] == "bf16"
