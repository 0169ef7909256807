"""Stage `ip-adapter`: a toy IP-Adapter for the shipped pipeline -> weights/ip_adapter (the published layout:
`ip-adapter.safetensors` and `image_encoder/`), then its quality bar -> weights/ip_adapter/quality.json.

As the IP-Adapter paper trains it: the UNet and text encoder stay frozen; only the image projection and the IP
key/value layers learn, with the UNet's own denoising loss on real ToyCanvas images conditioned on their own image
embedding. Half the time the caption is the empty prompt, so the image alone must carry the object (the bar
conditions on an image and the empty prompt); a tenth of the time the image embedding is zero, the unconditional
image of classifier-free guidance. Three things make that reach the bar in CPU minutes (benchmarks/results/NOTES.md,
"Co-Erasing and the toy IP-Adapter", has the runs):

- The image encoder: the toy CLIP's vision tower names the object of a real image in only 89% of cases (the toy
  classifier: 100%), which caps any adapter. The adapter's copy of it is first trained further against the frozen
  text tower (`ip-adapter-image-encoder`, LiT-style, 1,500 steps): 94%. The text tower is untouched, so the
  toy CLIP still embeds text in the encoder's space (Co-Erasing's refinement relies on it).
- Phase 1 (`ip-adapter-init`, a minute) fits the image projection to read an image as its caption: its 16 tokens
  regress onto the first 16 text-encoder states of the caption (a zero embedding onto the empty caption's). With
  IP keys/values starting as copies of the text ones, the adapter attends to an image as to its caption from the
  first denoising step. The projection is an MLP (diffusers' `IPAdapterFaceIDImageProjection` layout): the
  published linear projection to 4 tokens blurred the object between neighbours, and 4 tokens stand in for a
  caption's states far worse than 16.
- Phase 2 adds a distillation term to the denoising loss (`ip_adapter_distill`): on the same noisy latent, the
  prediction with the image (and the empty caption) is pulled toward the frozen text-only model's prediction for
  the image's caption, a target without the denoising loss's noise, so 800 CPU steps suffice.

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

from erasers.files import save_atomically, writing_into
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

    from erasers import ip_adapter
    from erasers.models import load_pipeline

    final = Path(cfg.weights_dir) / "ip_adapter"
    if not (final / ip_adapter.WEIGHT_NAME).exists():
        torch.manual_seed(cfg.seed)
        loaded = load_pipeline(str(Path(cfg.weights_dir) / "pipeline"), device="cpu")
        image_encoder = _tuned_image_encoder(cfg)
        ip_adapter.add_ip_adapter(loaded, image_encoder, seed=cfg.seed, tokens=cfg.ip_adapter_tokens,
                                  hidden_multiplier=cfg.ip_adapter_hidden_multiplier)
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
        _read_images_as_captions(cfg, loaded, embeds, caption_index, caption_states, empty_index)
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
        with writing_into(final, replace=True) as tmp:  # a rebuild replaces the shipped adapter
            ip_adapter.save_ip_adapter(unet, image_encoder, tmp)
            declare_float32(tmp / "image_encoder" / "config.json")
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


def _read_images_as_captions(cfg: BuildConfig, loaded, embeds, caption_index, caption_states, empty_index) -> None:
    """Phase 1: the image projection's tokens regress onto the first tokens of the caption's text-encoder states
    (those the text-only UNet attends to), and a zero image embedding, the unconditional image of classifier-free
    guidance, onto the empty caption's."""
    tokens = cfg.ip_adapter_tokens
    targets = caption_states[:, :tokens]
    projection = loaded.denoiser.encoder_hid_proj.image_projection_layers[0]
    optimizer = torch.optim.AdamW(projection.parameters(), lr=3e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=cfg.ip_adapter_init_steps,
                                                   pct_start=0.05)

    def step(_, generator):
        idx = torch.randint(len(embeds), (256,), generator=generator)
        blank = torch.rand(256, generator=generator) < 0.1
        shown = torch.where(blank, empty_index, caption_index[idx])
        return _update(F.mse_loss(projection(embeds[idx] * ~blank[:, None]), targets[shown]), optimizer, schedule)

    TrainingLoop("ip-adapter-init", cfg.ip_adapter_init_steps,
                 {"projection": projection, "opt": optimizer, "sched": schedule}, cfg.seed, cfg.build_dir,
                 cfg.checkpoint_every).run(step)


