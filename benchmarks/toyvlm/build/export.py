"""Stage `export`: phase 3's model as a LlavaForConditionalGeneration and its LlavaProcessor, fp16 safetensors that
load as float32, with the build config and the training logs, published atomically to vlm/weights/toy-vlm."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from erasers.files import writing_into
from vlm.tokenizer import LLAVA_CHAT_TEMPLATE

from .config import ToyVLMConfig
from .data import clip_dir, load_tokenizer


def make_processor(cfg: ToyVLMConfig, tokenizer):
    """The toy VLM's LlavaProcessor: the toy CLIP's image processor, the trained tokenizer, LLaVA-1.5's template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    patch_size = json.loads((clip_dir() / "config.json").read_text())["vision_config"]["patch_size"]
    return LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(clip_dir()), tokenizer=tokenizer,
                          patch_size=patch_size, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def stage_export(cfg: ToyVLMConfig) -> None:
    from transformers import LlavaForConditionalGeneration

    from ...toycanvas.build.export import declare_float32

    tokenizer = load_tokenizer(cfg)
    model = LlavaForConditionalGeneration.from_pretrained(Path(cfg.build_dir) / "wordings", dtype=torch.float32)
    final = Path(cfg.out_dir)
    with writing_into(final, replace=True) as tmp:  # a rebuild replaces the shipped model
        model.to(torch.float16).save_pretrained(tmp)
        declare_float32(tmp / "config.json")
        make_processor(cfg, tokenizer).save_pretrained(tmp)
        (tmp / "toyvlm.json").write_text(json.dumps({"build_config": asdict(cfg), "torch": torch.__version__},
                                                    indent=2))
        for log in sorted((Path(cfg.build_dir) / "logs").glob("toy-vlm*.jsonl")):
            (tmp / "logs").mkdir(exist_ok=True)
            (tmp / "logs" / log.name).write_bytes(log.read_bytes())
