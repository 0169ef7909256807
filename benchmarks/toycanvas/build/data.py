"""Stage `data`: the seeded training and held-out image sets, as every training stage reads them, and the
augmentation the classifier and CLIP train on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erasers.files import save_atomically

from ..render import make_dataset
from .config import BuildConfig


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def load_data(cfg: BuildConfig, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = Path(cfg.build_dir) / "data" / f"{split}.npz"
    with np.load(path) as data:
        return to_tensor(data["images"]), torch.from_numpy(data["objects"]), torch.from_numpy(data["styles"])


def stage_data(cfg: BuildConfig) -> None:
    out = Path(cfg.build_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    splits = (("train", cfg.train_images, cfg.seed + 1), ("heldout", cfg.heldout_images, cfg.seed + 2))
    for split, count, seed in splits:
        if (out / f"{split}.npz").exists():
            continue
        images, objects, styles = make_dataset(count, seed)
        # The temporary name keeps the .npz suffix, so np.savez does not append another.
        save_atomically(out / f"{split}.npz", lambda tmp: np.savez(tmp, images=images, objects=objects, styles=styles))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and slight colour jitter: the classifier must also read VAE reconstructions and generations."""
    n = images.shape[0]
    sigma = torch.rand(n, generator=generator) * 0.9
    blurred = torch.stack([_gaussian_blur(im, float(s)) for im, s in zip(images, sigma)])
    gain = 1 + 0.12 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    noise = torch.randn(images.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.05
    return (blurred * gain + noise).clamp(0, 1)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.2:
        return image
    x = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    image = F.conv2d(F.pad(image[:, None], (2, 2, 0, 0), mode="reflect"), kernel.view(1, 1, 1, 5))
    return F.conv2d(F.pad(image, (0, 0, 2, 2), mode="reflect"), kernel.view(1, 1, 5, 1))[:, 0]
