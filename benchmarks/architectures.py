"""The SD 1.5, SDXL and Flux architectures with random weights, built from their published configs (nothing is
downloaded), for the benchmarks that time or check training at full size (step_cost, gpu_check)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

FAMILIES = ("sd15", "sdxl", "flux")


def pipeline_family(family: str) -> str:
    """The name erasers.models.FAMILIES (and the tests' tiny pipelines) know `family` by."""
    return "sd" if family == "sd15" else family


# SD 1.5's UNet and CLIP ViT-L text encoder.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=1, projection_dim=768)
# SDXL base 1.0's UNet and text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), as published.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                        "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_TEXT = dict(SD15_TEXT, hidden_act="quick_gelu")
SDXL_TEXT_2 = dict(SD15_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu")
# Both models' published noise schedule (SD 1.5 ships it with PNDM, SDXL with Euler; the betas, offset and clipping
# are what an eraser's training timesteps and x_t depend on).
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                   clip_sample=False, set_alpha_to_one=False)
SDXL_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                     timestep_spacing="leading")
# FLUX.1-dev's transformer and T5-XXL's encoder (layer counts set by --flux-depth).
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new", decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)


def _tokenizers():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_pipelines import t5_tokenizer
    from transformers import CLIPTokenizer

    from benchmarks.toycanvas.tokenizer import build_clip_tokenizer

    directory = tempfile.mkdtemp()
    build_clip_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(directory), t5_tokenizer()


def _vae(latent_channels: int, **flux_options):
    """A minimal VAE with SD's 8x downsampling (four blocks, 8 channels): the erasers never run it."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=latent_channels,
                         **flux_options)


def build_architecture(family: str, flux_depth: str = "4,8"):
    """A pipeline of `family` with random weights from the published configs, on the CPU in float32."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip, t5 = _tokenizers()
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=_vae(4), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer=clip,
            unet=UNet2DConditionModel(**SD15_UNET), scheduler=DDIMScheduler(**SD_SCHEDULE),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=_vae(4), text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)), tokenizer=clip,
            tokenizer_2=clip, unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULE))
    if family == "flux":
        joint, single, encoder_layers = (19, 38, 24) if flux_depth == "full" else (*map(int, flux_depth.split(",")), 4)
        transformer = FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "num_layers": joint, "num_single_layers": single})
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15),
            vae=_vae(16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer=clip,
            text_encoder_2=T5EncoderModel(T5Config(**{**T5_XXL, "num_layers": encoder_layers})), tokenizer_2=t5,
            transformer=transformer)
    raise SystemExit(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def as_loaded(pipeline, family: str, resolution: int | None = None):
    """`pipeline` as the erasers see it (erasers.models.LoadedPipeline), with the family's sampling defaults, frozen
    as load_pipeline returns it."""
    from erasers.models import FAMILIES as KNOWN
    from erasers.models import LoadedPipeline

    known = KNOWN[pipeline_family(family)]
    loaded = LoadedPipeline(pipeline, known, f"{family}-random", known.default_steps, known.default_guidance,
                            resolution=resolution)
    loaded.freeze()
    return loaded


# Co-Erasing's IP-Adapter image encoder and refinement CLIP at the published SD 1.5 adapter's size: OpenCLIP
# ViT-H/14 (its text tower for the refinement).
IMAGE_ENCODER = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                     patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
REFINE_CLIP = dict(SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   projection_dim=1024, hidden_act="gelu")


def write_random_ip_adapter(loaded, root: Path, image_encoder: dict = IMAGE_ENCODER,
                            refine_clip: dict | object = REFINE_CLIP) -> dict[str, str]:
    """A random IP-Adapter for this pipeline's denoiser in the published layout (erasers.ip_adapter's add/save,
    with its image encoder) and a random refinement CLIP (a config dict or a CLIPTextConfig) in `root`; Co-Erasing's
    options to use them. The pipeline is left without the adapter."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from erasers.ip_adapter import add_ip_adapter, save_ip_adapter

    (root / "adapter").mkdir(parents=True)
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**image_encoder))
    add_ip_adapter(loaded, encoder)
    save_ip_adapter(loaded.denoiser, encoder, root / "adapter", dtype=loaded.dtype)
    loaded.pipeline.unload_ip_adapter()
    if isinstance(refine_clip, dict):
        refine_clip = CLIPTextConfig(**refine_clip)
    CLIPTextModelWithProjection(refine_clip).save_pretrained(root / "clip")
    loaded.tokenizer.save_pretrained(root / "clip")
    return {"ip_adapter": str(root / "adapter"), "refine_clip": str(root / "clip")}
