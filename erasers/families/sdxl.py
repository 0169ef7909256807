"""The SDXL family adapter (erasers/families/base.py says what an adapter does): both CLIP encoders' penultimate
states, the second encoder's pooled projection as `text_embeds`, and the size/crop `time_ids`."""

from __future__ import annotations

import torch

from ..conditioning import Conditioning
from .base import UNetAdapter, on_device


class SDXLAdapter(UNetAdapter):
    """SDXL: two CLIP encoders (penultimate states concatenated; the second's projected end token pooled) and the
    size conditioning `time_ids`."""

    needs_hidden_states = True

    def compose(self, outputs: dict) -> Conditioning:
        first, second = outputs["text_encoder"], outputs["text_encoder_2"]
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return Conditioning(states, second[0], self)

    def time_ids(self, batch: int, device, dtype) -> torch.Tensor:
        # (original height, width, crop top, left, target height, width): the training resolution, uncropped.
        size = self.latent_size() * self.pipeline.vae_scale_factor
        return torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype).expand(batch, -1)

    def predict(self, denoiser, latents, timestep, cond, guidance=None):
        added = {"text_embeds": cond.pooled, "time_ids": self.time_ids(len(cond), cond.device, cond.dtype)}
        return denoiser(latents, on_device(timestep, latents), encoder_hidden_states=cond.states,
                        added_cond_kwargs=added).sample

    def unconditional(self) -> Conditioning:
        # SDXL base's pipeline (force_zeros_for_empty_prompt) guides from zero embeddings, not the encoded "": ESD's
        # x_t sampling and targets must guide from the same point as the sampling it is meant to change.
        empty = super().unconditional()
        if getattr(self.pipeline.config, "force_zeros_for_empty_prompt", False):
            return Conditioning(torch.zeros_like(empty.states), torch.zeros_like(empty.pooled), self)
        return empty

    def pipeline_inputs(self, cond, negative):
        negative = negative.expand(len(cond))
        return {"prompt_embeds": cond.states, "negative_prompt_embeds": negative.states,
                "pooled_prompt_embeds": cond.pooled, "negative_pooled_prompt_embeds": negative.pooled, **self.size()}
