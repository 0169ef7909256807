"""Stage `ip-adapter`: a toy IP-Adapter for the shipped pipeline -> weights/ip_adapter (the published layout:
`ip-adapter.safetensors` and `image_encoder/`), then its quality bar -> weights/ip_adapter/quality.json.

As the IP-Adapter paper trains it: the UNet, text encoder and image encoder (the toy CLIP's vision tower) stay
frozen; only the image projection and the IP key/value layers learn, with the UNet's own denoising loss on real
ToyCanvas images conditioned on their own image embedding. Half the time the caption is the empty prompt, so the
image alone must carry the object (the bar conditions on an image and the empty prompt); a tenth of the time the
image embedding is zero, the unconditional image of classifier-free guidance.

That loss alone moved too slowly for a CPU budget (after 250 steps of batch 16 the image changed the prediction at
high noise, where the silhouette is drawn, by under 1%, and generations followed the image's object at chance), so
a first phase (`ip-adapter-init`, seconds) fits the image projection to read an image as its caption: its four
tokens regress onto the text encoder's states of the caption's object word, style word, "image" and end token.
With IP keys/values starting as copies of the text ones, the adapter then attends to an image as to its caption
from the first denoising step, and the second phase refines that with the denoising loss plus a distillation term
(`ip_adapter_distill`): on the same noisy latent, the prediction with the image (and the empty caption) is pulled
toward the frozen text-only model's prediction for the image's caption, a target without the denoising loss's
noise, so a few hundred CPU steps suffice.

(The first adapters were measured through a generation bug, not an adapter one: diffusers' SD pipeline repeats one
image prompt for the whole batch, so each generation attended to every image of its batch; see
`erasers.ip_adapter.generate_with_images`.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from erasers.files import atomic_dir, publish
from erasers.train import ParameterState, TrainingLoop

from ..render import make_dataset, sample_image
from ..world import OBJECTS, STYLES, caption
from .config import BuildConfig
from .export import declare_float32, noise_scheduler

IP_QUALITY_BAR = 0.80
# The uninformative caption the bar is measured with; "A object image in Flat style." is measured beside it.
UNINFORMATIVE_CAPTIONS = ("", "A object image in Flat style.")


def stage_ip_adapter(cfg: BuildConfig) -> None:
    from diffusers.training_utils import compute_snr
    from transformers import CLIPVisionModelWithProjection

    from erasers import ip_adapter
    from erasers.models import load_pipeline

    final = Path(cfg.weights_dir) / "ip_adapter"
    if not (final / ip_adapter.WEIGHT_NAME).exists():
        torch.manual_seed(cfg.seed)
        loaded = load_pipeline(str(Path(cfg.weights_dir) / "pipeline"), device="cpu")
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(Path(cfg.weights_dir) / "clip",
                                                                      dtype=torch.float32).eval()
        ip_adapter.add_ip_adapter(loaded, image_encoder, seed=cfg.seed)
        unet = loaded.denoiser
        unet.requires_grad_(False)
        parameters = ip_adapter.ip_adapter_parameters(unet)
        for parameter in parameters:
            parameter.requires_grad_(True)

        mean, embeds, captions = _encoded_data(cfg, loaded)
        with torch.no_grad():
            caption_states = loaded.encode_text(sorted(set(captions)) + [""]).states  # SD: token states
        caption_row = {text: i for i, text in enumerate(sorted(set(captions)))}
        caption_index = torch.tensor([caption_row[c] for c in captions])
        empty_index = len(caption_row)
        _read_images_as_captions(cfg, loaded, embeds, caption_index, caption_states, sorted(caption_row))
        scheduler = noise_scheduler()
        optimizer = torch.optim.AdamW(parameters, lr=cfg.ip_adapter_lr, weight_decay=1e-2)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.ip_adapter_lr,
                                                       total_steps=cfg.ip_adapter_steps, pct_start=0.05)
        unet.train()

        def step(_, generator):
            idx = torch.randint(len(mean), (cfg.ip_adapter_batch,), generator=generator)
            draw = torch.rand(cfg.ip_adapter_batch, generator=generator)
            with_image = draw < 0.9
            shown = torch.where(draw < 0.5, empty_index, caption_index[idx])
            image = embeds[idx] * with_image[:, None]
            noise = torch.randn(mean[idx].shape, generator=generator)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.ip_adapter_batch,),
                                      generator=generator)
            noisy = scheduler.add_noise(mean[idx], noise, timesteps)
            prediction = ip_adapter.predict_noise_with_images(unet, noisy, timesteps, caption_states[shown], image)
            snr = compute_snr(scheduler, timesteps)
            weight = torch.clamp(snr, max=5.0) / snr
            loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
            if cfg.ip_adapter_distill:
                # The frozen text-conditioned model's prediction for the image's own caption, on the same x_t
                # (image embedding zero: the uncond tokens; an image with the empty caption must say what the
                # caption says, one without image must keep what the text alone says).
                with torch.no_grad():
                    teacher = _text_only_prediction(loaded, noisy, timesteps,
                                                    caption_states[torch.where(with_image, caption_index[idx], shown)])
                loss = loss + cfg.ip_adapter_distill * (
                    F.mse_loss(prediction, teacher, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            return {"loss": loss.item()}

        state = {"params": ParameterState(parameters), "opt": optimizer, "sched": schedule}
        TrainingLoop("ip-adapter", cfg.ip_adapter_steps, state, cfg.seed, cfg.build_dir,
                     cfg.checkpoint_every).run(step)
        unet.eval()
        tmp = atomic_dir(final)
        ip_adapter.save_ip_adapter(unet, image_encoder, tmp)
        declare_float32(tmp / "image_encoder" / "config.json")
        publish(tmp, final)
    figures = measure_ip_adapter(Path(cfg.weights_dir))
    (final / "quality.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps({k: v for k, v in figures.items() if k != "per_object"}, indent=2))


def _text_only_prediction(loaded, latents, timesteps, states):
    """The UNet's prediction with the IP attention switched off (scale 0): the text-only model it was trained as."""
    from erasers import ip_adapter

    loaded.pipeline.set_ip_adapter_scale(0.0)
    try:
        no_image = latents.new_zeros(len(latents), loaded.pipeline.image_encoder.config.projection_dim)
        return ip_adapter.predict_noise_with_images(loaded.denoiser, latents, timesteps, states, no_image)
    finally:
        loaded.pipeline.set_ip_adapter_scale(1.0)


