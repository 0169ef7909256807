"""HiRM: High-level Representation Misdirection (concept erasure through the text encoder's early layers).

Reimplemented from the paper's description (it has no public code). The denoiser reads the text encoder's
*high-level* representation: its final hidden states (after the final layer norm) and, on SDXL and Flux, the
CLIP pooled output (the end token's final state). HiRM moves that representation of the concept onto a
designated vector v while training only a few *early* text-encoder layers:

    L = mse(h(p)[concept tokens], v) + pooled_weight * mse(h(p)[end token], v_pooled)
        + retain_weight * mse(h(r), h*(r))

for prompts p naming the concept and retain prompts r of other concepts (h* the frozen encoder). The designated
vectors are either "random" (seeded, with the mean and spread of real final states) or "supercategory": the
frozen encoder's final states of the prompt with the concept replaced by a broader word ("object", "painting").
Because the edit sits before the layers that form meaning, the concept's tokens are misdirected wherever
they appear, and because only the CLIP text encoder changes, one edit loads into every pipeline that uses that
encoder (SD, SDXL's first encoder, Flux's pooled encoder) and stacks with a denoiser edit (ESD, UCE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..losses import FrozenOriginal
from ..models import LoadedPipeline
from ..prompts import EraseRequest, supercategory_word
from ..registry import Eraser, register
from ..text_encoders import text_encoder_layers
from ..train import TrainingLoop

TARGETS = ("random", "supercategory")


@dataclass
class HiRMConfig:
    # Text-encoder blocks trained, comma-separated indices counted from the first (0); all others stay frozen.
    layers: str = "0"
    target: str = "supercategory"
    supercategory: str = ""        # "" = by the request's kind (SUPERCATEGORIES)
    pooled_weight: float = 1.0
    context_weight: float = 1.0
    retain_weight: float = 1.0
    iterations: int = 300
    lr: float = 1e-4
    batch_size: int = 8
    retain_batch: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.target not in TARGETS:
            raise UsageError(f"hirm target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        self.layers = ",".join(str(i) for i in parse_layers(self.layers))


def parse_layers(layers, count: int | None = None) -> list[int]:
    """Block indices from "0,1", [0, 1] or 0; checked against the encoder's `count` blocks when given."""
    parts = str(layers).replace(" ", "").strip("[]()").split(",") if not isinstance(layers, (list, tuple)) else layers
    try:
        chosen = sorted({int(part) for part in parts})
    except (TypeError, ValueError):
        chosen = []
    top = f"0..{count - 1}" if count else "0, 1, ..."
    if not chosen or min(chosen) < 0 or (count is not None and max(chosen) >= count):
        raise UsageError(f"hirm layers must be text-encoder block indices {top} separated by commas (the early "
                         f"blocks: 0 is the first), not {layers!r}")
    return chosen


def concept_span(ids: list[int], concept_ids: list[int]) -> list[int]:
    """Positions of the first occurrence of `concept_ids` in `ids` (empty if absent)."""
    n = len(concept_ids)
    for start in range(len(ids) - n + 1):
        if ids[start:start + n] == concept_ids:
            return list(range(start, start + n))
    return []


class _Prompts:
    """Token ids of a prompt list (padded as the pipelines pad them) and each prompt's end-token position."""

    def __init__(self, loaded: LoadedPipeline, prompts: list[str]):
        tokenizer = loaded.tokenizer
        self.ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(loaded.device)
        # The pooled output is read at the first end token (the pad token may be the end token too).
        self.eos = (self.ids == tokenizer.eos_token_id).int().argmax(dim=1)


@dataclass
class _Targets:
    """Per erase prompt: where its concept tokens are and the vector they go to, the vector its end token (the
    pooled output) goes to, and the positions after the concept with the states they go to."""

    spans: list[list[int]]
    tokens: torch.Tensor
    pooled: torch.Tensor
    context_positions: list[list[int]]
    context: list[torch.Tensor]


