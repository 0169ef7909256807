"""SPM: One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications (Lyu et al.,
CVPR 2024, arXiv 2312.16145), the "concept semi-permeable membrane".

A rank-1 adapter (down/up, alpha 1, up initialised to zero) on every Linear and Conv2d inside the denoiser's
transformer blocks (a UNet's Transformer2DModel: proj_in, attention, feed-forward, proj_out; Flux's joint and single
blocks); the base model stays frozen. Each iteration:
  x_t        fresh noise denoised by the model *with* the adapter (classifier-free guidance 3) for a random number of
             the 30 DDIM steps, conditioned on the target prompt c_tar
  erasure    the adapter's prediction for c_tar is pulled to the frozen model's negative guidance,
                 eps(x_t, c_neu) - eta (eps(x_t, c_pos) - eps(x_t, c_neu)),    c_pos = c_tar, eta 1,
             c_neu the empty prompt (the paper's) or, `contrast=neutral`, the prompt with the concept replaced by its
             supercategory word (erasers.losses.contrast_states, as ESD's)
  anchoring  on 4 latent anchors a, random text embeddings drawn around the target's (each accepted with probability
             1 - cos(c_tar, a) and scaled to U[0.8, 1.2] times the target's norm), the adapter must leave the
             prediction as it was: + 1000 * MSE(eps_spm(x_t, a), sg eps(x_t, a))
The paper trains 3000 iterations at batch 1, lr 1e-4, cosine with 3 restarts after 500 warm-up steps.

The edit is the adapter alone, in diffusers' LoRA format (`adapter/`; erasers/lora_adapters.py): plain diffusers
loads it with `pipe.load_lora_weights(edit + "/adapter", adapter_name="spm")`. `apply_spm`, the registry's loader,
adds "facilitated transport": at generation each adapter is scaled, per prompt, by
    gamma = max(cos(E(prompt), E(concept)), |tokens(prompt) & tokens(concept)| / |tokens(concept)|)
(special tokens excluded, E the CLIP text encoder's pooled end-of-text embedding), so a prompt naming the concept gets
the adapter in full and an unrelated prompt little of it. Several SPM edits stack, each its own adapter and gamma.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

from ..conditioning import Conditioning
from ..edits import ADAPTER
from ..errors import UsageError
from ..lora_adapters import (
    LoraEdit,
    PromptScaling,
    adapters_disabled,
    add_lora,
    has_adapters,
    load_lora,
    read_adapter_info,
    remove_lora,
    transformer_block_modules,
)
from ..losses import check_contrast, contrast_states, esd_target, predict_noise, sample_partially
from ..models import LoadedPipeline
from ..precision import build_optimizer, train_only
from ..prompts import EraseRequest
from ..registry import Eraser, register
from ..train import ParameterState, TrainingLoop
from ..validation import check_lr_schedule


@dataclass
class SPMConfig:
    """Defaults are the paper's (SD 1.4, its released configs)."""

    iterations: int = 3000
    lr: float = 1e-4
    # diffusers' get_scheduler names; the paper's cosine with restarts, 3 cycles, after a linear warm-up.
    lr_schedule: str = "cosine_with_restarts"
    lr_cycles: int = field(default=3, metadata={"min": 1})
    warmup_steps: int = 500
    rank: int = field(default=1, metadata={"min": 1})   # the adapter's rank: SPM's "one-dimensional" is 1
    eta: float = 1.0
    # "empty": c_neu is the empty prompt, as the paper; "neutral": the prompt with the concept replaced by its
    # supercategory word (erasers.losses.CONTRASTS).
    contrast: str = "empty"
    # "concept": the concept's text alone, as the paper; "captions": also, on ToyCanvas, every caption naming it.
    prompts: str = "concept"
    anchor_samples: int = 4            # latent anchors per iteration
    anchor_weight: float = 1000.0      # 0 switches latent anchoring off (the paper's plain "erase" action)
    ddim_steps: int = field(default=30, metadata={"min": 3})  # x_t is drawn after 1..ddim_steps-2 steps
    sample_guidance: float = field(default=3.0, metadata={"min": 0})
    seed: int = 0

    def __post_init__(self):
        # Checked when the config is built, before the pipeline loads or OUT.partial/ is made.
        check_lr_schedule("spm", self.lr_schedule)
        if self.prompts not in ("captions", "concept"):
            raise UsageError(f"spm prompts must be captions or concept, not {self.prompts!r}")
        check_contrast("spm", self.contrast)


