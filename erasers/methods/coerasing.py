"""Co-Erasing: erasing a concept with text and images together (Li et al., 2025; Ferry-Li/Co-Erasing).

Text-only erasers leave the concept reachable through other routes into the same knowledge (paraphrases,
adversarial prompts): Co-Erasing erases it from both modalities, in two stages on the same UNet weights:

  stage 1  text ESD: the project's ESD negative-guidance loss (erasers/losses.py) on the concept's prompts
  stage 2  the same loss with the concept's *images* as a second condition, through an IP-Adapter (diffusers'
           own image projection and IP attention processors, erasers/ip_adapter.py): conditioned on the concept's
           text and an image of it, the UNet is taught to predict the frozen model's noise guided away from the
           concept, from the neutral prompt with no image
  images   `image_count` generations of the base model for the concept's prompts (seeded, cached in OUT.partial)
           or a user's folder (`--images DIR`)

Text-guided refinement (`refine`, this suite's choice): an image of the concept also shows a colour, a background
and a style, and stage 2 would erase those with it. The refinement keeps the part of each image embedding that
the concept's text explains, in CLIP's joint image-text space: the concept direction d is the mean normalised
text embedding of the concept's prompts minus that of the same prompts with the concept replaced by its
supercategory word ("A arrow image in Stripes style." - "A object image in Stripes style."), so whatever the
prompts share (the style, the template) cancels. Each image embedding e = (e.d) d + e_perp becomes
(e.d) d + (1 - refine_strength) e_perp, rescaled to |e|: the concept component stays, the rest (what the image
shows besides the concept) shrinks. A projection was chosen over optimising the embedding against a CLIP
similarity objective because it is closed-form, deterministic and cannot overshoot into an embedding the
IP-Adapter never saw. It needs a CLIP text tower in the image encoder's space (`refine_clip`: on the toy model
the toy CLIP; for the published SD 1.5 and SDXL ViT-H IP-Adapters, the ViT-H/14 CLIP their image encoder comes
from; for Flux's XLabs adapter, CLIP ViT-L/14).

On Flux (not in the paper) both stages are ESD's loss on the transformer's velocity, the image condition goes in
through the XLabs IP-Adapter (diffusers' FluxIPAdapterMixin: IP keys/values in each joint block), the blur acts on
the unpacked latent image, and the default parameters are ESD-u's there (image stream and single blocks).

Trained: the UNet outside cross-attention (`parameters`, as ESD's; the paper's "non-cross-attention"). The
IP-Adapter is frozen and not part of the edit: the edit is the denoiser (`unet/`, Flux `transformer/`) and
`erasure.json`, like ESD's, and loads into the plain pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError, first_line
from ..files import work_file
from ..images import IMAGES_REMEDY, image_files, open_image, read_images
from ..losses import FrozenOriginal, check_contrast, contrast_states, esd_target, predict_noise, sample_partially
from ..models import LoadedPipeline
from ..parameters import PARAMETER_SETS, trainable_parameters
from ..precision import build_optimizer, finish, train_only
from ..prompts import EraseRequest
from ..registry import Eraser, register
from ..train import ParameterState, TrainingLoop


@dataclass
class CoErasingConfig:
    parameters: str = "noxattn"
    text_iterations: int = 1000         # stage 1
    image_iterations: int = 1000        # stage 2 (the paper: 1000-1500 iterations)
    lr: float = 1e-5
    eta: float = 1.0                    # the paper's: target = eps(neutral) - eta * (eps(concept) - eps(neutral))
    ddim_steps: int = 50
    sample_guidance: float = 3.0
    contrast: str = "empty"             # as ESD's: "empty" or "neutral" (losses.CONTRASTS)
    latent_blur: int = 3                # Gaussian blur kernel on x_t in stage 2 (the paper: 3-5; 0: none)
    image_count: int = 100              # generated concept images (the paper: 100-200)
    images: str = ""                    # a folder of the concept's images instead of generating them
    refine: bool = True
    refine_strength: float = 0.8        # how much of what the text does not explain is removed (0..1)
    # An IP-Adapter in the published layout (a folder or hub id: the weight file, image_encoder/), by default the
    # family's published one (erasers.ip_adapter.PUBLISHED: SD 1.x/2.x h94/IP-Adapter models/ip-adapter_sd15; SDXL
    # its sdxl_models/ip-adapter_sdxl_vit-h, the same ViT-H image encoder; Flux XLabs-AI/flux-ip-adapter with
    # CLIP ViT-L/14), and the CLIP text tower in its image encoder's space for the refinement (default: the one
    # that published adapter's image encoder comes from).
    refine_clip: str = ""
    ip_adapter: str = ""
    ip_adapter_subfolder: str = ""
    ip_adapter_weight: str = ""                     # default ip-adapter.safetensors in ip_adapter_subfolder
    seed: int = 0

    def __post_init__(self):
        if self.parameters not in PARAMETER_SETS or self.parameters == "text_encoder":
            raise UsageError(f"coerasing parameters must be one of xattn, xattn-strict, noxattn, full, not "
                             f"{self.parameters!r}")
        check_contrast("coerasing", self.contrast)
        if not 0.0 <= self.refine_strength <= 1.0:
            raise UsageError(f"coerasing refine_strength must be between 0 and 1, not {self.refine_strength}")
        if self.latent_blur and self.latent_blur % 2 == 0:
            raise UsageError(f"coerasing latent_blur must be an odd kernel size (3, 5) or 0, not {self.latent_blur}")
        if self.images:  # every file's header now: a damaged image or a decompression bomb fails before the model loads
            for file in image_files(self.images):
                open_image(file, IMAGES_REMEDY, header_only=True)


def concept_images(loaded: LoadedPipeline, request: EraseRequest, cfg: CoErasingConfig, work_dir: Path | None):
    """The user's images, or `image_count` generations of the base model for the concept's prompts, cached in
    `work_dir/images` so a resumed run reuses them (image i: prompt i mod len(prompts), seed seed * 10^6 + i)."""
    if cfg.images:
        return read_images(image_files(cfg.images))
    cache = work_file(work_dir, "images")
    if cache is not None and len(list(cache.glob("*.png"))) == cfg.image_count:
        return read_images(sorted(cache.glob("*.png")))
    prompts = request.erase_prompts()
    chosen = [prompts[i % len(prompts)] for i in range(cfg.image_count)]
    # Outside the erase's autocast, with the base weights still in one dtype: the pipeline keeps its own precision
    # rules, and SDXL's fp16 VAE decodes upcast (force_upcast), which fp16 autocast would undo.
    with torch.autocast(torch.device(loaded.device).type, enabled=False):
        images = loaded.generate(chosen, seeds=[cfg.seed * 1_000_000 + i for i in range(cfg.image_count)],
                                 height=loaded.resolution, width=loaded.resolution)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(cache / f"{i:04d}.png")
    return images


@torch.no_grad()
def concept_direction(text_model, tokenizer, request: EraseRequest, prompts: list[str]) -> torch.Tensor:
    """Unit vector in CLIP's joint space from the supercategory prompts to the concept's prompts."""
    def embed(texts):
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(text_model.device)
        return F.normalize(text_model(**tokens).text_embeds.float(), dim=-1).mean(0)

    return F.normalize(embed(prompts) - embed(request.neutral_prompts(prompts)), dim=0)


def refine_embeddings(embeds: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """Keep each embedding's component along the concept direction, shrink the rest by `strength`, keep norms."""
    along = (embeds.float() @ direction)[:, None] * direction
    refined = along + (1.0 - strength) * (embeds.float() - along)
    refined = refined * embeds.float().norm(dim=-1, keepdim=True) / refined.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return refined.to(embeds.dtype)


