"""Model families: one `Family` record per pipeline family (which components are text encoders, which is the
denoiser, the sampling defaults) and one adapter each behind one interface (base.py: SD 1.x/2.x, which SDXL's and
Flux's extend). Methods call `loaded.adapter`; none tests a pipeline's class."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..conditioning import Conditioning
from .base import UNetAdapter, latent_dtype, on_device, predict
from .flux import FluxAdapter
from .sdxl import SDXLAdapter


@dataclass(frozen=True)
class Family:
    name: str
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    denoiser: str
    default_steps: int
    default_guidance: float
    # Config keys a replacement component must share with the one it replaces.
    compatible_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)


_TEXT_KEYS = ("hidden_size", "vocab_size", "max_position_embeddings")
SD = Family("sd", ("text_encoder",), ("tokenizer",), "unet", 50, 7.5,
            {"text_encoder": _TEXT_KEYS, "unet": ("in_channels", "cross_attention_dim", "block_out_channels")})
SDXL = Family("sdxl", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), "unet", 50, 5.0,
              {"text_encoder": _TEXT_KEYS, "text_encoder_2": _TEXT_KEYS,
               "unet": ("in_channels", "cross_attention_dim", "block_out_channels", "addition_embed_type")})
FLUX = Family("flux", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), "transformer", 28, 3.5,
              {"text_encoder": _TEXT_KEYS, "text_encoder_2": ("d_model", "vocab_size"),
               "transformer": ("in_channels", "joint_attention_dim", "pooled_projection_dim")})

PIPELINE_FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": SD,
    "StableDiffusionXLPipeline": SDXL,
    "FluxPipeline": FLUX,
}
FAMILIES: dict[str, Family] = {f.name: f for f in (SD, SDXL, FLUX)}

ADAPTERS: dict[str, type[UNetAdapter]] = {"sd": UNetAdapter, "sdxl": SDXLAdapter, "flux": FluxAdapter}


def adapter_class(family: str) -> type[UNetAdapter]:
    """The adapter of a family name (erasers.models.FAMILIES)."""
    return ADAPTERS[family]


__all__ = ["ADAPTERS", "FAMILIES", "PIPELINE_FAMILIES", "Conditioning", "Family", "FluxAdapter", "SDXLAdapter",
           "UNetAdapter", "adapter_class", "latent_dtype", "on_device", "predict"]
