"""Family adapters: how each pipeline family turns prompts into what its denoiser reads, what the denoiser
predicts, and how a partially denoised latent is sampled. Methods see one interface for SD 1.x/2.x, SDXL and Flux:

    cond = loaded.encode_text(prompts)                       # a Conditioning
    pred = predict_noise(denoiser, latents, t, cond)         # SD/SDXL: noise; Flux: flow-matching velocity
    x_t, t = sample_partially(loaded, denoiser, cond, empty, stop, steps, guidance, generator)

Also: noising a clean latent for training and the x_0 a prediction implies, which parameters read the text, and
where an IP-Adapter's image embeddings join the call. The base adapter here is SD 1.x/2.x's; SDXL's (sdxl.py) and
Flux's (flux.py) extend it; `erasers.families.adapter_class(name)` gives a family's.

What each family's denoiser reads (all built in the adapters, never in a method file):
  SD     the CLIP text encoder's last hidden states (77 x 768 for SD 1.x).
  SDXL   both CLIP encoders' penultimate hidden states concatenated (77 x (768 + 1280)), the second encoder's
         projected end-token state as `text_embeds`, and `time_ids` (original size, crop, target size) for the
         training resolution, as StableDiffusionXLPipeline builds them.
  Flux   T5's last hidden states (512 tokens), CLIP's pooled output as `pooled_projections`, zero text position
         ids, the packed latent's position ids, and, for guidance-distilled Flux (FLUX.1-dev: the transformer has
         `guidance_embeds`), the guidance scale as an input embedding. Flux predicts the flow-matching velocity
         v = noise - x_0 on packed 2x2 latent patches; x_t is sampled with FlowMatchEulerDiscreteScheduler on the
         pipeline's (shifted) sigma schedule.

Guidance on Flux. A guidance-distilled transformer has no unconditional branch: the guidance scale is an input.
Every prediction a method makes (teacher and student alike) reads the same guidance embedding, the pipeline's
default scale (3.5 for FLUX.1-dev), so ESD's negative-guidance target is formed from the concept and contrast
predictions *at the guidance users generate with*; sampling x_t uses the method's sample guidance through the
embedding, in one pass. A Flux transformer without the embedding (FLUX.1-schnell, the tiny test model) samples with
true classifier-free guidance against the empty prompt, as the pipeline's `true_cfg_scale` does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..conditioning import Conditioning, replaced_token_embeddings
from ..errors import UsageError


class UNetAdapter:
    """SD 1.x/2.x: one CLIP text encoder, an epsilon-predicting UNet, DDIM sampling."""

    def __init__(self, loaded):
        self.loaded = loaded

    @property
    def pipeline(self):
        return self.loaded.pipeline

    # ---- text ---------------------------------------------------------------------------------------------------

    def text_length(self, name: str) -> int:
        return self.loaded.tokenizers[name.replace("text_encoder", "tokenizer")].model_max_length

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = {}
        for name in self.loaded.family.text_encoders:
            tokenizer = self.loaded.tokenizers[name.replace("text_encoder", "tokenizer")]
            ids[name] = tokenizer(prompts, padding="max_length", max_length=self.text_length(name), truncation=True,
                                  return_tensors="pt").input_ids.to(self.loaded.device)
        return ids

    def encode_ids(self, ids: dict[str, torch.Tensor], token_embeddings: dict[str, torch.Tensor] | None = None,
                   text_encoders: dict[str, nn.Module] | None = None) -> Conditioning:
        outputs = {}
        for name in self.loaded.family.text_encoders:
            encoder = (text_encoders or {}).get(name) or self.loaded.text_encoders[name]
            with replaced_token_embeddings(encoder, (token_embeddings or {}).get(name)):
                outputs[name] = encoder(ids[name], output_hidden_states=self.needs_hidden_states)
        return self.compose(outputs)

    needs_hidden_states = False

    def compose(self, outputs: dict) -> Conditioning:
        return Conditioning(outputs["text_encoder"][0], None, self)

    @property
    def token_states_encoder(self) -> str:
        """The encoder whose tokens the token states are aligned with (its tokenizer counts the positions)."""
        return "text_encoder"

    # ---- latents and prediction ---------------------------------------------------------------------------------

    def latent_size(self) -> int:
        resolution = self.loaded.resolution
        if resolution is None:
            return self.loaded.denoiser.config.sample_size
        return resolution // self.pipeline.vae_scale_factor

    def latent_shape(self, batch: int = 1) -> tuple[int, ...]:
        size = self.latent_size()
        return (batch, self.loaded.denoiser.config.in_channels, size, size)

    def predict(self, denoiser: nn.Module, latents: torch.Tensor, timestep, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        return denoiser(latents, on_device(timestep, latents), encoder_hidden_states=cond.states).sample

    def sampling_scheduler(self, steps: int):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def unconditional(self) -> Conditioning:
        """The unconditional branch the family's pipeline samples with when no negative prompt is given."""
        return self.loaded.encode_text([""])

    def guided_prediction(self, denoiser, latents, t, cond: Conditioning, empty: Conditioning, guidance: float):
        """Classifier-free guidance: uncond + guidance * (cond - uncond)."""
        both = torch.cat([empty.expand(len(cond)), cond])
        uncond, conditional = predict(denoiser, torch.cat([latents, latents]), t, both).chunk(2)
        return uncond + guidance * (conditional - uncond)

    def initial_latents(self, batch: int, generator: torch.Generator, scheduler) -> torch.Tensor:
        noise = torch.randn(self.latent_shape(batch), generator=generator)
        return noise.to(self.loaded.device, latent_dtype(self.loaded)) * getattr(scheduler, "init_noise_sigma", 1.0)

    # ---- training examples: noising, and the clean latent a prediction implies ----------------------------------

    def noised(self, x0: torch.Tensor, generator: torch.Generator):
        """A training example at one uniformly drawn timestep for the whole batch: (x_t, t, what the denoiser
        should predict)."""
        t = self.training_timesteps(1, generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        return self.add_noise(x0, noise, t), t, self.prediction_target(x0, noise, t)

    @property
    def training_scheduler(self):
        """The DDPM forward process the denoiser was trained with (its scheduler's betas and prediction type)."""
        if getattr(self, "_training_scheduler", None) is None:
            from diffusers import DDPMScheduler

            self._training_scheduler = DDPMScheduler.from_config(self.pipeline.scheduler.config)
        return self._training_scheduler

    def training_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """One uniformly drawn training timestep per example (SD/SDXL: DDPM's integer steps)."""
        return torch.randint(self.training_scheduler.config.num_train_timesteps, (batch,), generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, per example (or one t for all)."""
        return self.training_scheduler.add_noise(x0, noise, t.expand(len(x0)) if len(t) == 1 else t)

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        alphas = self.training_scheduler.alphas_cumprod.to(like.device)[t.cpu()]
        return alphas.view(-1, *[1] * (like.dim() - 1)).to(like)

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser predicts at x_t: the noise, or v (SD 2.x 768 px models, prediction_type
        v_prediction)."""
        if self.training_scheduler.config.prediction_type == "v_prediction":
            alpha = self._alpha(t, x0)
            return alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
        return noise

    def x0_estimate(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The clean latent a prediction at (x_t, t) implies."""
        alpha = self._alpha(t, prediction)
        if self.training_scheduler.config.prediction_type == "v_prediction":
            return alpha.sqrt() * x_t - (1 - alpha).sqrt() * prediction
        return (x_t - (1 - alpha).sqrt() * prediction) / alpha.sqrt()

    def as_image(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or predictions) laid out as images, (batch, channels, height, width), for convolutions."""
        return latents

    def on_latent_image(self, latents: torch.Tensor, function) -> torch.Tensor:
        """`function` applied to the latents as the VAE's latent image (batch, channels, height, width)."""
        return function(latents)

    # ---- image prompts (IP-Adapter) ---------------------------------------------------------------------------

    # Whether classifier-free guidance runs as one doubled batch, unconditional half first (what an image prompt's
    # zero image for the unconditional branch has to follow).
    batch_guidance = True

    def with_image_embeds(self, call: dict, embeds: torch.Tensor) -> dict:
        """The denoiser call's keyword arguments with IP-Adapter image embeddings (batch, D) joined: a UNet reads
        them among its added conditions (beside SDXL's pooled text and size ids)."""
        added = {**(call.get("added_cond_kwargs") or {}), "image_embeds": [embeds[:, None]]}
        return {**call, "added_cond_kwargs": added}

    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        return self.vae_latent_mean(image) * self.pipeline.vae.config.scaling_factor

    @torch.no_grad()
    def vae_latent_mean(self, image) -> torch.Tensor:
        """The VAE's latent mean of an image, in the VAE's dtype. A VAE whose config sets force_upcast (SDXL's, Flux's:
        they overflow in fp16) encodes in fp32 outside any autocast, as diffusers' img2img pipelines do."""
        vae = self.pipeline.vae
        dtype = vae.dtype
        upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        pixels = self.pipeline.image_processor.preprocess(image).to(self.loaded.device)
        if upcast:
            vae.to(torch.float32)
        try:
            with torch.autocast(torch.device(self.loaded.device).type, enabled=False):
                return vae.encode(pixels.to(vae.dtype)).latent_dist.mean.to(dtype)
        finally:
            if upcast:
                vae.to(dtype)

    def pipeline_inputs(self, cond: Conditioning, negative: Conditioning) -> dict:
        """Keyword arguments of the pipeline's __call__ that generate from this conditioning (at the training
        resolution when one is set)."""
        return {"prompt_embeds": cond.states, "negative_prompt_embeds": negative.expand(len(cond)).states,
                **self.size()}

    def size(self) -> dict:
        if self.loaded.resolution is None:
            return {}
        return {"height": self.loaded.resolution, "width": self.loaded.resolution}

    # ---- generation-time guidance (the training-free edits, erasers/guidance.py) -------------------------------

    def classifier_free(self, guidance_scale) -> bool:
        """Whether the pipeline's call at this guidance scale runs an unconditional (negative) branch: not at scale
        <= 1, nor on a guidance-distilled UNet (time_cond_proj_dim: LCM, whose scale is an input)."""
        return guidance_scale is not None and guidance_scale > 1 and \
            self.loaded.denoiser.config.get("time_cond_proj_dim") is None

    def negative_prompt_call(self, guidance_scale, true_cfg_scale: float, method: str) -> dict:
        """Arguments to add to a pipeline call so that it guides away from its negative prompt; a UsageError where
        the call has no negative branch. SD and SDXL guide from it whenever classifier-free guidance is on."""
        if not self.classifier_free(guidance_scale):
            raise UsageError(f"{method} needs classifier-free guidance, but this {self.loaded.family.name} pipeline "
                             f"draws at guidance scale {guidance_scale} without a negative branch; generate with "
                             "--guidance above 1")
        return {}

    def with_extra_rows(self, args: tuple, kwargs: dict, text: Conditioning) -> tuple[tuple, dict]:
        """A classifier-free-guidance denoiser call ([negative, conditional] rows) extended by one more row per
        prompt: the conditional row's latent, timestep and size conditioning with `text` in place of the prompt's
        (SLD's safety-concept prediction, in the same batch as diffusers' safe pipeline computes it)."""
        args, kwargs = list(args), dict(kwargs)
        sample = args[0] if args else kwargs["sample"]
        half = sample.shape[0] // 2

        def extended(tensor, replacement=None):
            extra = tensor[half:] if replacement is None else replacement.to(tensor).expand(half, *tensor.shape[1:])
            return torch.cat([tensor, extra])

        if args:
            args[0] = extended(sample)
        else:
            kwargs["sample"] = extended(sample)
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if torch.is_tensor(timestep) and timestep.ndim and timestep.shape[0] == 2 * half:
            if len(args) > 1:
                args[1] = extended(timestep)
            else:
                kwargs["timestep"] = extended(timestep)
        kwargs["encoder_hidden_states"] = extended(kwargs["encoder_hidden_states"], text.states)
        added = kwargs.get("added_cond_kwargs")
        if added:
            kwargs["added_cond_kwargs"] = {
                key: extended(value, text.pooled if key == "text_embeds" else None) if torch.is_tensor(value)
                else value for key, value in added.items()}
        return tuple(args), kwargs

    # ---- which parameters read the text -------------------------------------------------------------------------

    def text_attention_names(self) -> list[str]:
        """SD's attn2, and attn1 as well in blocks built with only_cross_attention (the toy UNet's 16x16 blocks):
        every attention whose keys and values read the text."""
        return [name for name, module in self.loaded.denoiser.named_modules()
                if getattr(module, "is_cross_attention", False) and hasattr(module, "to_k")]

    def cross_attention_kv(self) -> list[tuple[str, nn.Linear, nn.Linear]]:
        denoiser = self.loaded.denoiser
        return [(name, denoiser.get_submodule(name).to_k, denoiser.get_submodule(name).to_v)
                for name in self.text_attention_names()]

    def reads_text(self, parameter_name: str, strict: bool = False) -> bool:
        """ESD-x's parameters: the text-reading attentions (strict: their keys and values only)."""
        prefixes = tuple(f"{name}." for name in self.text_attention_names())
        if not parameter_name.startswith(prefixes):
            return False
        return not strict or ".to_k." in parameter_name or ".to_v." in parameter_name

    def attention_names(self) -> list[str]:
        """Every attention module of the denoiser: SD's and SDXL's attn1 and attn2 (self- and cross-attention),
        Flux's joint and single blocks' attentions (their norms and text projections included)."""
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        return [name for name, module in self.loaded.denoiser.named_modules()
                if isinstance(module, (Attention, AttentionModuleMixin))]

    def in_attention(self, parameter_name: str) -> bool:
        """The parameters of Concept Ablation's "attn" set: those of every attention module."""
        return parameter_name.startswith(tuple(f"{name}." for name in self.attention_names()))

    def conditioning_path(self, parameter_name: str) -> bool:
        """Parameters ESD-u leaves alone: the text-reading attentions, the time embedding, and SDXL's added
        embedding (it reads the pooled text and the size conditioning)."""
        return (self.reads_text(parameter_name) or "time_emb" in parameter_name
                or parameter_name.startswith("add_embedding."))

    def text_projection_inputs(self, prompts: list[str]) -> list[tuple[list[nn.Linear], torch.Tensor]]:
        """UCE's inputs: groups of (key/value linears, what they read for `prompts`: (levels, batch, tokens, width)).
        Every UNet cross-attention reads the text states themselves: one group, one level."""
        with torch.no_grad():
            states = self.loaded.encode_text(prompts).states
        return [([linear for _, k, v in self.cross_attention_kv() for linear in (k, v)], states[None])]


def latent_dtype(loaded) -> torch.dtype:
    """Latents stay float32 under autocast (mixed precision: the denoiser casts them); otherwise the denoiser's."""
    if torch.is_autocast_enabled(loaded.device.type):
        return torch.float32
    return loaded.dtype


def on_device(timestep, latents: torch.Tensor):
    """The UNet moves a 0-dim timestep to its device but builds the time embedding of a batch of them wherever they
    are: training timesteps drawn from a CPU generator must join the latents' device (a CUDA device mismatch
    otherwise)."""
    return timestep.to(latents.device) if torch.is_tensor(timestep) else timestep


def predict(denoiser: nn.Module, latents: torch.Tensor, timestep, cond, guidance: float | None = None):
    """The denoiser's prediction for `cond` (a Conditioning, or SD hidden states as a bare tensor)."""
    if not isinstance(cond, Conditioning):
        cond = Conditioning(cond, None, None)
    if len(cond) != latents.shape[0]:
        cond = cond.expand(latents.shape[0])
    adapter = cond.adapter or UNetAdapter(None)
    return adapter.predict(denoiser, latents, timestep, cond, guidance)
