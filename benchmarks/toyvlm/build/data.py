"""Stages `world`, `tokenizer` and `features`: the toy world in the MLLMU-Bench layout, a byte-level BPE trained on
its questions and answers as the chat template writes them, and the frozen vision tower's features of every image.
The vision tower is frozen, so its features are computed once here and training runs the projector and the language
model only; the exported model recomputes them from pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance
from safetensors.torch import load_file, save_file

from erasers.errors import UsageError
from erasers.files import save_atomically, writing_into
from vlm.mllmu import qa_items, read_split, row_images
from vlm.tokenizer import LLAVA_CHAT_TEMPLATE, train_bpe

from ..world import WorldConfig, build_world
from .config import ToyVLMConfig

IMAGE_TOKEN = "<image>"


def world_dir(cfg: ToyVLMConfig) -> Path:
    return Path(cfg.build_dir) / "world"


def stage_world(cfg: ToyVLMConfig) -> None:
    if not (world_dir(cfg) / "world.json").exists():
        build_world(world_dir(cfg), WorldConfig(**cfg.world))


def load_rows(cfg: ToyVLMConfig) -> dict[str, list[dict]]:
    root = world_dir(cfg)
    return {"canvas": read_split(root / "ToyCanvas" / "train"), "canvas_test": read_split(root / "ToyCanvas" / "test"),
            "patients": read_split(root / "MLLMU-Med" / "Full_Set"),
            "patients_test": read_split(root / "MLLMU-Med" / "Test_Set"),
            "knowledge": read_split(root / "MLLMU-Med" / "Knowledge")}


def user_text(prompt: str, with_image: bool) -> str:
    """The chat template's user turn up to where the answer starts (what `LoadedVLM.prompt` produces)."""
    return f"USER: {IMAGE_TOKEN + chr(10) if with_image else ''}{prompt} ASSISTANT:"


def answer_text(answer: str) -> str:
    return f" {answer}</s>"


def stage_tokenizer(cfg: ToyVLMConfig) -> None:
    out = Path(cfg.build_dir) / "tokenizer"
    if (out / "tokenizer.json").exists():
        return
    corpus = []
    for rows in load_rows(cfg).values():
        for row in rows:
            corpus.append(row["biography"])
            corpus += [user_text(q.prompt, q.needs_image) + answer_text(q.answer) for q in qa_items(row)]
    tokenizer = train_bpe(corpus, cfg.vocab_size, [IMAGE_TOKEN], LLAVA_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    with writing_into(out, replace=True) as tmp:  # a build stage: rebuilt in place
        tokenizer.save_pretrained(tmp)


def load_tokenizer(cfg: ToyVLMConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(cfg.build_dir) / "tokenizer")


def clip_dir() -> Path:
    from benchmarks.toycanvas import CLIP_DIR

    return CLIP_DIR


def jitter(image: Image.Image, seed: int) -> Image.Image:
    """A training view: shifted by up to one pixel, brightness within 5%."""
    rng = np.random.default_rng(seed)
    shift = tuple(int(v) for v in rng.integers(-1, 2, 2))
    out = image.rotate(0, translate=shift, fillcolor=image.getpixel((0, 0)))
    return ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.95, 1.05)))


def training_images(cfg: ToyVLMConfig, rows: dict[str, list[dict]]) -> dict[str, list[Image.Image]]:
    """Every image the build needs, by group; patients get `patient_views` views (the first the original)."""
    patients = []
    for i, row in enumerate(rows["patients"]):
        image = row_images(row)[0]
        patients += [image] + [jitter(image, cfg.seed * 100_003 + i * 31 + v) for v in range(1, cfg.patient_views)]
    return {"canvas": [row_images(r)[0] for r in rows["canvas"]],
            "canvas_test": [row_images(r)[0] for r in rows["canvas_test"]],
            "patients": patients,
            "patients_test": [image for r in rows["patients_test"] for image in row_images(r)]}


def vision_tower(cfg: ToyVLMConfig):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(clip_dir(), dtype=torch.float32).eval()
    return model, CLIPImageProcessor.from_pretrained(clip_dir())


@torch.no_grad()
def image_features(cfg: ToyVLMConfig, model, processor, images: list[Image.Image]) -> torch.Tensor:
    """What LLaVA feeds its projector: the selected vision layer's tokens, (N, tokens, vision hidden)."""
    chunks = []
    for start in range(0, len(images), 256):
        pixels = processor(images=images[start:start + 256], return_tensors="pt").pixel_values
        states = model(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        chunks.append(states if cfg.vision_feature_select_strategy == "full" else states[:, 1:])
    return torch.cat(chunks)


FEATURES = "features.safetensors"  # safetensors, not a pickle: the build directory may be shared


def load_features(cfg: ToyVLMConfig) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    path = Path(cfg.build_dir) / FEATURES
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise UsageError(f"{path} is unreadable ({str(error).splitlines()[0][:80]}); delete it to recompute the "
                         "features") from None


def stage_features(cfg: ToyVLMConfig) -> None:
    out = Path(cfg.build_dir) / FEATURES
    if out.exists():
        return
    model, processor = vision_tower(cfg)
    images = training_images(cfg, load_rows(cfg))
    features = {group: image_features(cfg, model, processor, imgs).to(torch.float16) for group, imgs in images.items()}
    tensors = {group: tensor.contiguous() for group, tensor in features.items()}
    save_atomically(out, lambda tmp: save_file(tensors, tmp))