def _update(loss: torch.Tensor, optimizer, schedule) -> dict[str, float]:
    """One optimiser and schedule step on `loss`; the step's log entry."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    return {"loss": loss.item()}


@torch.no_grad()
def _caption_text_features(clip_dir: Path) -> tuple[torch.Tensor, float]:
    """The toy CLIP's unit text embeddings of the 100 captions (train_clip.pair_captions' order) and its logit
    scale: what the encoder fine-tune trains against and the zero-shot accuracy reads with."""
    from transformers import CLIPModel, CLIPTokenizer

    from .train_clip import pair_captions

    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    tokens = CLIPTokenizer.from_pretrained(clip_dir)(pair_captions(), padding="longest", return_tensors="pt")
    text = clip.get_text_features(**tokens)
    return F.normalize(getattr(text, "pooler_output", text), dim=-1), clip.logit_scale.exp().item()


def _tuned_image_encoder(cfg: BuildConfig):
    """The toy CLIP's vision tower trained further against its frozen text tower (LiT, Zhai et al. 2022): the
    contrastive loss of each image against all 100 captions "A {object} image in {style} style.", one image of
    every caption per batch, the CLIP stage's augmentation and logit scale. Kept in the build directory."""
    from diffusers.optimization import get_scheduler
    from transformers import CLIPVisionModelWithProjection

    from .data import augment, to_tensor
    from .train_clip import normalize_for_clip

    out = Path(cfg.build_dir) / "ip_adapter_image_encoder"
    if (out / "config.json").exists():
        return CLIPVisionModelWithProjection.from_pretrained(out, dtype=torch.float32).eval()
    clip_dir = Path(cfg.weights_dir) / "clip"
    encoder = CLIPVisionModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32)
    if not cfg.ip_adapter_encoder_steps:
        return encoder.eval()
    text, scale = _caption_text_features(clip_dir)
    images, objects, styles = make_dataset(cfg.ip_adapter_encoder_images, cfg.seed + 777)
    pixels, labels = to_tensor(images), torch.from_numpy(objects + len(OBJECTS) * styles)  # pair_captions' index
    pairs = len(text)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.ip_adapter_encoder_lr, weight_decay=0.05)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=50, num_training_steps=cfg.ip_adapter_encoder_steps)
    encoder.train()

    def step(_, generator):
        # make_dataset cycles through the pairs, so rows k * pairs + p are all of pair p.
        picked = torch.randint(len(pixels) // pairs, (pairs,), generator=generator) * pairs + torch.arange(pairs)
        embedded = F.normalize(encoder(normalize_for_clip(augment(pixels[picked], generator))).image_embeds, dim=-1)
        return _update(F.cross_entropy(scale * embedded @ text.T, labels[picked]), optimizer, schedule)

    TrainingLoop("ip-adapter-image-encoder", cfg.ip_adapter_encoder_steps,
                 {"encoder": encoder, "opt": optimizer, "sched": schedule}, cfg.seed, cfg.build_dir,
                 cfg.checkpoint_every).run(step)
    encoder.eval()
    with writing_into(out, replace=True) as tmp:  # a build stage: rebuilt in place
        encoder.save_pretrained(tmp)
    return encoder


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
    save_atomically(cache, lambda tmp: torch.save({"latents": latents, "embeds": embeds, "captions": captions}, tmp))
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
    figures["image_encoder_zero_shot_object_accuracy"] = zero_shot_object_accuracy(loaded.pipeline.image_encoder,
                                                                                   weights_dir / "clip")
    return figures


@torch.no_grad()
def zero_shot_object_accuracy(image_encoder, clip_dir: Path, count: int = 1000, seed: int = 4242) -> float:
    """How often the image encoder names the object of a fresh ToyCanvas image: the nearest of the 100 captions
    under the toy CLIP's text tower (the ceiling of what an adapter on this encoder can pass on)."""
    from .data import to_tensor
    from .train_clip import normalize_for_clip

    text, _ = _caption_text_features(clip_dir)
    images, objects, _ = make_dataset(count, seed)
    embedded = image_encoder.float()(normalize_for_clip(to_tensor(images))).image_embeds
    nearest = (F.normalize(embedded, dim=-1) @ text.T).argmax(1) % len(OBJECTS)
    return float((nearest == torch.from_numpy(objects)).float().mean())
