"""SalUn: Saliency Unlearning (Fan et al., ICLR 2024), its diffusion part.

Unlearning restricted to the weights that matter for the concept:
  saliency   one pass over the forget set (images of the concept the base model draws, noised at random
             timesteps) accumulates the gradient of the forgetting loss
                 L_f = || eps - ((1 + w) eps_theta(x_t, c_f) - w eps_theta(x_t, "")) ||^2      (w = 7.5)
             the guided prediction's denoising error on the concept's images. The mask keeps the weights whose
             summed |gradient| is among the top `saliency_share` (50%) of all trained weights; the others are
             never changed: their gradients are masked to zero, so Adam's update of them is exactly zero and they
             stay bit-identical (decoupled weight decay, as AdamW's, is applied to the salient weights only).
  forgetting random labelling: on the same noised forget latents the model's prediction for the concept's prompt
             is pulled to its own (stop-gradient) prediction for another concept's prompt c',
                 L_forget = || eps_theta(x_t, c_f) - sg eps_theta(x_t, c') ||^2
             c' on ToyCanvas: the prompt with the concept replaced by another object (style) of the vocabulary,
             drawn at random per example; elsewhere --anchor TEXT or the supercategory prompt.
  retention  plus alpha times the plain denoising loss on retain data: images the base model draws for the retain
             prompts (the vocabulary's other captions, --preserve, or COCO objects).
Trained for `epochs` passes over the forget set. Saliency share and threshold are the first record of the
eraser's history (and cached with the mask in OUT.partial/, so a resumed run trains the same weights).

On Flux (not in the paper) the same losses act on flow-matching velocity: eps above is the adapter's prediction
target (noise - x_0), the unconditional branch is the adapter's, and x_t = (1 - sigma) x_0 + sigma noise.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..anchors import anchor_prompts, draw_anchor_latents, noised
from ..errors import UsageError
from ..files import save_atomically, work_file
from ..losses import predict_noise
from ..models import LoadedPipeline
from ..parameters import trainable_parameters
from ..precision import build_optimizer, finish, train_only
from ..prompts import EraseRequest, default_retain_prompts
from ..registry import Eraser, register
from ..train import ParameterState, TrainingLoop, masked_update

PARAMETER_SETS = ("full", "xattn", "noxattn")
TARGETS = ("other", "supercategory", "empty")


@dataclass
class SalUnConfig:
    """Defaults are the reference code's for SD 1.4 objects (lr 1e-5, batch 8, 5 epochs, alpha 0.1; for nudity
    1 epoch and --anchor "a photo of a person wearing clothes"), with AdamW's decoupled decay 1e-2."""

    parameters: str = "full"           # the weights the mask is drawn from and trained: full, xattn or noxattn
    # share of the trained weights the mask keeps (top |gradient|)
    saliency_share: float = field(default=0.5, metadata={"min": 0, "max": 1, "min_exclusive": True})
    mask_guidance: float = field(default=7.5, metadata={"min": 0})  # w of the loss the saliency is taken from
    # "other": another concept of the vocabulary per example (random labelling; off the toy the supercategory);
    # "supercategory": the prompt with the concept replaced by its supercategory word; "empty": "".
    # --anchor TEXT replaces all three off the vocabulary.
    target: str = "other"
    # weight of the retain denoising loss (the reference code's; the paper 1, per its maintainer; its README 0.5)
    alpha: float = field(default=0.1, metadata={"min": 0})
    lr: float = 1e-5
    weight_decay: float = 0.01
    batch_size: int = 8
    epochs: int = 5
    # > 0: this many steps instead of epochs x ceil(forget_images / batch_size) (the benchmarks' short runs)
    iterations: int = field(default=0, metadata={"min": 0})
    forget_images: int = 256           # images the base model draws per concept (spread over its prompts)
    retain_images: int = 256
    sample_steps: int = 50             # their sampling steps and guidance
    sample_guidance: float = 7.5
    seed: int = 0

    def __post_init__(self):
        # Checked when the config is built, before the pipeline loads or OUT.partial/ is made.
        if self.parameters not in PARAMETER_SETS:
            raise UsageError(f"salun parameters must be one of {', '.join(PARAMETER_SETS)}, not {self.parameters!r}")
        if self.target not in TARGETS:
            raise UsageError(f"salun target must be one of {', '.join(TARGETS)}, not {self.target!r}; for another "
                             "target text pass --anchor TEXT")


