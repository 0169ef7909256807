"""How step_cost (CPU: the toy and full-size architectures) and gpu_check (CUDA) time a step, in one place: the
plain forward+backward of the whole denoiser that every ratio divides by, and a short run of an eraser timed from
its own history."""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable

import torch

from erasers.precision import autocast

# Enough iterations to time the asked steps; short sampling chains, DoCo's adversarial loss from the start and its
# anchor images few and quick (drawn before the timed steps); Co-Erasing: one text step, then the image-conditioned
# steps it adds to ESD (the ones timed), from two generated images. Only the fields a method has apply to it.
SHORT_RUN = {"ddim_steps": 4, "warmup": 0, "warmup_steps": 0, "batch_size": 1, "anchor_images": 2, "sample_steps": 2,
             "text_iterations": 1, "image_count": 2, "forget_images": 2, "retain_images": 2, "concept_images": 2}


def short_run_config(method: str, steps: int, toy: bool, **options):
    """`method`'s config for `steps` timed steps plus one untimed (SHORT_RUN, then `options`)."""
    from erasers.registry import build_config, get_method

    wanted = {"iterations": steps + 1, "image_iterations": steps + 1, **SHORT_RUN, **options}
    fields = {f.name for f in dataclasses.fields(get_method(method).eraser.config_class)}
    return build_config(method, toy, {key: value for key, value in wanted.items() if key in fields})


def seconds_per_step(history: list[dict] | None, total_seconds: float, steps: int) -> float:
    """From the eraser's history (its first logged step paid one-off costs); an eraser with no steps (UCE's closed
    form) or a history too short to tell: the whole run, per step when it has steps."""
    if history and len(history) > 1 and history[-1]["seconds"] > history[0]["seconds"]:
        return (history[-1]["seconds"] - history[0]["seconds"]) / (history[-1]["step"] - history[0]["step"])
    return total_seconds / (steps + 1) if history else total_seconds


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work, so a timer reads the work's time and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_plain_step(loaded, steps: int, prompt: str, release_text_encoders: bool = False,
                    before_steps: Callable[[], None] = lambda: None) -> tuple[float, torch.Tensor]:
    """Seconds per forward+backward of the whole denoiser (every parameter with a gradient, batch 1, timestep 500)
    in the pipeline's precision, and the last loss. `release_text_encoders`: drop them once the prompt is encoded,
    so the process's peak memory is the denoiser's alone; `before_steps` runs right before the first step."""
    from erasers.losses import predict_noise

    with torch.no_grad(), autocast(loaded):
        cond = loaded.encode_text([prompt])
    if release_text_encoders:
        for name in loaded.family.text_encoders:
            setattr(loaded.pipeline, name, None)
        gc.collect()
    denoiser = loaded.denoiser.train().requires_grad_(True)
    if loaded.training.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    latents = torch.randn(loaded.adapter.latent_shape(1), device=loaded.device)
    before_steps()
    times = []
    for _ in range(steps + 1):
        synchronize(loaded.device)
        started = time.perf_counter()
        with autocast(loaded):
            loss = predict_noise(denoiser, latents, 500, cond).float().pow(2).mean()
        loss.backward()
        denoiser.zero_grad(set_to_none=False)  # a training step holds every gradient
        synchronize(loaded.device)
        times.append(time.perf_counter() - started)
    return sum(times[1:]) / steps, loss.detach()  # the first step pays one-off allocation


def time_sampling_step(loaded, steps: int, prompt: str) -> tuple[float, torch.Tensor]:
    """Seconds per sampling step of `loaded` (classifier-free guidance at the family's default scale, latents out,
    seed 0) and the latents, after one untimed run that pays the one-off allocation."""
    loaded.pipeline.set_progress_bar_config(disable=True)

    def sample():
        synchronize(loaded.device)
        started = time.perf_counter()
        with torch.no_grad():
            out = loaded.pipeline(prompt=[prompt], num_inference_steps=steps, output_type="latent",
                                  guidance_scale=loaded.default_guidance,
                                  generator=[torch.Generator("cpu").manual_seed(0)], **loaded.adapter.size())
        synchronize(loaded.device)
        return (time.perf_counter() - started) / steps, out.images

    sample()
    return sample()


def time_guided_sampling(loaded, method: str, steps: int, prompt: str) -> dict:
    """A training-free method's cost is at generation: seconds per sampling step (classifier-free guidance at the
    family's default scale) with its edit installed and without, in one process, and whether the edit moved the
    result. Its edit is installed as loading it would (the registry entry's `apply`) with its default config."""
    from erasers.registry import build_config, get_method

    entry = get_method(method)
    config = build_config(method, loaded.is_toy, entry.quick)
    metadata = {"method": method, "concepts": ["cat"], "kind": "concept", "config": dataclasses.asdict(config)}
    plain_seconds, plain = time_sampling_step(loaded, steps, prompt)
    entry.apply(loaded, None, metadata)
    seconds, guided = time_sampling_step(loaded, steps, prompt)
    return {"seconds_per_step": seconds, "plain_seconds_per_step": plain_seconds,
            "finite": bool(torch.isfinite(guided).all()), "moved": not torch.equal(plain, guided)}


# The images an attack draws around its steps (targets, the plain prompt, checks, the images it trains on) are not
# timed; drawn with one sampling step, they cost a measurement little.
ATTACK_SAMPLING_STEPS = 1


def never_found(images: list, concept: str) -> list[bool]:
    """A judge that never finds the concept, so the timed item always goes on to the attack's search."""
    return [False] * len(images)


def time_attack_steps(loaded, attack: str, steps: int, concept: str) -> dict:
    """Seconds per step of `attack` on `loaded` (what a step is: its registry entry's AttackStep): a run of its
    step options over `steps` timed steps and one untimed first, on one item (the concept's first prompt) which
    `never_found` sends to the search, timed from the attack's `history`. The base model stands for an edit (an
    edit keeps the modules' shapes, so a step costs the same). An attack whose step is a sampling step (quantize):
    each pipeline it loads, against `loaded`'s sampling step (`baseline_seconds`)."""
    from benchmarks.attacks import build_attack_config, get_attack
    from benchmarks.attacks.harness import AttackContext, base_model
    from benchmarks.attacks.prompts import PromptRow
    from erasers.prompts import make_request

    step = get_attack(attack).step
    loaded.default_steps = ATTACK_SAMPLING_STEPS
    request = make_request([concept], loaded.tokenizer, loaded.vocabulary)
    prompt = request.erase_prompts()[1] if loaded.vocabulary else request.concept
    runner = get_attack(attack).attack(build_attack_config(attack, loaded.is_toy, step.options(steps + 1)))
    items = runner.plan([PromptRow(prompt)], 1, 0)
    runner.check(loaded, items)
    context = AttackContext(loaded, request, never_found, [], [], progress=False)
    runner.prepare(context, items)
    if step.sampling:
        baseline, _ = time_sampling_step(loaded, steps, prompt)
        timed = {name: time_sampling_step(other, steps, prompt)[0]
                 for name, other in runner.loaded_pipelines().items()}
        return {"seconds_per_step": max(timed.values()), "baseline_seconds": baseline, "by_pipeline": timed}
    context.base = base_model(loaded, [], runner.needs_base)
    started = time.perf_counter()
    runner.run_item(context, items[0])
    history = runner.history or []
    return {"seconds_per_step": seconds_per_step(history, time.perf_counter() - started, steps),
            "timed_steps": history[-1]["step"] - history[0]["step"] if history else 0}
