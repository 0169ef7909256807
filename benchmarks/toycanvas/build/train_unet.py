"""Stage `unet`: the UNet2DConditionModel on the frozen CLIP text, in four cycles (BuildConfig says why each), then the
whole Stable Diffusion directory -> weights/pipeline. Finished cycles are kept in the build directory, so a later
cycle can be rerun alone."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from erasers.files import writing_into
from erasers.train import TrainingLoop

from ..world import OBJECTS, STYLES, caption
from .config import BuildConfig
from .data import load_data
from .export import export_pipeline, noise_scheduler


def unet_model(cfg: BuildConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8, norm_num_groups=16)


def with_full_resolution_text(unet):
    """The same UNet with text cross-attention also in its outermost (16x16) blocks. Those blocks attend only to
    the text (no 256-token self-attention, which would more than double the step) and their output projections
    start at zero, so the returned model computes exactly what `unet` does until it is trained."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["down_block_types"] = ["CrossAttnDownBlock2D", *config["down_block_types"][1:]]
    config["up_block_types"] = [*config["up_block_types"][:-1], "CrossAttnUpBlock2D"]
    config["only_cross_attention"] = [True] + [False] * (len(config["down_block_types"]) - 1)
    wider = UNet2DConditionModel.from_config(config)
    missing, unexpected = wider.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(".attentions." not in name for name in missing):
        raise RuntimeError(f"UNet expansion lost weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, parameter in wider.named_parameters():
            if name in missing and "proj_out" in name:
                parameter.zero_()
    return wider


def stage_unet(cfg: BuildConfig) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr
    from transformers import CLIPTextModel, CLIPTokenizer

    images, objects, styles = load_data(cfg, "train")
    clip_dir = Path(cfg.weights_dir) / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(Path(cfg.build_dir) / "vae").eval()
    captions = [caption(OBJECTS[o], STYLES[s]) for s in range(len(STYLES)) for o in range(len(OBJECTS))] + [""]
    with torch.no_grad():
        tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        text_states = text_encoder(tokens.input_ids)[0]
        moments = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.parameters for chunk in tqdm(
            images.split(500), desc="encoding latents")])
    caption_index = styles * len(OBJECTS) + objects
    empty_index = len(captions) - 1
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    scaling = vae.config.scaling_factor
    del images

    torch.manual_seed(cfg.seed)
    unet = unet_model(cfg)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    scheduler = noise_scheduler()
    unet.train()

    def phase(name: str, steps: int, max_lr: float, seed: int) -> None:
        """One one-cycle run of the loop; a second phase (a fresh cycle, other batches) refines the first."""
        optimizer = torch.optim.AdamW(unet.parameters(), lr=max_lr, weight_decay=1e-2)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps, pct_start=0.03)

        def step(_, generator):
            idx = torch.randint(len(mean), (cfg.unet_batch,), generator=generator)
            latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * scaling
            # Caption dropout (10%) trains the unconditional branch that classifier-free guidance needs.
            drop = torch.rand(cfg.unet_batch, generator=generator) < 0.1
            states = text_states[torch.where(drop, empty_index, caption_index[idx])]
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=generator)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, states).sample
            # Min-SNR-5 weighting: converges several times faster than plain MSE on small budgets.
            snr = compute_snr(scheduler, timesteps)
            weights = torch.clamp(snr, max=5.0) / snr
            loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            ema.step(unet.parameters())
            return {"loss": loss.item()}

        state = {"model": unet, "ema": ema, "opt": optimizer, "sched": schedule}
        TrainingLoop(name, steps, state, seed, cfg.build_dir, cfg.checkpoint_every).run(step)

    def phase_with_fresh_ema(name: str, steps: int, max_lr: float, seed: int) -> None:
        """A cycle whose average starts from the current weights, not from an earlier cycle's."""
        nonlocal ema
        unet.train()
        ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
        phase(name, steps, max_lr, seed)
        ema.copy_to(unet.parameters())

    def save_checkpoint(directory: Path) -> None:
        with writing_into(directory, replace=True) as tmp:  # a build stage: rebuilt in place
            unet.save_pretrained(tmp)

    # Each finished group of cycles is kept as a plain UNet directory, so a later cycle can be rerun alone.
    two_cycles = Path(cfg.build_dir) / "unet-two-cycles"
    three_cycles = Path(cfg.build_dir) / "unet-three-cycles"
    if (three_cycles / "config.json").exists():
        unet = UNet2DConditionModel.from_pretrained(three_cycles, dtype=torch.float32)
    else:
        if (two_cycles / "config.json").exists():
            unet = UNet2DConditionModel.from_pretrained(two_cycles, dtype=torch.float32)
        else:
            phase("unet", cfg.unet_steps, 1e-3, cfg.seed)
            if cfg.unet_refine_steps:
                phase("unet-refine", cfg.unet_refine_steps, cfg.unet_refine_lr, cfg.seed + 1)
            ema.copy_to(unet.parameters())
            save_checkpoint(two_cycles)
        if cfg.unet_full_res_text_steps:
            unet = with_full_resolution_text(unet)
            phase_with_fresh_ema("unet-full-res-text", cfg.unet_full_res_text_steps, cfg.unet_full_res_text_lr,
                                 cfg.seed + 2)
            save_checkpoint(three_cycles)
    if cfg.unet_polish_steps:
        phase_with_fresh_ema("unet-polish", cfg.unet_polish_steps, cfg.unet_polish_lr, cfg.seed + 3)
    export_pipeline(cfg, unet.eval(), vae, text_encoder, tokenizer)