def kth_largest(scores: list[torch.Tensor], k: int) -> float:
    """The k-th largest of all entries of non-negative float tensors, exactly, without concatenating them (SDXL's
    UNet has 2.6e9 weights): non-negative floats order as their bit patterns do, so a bisection over the 31-bit
    patterns on the count of entries at or above each candidate finds it in 31 passes."""
    low, high = 0, 0x7F800000  # +0.0 and +inf
    while low < high:
        middle = (low + high + 1) // 2
        value = struct.unpack("<f", struct.pack("<I", middle))[0]
        if int(sum((score >= value).sum() for score in scores)) >= k:  # one device sync per pass
            low = middle
        else:
            high = middle - 1
    return struct.unpack("<f", struct.pack("<I", low))[0]


def saliency_mask(gradients: list[torch.Tensor], share: float) -> tuple[list[torch.Tensor], float, float]:
    """Boolean masks of the weights whose |gradient| is among the top `share` of all, the threshold (the smallest
    kept |gradient|) and the share actually kept (ties at the threshold are kept; weights without any gradient
    never are)."""
    scores = [gradient.abs().float() for gradient in gradients]
    total = sum(score.numel() for score in scores)
    threshold = kth_largest(scores, max(1, math.ceil(share * total)))
    masks = [(score >= threshold) & (score > 0) for score in scores]
    return masks, threshold, sum(int(mask.sum()) for mask in masks) / total


def concept_targets(request: EraseRequest, prompts: list[str], target: str) -> list[list[str]]:
    """For each forget prompt, the prompts c' its prediction may be pulled to (one is drawn per example)."""
    vocabulary = request.vocabulary
    if target == "other" and vocabulary is not None and not request.anchors:
        pool = vocabulary.styles if request.kind == "style" else vocabulary.objects
        erased = {concept.lower() for concept in request.concepts}
        others = [name for name in pool if name.lower() not in erased]
        return [[request.neutral_prompts([prompt], other)[0] for other in others] for prompt in prompts]
    return [[anchor] for anchor in anchor_prompts(request, prompts, "empty" if target == "empty" else "supercategory")]


def forgetting_gradients(loaded: LoadedPipeline, parameters: list[torch.nn.Parameter], images: torch.Tensor,
                         states, cfg: SalUnConfig) -> list[torch.Tensor]:
    """The gradient of the guided denoising loss L_f summed over the forget set (`images`, with their prompts'
    `states`), in batches, one pass, as the saliency is taken from it."""
    unet, w = loaded.denoiser, cfg.mask_guidance
    empty = loaded.adapter.unconditional()
    generator = torch.Generator().manual_seed(cfg.seed)
    for start in range(0, len(images), cfg.batch_size):
        x_t, t, target = noised(loaded, images[start:start + cfg.batch_size], generator)
        cond = states[start:start + cfg.batch_size]
        guided = (1 + w) * predict_noise(unet, x_t, t, cond) - w * predict_noise(unet, x_t, t, empty.expand(len(x_t)))
        F.mse_loss(guided.float(), target.float()).backward()
    gradients = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
    for parameter in parameters:
        parameter.grad = None
    return gradients


