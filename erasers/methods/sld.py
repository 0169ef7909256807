"""Safe Latent Diffusion (Schramowski et al., CVPR 2023): no training; at every sampling step a third prediction,
for the safety concept S, steers the classifier-free guidance away from it.

With eps_0 (empty or negative prompt), eps_p (the prompt) and eps_S (the safety concept) at x_t:
    mu    = min(s_S |eps_p - eps_S|, 1) elementwise, and 0 where eps_p - eps_S >= lambda
    gamma = mu (eps_S - eps_0) + s_m nu            nu <- beta_m nu + (1 - beta_m) gamma   (momentum, from step 0)
    eps   = eps_0 + s_g (eps_p - eps_0 - gamma)    from step `warmup_steps` on; plain guidance before
The four presets are the paper's (warm-up / s_S / lambda / s_m / beta_m). diffusers' StableDiffusionPipelineSafe
computes the same for SD 1.x; here it is an edit any SD or SDXL pipeline loads (erasers/guidance.py): a forward
pre-hook on the denoiser adds the safety rows to the pipeline's own guidance batch (as the safe pipeline batches
them), and a forward hook hands the pipeline a conditional prediction eps_p - gamma, so the pipeline's guidance
eps_0 + s_g (eps_p - gamma - eps_0) is SLD's. Flux is guidance-distilled: no unconditional branch to steer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..guidance import CallEdit, call_argument, concept_text, install_call_edit
from ..models import LoadedPipeline
from ..prompts import EraseRequest
from ..registry import Eraser, register

# warmup_steps, safety_scale (s_S), threshold (lambda), momentum_scale (s_m), momentum_beta (beta_m)
PRESETS = {
    "weak": (15, 20.0, 0.0, 0.0, 0.0),
    "medium": (10, 1000.0, 0.01, 0.3, 0.4),
    "strong": (7, 2000.0, 0.025, 0.5, 0.7),
    "max": (0, 5000.0, 1.0, 0.5, 0.7),
}
PARAMETERS = ("warmup_steps", "safety_scale", "threshold", "momentum_scale", "momentum_beta")
# The SLD paper's inappropriate-content concept, as diffusers' safe pipeline writes it (`--set
# safety_concept=i2p`): for I2P; on a single concept the concept's own text is S.
I2P_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
               "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child "
               "abuse, brutality, cruelty")


@dataclass
class SLDConfig:
    # One of PRESETS, or "custom" to give the five parameters below yourself (they default to "medium", diffusers'
    # defaults).
    preset: str = "medium"
    warmup_steps: int = 10
    safety_scale: float = 1000.0
    threshold: float = 0.01
    momentum_scale: float = 0.3
    momentum_beta: float = dataclasses.field(default=0.4, metadata={"min": 0, "max": 1, "max_exclusive": True})
    # S: empty for the erased concepts' own text ("arrow", "Stripes style"); "i2p" for I2P_CONCEPT; else the text.
    safety_concept: str = ""

    def __post_init__(self):
        if self.preset not in (*PRESETS, "custom"):
            raise UsageError(f"sld preset must be one of {', '.join(PRESETS)} or custom, not {self.preset!r}")
        if self.preset == "custom":
            return
        defaults = PRESETS["medium"]
        changed = [name for name, default in zip(PARAMETERS, defaults) if getattr(self, name) != default]
        if changed:
            raise UsageError(f"sld preset={self.preset} sets {', '.join(changed)} itself; to give them yourself "
                             "pass --set preset=custom")
        for name, value in zip(PARAMETERS, PRESETS[self.preset]):
            setattr(self, name, value)



def safety_text(metadata: dict) -> str:
    text = metadata.get("config", {}).get("safety_concept", "")
    if text == "i2p":
        return I2P_CONCEPT
    return text or concept_text(metadata)


def safety_guidance(eps_empty, eps_prompt, eps_safety, momentum, config: SLDConfig):
    """SLD's correction gamma of one step and the momentum after it."""
    difference = eps_prompt - eps_safety
    scale = torch.clamp(difference.abs() * config.safety_scale, max=1.0)
    scale = torch.where(difference >= config.threshold, torch.zeros_like(scale), scale)
    gamma = (eps_safety - eps_empty) * scale + config.momentum_scale * momentum
    return gamma, config.momentum_beta * momentum + (1 - config.momentum_beta) * gamma


class SafetyGuidance(CallEdit):
    name = "sld"

    def __init__(self, loaded: LoadedPipeline, text: str, config: SLDConfig):
        self.loaded, self.text, self.config = loaded, text, config
        self.safety = None

    def rewrite(self, pipeline, arguments: dict) -> dict:
        guidance = call_argument(pipeline, arguments, "guidance_scale")
        if not self.loaded.adapter.classifier_free(guidance):
            raise UsageError(f"sld needs classifier-free guidance, but this pipeline draws at guidance scale "
                             f"{guidance} without an unconditional branch; generate with --guidance above 1")
        if self.safety is None:
            with torch.no_grad():
                self.safety = self.loaded.encode_text([self.text])
        return arguments

    @contextlib.contextmanager
    def during(self, pipeline):
        denoiser, adapter, config = self.loaded.denoiser, self.loaded.adapter, self.config
        state = {"step": 0, "momentum": None}

        def add_safety_rows(module, args, kwargs):
            return adapter.with_extra_rows(args, kwargs, self.safety)

        def steer(module, args, kwargs, output):
            tuple_output = isinstance(output, tuple)
            prediction = output[0] if tuple_output else output.sample
            eps_empty, eps_prompt, eps_safety = prediction.chunk(3)
            if state["momentum"] is None:
                state["momentum"] = torch.zeros_like(eps_prompt)
            gamma, state["momentum"] = safety_guidance(eps_empty, eps_prompt, eps_safety, state["momentum"], config)
            if state["step"] >= config.warmup_steps:
                eps_prompt = eps_prompt - gamma
            state["step"] += 1
            steered = torch.cat([eps_empty, eps_prompt])
            if tuple_output:
                return (steered, *output[1:])
            output.sample = steered
            return output

        handles = [denoiser.register_forward_pre_hook(add_safety_rows, with_kwargs=True),
                   denoiser.register_forward_hook(steer, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def apply_safety_guidance(loaded: LoadedPipeline, path: Path, metadata: dict) -> None:
    saved = metadata.get("config", {})
    config = SLDConfig(**{key: saved[key] for key in ("preset", *PARAMETERS, "safety_concept") if key in saved}
                       | {"preset": "custom"})
    install_call_edit(loaded.pipeline, SafetyGuidance(loaded, safety_text(metadata), config))


@register("sld", "Safe Latent Diffusion: safety guidance away from the concept at generation time (training-free)",
          families=("sd", "sdxl"), trains=False, apply=apply_safety_guidance, step_cost_models=(),
          multi_concept="one safety concept naming all",
          quick={"preset": "max"}, variants={"strong": {"preset": "strong"}, "max": {"preset": "max"}},
          why_not={"flux": "guidance-distilled Flux has no unconditional branch for SLD to steer (its guidance scale "
                           "is an input embedding); negprompt applies there through true classifier-free guidance"})
class SLD(Eraser):
    config_class = SLDConfig

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        return {}  # nothing trains: the edit is its erasure.json (the preset's values written out), applied when loaded
