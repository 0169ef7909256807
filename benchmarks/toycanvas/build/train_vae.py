"""Stage `vae`: the AutoencoderKL (one 2x downsampling, 8 latent channels), with a deterministic warm-up and an L1 +
image-gradient loss -> BUILD/vae (exported with the pipeline)."""

from __future__ import annotations

from pathlib import Path

import torch

from erasers.files import writing_into
from erasers.train import TrainingLoop

from .config import BuildConfig
from .data import load_data


def vae_model(cfg: BuildConfig):
    from diffusers import AutoencoderKL

    # One 2x downsampling: 32x32 images become 16x16 latents. Eight latent channels rather than SD's four keep
    # the 6-pixel style textures, which four channels at this size blurred away.
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                         latent_channels=cfg.latent_channels, norm_num_groups=16, sample_size=32)


def _edges(images: torch.Tensor) -> torch.Tensor:
    return torch.cat([images[..., 1:, :] - images[..., :-1, :], images[..., :, 1:].transpose(-1, -2)
                      - images[..., :, :-1].transpose(-1, -2)], dim=-2)


def stage_vae(cfg: BuildConfig) -> None:
    images, _, _ = load_data(cfg, "train")
    torch.manual_seed(cfg.seed)
    vae = vae_model(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=cfg.vae_steps, pct_start=0.05)
    loop = TrainingLoop("vae", cfg.vae_steps, {"model": vae, "opt": optimizer, "sched": schedule},
                        cfg.seed, cfg.build_dir, cfg.checkpoint_every)
    vae.train()

    def step(step_index, generator):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=generator)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        # A deterministic warm-up lets the decoder learn textures before the posterior noise is switched on.
        z = posterior.mode() if step_index < cfg.vae_deterministic_steps else posterior.sample(generator)
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        edge = (_edges(recon) - _edges(x)).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + edge + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        return {"l1": l1.item(), "edge": edge.item(), "kl": kl.item()}

    loop.run(step)
    vae.eval()
    with torch.no_grad():
        sample = images[:2000] * 2 - 1
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in sample.split(250)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    final = Path(cfg.build_dir) / "vae"
    with writing_into(final, replace=True) as tmp:  # a build stage: rebuilt in place
        vae.save_pretrained(tmp)
