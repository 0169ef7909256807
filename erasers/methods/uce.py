"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., 2024).

A closed-form edit of every linear that reads the text (cross-attention keys and values on SD and SDXL, whose
inputs are the concatenated states of both encoders; on Flux the joint blocks' add_k_proj/add_v_proj, whose inputs
are each block's text stream built from T5's token states): the concept's text embeddings c are mapped to what
the frozen layer gives a guide text, v* = W0 c_guide, while the embeddings p of preserved prompts keep their
outputs:
    W = (lambda W0 + sum_erase v* c^T + sum_preserve (W0 p) p^T) (lambda I + sum_erase c c^T + sum_preserve p p^T)^-1
(erasers/closed_form.py, which MACE shares). No training: it runs in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import torch

from ..closed_form import LeastSquaresEdit, token_columns, token_counts
from ..models import LoadedPipeline
from ..prompts import EraseRequest
from ..registry import Eraser, register


@dataclass
class UCEConfig:
    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    guide: str = ""
    edit_keys: bool = True
    # Also map the padding positions after the end token. CLIP's attention is causal, so those states are read
    # by the UNet and carry the prompt, concept included: editing only the prompt's own tokens leaves the
    # concept recoverable from them (measured on ToyCanvas: UA on an object stops near 80%).
    include_padding: bool = True


@register("uce", "closed-form edit of cross-attention keys/values", preserves=True, reads_anchors=True,
          reads_preserve=True,
          step_cost_models=("toy", "sd15", "sdxl"), multi_concept="one closed form over every concept's prompts")
class UCE(Eraser):
    config_class = UCEConfig

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        cfg = self.config
        erase = request.erase_prompts()
        guide = request.anchors[0] if request.anchors else cfg.guide
        guides = request.neutral_prompts(erase, guide)
        # Erase and guide prompts are aligned position by position over the longer of the two.
        padded = cfg.include_padding
        lengths = [max(a, b) for a, b in zip(token_counts(loaded, erase, padded), token_counts(loaded, guides, padded))]
        preserve = request.preserve or request.retain_prompts()
        preserve_lengths = token_counts(loaded, preserve, padded) if preserve else []
        # Each group of linears reads the same inputs: on SD/SDXL every cross-attention reads the text states (one
        # group); on Flux each joint block's add_k/v_proj read that block's text stream (erasers/families/flux.py).
        groups = zip(loaded.adapter.text_projection_inputs(erase), loaded.adapter.text_projection_inputs(guides),
                     loaded.adapter.text_projection_inputs(preserve) if preserve else repeat((None, None)))
        with torch.no_grad():
            for (linears, concept_inputs), (_, guide_inputs), (_, preserve_inputs) in groups:
                concept_columns = token_columns(loaded, erase, lengths, concept_inputs)
                guide_columns = token_columns(loaded, guides, lengths, guide_inputs)
                preserve_columns = (token_columns(loaded, preserve, preserve_lengths, preserve_inputs)
                                    if preserve else concept_columns[:, :0])
                self.edit(linears, concept_columns, guide_columns, preserve_columns)
        return {loaded.family.denoiser: loaded.denoiser}

    def edit(self, linears: list[torch.nn.Linear], concept_columns, guide_columns, preserve_columns) -> None:
        """The closed form on every linear of a group (keys and values, or values only without edit_keys)."""
        cfg = self.config
        closed_form = LeastSquaresEdit(cfg.lamb, [(cfg.erase_scale, concept_columns),
                                                  (cfg.preserve_scale, preserve_columns)], concept_columns.shape[0])
        # Linears come in (key, value) pairs.
        for linear in (linears if cfg.edit_keys else linears[1::2]):
            w0 = linear.weight.double().cpu()
            edited = closed_form.solve(w0, [w0 @ guide_columns, w0 @ preserve_columns])
            linear.weight.copy_(edited.to(linear.weight.dtype))
