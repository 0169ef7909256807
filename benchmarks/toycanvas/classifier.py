"""The ToyCanvas classifier: the miniature of UnlearnCanvas' style/object classifier (one backbone, two heads)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .world import OBJECTS, STYLES


@dataclass
class ClassifierConfig:
    objects: tuple[str, ...] = OBJECTS
    styles: tuple[str, ...] = STYLES
    widths: tuple[int, ...] = (32, 64, 128, 128)
    image_size: int = 32


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class ToyClassifier(nn.Module):
    """Takes images in [0, 1] (N, 3, H, W); returns (object logits, style logits)."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        widths = self.config.widths
        layers, c_in = [], 3
        for i, width in enumerate(widths):
            layers.append(_block(c_in, width, 1 if i == 0 else 2))
            c_in = width
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.object_head = nn.Linear(c_in, len(self.config.objects))
        self.style_head = nn.Linear(c_in, len(self.config.styles))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images * 2 - 1)
        return self.object_head(features), self.style_head(features)

    @torch.no_grad()
    def predict(self, images: torch.Tensor | list, batch_size: int = 256) -> tuple[list[str], list[str]]:
        """Object and style names for a batch of images (tensor in [0, 1] or PIL images)."""
        if isinstance(images, list):
            images = pil_to_tensor(images)
        self.eval()
        objects, styles = [], []
        for chunk in images.split(batch_size):
            object_logits, style_logits = self(chunk.to(next(self.parameters()).device, torch.float32))
            objects += [self.config.objects[i] for i in object_logits.argmax(-1).tolist()]
            styles += [self.config.styles[i] for i in style_logits.argmax(-1).tolist()]
        return objects, styles

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in self.state_dict().items()},
                  directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ToyClassifier":
        directory = Path(directory)
        raw = json.loads((directory / "config.json").read_text())
        config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        model = cls(config)
        state = load_file(directory / "model.safetensors")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model.eval()


def pil_to_tensor(images: list) -> torch.Tensor:
    pixels = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
