"""The named parameter sets the denoiser and text-encoder erasers train (ESD's variants; DoCo, Co-Erasing and
Concept Ablation reuse them)."""

from __future__ import annotations

import torch

from .models import LoadedPipeline

PARAMETER_SETS = ("xattn", "xattn-strict", "noxattn", "attn", "full", "text_encoder")


def trainable_parameters(loaded: LoadedPipeline, which: str) -> list[torch.nn.Parameter]:
    """The parameters a variant trains; what reads the text is the family adapter's call (SD/SDXL: the
    cross-attentions; Flux: the joint blocks' text projections add_q/k/v_proj); "attn" is every attention module's
    parameters (Concept Ablation's "all attention"), also the adapter's call."""
    if which == "text_encoder":
        return [p for encoder in loaded.trained_text_encoders.values() for p in encoder.parameters()]
    adapter = loaded.adapter
    chosen = []
    for name, parameter in loaded.denoiser.named_parameters():
        if which == "xattn" and adapter.reads_text(name):
            chosen.append(parameter)
        elif which == "xattn-strict" and adapter.reads_text(name, strict=True):
            chosen.append(parameter)
        elif which == "noxattn" and not adapter.conditioning_path(name):
            chosen.append(parameter)
        elif which == "attn" and adapter.in_attention(name):
            chosen.append(parameter)
        elif which == "full":
            chosen.append(parameter)
    return chosen
