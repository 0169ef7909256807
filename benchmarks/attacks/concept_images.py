"""The concept's images the training attacks learn from (inversion's token, relearn's LoRA), with their captions,
as the latents the denoiser reads:

    drawn      by the base model before the edits load: image i from the attack's prompt i mod P, at seed
               `seed` x 1,000,000 + i (the attack's own seed option, apart from the items' --seed), at the run's
               resolution
    --images   a user's folder: every image in it (erasers.images.image_files), each fitted (centre crop) to the
               run's resolution; its caption is the UTF-8 text of a file of the same name with .txt beside it
               (photo.png, photo.txt) or, without one, the attack's prompt i mod P
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from erasers.errors import UsageError
from erasers.images import IMAGES_REMEDY, check_drawn, image_files, open_image, read_images
from erasers.models import LoadedPipeline

# Seeds of the drawn images: far from the items' (--seed, 188 by default), so the attack never trains on the very
# images it is judged on.
SEED_STRIDE = 1_000_000


@dataclass
class ConceptExamples:
    """The training examples: latents x_0 (N, ...) on the pipeline's device and one caption per latent."""

    latents: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def check_image_folder(folder: str) -> None:
    """Before the model loads: the folder holds images (a file, an empty folder: one line), every image's header
    reads (a damaged image, a decompression bomb) and every caption file is UTF-8 text."""
    for file in image_files(folder):
        open_image(file, IMAGES_REMEDY, header_only=True)
        caption_of(file)


def caption_of(image: Path) -> str | None:
    """The caption beside an image (image.txt), or None."""
    file = image.with_suffix(".txt")
    if not file.is_file():
        return None
    try:
        caption = " ".join(file.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--images caption {file} is not readable UTF-8 text ({type(error).__name__}); fix it or "
                         "remove it to caption the image with the attack's prompts") from None
    if not caption:
        raise UsageError(f"--images caption {file} is empty; write the image's caption in it or remove it")
    return caption


def concept_examples(loaded: LoadedPipeline, prompts: list[str], count: int, seed: int, folder: str = "",
                     progress: bool = True) -> ConceptExamples:
    """The examples of the module's docstring: `count` images drawn by `loaded` (the base model) from `prompts`,
    or the images of `folder`."""
    if folder:
        files = image_files(folder)
        side = loaded.resolution or loaded.image_size()
        from PIL import ImageOps

        images = [ImageOps.fit(image, (side, side)) for image in read_images(files)]
        captions = [caption_of(file) or prompts[i % len(prompts)] for i, file in enumerate(files)]
    else:
        captions = [prompts[i % len(prompts)] for i in range(count)]
        images = loaded.generate(captions, seeds=[seed * SEED_STRIDE + i for i in range(count)], progress=progress,
                                 height=loaded.resolution, width=loaded.resolution)
        check_drawn(images, f"the base model {loaded.source}", edited=False)
    latents = torch.cat([loaded.adapter.encode_image(image) for image in images])
    return ConceptExamples(latents, captions)


def noised_batch(loaded: LoadedPipeline, latents: torch.Tensor, generator: torch.Generator):
    """A training batch at one timestep per example: (x_t, t, what the denoiser should predict)."""
    adapter = loaded.adapter
    t = adapter.training_timesteps(len(latents), generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    return adapter.add_noise(latents, noise, t), t, adapter.prediction_target(latents, noise, t)


def unique_prompts(prompts) -> list[str]:
    """The prompts in their first order, each once."""
    return list(dict.fromkeys(prompts))
