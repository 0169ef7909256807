"""What the build ships: fp16 weights whose configs declare float32, and the Stable Diffusion directory with its
schedulers (training's DDPM noise schedule; Euler ancestral sampling that keeps DDIM's fields) and the sampling
defaults the quality bars are measured with."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from erasers.files import writing_into
from erasers.vocabulary import FILE_NAME as VOCABULARY_FILE

from ..world import VOCABULARY
from .config import BuildConfig

SAMPLING = {"num_inference_steps": 25, "guidance_scale": 5.0}


def declare_float32(config_path: Path) -> None:
    """Weights ship in fp16 to fit the size budget; transformers loads a model in the dtype its config declares,
    so declaring float32 makes plain `from_pretrained` compute in float32, as diffusers' components do."""
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    # Sub-configs (a CLIPModel's text and vision towers) are what CLIPTextModel / CLIPVisionModel* load from.
    for key, value in config.items():
        if key.endswith("_config") and isinstance(value, dict):
            value["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2))


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="epsilon", clip_sample=False)


def sampling_scheduler():
    """Euler ancestral sampling. Deterministic DDIM follows the silhouette the initial noise suggests, and for
    some seeds that is no object at all (object accuracy 78% with DDIM on the quality seeds); fresh noise at
    every step lets the text redraw it (90%). Its config keeps DDIM's fields, so the erasers' DDIM sampling of
    x_t, built from this config, is unchanged."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    ddim = DDIMScheduler.from_config(noise_scheduler().config, steps_offset=1, set_alpha_to_one=False)
    return EulerAncestralDiscreteScheduler.from_config(ddim.config, timestep_spacing="leading")


# The toy pipeline's companions, beside it in the weights directory: the IP-Adapter and the CLIP whose joint space
# Co-Erasing refines image embeddings in (its "toy" options name them).
COMPANIONS = {"ip_adapter": "../ip_adapter", "refine_clip": "../clip"}


def toy_marker(cfg: BuildConfig) -> dict:
    """toycanvas.json: marks the toy pipeline (its erasers take their toy defaults) and says how it was built."""
    return {"build_config": asdict(cfg), "torch": torch.__version__, "companions": COMPANIONS}


def export_pipeline(cfg: BuildConfig, unet, vae, text_encoder, tokenizer) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    final = Path(cfg.weights_dir) / "pipeline"
    with writing_into(final, replace=True) as tmp:  # a rebuild replaces the shipped pipeline
        pipeline.to(torch.float16).save_pretrained(tmp)
        declare_float32(tmp / "text_encoder" / "config.json")
        (tmp / "toycanvas.json").write_text(json.dumps(toy_marker(cfg), indent=2))
        # The concepts the library reads from the model directory (erasers/vocabulary.py).
        (tmp / VOCABULARY_FILE).write_text(VOCABULARY.to_json())
        # The sampling the quality bars are measured with; load_pipeline takes it as this model's default.
        (tmp / "sampling.json").write_text(json.dumps(SAMPLING, indent=2))
