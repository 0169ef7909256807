"""The one training loop: every toy-model stage and every training-based eraser runs through it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .checkpoint import corrupt_checkpoint, load_checkpoint, save_checkpoint, set_rng_states

# Seeds are reduced to the 64 bits torch.Generator takes, so any seed a config accepts gives a valid step seed.
SEED_MODULUS = 2 ** 64


class TrainingLoop:
    """Seeded per step (a resumed run draws the same batches as an uninterrupted one), with a progress bar and,
    when `work_dir` is given, a JSON-lines log and a checkpoint of every module, optimiser and schedule in `state`
    every `checkpoint_every` steps, from which a later run with the same `work_dir` resumes.

    `state` maps names to objects with `state_dict()` / `load_state_dict()` (modules, optimisers, schedules, or
    small wrappers of a parameter list); their state dicts are saved as safetensors + JSON (erasers.checkpoint),
    never pickled. A checkpoint that cannot be read or does not fit `state` is a UsageError asking for
    `--restart`: a run never silently starts over."""

    def __init__(self, name: str, steps: int, state: dict, seed: int = 0, work_dir: str | Path | None = None,
                 checkpoint_every: int = 250, progress: bool = True):
        self.name, self.steps, self.state, self.seed = name, steps, state, seed
        self.checkpoint_every, self.progress = checkpoint_every, progress
        self.start = 0
        self.path = self.log_path = self.rng = None
        if work_dir is not None:
            self.path = Path(work_dir) / "ckpt" / f"{name}.safetensors"
            self.log_path = Path(work_dir) / "logs" / f"{name}.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            legacy = self.path.with_suffix(".pt")
            if legacy.exists():  # the old pickle format, or a file planted there: never unpickled
                raise corrupt_checkpoint(legacy, "a pickle file, which erasure-suite no longer loads")
            if self.path.exists():
                self.start, saved, self.rng = load_checkpoint(self.path)
                try:
                    if set(saved) != set(state):
                        raise ValueError(f"it holds {', '.join(sorted(saved))}, not {', '.join(sorted(state))}")
                    for key, obj in state.items():
                        obj.load_state_dict(saved[key])
                except Exception as error:  # noqa: BLE001 - a mismatch is a foreign or damaged checkpoint
                    raise corrupt_checkpoint(self.path, error) from None

    def save(self, step: int) -> None:
        save_checkpoint(self.path, step, {k: v.state_dict() for k, v in self.state.items()})

    def run(self, step_fn: Callable[[int, torch.Generator], dict[str, float]]) -> list[dict]:
        """Call `step_fn(step, generator)` for every remaining step; returns the logged metrics."""
        started = time.time()
        history = []
        if self.rng is not None:  # global RNG draws (dropout...) continue as in an uninterrupted run
            set_rng_states(self.rng)
        log = self.log_path.open("a") if self.log_path else None
        bar = tqdm(range(self.start, self.steps), initial=self.start, total=self.steps, desc=self.name,
                   disable=not self.progress)
        try:
            for step in bar:
                generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % SEED_MODULUS)
                metrics = step_fn(step, generator)
                bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
                if step % 25 == 0 or step == self.steps - 1:
                    record = {"step": step, "seconds": round(time.time() - started, 3), **metrics}
                    history.append(record)
                    if log:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                last = step == self.steps - 1
                if self.path and ((step + 1) % self.checkpoint_every == 0 or last):
                    self.save(step + 1)
        finally:
            if log:
                log.close()
        return history


class ParameterState:
    """Checkpoints a list of parameters (the trained subset of a model) for resume."""

    def __init__(self, parameters):
        self.parameters = parameters

    def state_dict(self):
        return {str(i): p.detach().clone() for i, p in enumerate(self.parameters)}

    def load_state_dict(self, state):
        with torch.no_grad():
            for i, p in enumerate(self.parameters):
                p.copy_(state[str(i)])


def descend(loss: torch.Tensor, optimizer, parameters, max_grad_norm: float = 0.0) -> None:
    """One optimiser step on `loss`: gradients cleared, backpropagated, clipped to `max_grad_norm` (0: not)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()


@torch.no_grad()
def masked_update(parameters, masks, decay: float = 1.0) -> None:
    """Before the optimiser step of a run that trains only the `masks`' elements of `parameters` (SalUn's salient
    weights, Concept Ablation's token-embedding rows; a mask broadcasts against its parameter): the other elements'
    gradients are zeroed, so Adam leaves them bit-identical, and AdamW's decoupled decay, `decay` = 1 - lr x
    weight_decay, shrinks the trained elements alone (torch's AdamW would shrink every element)."""
    for parameter, mask in zip(parameters, masks):
        if parameter.grad is not None:
            parameter.grad.mul_(mask)
        if decay != 1:  # x * 1.0 is x, bit for bit
            parameter.mul_(torch.where(mask, decay, 1.0))

