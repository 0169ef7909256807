"""The Flux family adapter (erasers/families/base.py says what an adapter does): T5 token states with CLIP's pooled
output, packed 2x2 latent patches, flow matching (the transformer predicts velocity), the guidance embedding of
guidance-distilled Flux, and the joint blocks' text projections as what reads the text."""

from __future__ import annotations

import re

import numpy as np
import torch

from ..conditioning import Conditioning
from .base import UNetAdapter, latent_dtype


class FluxAdapter(UNetAdapter):
    """Flux: T5 token states, CLIP pooled output, packed latents, flow matching, guidance as an input embedding."""

    # FluxPipeline's default max_sequence_length: prompts are encoded as it encodes them.
    T5_LENGTH = 512
    # The joint blocks' text-stream parameters and the embedders of time, guidance and pooled text: what ESD-u
    # leaves alone (it trains the image stream and the single blocks).
    TEXT_STREAM = re.compile(r"(^context_embedder\.|_context\.|\.add_[qkv]_proj\.|\.to_add_out\.|\.norm_added_|"
                             r"^time_text_embed\.)")
    TEXT_PROJECTIONS = re.compile(r"^transformer_blocks\.\d+\.attn\.add_([qkv])_proj\.")

    def text_length(self, name: str) -> int:
        if name == "text_encoder_2":
            return self.T5_LENGTH
        return getattr(self.pipeline, "tokenizer_max_length", None) or super().text_length(name)

    def compose(self, outputs):
        return Conditioning(outputs["text_encoder_2"][0], outputs["text_encoder"].pooler_output, self)

    @property
    def token_states_encoder(self) -> str:
        return "text_encoder_2"

    def latent_size(self) -> int:
        resolution = self.loaded.resolution or self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return 2 * (resolution // (self.pipeline.vae_scale_factor * 2))

    def latent_shape(self, batch: int = 1) -> tuple[int, ...]:
        size = self.latent_size()
        return (batch, (size // 2) ** 2, self.loaded.denoiser.config.in_channels)

    def image_ids(self, device, dtype) -> torch.Tensor:
        size = self.latent_size() // 2
        return type(self.pipeline)._prepare_latent_image_ids(1, size, size, device, dtype)

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.loaded.denoiser.config.guidance_embeds)

    def predict(self, denoiser, latents, timestep, cond, guidance=None):
        batch = latents.shape[0]
        timestep = torch.as_tensor(timestep, device=latents.device, dtype=torch.float32).reshape(-1).expand(batch)
        guidance_input = None
        if denoiser.config.guidance_embeds:
            scale = self.loaded.default_guidance if guidance is None else guidance
            guidance_input = torch.full((batch,), float(scale), device=latents.device, dtype=torch.float32)
        text_ids = torch.zeros(cond.states.shape[1], 3, device=latents.device, dtype=cond.dtype)
        return denoiser(hidden_states=latents, timestep=timestep / 1000, guidance=guidance_input,
                        pooled_projections=cond.pooled, encoder_hidden_states=cond.states, txt_ids=text_ids,
                        img_ids=self.image_ids(latents.device, cond.dtype), return_dict=False)[0]

    def sampling_scheduler(self, steps: int):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        config = scheduler.config
        mu = calculate_shift(self.latent_shape()[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=self.loaded.device)
        return scheduler

    def guided_prediction(self, denoiser, latents, t, cond, empty, guidance):
        if self.guidance_embedded:
            return self.predict(denoiser, latents, t, cond, guidance)
        return super().guided_prediction(denoiser, latents, t, cond, empty, guidance)

    # Flow matching: x_t = (1 - sigma) x_0 + sigma noise, velocity target noise - x_0, t = 1000 sigma, sigma drawn
    # uniformly in [0, 1).
    def training_timesteps(self, batch, generator):
        return 1000 * torch.rand((batch,), generator=generator)

    @staticmethod
    def _sigma(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t / 1000).view(-1, *[1] * (like.dim() - 1)).to(like)

    def add_noise(self, x0, noise, t):
        sigma = self._sigma(t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def prediction_target(self, x0, noise, t):
        return noise - x0

    def x0_estimate(self, x_t, t, prediction):
        return x_t - self._sigma(t, prediction) * prediction

    def as_image(self, latents):
        """Packed 2x2 patches, (batch, tokens, 4 x channels), as the (batch, 4 x channels, h/2, w/2) grid they tile
        (the pipeline packs them row by row)."""
        batch, tokens, channels = latents.shape
        side = self.latent_size() // 2
        return latents.transpose(1, 2).reshape(batch, channels, side, side)

    def on_latent_image(self, latents, function):
        pipeline, size = type(self.pipeline), self.latent_size()
        pixels = size * self.pipeline.vae_scale_factor
        image = function(pipeline._unpack_latents(latents, pixels, pixels, self.pipeline.vae_scale_factor))
        return pipeline._pack_latents(image, *image.shape)

    @property
    def batch_guidance(self) -> bool:
        return not self.guidance_embedded

    def with_image_embeds(self, call, embeds):
        """Flux's IP-Adapter (XLabs' layout, diffusers' FluxIPAdapterMixin) reads the image embeddings through the
        joint attention's keyword arguments."""
        return {**call, "joint_attention_kwargs": {"ip_adapter_image_embeds": [embeds[:, None]]}}

    @torch.no_grad()
    def encode_image(self, image):
        vae = self.pipeline.vae
        latents = (self.vae_latent_mean(image) - vae.config.shift_factor) * vae.config.scaling_factor
        batch, channels, height, width = latents.shape
        return type(self.pipeline)._pack_latents(latents, batch, channels, height, width)

    def pipeline_inputs(self, cond, negative):
        size = self.latent_size() * self.pipeline.vae_scale_factor
        return {"prompt_embeds": cond.states, "pooled_prompt_embeds": cond.pooled, "height": size, "width": size}

    def negative_prompt_call(self, guidance_scale, true_cfg_scale: float, method: str) -> dict:
        """Flux has no negative branch by default (FLUX.1-dev's guidance is an input embedding): a negative prompt
        acts through the pipeline's true classifier-free guidance, a second pass per step at `true_cfg_scale`."""
        return {"true_cfg_scale": true_cfg_scale}

    def with_extra_rows(self, args, kwargs, text):
        raise NotImplementedError("Flux's pipeline runs no classifier-free-guidance batch to extend")

    def text_attention_names(self) -> list[str]:
        """The joint blocks' attentions: their add_q/k/v projections carry the text stream into joint attention."""
        return [name for name, module in self.loaded.denoiser.named_modules()
                if getattr(module, "add_k_proj", None) is not None]

    def cross_attention_kv(self):
        return [(name, self.loaded.denoiser.get_submodule(name).add_k_proj,
                 self.loaded.denoiser.get_submodule(name).add_v_proj) for name in self.text_attention_names()]

    def reads_text(self, parameter_name: str, strict: bool = False) -> bool:
        """ESD-x on Flux: the joint blocks' text projections add_q/k/v_proj (strict: add_k/v_proj)."""
        match = self.TEXT_PROJECTIONS.match(parameter_name)
        return bool(match) and (not strict or match.group(1) in "kv")

    def conditioning_path(self, parameter_name: str) -> bool:
        return bool(self.TEXT_STREAM.search(parameter_name))

    # Noise levels at which UCE records what each joint block's text projections read.
    UCE_SIGMAS = (0.8, 0.5, 0.2)

    @torch.no_grad()
    def text_projection_inputs(self, prompts):
        """What each joint block's add_k_proj/add_v_proj read: the text stream after the earlier blocks, normed
        and modulated by the timestep, so it depends on the step and, past the first block, on the image tokens.
        Recorded with forward hooks for `prompts` on one seeded noise latent at a few noise levels (UCE_SIGMAS),
        the same for every prompt list, so the concept's and the guide's columns line up; every block is edited
        from the unedited model's inputs, as UCE edits every SD layer from the same embeddings."""
        cond = self.loaded.encode_text(prompts)
        kv = self.cross_attention_kv()
        recorded: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in kv}
        handles = [k.register_forward_hook(lambda module, args, output, name=name: recorded[name].append(args[0]))
                   for name, k, _ in kv]
        noise = torch.randn(self.latent_shape(1), generator=torch.Generator().manual_seed(0))
        noise = noise.to(self.loaded.device, latent_dtype(self.loaded)).expand(len(prompts), -1, -1)
        try:
            for sigma in self.UCE_SIGMAS:
                self.predict(self.loaded.denoiser, noise, 1000 * sigma, cond)
        finally:
            for handle in handles:
                handle.remove()
        return [([k, v], torch.stack(recorded[name])) for name, k, v in kv]