def latent_anchors(target: Conditioning, count: int, generator: torch.Generator) -> Conditioning:
    """`count` random conditionings around `target` (one row), each part (token states; the pooled embedding on
    SDXL and Flux) drawn apart: a Gaussian direction, accepted with probability 1 - cos(target, direction) (random
    directions are nearly orthogonal to it in these dimensions, so nearly all are), scaled to U[0.8, 1.2] times the
    target's norm. SPM's latent anchoring keeps the adapter's predictions for them unchanged."""
    parts = []
    for tensor in target.parts():
        flat = tensor[0].reshape(-1).float().cpu()
        rows = []
        while len(rows) < count:
            direction = torch.randn(flat.shape, generator=generator)
            direction = direction / direction.norm()
            if float(torch.rand((), generator=generator)) < 1 - float(F.cosine_similarity(flat, direction, dim=0)):
                scale = 0.8 + 0.4 * float(torch.rand((), generator=generator))
                rows.append(direction * scale * flat.norm())
        parts.append(torch.stack(rows).view(count, *tensor.shape[1:]).to(tensor))
    return Conditioning(parts[0], parts[1] if len(parts) > 1 else None, target.adapter)


def spm_loss(student: torch.Tensor, target: torch.Tensor, anchored: torch.Tensor | None, weight: float):
    """(total, erasure, anchoring): row 0 of `student` (the adapter's prediction for c_tar) against the negative-
    guidance `target`; the other rows (its predictions for the anchors) against the frozen model's `anchored`."""
    erasure = F.mse_loss(student[:1].float(), target.float())
    if anchored is None:
        return erasure, erasure, None
    anchoring = F.mse_loss(student[1:].float(), anchored.float())
    return erasure + weight * anchoring, erasure, anchoring


def adapter_name(concepts: list[str]) -> str:
    """A peft adapter name for the concepts ("spm_van_gogh"): letters, digits and underscores."""
    slug = "_".join(re.sub(r"[^0-9a-z]+", "_", c.lower()).strip("_") for c in concepts).strip("_")
    return f"spm_{slug[:48] or 'concept'}"


# Toy defaults, measured on ToyCanvas (benchmarks/results/NOTES.md, SPM). The paper's anchoring weight (1000) holds
# the rank-1 adapter in place on the toy, whose narrow text states put random anchors near real prompts: the arrow
# stayed (UA 0%) even at lr 1e-2; weight 10 erases the arrow and Stripes, and transport keeps the other objects and
# styles at the base model's. The tiny UNet needs the larger steps, as the other methods' toy defaults do.
TOY_DEFAULTS = {"lr": 1e-2, "iterations": 200, "warmup_steps": 20, "ddim_steps": 10, "contrast": "neutral",
                "prompts": "captions", "anchor_weight": 10.0}


def apply_spm(loaded: LoadedPipeline, edit_dir: str | Path, metadata: dict) -> None:
    """Install an SPM edit on a loaded pipeline (erasers.edits.apply_edits calls it, once it has checked the edit's
    base model): its adapter, named after its concepts, beside any other SPM edit's, scaled per prompt by
    facilitated transport."""
    directory = Path(edit_dir) / ADAPTER
    info = read_adapter_info(directory, {"concepts": list, "adapter_name": str})
    scaling = PromptScaling.of(loaded)
    name = load_lora(loaded, directory, info["adapter_name"])
    scaling.add(name, transport(loaded, scaling, [str(c) for c in info["concepts"]]))