def designated_targets(cfg: HiRMConfig, loaded: LoadedPipeline, request: EraseRequest, teacher, prompts: list[str],
                       erase: _Prompts, retain_states: torch.Tensor, retain: _Prompts) -> _Targets:
    tokenizer = loaded.tokenizer
    spans = []
    for i in range(len(prompts)):
        row = erase.ids[i].tolist()
        spans.append(next((s for c in request.concepts if (s := concept_span(row, tokenizer(c).input_ids[1:-1]))),
                          []))
    if not any(spans):
        raise UsageError(f"none of the prompts holds the concept's tokens ({', '.join(request.concepts)})")
    # The neutral prompt: the concept replaced by the supercategory, or removed for a random target.
    word = supercategory(cfg, request) if cfg.target == "supercategory" else ""
    neutral = _Prompts(loaded, request.neutral_prompts(prompts, word))
    with torch.no_grad():
        neutral_states = teacher(neutral.ids)[0]
    width = len(tokenizer(word).input_ids) - 2 if word else 0
    length = erase.ids.shape[1]
    positions, context = [], []
    for i, span in enumerate(spans):
        # Positions after the concept read it through causal attention: they go where the neutral prompt's
        # states are, shifted by the difference in length between the concept and its replacement.
        shift = width - len(span)
        after = [p for p in range(span[-1] + 1 if span else length, length)
                 if p != int(erase.eos[i]) and 0 <= p + shift < length]
        positions.append(after)
        context.append(neutral_states[i, [p + shift for p in after]])
    rows = torch.arange(len(prompts))
    if cfg.target == "supercategory":
        tokens = torch.stack([neutral_states[i, s[0]:s[0] + width].mean(0) if s else neutral_states[i, 0]
                              for i, s in enumerate(spans)])
        return _Targets(spans, tokens, neutral_states[rows, neutral.eos], positions, context)
    # "random": one seeded direction for the concept tokens and one for the pooled output, each placed at the
    # mean of the real final states with their typical distance from it.
    generator = torch.Generator().manual_seed(cfg.seed)
    mask = torch.zeros_like(retain.ids, dtype=torch.bool)
    for i, end in enumerate(retain.eos.tolist()):
        mask[i, 1:end] = True
    vectors = []
    for states in (retain_states[mask], retain_states[torch.arange(len(retain.ids)), retain.eos]):
        mean = states.mean(0)
        spread = (states - mean).norm(dim=1).mean()
        direction = torch.randn(mean.shape, generator=generator).to(mean)
        vectors.append((mean + spread * direction / direction.norm()).expand(len(prompts), -1))
    return _Targets(spans, vectors[0], vectors[1], positions, context)


def supercategory(cfg: HiRMConfig, request: EraseRequest) -> str:
    return cfg.supercategory.strip() or supercategory_word(request)


@register("hirm", "misdirects the text encoder's final representation of the concept by training its early "
          "layers (any CLIP-based family)", toy_defaults={"iterations": 100, "lr": 2e-3},
          quick={"iterations": 12, "lr": 3e-3, "retain_weight": 3.0}, preserves=True, reads_preserve=True,
          step_cost_models=("toy", "sd15", "sdxl"),
          multi_concept="one loss over all: every concept's tokens misdirected together")
class HiRM(Eraser):
    config_class = HiRMConfig

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        cfg = self.config
        encoder = loaded.text_encoder
        blocks = text_encoder_layers(encoder)
        chosen = parse_layers(cfg.layers, len(blocks))
        torch.manual_seed(cfg.seed)
        # Trained in float32 whatever the pipeline's dtype (Adam steps vanish in float16), then cast back.
        dtype = encoder.dtype
        encoder.to(torch.float32).eval().requires_grad_(False)
        parameters = [p for i in chosen for p in blocks[i].parameters()]
        for parameter in parameters:
            parameter.requires_grad_(True)
        teacher = FrozenOriginal(encoder, parameters)

        prompts = request.erase_prompts()
        # Off the toy world with no --preserve, the prompts themselves with the supercategory for the concept.
        retained = (request.retain_prompts()
                    or request.neutral_prompts(prompts, supercategory(cfg, request)))
        erase, retain = _Prompts(loaded, prompts), _Prompts(loaded, retained)
        with torch.no_grad():
            retain_states = teacher(retain.ids)[0]
        targets = designated_targets(cfg, loaded, request, teacher, prompts, erase, retain_states, retain)
        with_span = [i for i, s in enumerate(targets.spans) if s]
        optimizer = torch.optim.Adam(parameters, lr=cfg.lr)

        def step(_, generator):
            picked = [with_span[j] for j in torch.randperm(len(with_span), generator=generator)[:cfg.batch_size]]
            states = encoder(erase.ids[picked])[0]
            misdirect = F.mse_loss(torch.cat([states[k, targets.spans[i]] for k, i in enumerate(picked)]),
                                   torch.cat([targets.tokens[i].expand(len(targets.spans[i]), -1) for i in picked]))
            pooled = F.mse_loss(states[torch.arange(len(picked)), erase.eos[picked]], targets.pooled[picked])
            context = F.mse_loss(torch.cat([states[k, targets.context_positions[i]] for k, i in enumerate(picked)]),
                                 torch.cat([targets.context[i] for i in picked]))
            kept = torch.randperm(len(retained), generator=generator)[:cfg.retain_batch]
            keep = F.mse_loss(encoder(retain.ids[kept])[0], retain_states[kept])
            loss = misdirect + cfg.pooled_weight * pooled + cfg.context_weight * context + cfg.retain_weight * keep
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return {"misdirect": misdirect.item(), "pooled": pooled.item(), "context": context.item(),
                    "retain": keep.item()}

        self.history = TrainingLoop("hirm", cfg.iterations, {"encoder": encoder, "opt": optimizer}, cfg.seed,
                                    work_dir, checkpoint_every=100).run(step)
        encoder.zero_grad(set_to_none=True)
        encoder.requires_grad_(False).to(dtype)
        return {"text_encoder": encoder}
