"""The ToyCanvas build's settings: data sizes, each training stage's steps, and the UNet's four cycles (each
cycle's comment says why it was added)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import WEIGHTS_DIR


@dataclass
class BuildConfig:
    build_dir: str = ".toybuild"
    weights_dir: str = str(WEIGHTS_DIR)
    seed: int = 0
    train_images: int = 40_000
    heldout_images: int = 2_000
    classifier_steps: int = 1_500
    classifier_batch: int = 128
    clip_steps: int = 1_200
    vae_steps: int = 2_000
    vae_batch: int = 32
    vae_deterministic_steps: int = 1_200
    unet_steps: int = 4_500
    # Shapes were still blobs when the first cycle ended (about half the objects recognised): a second,
    # gentler cycle on other batches sharpens them.
    unet_refine_steps: int = 2_400
    unet_refine_lr: float = 4e-4
    # After two cycles a third of the generations still missed the object (the noise, not the text, set the
    # silhouette): cycle 3 adds text cross-attention at the full 16x16 latent resolution, starting as an identity.
    unet_full_res_text_steps: int = 3_000
    unet_full_res_text_lr: float = 4e-4
    # After cycle 3 about 89% of generations showed the asked object; a short, gentle fourth cycle on other
    # batches (fresh EMA) lifts that to about 92%.
    unet_polish_steps: int = 2_000
    unet_polish_lr: float = 2e-4
    unet_batch: int = 64
    # The toy IP-Adapter (stage ip-adapter): trained on freshly rendered images with the UNet frozen.
    ip_adapter_images: int = 6_000
    # The adapter's copy of the toy CLIP's vision tower is first trained further against the frozen text tower
    # (locked-text tuning): the CLIP stage leaves it naming the object of 89% of images, the toy classifier 100%.
    ip_adapter_encoder_steps: int = 1_500
    ip_adapter_encoder_images: int = 30_000
    ip_adapter_encoder_lr: float = 3e-4
    # An MLP image projection to 16 tokens (diffusers' IPAdapterFaceIDImageProjection layout): the published
    # linear projection to 4 tokens blurred the object between neighbours, and 4 tokens cannot stand in for a
    # caption's states.
    ip_adapter_tokens: int = 16
    ip_adapter_hidden_multiplier: int = 4
    ip_adapter_init_steps: int = 1_500
    ip_adapter_steps: int = 800
    # Weight of the distillation term in the denoising phase (0: the IP-Adapter paper's denoising loss alone).
    ip_adapter_distill: float = 1.0
    ip_adapter_batch: int = 16
    ip_adapter_lr: float = 1e-3
    checkpoint_every: int = 250
    latent_channels: int = 8
    text_hidden: int = 128
    text_layers: int = 4
    extra: dict = field(default_factory=dict)
