"""The toy VLM: a LlavaForConditionalGeneration on the toy CLIP's vision tower (frozen, as LLaVA keeps its CLIP frozen),
a two-layer MLP projector and a small Llama; growing it by layers that start as the identity (phase 2); and the
forward pass training runs on cached image features."""

from __future__ import annotations

import json

import torch

from .config import ToyVLMConfig
from .data import IMAGE_TOKEN, clip_dir


def model_config(cfg: ToyVLMConfig, tokenizer, layers: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    clip = json.loads((clip_dir() / "config.json").read_text())
    vision = CLIPVisionConfig(**{k: v for k, v in clip["vision_config"].items() if k not in ("model_type",)})
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=layers or cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.heads,
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=True)
    tokens = (vision.image_size // vision.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(
        IMAGE_TOKEN), vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, image_seq_length=tokens,
        projector_hidden_act="gelu", tie_word_embeddings=True)


def new_model(cfg: ToyVLMConfig, tokenizer):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(model_config(cfg, tokenizer))
    vision = CLIPVisionModel.from_pretrained(clip_dir(), dtype=torch.float32)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.vision_tower.requires_grad_(False)
    return model


def grow(cfg: ToyVLMConfig, model, tokenizer):
    """`model` with `grow_layers` more decoder layers on top, initialised so that the output is unchanged."""
    from transformers import LlavaForConditionalGeneration

    from vlm.models import decoder_layers

    torch.manual_seed(cfg.seed + 1)
    bigger = LlavaForConditionalGeneration(model_config(cfg, tokenizer, cfg.layers + cfg.grow_layers))
    missing, unexpected = bigger.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".layers." in key for key in missing), (missing, unexpected)
    for layer in decoder_layers(bigger)[cfg.layers:]:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    bigger.model.vision_tower.requires_grad_(False)
    return bigger


def forward_hidden(model, ids: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor | None,
                   position_ids: torch.Tensor | None = None, all_layers: bool = False):
    """The language model's last hidden states, with projected cached image features in the image positions (with
    `all_layers`, the model output, whose `hidden_states` hold every layer's)."""
    embeds = model.get_input_embeddings()(ids)
    if feats is not None:
        projected = model.model.multi_modal_projector(feats).reshape(-1, embeds.shape[-1])
        image_mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, projected.to(embeds.dtype))
    if position_ids is None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                     use_cache=False, output_hidden_states=all_layers)
    return out if all_layers else out.last_hidden_state