def _refine_clip_error(source: str, error: BaseException) -> UsageError:
    return UsageError(f"could not load the CLIP text tower for the refinement from {source}: "
                      f"{first_line(error)}; pass --set refine_clip=PATH (a CLIP in the IP-Adapter image "
                      "encoder's space) or --set refine=false")


def check_refine_clip(source: str, image_dim: int) -> None:
    """That the refinement CLIP's config can be read and projects to the image encoder's `image_dim`."""
    from transformers import CLIPTextConfig

    try:
        projection_dim = CLIPTextConfig.from_pretrained(source).projection_dim
    except Exception as error:  # noqa: BLE001 - one clear line for a missing or wrong model
        raise _refine_clip_error(source, error) from None
    if projection_dim != image_dim:
        raise UsageError(f"the refinement CLIP {source} projects to {projection_dim} dimensions, the IP-Adapter's "
                         f"image encoder to {image_dim}: pass the CLIP that image encoder comes from")


def load_refine_clip(source: str, loaded: LoadedPipeline):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    try:
        model = CLIPTextModelWithProjection.from_pretrained(source).to(loaded.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - one clear line for a missing or wrong model
        raise _refine_clip_error(source, error) from None
    return model, tokenizer


def _companion_path(loaded: LoadedPipeline, value: str, name: str) -> str:
    """"toy": the companion of that name that the toy pipeline ships beside it; anything else as given."""
    return str(loaded.companion(name)) if value == "toy" else value


# Toy defaults measured on ToyCanvas (benchmarks/method_table.py; benchmarks/results/NOTES.md).
@register("coerasing", "Co-Erasing: ESD with text, then with the concept's images through an IP-Adapter",
          toy_defaults={"parameters": "xattn", "lr": 3e-4, "text_iterations": 200,
                        "image_iterations": 100, "ddim_steps": 10, "contrast": "neutral", "image_count": 100,
                        "refine_clip": "toy", "ip_adapter": "toy", "ip_adapter_subfolder": "",
                        "ip_adapter_weight": "ip-adapter.safetensors"},
          quick={"parameters": "xattn", "text_iterations": 4, "image_iterations": 4, "ddim_steps": 4,
                 "image_count": 2, "lr": 1e-3},
          needs=("ip_adapter",), variants={"norefine": {"refine": False}},
          multi_concept="one loss over all: text and image steps draw any concept's prompt and images")
class CoErasing(Eraser):
    config_class = CoErasingConfig

    def resources(self, loaded: LoadedPipeline) -> tuple[dict, str]:
        """The IP-Adapter's `load_ip_adapter` arguments (source included) and the refinement CLIP, by the config."""
        from .. import ip_adapter

        cfg = self.config
        files = ip_adapter.adapter_files(_companion_path(loaded, cfg.ip_adapter, "ip_adapter"), loaded.family.name,
                                         cfg.ip_adapter_subfolder, cfg.ip_adapter_weight)
        refine_clip = _companion_path(loaded, cfg.refine_clip or ip_adapter.PUBLISHED[loaded.family.name].text_clip,
                                      "refine_clip")
        return files, refine_clip

    def check(self, loaded: LoadedPipeline, request: EraseRequest) -> None:
        self._check_resources(*self.resources(loaded))

    def _check_resources(self, files: dict, refine_clip: str) -> None:
        """The IP-Adapter and the refinement CLIP are first needed after stage 1 (1000 steps by default): a missing
        or mismatched one fails before it."""
        from .. import ip_adapter

        image_dim = ip_adapter.check_ip_adapter(**files)
        if self.config.refine:
            check_refine_clip(refine_clip, image_dim)

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        from .. import ip_adapter

        cfg = self.config
        files, refine_clip = self.resources(loaded)
        self._check_resources(files, refine_clip)  # also when called directly, not through erasers.run.erase
        torch.manual_seed(cfg.seed)
        images = concept_images(loaded, request, cfg, work_dir)  # from the base model, before any training
        unet = loaded.denoiser
        parameters = train_only(loaded, trainable_parameters(loaded, cfg.parameters), unet)
        # Called with the adapter loaded (stage 2), it is the adapted UNet with the original weights.
        teacher = FrozenOriginal(unet, parameters)
        prompts = request.erase_prompts()
        with torch.no_grad():
            empty = loaded.adapter.unconditional()
            concept_states = loaded.encode_text(prompts)
            contrasts = contrast_states(loaded, request, prompts, cfg.contrast)
        optimizer = build_optimizer(loaded, parameters, cfg.lr)
        state = {"params": ParameterState(parameters), "opt": optimizer}

        def esd_step(generator, student, teacher_call, student_call, blur=0):
            k = int(torch.randint(len(prompts), (1,), generator=generator))
            stop = int(torch.randint(1, cfg.ddim_steps - 1, (1,), generator=generator))
            with torch.no_grad():
                x_t, t = sample_partially(loaded, student, concept_states[k:k + 1], empty, stop, cfg.ddim_steps,
                                          cfg.sample_guidance, generator)
                x_t = loaded.adapter.on_latent_image(x_t, lambda latents: _blur(latents, blur))
                eps_contrast = teacher_call(x_t, t, contrasts[k:k + 1], None)
                eps_concept = teacher_call(x_t, t, concept_states[k:k + 1], "image")
                target = esd_target(eps_contrast, eps_concept, eps_contrast, cfg.eta)
            loss = F.mse_loss(student_call(x_t, t, concept_states[k:k + 1]), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        # Stage 1: text ESD, on the plain UNet.
        unet.train()
        self.text_history = TrainingLoop("coerasing-text", cfg.text_iterations, state, cfg.seed, work_dir,
                                    checkpoint_every=50).run(
            lambda _, generator: esd_step(generator, unet, lambda x, t, s, _image: predict_noise(teacher, x, t, s),
                                          lambda x, t, s: predict_noise(unet, x, t, s)))

        # Stage 2: the same loss with the concept's images through the (frozen) IP-Adapter.
        ip_adapter.load_ip_adapter(loaded, **files)
        embeds = ip_adapter.encode_images(loaded, images)
        if cfg.refine:
            clip_model, clip_tokenizer = load_refine_clip(refine_clip, loaded)
            direction = concept_direction(clip_model, clip_tokenizer, request, prompts).to(embeds.device)
            embeds = refine_embeddings(embeds, direction, cfg.refine_strength)
            del clip_model
        self.image_embeds = embeds.detach()
        for parameter in ip_adapter.ip_adapter_parameters(unet):
            parameter.requires_grad_(False)
        zero = torch.zeros_like(embeds[:1])

        def image_step(_, generator):
            image = embeds[int(torch.randint(len(embeds), (1,), generator=generator))][None]
            return esd_step(
                generator, ip_adapter.WithImages(unet, image, loaded.adapter, guided=loaded.adapter.batch_guidance),
                lambda x, t, s, which: ip_adapter.predict_noise_with_images(teacher, x, t, s,
                                                                            image if which else zero),
                lambda x, t, s: ip_adapter.predict_noise_with_images(unet, x, t, s, image), cfg.latent_blur)

        # `history` is stage 2's, the step this method adds to ESD's (benchmarks/step_cost.py times it).
        self.history = TrainingLoop("coerasing-image", cfg.image_iterations, state, cfg.seed + 1, work_dir,
                                     checkpoint_every=50).run(image_step)
        loaded.pipeline.unload_ip_adapter()
        return {loaded.family.denoiser: finish(loaded, unet.eval())}


def _blur(latents: torch.Tensor, kernel: int) -> torch.Tensor:
    if not kernel:
        return latents
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(latents, kernel_size=kernel)
