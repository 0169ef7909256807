"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., 2023).

Fine-tune part of the model so that, conditioned on the concept, it predicts the frozen model's noise *guided
away* from the concept (negative guidance). Which part is trained names the variant:
  esd-x   the denoiser's attention that reads the text (attn2 in SD and SDXL; on Flux the joint blocks' text
          projections add_q/k/v_proj): for styles and artists, local to the prompt
  esd-u   everything but what reads the text and the time embedding (on Flux: the image stream and the single
          blocks): for global concepts such as nudity
  esd-te  the text encoders (SD: CLIP; SDXL: both; Flux: CLIP and T5), with the denoiser frozen (AdvUnlearn's outer
          step)
The latent x_t is drawn by denoising noise with the model being edited, for a random number of steps. On Flux the
predictions are flow-matching velocities and the same negative-guidance target is taken on them
(erasers/families/: the guidance embedding of guidance-distilled Flux).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..losses import FrozenOriginal, check_contrast, contrast_states, esd_target, predict_noise, sample_partially
from ..models import LoadedPipeline
from ..parameters import PARAMETER_SETS, trainable_parameters
from ..precision import build_optimizer, finish, train_only
from ..prompts import EraseRequest
from ..registry import Eraser, register
from ..train import ParameterState, TrainingLoop


@dataclass
class ESDConfig:
    parameters: str = "xattn"
    iterations: int = 200
    lr: float = 5e-5
    eta: float = 2.0
    ddim_steps: int = field(default=50, metadata={"min": 3})  # x_t is drawn after 1..ddim_steps-2 steps
    sample_guidance: float = 3.0
    # "captions": the concept and, on ToyCanvas, every caption naming it; "concept": the concept's text alone, as
    # the ESD paper prompts.
    prompts: str = "captions"
    contrast: str = "empty"        # what the concept is guided away from: "empty" or "neutral" (losses.CONTRASTS)
    seed: int = 0

    def __post_init__(self):
        # Checked when the config is built, before the pipeline loads or OUT.partial/ is made.
        if self.parameters not in PARAMETER_SETS:
            raise UsageError(f"esd parameters must be one of {', '.join(PARAMETER_SETS)}, not {self.parameters!r}")
        if self.prompts not in ("captions", "concept"):
            raise UsageError(f"esd prompts must be captions or concept, not {self.prompts!r}")
        check_contrast("esd", self.contrast)


# The three variants take several concepts alike: each step draws one prompt from every concept's prompts.
ESD_MULTI_CONCEPT = "one loss over all: each step a prompt of any concept"

# Toy defaults measured on ToyCanvas (benchmarks/method_table.py; README): the tiny UNet needs larger steps than
# SD's 1e-5 to reach UA >= 90% in a few hundred iterations, and the neutral contrast: guided away from the empty
# prompt, ESD-x erased the objects of the Stripes captions and left the stripes (UA 5%), ESD-u half the arrows.
# x_t is drawn in 10 DDIM steps, as AdvUnlearn's: with 25, sampling was most of a step's cost and the
# benchmark's UA the same (benchmarks/results/NOTES.md, "Benchmark cost").
@register("esd-x", "ESD on the UNet's cross-attention (styles, artists)", defaults={"parameters": "xattn"},
          reads_anchors=True,
          toy_defaults={"lr": 3e-4, "iterations": 300, "ddim_steps": 10, "contrast": "neutral"},
          quick={"iterations": 8, "ddim_steps": 4, "lr": 1e-3}, step_cost_models=("toy", "sd15", "sdxl"),
          multi_concept=ESD_MULTI_CONCEPT)
@register("esd-u", "ESD on the UNet outside cross-attention (global concepts such as nudity)",
          defaults={"parameters": "noxattn"}, reads_anchors=True,
          toy_defaults={"lr": 2e-4, "eta": 4.0, "iterations": 300, "ddim_steps": 10, "contrast": "neutral"},
          quick={"iterations": 8, "ddim_steps": 4, "lr": 3e-4}, step_cost_models=("toy", "sd15"),
          multi_concept=ESD_MULTI_CONCEPT)
@register("esd-te", "ESD through the text encoder, UNet frozen", defaults={"parameters": "text_encoder"},
          reads_anchors=True,
          toy_defaults={"lr": 1e-4, "iterations": 200, "ddim_steps": 10},
          quick={"iterations": 8, "ddim_steps": 4, "lr": 1e-3}, step_cost_models=(), multi_concept=ESD_MULTI_CONCEPT)
class ESD(Eraser):
    config_class = ESDConfig

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        cfg = self.config
        torch.manual_seed(cfg.seed)
        unet = loaded.denoiser
        on_text_encoder = cfg.parameters == "text_encoder"
        encoders = loaded.trained_text_encoders
        parameters = train_only(loaded, trainable_parameters(loaded, cfg.parameters),
                                       *(encoders.values() if on_text_encoder else [unet]))
        # With the text encoder trained, the UNet itself is the frozen teacher; otherwise the UNet with its trained
        # parameters' original values.
        teacher = unet if on_text_encoder else FrozenOriginal(unet, parameters)

        prompts = request.erase_prompts() if cfg.prompts == "captions" else request.concept_prompts()
        with torch.no_grad():
            empty = loaded.adapter.unconditional()
            concept_states = loaded.encode_text(prompts)
            contrasts = contrast_states(loaded, request, prompts, cfg.contrast)
            anchor_states = loaded.encode_text(request.anchors) if request.anchors else None
        optimizer = build_optimizer(loaded, parameters, cfg.lr)

        def step(_, generator):
            k = int(torch.randint(len(prompts), (1,), generator=generator))
            stop = int(torch.randint(1, cfg.ddim_steps - 1, (1,), generator=generator))
            # Trained-side conditioning: through the text encoder when it is what is being edited.
            student_states = (loaded.encode_text([prompts[k]]) if on_text_encoder else concept_states[k:k + 1])
            with torch.no_grad():
                x_t, t = sample_partially(loaded, unet, student_states.detach(), empty, stop, cfg.ddim_steps,
                                          cfg.sample_guidance, generator)
                # The teacher's predictions in one batched call: a small denoiser costs about the same at batch 3
                # as at batch 1.
                conditions = [contrasts[k:k + 1], concept_states[k:k + 1]]
                if anchor_states is not None:
                    j = k % len(anchor_states)
                    conditions.append(anchor_states[j:j + 1])
                eps = predict_noise(teacher, x_t.expand(len(conditions), *x_t.shape[1:]), t, torch.cat(conditions))
                eps_contrast, eps_concept = eps[:1], eps[1:2]
                eps_from = eps[2:] if anchor_states is not None else eps_concept
                target = esd_target(eps_from, eps_concept, eps_contrast, cfg.eta)
            loss = F.mse_loss(predict_noise(unet, x_t, t, student_states).float(), target.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        unet.train(not on_text_encoder)
        for encoder in encoders.values():  # as AdvUnlearn's; transformers checkpoints only a model in training mode
            encoder.train(on_text_encoder)
        self.history = TrainingLoop("esd", cfg.iterations, {"params": ParameterState(parameters), "opt": optimizer},
                                    cfg.seed, work_dir, checkpoint_every=50).run(step)
        unet.eval()
        for encoder in encoders.values():
            encoder.eval()
        if on_text_encoder:
            return {name: finish(loaded, encoder) for name, encoder in encoders.items()}
        return {loaded.family.denoiser: finish(loaded, unet)}

