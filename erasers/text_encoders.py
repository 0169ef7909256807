"""Where the parts of a CLIP or T5 text encoder are, for the erasers that train some of its blocks (HiRM, AdvUnlearn,
ESD-te): the blocks in order, the final layer norm, and a block's attention or MLP."""

from __future__ import annotations

from torch import nn


def text_encoder_layers(text_encoder: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a CLIP or T5 text encoder, first (early) to last (high-level)."""
    if hasattr(text_encoder, "encoder") and hasattr(text_encoder.encoder, "block"):  # T5EncoderModel
        return text_encoder.encoder.block
    inner = getattr(text_encoder, "text_model", text_encoder)  # transformers < 5 nests the blocks one deeper
    return inner.encoder.layers


def text_encoder_final_norm(text_encoder: nn.Module) -> nn.Module:
    """The layer norm after the last block (CLIP's final_layer_norm, T5's encoder.final_layer_norm)."""
    if hasattr(text_encoder, "encoder") and hasattr(text_encoder.encoder, "final_layer_norm"):
        return text_encoder.encoder.final_layer_norm
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def text_block_part(text_encoder: nn.Module, component: str) -> str:
    """The parameter-name fragment of a block's self-attention ("attn") or MLP ("ffn"), or "" for all of it."""
    t5 = hasattr(text_encoder, "encoder") and hasattr(text_encoder.encoder, "block")
    return {"attn": "layer.0." if t5 else "self_attn", "ffn": "layer.1." if t5 else "mlp", "all": ""}[component]