def _read_images_as_captions(cfg: BuildConfig, loaded, embeds, caption_index, caption_states, captions) -> None:
    """Phase 1: the image projection's four tokens regress onto the caption's object, style, "image" and
    end-of-text states."""
    tokenizer = loaded.tokenizer
    positions = []
    for text in captions:
        ids = tokenizer(text).input_ids
        object_name, style = text[2:text.index(" image in ")], text[text.index(" image in ") + 10:-len(" style.")]
        positions.append([_last_position(ids, tokenizer(" " + word, add_special_tokens=False).input_ids)
                          for word in (object_name, style, "image")] + [ids.index(tokenizer.eos_token_id)])
    rows = torch.arange(len(captions))[:, None]
    targets = caption_states[:len(captions)][rows, torch.tensor(positions)]
    projection = loaded.denoiser.encoder_hid_proj.image_projection_layers[0]
    optimizer = torch.optim.AdamW(projection.parameters(), lr=3e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=cfg.ip_adapter_init_steps,
                                                   pct_start=0.05)

    def step(_, generator):
        idx = torch.randint(len(embeds), (256,), generator=generator)
        loss = F.mse_loss(projection(embeds[idx]), targets[caption_index[idx]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        return {"loss": loss.item()}

    TrainingLoop("ip-adapter-init", cfg.ip_adapter_init_steps,
                 {"projection": projection, "opt": optimizer, "sched": schedule}, cfg.seed, cfg.build_dir,
                 cfg.checkpoint_every).run(step)


def _last_position(ids: list[int], piece: list[int]) -> int:
    for start in range(len(ids) - len(piece), -1, -1):
        if ids[start:start + len(piece)] == piece:
            return start + len(piece) - 1
    raise ValueError(f"token piece {piece} not in {ids}")


def _encoded_data(cfg: BuildConfig, loaded):
    """Latents, image embeddings and captions of freshly rendered images, cached in the build directory."""
    from erasers import ip_adapter

    cache = Path(cfg.build_dir) / "ip_adapter_data.pt"
    if cache.exists():
        saved = torch.load(cache)
        return saved["latents"], saved["embeds"], saved["captions"]
    images, objects, styles = make_dataset(cfg.ip_adapter_images, cfg.seed + 3)
    captions = [caption(OBJECTS[o], STYLES[s]) for o, s in zip(objects, styles)]
    vae = loaded.pipeline.vae
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        latents = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mean for chunk in tqdm(
            pixels.split(500), desc="encoding latents")]) * vae.config.scaling_factor
        embeds = torch.cat([ip_adapter.encode_images(loaded, list(chunk)) for chunk in tqdm(
            np.array_split(images, max(1, len(images) // 500)), desc="encoding images")])
    Path(cfg.build_dir).mkdir(parents=True, exist_ok=True)
    torch.save({"latents": latents, "embeds": embeds, "captions": captions}, cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").replace(cache)
    return latents, embeds, captions


def conditioning_images(count_per_object: int, seed: int = 10_000):
    """Real ToyCanvas images of every object, random style/colour/pose: (object names, PIL images)."""
    names, images = [], []
    for o, name in enumerate(OBJECTS):
        for i in range(count_per_object):
            names.append(name)
            images.append(sample_image(name, None, seed + 1000 * o + i)[0])
    return names, images


def measure_ip_adapter(weights_dir: Path, count_per_object: int = 5, seeds=(0, 1)) -> dict:
    """Share of generations, conditioned on an image of object X and an uninformative caption, that the toy
    classifier reads as X; all 10 objects, `count_per_object` images each, every image at every seed."""
    from erasers import ip_adapter
    from erasers.models import load_pipeline

    from ..classifier import ToyClassifier

    loaded = load_pipeline(str(weights_dir / "pipeline"), device="cpu")
    ip_adapter.load_ip_adapter(loaded, weights_dir / "ip_adapter")
    classifier = ToyClassifier.from_pretrained(weights_dir / "classifier")
    names, images = conditioning_images(count_per_object)
    embeds = ip_adapter.encode_images(loaded, images)
    figures = {"bar": IP_QUALITY_BAR, "images_per_object": count_per_object, "seeds": list(seeds),
               "sampling": {"num_inference_steps": loaded.default_steps, "guidance_scale": loaded.default_guidance},
               "object_accuracy": {}, "per_object": {}}
    for text in UNINFORMATIVE_CAPTIONS:
        truth, predicted = [], []
        for seed in seeds:
            generated = ip_adapter.generate_with_images(loaded, [text] * len(images), embeds,
                                                        [seed * 100_000 + i for i in range(len(images))])
            predicted += classifier.predict(generated)[0]
            truth += names
        figures["object_accuracy"][repr(text)] = float(np.mean([p == t for p, t in zip(predicted, truth)]))
        figures["per_object"][repr(text)] = {o: float(np.mean([p == t for p, t in zip(predicted, truth) if t == o]))
                                             for o in OBJECTS}
    figures["met"] = figures["object_accuracy"][repr(UNINFORMATIVE_CAPTIONS[0])] >= IP_QUALITY_BAR
    return figures