def transport(loaded: LoadedPipeline, scaling: PromptScaling, concepts: list[str]):
    """SPM's facilitated transport for `concepts`: a function of a batch's token ids and pooled text embeddings (the
    CLIP text encoder's end-of-text state) giving each prompt's gamma, the larger of its cosine to the nearest
    concept's embedding and the share of that concept's tokens it contains (special tokens excluded)."""
    tokenizer = loaded.tokenizer
    ids = tokenizer(concepts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with scaling.pause(), torch.no_grad():
        embeddings = loaded.text_encoder(ids.to(loaded.device)).pooler_output.float()
    special = set(tokenizer.all_special_ids)
    concept_tokens = [set(row.tolist()) - special for row in ids]

    def gamma(input_ids: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        cosine = F.cosine_similarity(pooled.float()[:, None], embeddings[None].to(pooled.device), dim=-1)
        overlap = torch.tensor([max(len(set(row) & tokens) / len(tokens) if tokens else 0.0
                                    for tokens in concept_tokens) for row in input_ids.tolist()])
        return torch.maximum(cosine.max(dim=1).values.cpu(), overlap).clamp(0, 1)

    return gamma


@register("spm", "SPM: a rank-1 adapter in the transformer blocks with latent anchoring, scaled per prompt by "
          "facilitated transport", toy_defaults=TOY_DEFAULTS,
          quick={"iterations": 16, "ddim_steps": 4, "lr": 1e-2, "warmup_steps": 0, "anchor_samples": 2},
          apply=apply_spm, step_cost_models=("toy", "sd15"),
          multi_concept="one adapter for all, scaled per prompt by the nearest concept")
class SPM(Eraser):
    config_class = SPMConfig

    def check(self, loaded: LoadedPipeline, request: EraseRequest) -> None:
        if has_adapters(loaded.denoiser):
            raise UsageError("spm trains its adapter on the base denoiser, and this one already holds LoRA adapters; "
                             "load the base model without them")

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        cfg = self.config
        self.check(loaded, request)
        torch.manual_seed(cfg.seed)  # the adapter's down projections start random
        unet = loaded.denoiser
        name = adapter_name(request.concepts)
        targets = transformer_block_modules(loaded)
        parameters = train_only(loaded, add_lora(loaded, name, targets, cfg.rank), unet)

        prompts = request.erase_prompts() if cfg.prompts == "captions" else request.concept_prompts()
        with torch.no_grad():
            empty = loaded.adapter.unconditional()
            target_states = loaded.encode_text(prompts)
            neutral_states = contrast_states(loaded, request, prompts, cfg.contrast)
        optimizer = build_optimizer(loaded, parameters, cfg.lr)
        schedule = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                                 num_training_steps=cfg.iterations, num_cycles=cfg.lr_cycles)
        anchoring = cfg.anchor_weight > 0

        def step(_, generator):
            k = int(torch.randint(len(prompts), (1,), generator=generator))
            stop = int(torch.randint(1, cfg.ddim_steps - 1, (1,), generator=generator))
            target = target_states[k:k + 1]
            with torch.no_grad():
                x_t, t = sample_partially(loaded, unet, target, empty, stop, cfg.ddim_steps, cfg.sample_guidance,
                                          generator)
                anchors = latent_anchors(target, cfg.anchor_samples, generator) if anchoring else None
                conditions = [neutral_states[k:k + 1], target] + ([anchors] if anchoring else [])
                teacher = torch.cat(conditions)
                with adapters_disabled(unet):  # c_pos = c_tar: the frozen model's predictions in one batch
                    eps = predict_noise(unet, x_t.expand(len(teacher), *x_t.shape[1:]), t, teacher)
                goal = esd_target(eps[:1], eps[1:2], eps[:1], cfg.eta)
            student_states = torch.cat([target, anchors]) if anchoring else target
            student = predict_noise(unet, x_t.expand(len(student_states), *x_t.shape[1:]), t, student_states)
            loss, erasure, anchored = spm_loss(student, goal, eps[2:] if anchoring else None, cfg.anchor_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            metrics = {"loss": loss.item(), "erase": erasure.item()}
            if anchored is not None:
                metrics["anchor"] = anchored.item()
            return metrics

        unet.train()
        state = {"params": ParameterState(parameters), "opt": optimizer, "lr_schedule": schedule}
        try:
            self.history = TrainingLoop("spm", cfg.iterations, state, cfg.seed, work_dir,
                                        checkpoint_every=50).run(step)
            info = {"method": "spm", "concepts": request.concepts, "adapter_name": name, "rank": cfg.rank,
                    "targets": targets}
            edit = LoraEdit(loaded, name, info)
        finally:
            remove_lora(loaded)  # the denoiser is left as loaded, for what else runs in this process
            unet.eval()
        return {ADAPTER: edit}