def cached_mask(loaded: LoadedPipeline, parameters, images, states, cfg: SalUnConfig, cache: Path | None):
    """The saliency mask, its threshold and share: read from `cache` when a run made it before (a resumed run's
    weights are no longer the base model's it was taken from), else computed and saved there."""
    from safetensors.torch import load_file, safe_open, save_file

    if cache is not None and cache.exists():
        with safe_open(str(cache), "pt") as saved:
            info = saved.metadata()
        masks = load_file(cache)
        return ([masks[str(i)].to(p.device, torch.bool) for i, p in enumerate(parameters)],
                float(info["threshold"]), float(info["share"]))
    masks, threshold, share = saliency_mask(forgetting_gradients(loaded, parameters, images, states, cfg),
                                            cfg.saliency_share)
    if cache is not None:
        tensors = {str(i): mask.to(torch.uint8).cpu().contiguous() for i, mask in enumerate(masks)}
        metadata = {"threshold": repr(threshold), "share": repr(share)}
        save_atomically(cache, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return masks, threshold, share


# Toy defaults, measured on ToyCanvas (benchmarks/results/NOTES.md, SalUn, has every tuning run).
TOY_DEFAULTS = {"lr": 1.5e-4, "alpha": 0.5, "epochs": 40, "forget_images": 40, "retain_images": 40,
                "sample_steps": 25, "sample_guidance": 5.0}


@register("salun", "SalUn: fine-tune only the weights salient to the concept, toward another concept's prediction",
          toy_defaults=TOY_DEFAULTS,
          quick={"forget_images": 4, "retain_images": 4, "batch_size": 2, "epochs": 2, "sample_steps": 2,
                 "lr": 1e-3},
          step_cost_models=("toy", "sd15"), reads_anchors=True, reads_preserve=True,
          multi_concept="one loss over all: one saliency mask and one forget set for all")
class SalUn(Eraser):
    config_class = SalUnConfig

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        cfg = self.config
        torch.manual_seed(cfg.seed)
        unet = loaded.denoiser
        parameters = train_only(loaded, trainable_parameters(loaded, cfg.parameters), unet)

        prompts = request.erase_prompts()
        targets = concept_targets(request, prompts, cfg.target)
        choices = len(targets[0])
        retained = request.retain_prompts() or default_retain_prompts(request)
        with torch.no_grad():
            forget_states = loaded.encode_text(prompts)
            target_states = loaded.encode_text([text for row in targets for text in row])  # row k: prompt k's
            retain_states = loaded.encode_text(retained)

        forget, forget_prompt = draw_anchor_latents(loaded, prompts, cfg.forget_images,
                                                    cfg.sample_steps, cfg.sample_guidance, cfg.seed,
                                                    work_file(work_dir, "forget_latents.safetensors"),
                                                    concepts=len(request.concepts))
        retain, retain_prompt = draw_anchor_latents(loaded, retained, cfg.retain_images, cfg.sample_steps,
                                                    cfg.sample_guidance, cfg.seed + cfg.forget_images,
                                                    work_file(work_dir, "retain_latents.safetensors"))
        masks, threshold, share = cached_mask(loaded, parameters, forget, forget_states[forget_prompt], cfg,
                                              work_file(work_dir, "saliency_mask.safetensors"))
        self.mask_threshold, self.mask_share = threshold, share
        optimizer = build_optimizer(loaded, parameters, cfg.lr)
        decay = 1 - cfg.lr * cfg.weight_decay
        steps_per_epoch = math.ceil(len(forget) / cfg.batch_size)

        def step(i, generator):
            epoch, position = divmod(i, steps_per_epoch)
            order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            picked = order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
            k = forget_prompt[picked]
            x_t, t, _ = noised(loaded, forget[picked], generator)
            pseudo = k * choices + torch.randint(choices, (len(picked),), generator=generator)
            with torch.no_grad():
                target = predict_noise(unet, x_t, t, target_states[pseudo])
            forget_loss = F.mse_loss(predict_noise(unet, x_t, t, forget_states[k]).float(), target.float())
            r = torch.randint(len(retain), (cfg.batch_size,), generator=generator)
            x_r, t_r, target_r = noised(loaded, retain[r], generator)
            retain_loss = F.mse_loss(predict_noise(unet, x_r, t_r, retain_states[retain_prompt[r]]).float(),
                                     target_r.float())
            optimizer.zero_grad(set_to_none=True)
            (forget_loss + cfg.alpha * retain_loss).backward()
            masked_update(parameters, masks, decay)
            optimizer.step()
            return {"loss": forget_loss.item(), "retain": retain_loss.item()}

        unet.train()
        steps = cfg.iterations or cfg.epochs * steps_per_epoch
        loop = TrainingLoop("salun", steps, {"params": ParameterState(parameters), "opt": optimizer}, cfg.seed,
                            work_dir, checkpoint_every=50)
        self.history = loop.run(step) or [{"step": loop.start, "seconds": 0.0}]
        self.history[0].update(mask_share=share, mask_threshold=threshold)
        return {loaded.family.denoiser: finish(loaded, unet.eval())}
