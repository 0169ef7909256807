"""Anchor prompts and the images the base model draws for them: the training data of Concept Ablation and the
methods built on it (DoCo, SalUn's retain set). Drawn once, seeded, and cached in the run's work directory so that a
resumed run trains on the same images; each step noises a random batch of them (`noised_anchors`)."""

from __future__ import annotations

from pathlib import Path

import torch

from .files import save_atomically
from .models import LoadedPipeline
from .prompts import EraseRequest

# The anchor a sensitive prompt is mapped to, by config: "supercategory", the prompt with the concept replaced by its
# supercategory word ("A object image in Flat style."); "empty", the empty prompt. --anchor TEXT replaces both.
ANCHORS = ("supercategory", "empty")


def anchor_prompts(request: EraseRequest, prompts: list[str], anchor: str) -> list[str]:
    """One anchor prompt per sensitive prompt: --anchor texts (in turn) when given, else by the config."""
    if request.anchors:
        return [request.anchors[i % len(request.anchors)] for i in range(len(prompts))]
    if anchor == "empty":
        return [""] * len(prompts)
    return request.neutral_prompts(prompts)


def prompt_of_each_image(count: int, prompts: int, groups: int = 1) -> torch.Tensor:
    """The prompt each of `count` images is drawn for, the prompts listed group by group (a request's concepts, each
    with its prompts, in nearly equal blocks). In turn (image i: prompt i mod n) when every prompt gets one; with fewer
    images than prompts, in turn over the groups first (image i: group i mod k, that group's prompts in turn), so that
    every concept still gets images (in turn over the whole list, the concepts at its end would get none). One group
    is the plain turn in both cases."""
    if count >= prompts:
        return torch.arange(count) % prompts
    bounds = [round(g * prompts / groups) for g in range(groups + 1)]
    return torch.tensor([bounds[i % groups] + (i // groups) % (bounds[i % groups + 1] - bounds[i % groups])
                         for i in range(count)], dtype=torch.long)


@torch.no_grad()
def draw_anchor_latents(loaded: LoadedPipeline, anchors: list[str], per_concept: int, steps: int, guidance: float,
                        seed: int, cache: Path | None = None, concepts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_concept` latents x_0 for each of `concepts` concepts whose anchor prompts are listed one concept after
    another, drawn by the base model (image i: seed seed + i, its prompt by `prompt_of_each_image`), and the anchor
    index of each. The count is per concept, as in the papers (which erase one), so a long list's last concepts are
    not left without images. Kept in `cache` so a resumed run trains on the same images."""
    from safetensors.torch import load_file, save_file

    if cache is not None and cache.exists():
        saved = load_file(cache)
        return saved["latents"].to(loaded.device, loaded.dtype), saved["anchor_index"]
    count = per_concept * concepts
    index = prompt_of_each_image(count, len(anchors), concepts)
    loaded.pipeline.set_progress_bar_config(disable=True)
    latents = []
    for start in range(0, count, 16):
        chunk = list(range(start, min(count, start + 16)))
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in chunk]
        out = loaded.pipeline(prompt=[anchors[int(index[i])] for i in chunk], generator=generators,
                              num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                              **loaded.adapter.size())
        latents.append(out.images)
    latents = torch.cat(latents)
    if cache is not None:
        saved = {"latents": latents.float().cpu().contiguous(), "anchor_index": index}
        save_atomically(cache, lambda tmp: save_file(saved, str(tmp)))
    return latents, index


def noised(loaded: LoadedPipeline, x_0: torch.Tensor, generator: torch.Generator,
           timesteps: torch.Tensor | None = None):
    """x_t at one uniformly drawn timestep per example (or at `timesteps`, MACE's drawn from its own
    distribution), the timesteps, and what the denoiser should predict there (the noise; v; Flux's velocity)."""
    adapter = loaded.adapter
    noise = torch.randn(x_0.shape, generator=generator).to(x_0)
    t = adapter.training_timesteps(len(x_0), generator) if timesteps is None else timesteps
    target = adapter.prediction_target(x_0, noise, t.to(x_0.device))
    return adapter.add_noise(x_0, noise, t).to(loaded.dtype), t.to(loaded.device), target


def noised_anchors(loaded: LoadedPipeline, images: torch.Tensor, batch: int, generator: torch.Generator):
    """A training batch of cached anchor images: `batch` of them picked at random and `noised`. Returns x_t, t, the
    picked indices and what the denoiser should predict at x_t (Concept Ablation's noise-based target)."""
    picked = torch.randint(len(images), (batch,), generator=generator)
    x_t, t, target = noised(loaded, images[picked], generator)
    return x_t, t, picked, target
