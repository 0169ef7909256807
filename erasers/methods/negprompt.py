"""The negative-prompt baseline (SD-NP): no training; at generation time the concept is the negative prompt, so
classifier-free guidance steers away from it, eps = eps(x_t, concept) + s (eps(x_t, prompt) - eps(x_t, concept)).

The edit is an edit directory with `erasure.json` only (erasers/guidance.py). Loaded, it adds the concept to every
pipeline call's negative prompt (after the caller's own negative prompt, if any; a caller's negative prompt
embeddings, such as the attack's unconditional ones, give way to the text). SD and SDXL guide from the negative
branch whenever classifier-free guidance is on (scale above 1); a call without it is refused, since the edit would
silently do nothing. Flux has no negative branch by default (FLUX.1-dev is guidance-distilled): there the edit turns
on the pipeline's true classifier-free guidance at `true_cfg_scale`, a second transformer pass per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..guidance import CallEdit, call_argument, concept_text, install_call_edit
from ..models import LoadedPipeline
from ..prompts import EraseRequest
from ..registry import Eraser, register


@dataclass
class NegativePromptConfig:
    # The negative prompt; empty: the erased concepts' own text ("arrow", "Stripes style"), joined by commas.
    negative_prompt: str = ""
    # Flux only: the true classifier-free guidance scale its negative branch is applied with (FluxPipeline's
    # true_cfg_scale; 4 is what its documentation shows for FLUX.1-dev).
    true_cfg_scale: float = 4.0


def negative_text(metadata: dict) -> str:
    """The text an edit puts in the negative prompt."""
    configured = metadata.get("config", {}).get("negative_prompt", "")
    if configured:
        return configured
    return concept_text(metadata)


class NegativePrompt(CallEdit):
    name = "negprompt"

    def __init__(self, loaded: LoadedPipeline, text: str, true_cfg_scale: float):
        self.loaded, self.text, self.true_cfg_scale = loaded, text, true_cfg_scale

    def rewrite(self, pipeline, arguments: dict) -> dict:
        guidance = call_argument(pipeline, arguments, "guidance_scale")
        extra = self.loaded.adapter.negative_prompt_call(guidance, self.true_cfg_scale, self.name)
        arguments = dict(arguments)
        # The caller's negative embeddings are replaced by text the pipeline encodes itself, in every family's way.
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            arguments.pop(name, None)
        # diffusers wants the negative prompt as the prompt is given: a string for a string, else one per prompt.
        prompt = arguments.get("prompt")
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(arguments["prompt_embeds"])
        given = arguments.get("negative_prompt")
        given = [given] * batch if given is None or isinstance(given, str) else list(given)
        negatives = [f"{g}, {self.text}" if g else self.text for g in given]
        arguments["negative_prompt"] = negatives[0] if isinstance(prompt, str) else negatives
        if call_argument(pipeline, arguments, "true_cfg_scale") not in (None, 1.0) and "true_cfg_scale" in extra:
            extra.pop("true_cfg_scale")  # the caller chose Flux's true guidance scale
        return {**arguments, **extra}


def apply_negative_prompt(loaded: LoadedPipeline, path: Path, metadata: dict) -> None:
    config = metadata.get("config", {})
    install_call_edit(loaded.pipeline, NegativePrompt(loaded, negative_text(metadata),
                                                      float(config.get("true_cfg_scale", 4.0))))


@register("negprompt", "Negative-prompt baseline: the concept as the negative prompt (training-free)",
          trains=False, apply=apply_negative_prompt, step_cost_models=(),
          multi_concept="one negative prompt naming all")
class NegativePromptEraser(Eraser):
    config_class = NegativePromptConfig

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        return {}  # nothing trains: the edit is its erasure.json, applied when loaded
