"""Tiny random-weight pipelines of each supported family, built from configs as diffusers' own tests build them,
but with tokenizers made offline (CLIP's real BPE vocabulary, and a small T5 unigram vocabulary for Flux)."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.toycanvas.tokenizer import build_clip_tokenizer

TEXT_HIDDEN = 32
# Co-Erasing's IP-Adapter image encoder (CLIPVisionConfig) and its refinement CLIP (clip_text_config) at test size.
IMAGE_DIM = 16
TINY_IMAGE_ENCODER = dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, projection_dim=IMAGE_DIM)
TINY_REFINE_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        projection_dim=IMAGE_DIM)


def random_ip_adapter_options(loaded, root: Path) -> dict[str, str]:
    """Co-Erasing's options for a random IP-Adapter made for this pipeline's denoiser (tiny image encoder) and a
    random tiny refinement CLIP, written in `root`."""
    from benchmarks.architectures import write_random_ip_adapter

    return write_random_ip_adapter(loaded, root, TINY_IMAGE_ENCODER, clip_text_config(**TINY_REFINE_CLIP))


def clip_text_config(**overrides):
    from transformers import CLIPTextConfig

    values = dict(vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=1, projection_dim=TEXT_HIDDEN)
    values.update(overrides)
    return CLIPTextConfig(**values)


def tiny_vae(latent_channels: int = 4, **flux_options):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16, **flux_options)


def build_sd(directory: Path, tokenizer_dir: Path) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
                                attention_head_dim=4, norm_num_groups=4)
    pipeline = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(clip_text_config()),
                                       tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), unet=unet,
                                       scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory)
    return directory


def build_sdxl(directory: Path, tokenizer_dir: Path) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=2 * TEXT_HIDDEN,
                                norm_num_groups=4)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipeline = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config()), tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True)
    pipeline.save_pretrained(directory)
    return directory


def t5_tokenizer():
    from transformers import T5Tokenizer

    words = "a an the of in image style photo star circle square painting picture object drawn cat dog".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(piece, -1.0 - i * 0.01) for i, piece in enumerate(
        ["\u2581" + w for w in words] + list("abcdefghijklmnopqrstuvwxyz.,") + ["\u2581"])]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_flux(directory: Path, tokenizer_dir: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=TEXT_HIDDEN, axes_dims_rope=[4, 4, 8])
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = tiny_vae(latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                   use_post_quant_conv=False)
    pipeline = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                            text_encoder=CLIPTextModel(clip_text_config()),
                            tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), text_encoder_2=t5,
                            tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipeline.save_pretrained(directory)
    return directory


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "flux": build_flux}


def build_tokenizer(directory: Path) -> Path:
    build_clip_tokenizer(directory)
    return directory


# Test-time settings on a loaded tiny pipeline (the `bases` fixture, conftest.py).
RESOLUTION = {"sd": None, "sdxl": None, "flux": 16}  # Flux's native 1024 px is 4,096 latent tokens: too many here


def text_sensitive(loaded, length: int = 8):
    """Random text encoders map every prompt to nearly the same states (tiny token embeddings, mostly padding), so
    the denoisers barely read the text; token embeddings of unit scale and 8-token prompts make the prompts tell
    apart, as a trained encoder's do."""
    torch.manual_seed(0)
    set_text_length(loaded, length)
    with torch.no_grad():
        for encoder in loaded.text_encoders.values():
            encoder.get_input_embeddings().weight.normal_(0, 1)
    return loaded


def set_text_length(loaded, length: int):
    """Every text encoder reads `length` tokens (start and end tokens included)."""
    for tokenizer in loaded.tokenizers.values():
        tokenizer.model_max_length = length
    loaded.adapter.T5_LENGTH = length
    if hasattr(loaded.pipeline, "tokenizer_max_length"):  # Flux reads CLIP's length once, at construction
        loaded.pipeline.tokenizer_max_length = length
