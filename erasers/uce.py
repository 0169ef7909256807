"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., 2024).

A closed-form edit of every linear that reads the text (cross-attention keys and values): the concept's text
embeddings c are mapped to what the frozen layer gives a guide text, v* = W0 c_guide, while the embeddings p of
preserved prompts keep their outputs:
    W = (lambda W0 + sum_erase v* c^T + sum_preserve (W0 p) p^T) (lambda I + sum_erase c c^T + sum_preserve p p^T)^-1
No training: it runs in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .models import LoadedPipeline
from .prompts import EraseRequest
from .registry import Eraser, register


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


def token_counts(loaded: LoadedPipeline, prompts: list[str], include_padding: bool = False) -> list[int]:
    if include_padding:
        return [loaded.tokenizer.model_max_length] * len(prompts)
    return [len(ids) for ids in loaded.tokenizer(prompts, truncation=True).input_ids]


def token_columns(loaded: LoadedPipeline, prompts: list[str], lengths: list[int] | None = None) -> torch.Tensor:
    """Text embeddings of each prompt's tokens after the start token, through its end token (or the first
    `lengths[i]` positions), stacked as columns: (d, n)."""
    with torch.no_grad():
        states = loaded.encode_text(prompts).double().cpu()
    lengths = lengths or token_counts(loaded, prompts)
    return torch.cat([states[i, 1:lengths[i]] for i in range(len(prompts))]).T


@register("uce", "closed-form edit of cross-attention keys/values", toy_defaults={})
class UCE(Eraser):
    config_class = UCEConfig

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        cfg = self.config
        loaded.require_text_conditioned_unet("uce")
        erase = request.erase_prompts()
        guide = request.anchors[0] if request.anchors else cfg.guide
        guides = request.neutral_prompts(erase, guide)
        # Erase and guide prompts are aligned position by position over the longer of the two.
        padded = cfg.include_padding
        lengths = [max(a, b) for a, b in zip(token_counts(loaded, erase, padded), token_counts(loaded, guides, padded))]
        concept_columns = token_columns(loaded, erase, lengths)
        guide_columns = token_columns(loaded, guides, lengths)
        preserve = request.preserve or request.retain_prompts()
        preserve_columns = (token_columns(loaded, preserve, token_counts(loaded, preserve, padded)) if preserve
                            else concept_columns[:, :0])

        d = concept_columns.shape[0]
        right = (cfg.lamb * torch.eye(d, dtype=torch.float64)
                 + cfg.erase_scale * concept_columns @ concept_columns.T
                 + cfg.preserve_scale * preserve_columns @ preserve_columns.T)
        inverse = torch.linalg.inv(right)
        with torch.no_grad():
            for _, to_k, to_v in loaded.cross_attention_kv():
                for linear in ((to_k, to_v) if cfg.edit_keys else (to_v,)):
                    w0 = linear.weight.double().cpu()
                    left = (cfg.lamb * w0
                            + cfg.erase_scale * (w0 @ guide_columns) @ concept_columns.T
                            + cfg.preserve_scale * (w0 @ preserve_columns) @ preserve_columns.T)
                    linear.weight.copy_((left @ inverse).to(linear.weight.dtype))
        return {loaded.family.denoiser: loaded.denoiser}
