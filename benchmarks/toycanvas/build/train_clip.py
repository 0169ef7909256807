"""Stage `clip`: a small CLIPModel with CLIP's real BPE vocabulary, trained contrastively on the world's captions
-> weights/clip (its text tower is the pipeline's text encoder, its vision tower the toy VLM's)."""

from __future__ import annotations

from pathlib import Path

import torch

from erasers.files import writing_into
from erasers.train import TrainingLoop

from ..world import OBJECTS, STYLES, caption
from .config import BuildConfig
from .data import augment, load_data
from .export import declare_float32

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_config(cfg: BuildConfig):
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=128)
    vision = dict(image_size=32, patch_size=4, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, projection_dim=128)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


def normalize_for_clip(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def pair_captions() -> list[str]:
    """The 100 captions in the datasets' pair order: caption p is object p % 10 in style p // 10, the pair that
    make_dataset's image i shows for p = i % 100."""
    return [caption(OBJECTS[p % len(OBJECTS)], STYLES[p // len(OBJECTS)])
            for p in range(len(OBJECTS) * len(STYLES))]


def stage_clip(cfg: BuildConfig) -> None:
    from transformers import CLIPImageProcessor, CLIPModel

    from ..tokenizer import build_clip_tokenizer

    images, objects, styles = load_data(cfg, "train")
    tokenizer = build_clip_tokenizer(Path(cfg.build_dir) / "tokenizer")
    captions = pair_captions()
    pairs = len(captions)
    # The dataset lays pairs out cyclically (image i shows pair i % pairs), so one image per pair is a batch of
    # 100 distinct captions: the plain CLIP loss then has exactly one positive per row.
    # Padding to the longest caption rather than 77 is 7x cheaper and changes nothing: the text transformer is
    # causal, so the pooled end-of-text state never sees the padding.
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    torch.manual_seed(cfg.seed)
    model = CLIPModel(clip_config(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-4, total_steps=cfg.clip_steps, pct_start=0.1)
    loop = TrainingLoop("clip", cfg.clip_steps, {"model": model, "opt": optimizer, "sched": schedule},
                        cfg.seed, cfg.build_dir, cfg.checkpoint_every)
    model.train()
    repeats = len(images) // pairs

    def step(_, generator):
        idx = torch.randint(repeats, (pairs,), generator=generator) * pairs + torch.arange(pairs)
        pixel_values = normalize_for_clip(augment(images[idx], generator))
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixel_values,
                    return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
        accuracy = (out.logits_per_image.argmax(-1) == torch.arange(pairs)).float().mean()
        return {"loss": out.loss.item(), "acc": accuracy.item()}

    loop.run(step)
    final = Path(cfg.weights_dir) / "clip"
    with writing_into(final, replace=True) as tmp:  # a rebuild replaces the shipped CLIP
        model.eval().to(torch.float16).save_pretrained(tmp)
        declare_float32(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(tmp)
