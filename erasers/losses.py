"""What the training-based erasers share: the frozen teacher, sampling a partially denoised latent from the
model being edited, and ESD's negative-guidance target."""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError
from .families import Conditioning, predict
from .models import LoadedPipeline
from .prompts import EraseRequest

# What ESD's negative guidance pushes a prompt away from (ESD, AdvUnlearn): "empty", the unconditional
# prediction, as the paper; or "neutral", the same prompt with the concept replaced by its supercategory word.
# On a caption naming an object and a style the unconditional direction is mostly the object's, so "empty" erases
# the object with a style; "neutral" cancels everything in the caption but the concept.
CONTRASTS = ("empty", "neutral")


class FrozenOriginal:
    """The module as it was before training, without a second copy of it: called like the module, it runs the
    module itself with the original values of the `trained` parameters (kept aside) in place of the current ones,
    under no_grad and in eval mode. Everything the edit leaves alone is shared, so a teacher for ESD-x on SDXL or Flux
    costs the cross-attention's size, not a second denoiser (a 12B Flux transformer: 24 GB in bf16). Create it after
    `make_trainable`, before the first optimiser step. The originals are kept in the frozen weights' dtype: under
    mixed precision the fp32 trained parameters are exact upcasts of bf16/fp16 weights, so this loses nothing and
    halves what the teacher holds."""

    def __init__(self, module: nn.Module, trained: list[nn.Parameter]):
        wanted = {id(parameter) for parameter in trained}
        frozen_dtype = next((p.dtype for p in module.parameters() if id(p) not in wanted), None)
        self.module = module
        self.originals = {name: parameter.detach().to(frozen_dtype or parameter.dtype, copy=True)
                          for name, parameter in module.named_parameters() if id(parameter) in wanted}
        if len(self.originals) != len(wanted):
            raise ValueError("FrozenOriginal: some trained parameters are not the module's")

    def __call__(self, *args, **kwargs):
        modes = [(module, module.training) for module in self.module.modules()]  # restored exactly, mixed or not
        self.module.eval()
        try:
            with torch.no_grad():
                return torch.func.functional_call(self.module, self.originals, args, kwargs)
        finally:
            for module, training in modes:
                module.training = training

    def __getattr__(self, name):  # config, dtype, device: the module's
        if name in ("module", "originals"):
            raise AttributeError(name)
        return getattr(self.module, name)


def check_contrast(method: str, contrast: str) -> None:
    if contrast not in CONTRASTS:
        raise UsageError(f"{method} contrast must be one of {', '.join(CONTRASTS)}, not {contrast!r}")


@torch.no_grad()
def contrast_states(loaded: LoadedPipeline, request: EraseRequest, prompts: list[str], contrast: str) -> Conditioning:
    """One row per prompt: the text states ESD guides that prompt away from."""
    if contrast == "empty":
        return loaded.adapter.unconditional().expand(len(prompts))
    return loaded.encode_text(request.neutral_prompts(prompts))


def predict_noise(unet: nn.Module, latents: torch.Tensor, timestep, text_states) -> torch.Tensor:
    """The denoiser's prediction at (x_t, t) for `text_states` (a Conditioning from `loaded.encode_text`, or SD
    hidden states): SD/SDXL's noise, Flux's flow-matching velocity. ESD's target is the same linear combination of
    either. The family adapter builds the call (SDXL's added embeddings, Flux's ids and guidance)."""
    return predict(unet, latents, timestep, text_states)


def sample_partially(loaded: LoadedPipeline, unet: nn.Module, text_states, empty_states, stop_index: int, steps: int,
                     guidance: float, generator: torch.Generator):
    """Denoise fresh noise for `stop_index` of `steps` sampling steps with guidance (DDIM with classifier-free
    guidance on SD/SDXL; Flux's flow-matching Euler steps, guidance as its embedding when it has one); returns the
    latent x_t and its timestep t. ESD trains on x_t drawn this way from the model being edited."""
    return sample_trajectory(loaded, unet, text_states, empty_states, stop_index, steps, guidance, generator)[-1]


@torch.no_grad()
def sample_trajectory(loaded: LoadedPipeline, unet: nn.Module, text_states, empty_states, stop_index: int,
                      steps: int, guidance: float, generator: torch.Generator):
    """As `sample_partially`, but returns every (x_t, t) on the way: stop_index + 1 pairs, from pure noise to the
    latent after `stop_index` steps. One run gives latents at many noise levels (what an attack round needs)."""
    adapter = loaded.adapter
    text_states, empty_states = as_conditioning(loaded, text_states), as_conditioning(loaded, empty_states)
    scheduler = adapter.sampling_scheduler(steps)
    latents = adapter.initial_latents(len(text_states), generator, scheduler)
    path = []
    for t in scheduler.timesteps[:stop_index]:
        path.append((latents, t))
        prediction = adapter.guided_prediction(unet, latents, t, text_states, empty_states, guidance)
        latents = scheduler.step(prediction, t, latents).prev_sample
    path.append((latents, scheduler.timesteps[stop_index]))
    return path


def as_conditioning(loaded: LoadedPipeline, states) -> Conditioning:
    return states if isinstance(states, Conditioning) else Conditioning(states, None, loaded.adapter)


def esd_target(eps_from: torch.Tensor, eps_concept: torch.Tensor, eps_empty: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's negative guidance: where the frozen model would move toward the concept, move away from it instead.
    eps*(x_t, c_from) - eta * (eps*(x_t, c) - eps*(x_t, "")); with c_from = c and eta = 2 this is the original
    paper's eps*(x_t, "") - (eps*(x_t, c) - eps*(x_t, ""))."""
    return eps_from - eta * (eps_concept - eps_empty)
