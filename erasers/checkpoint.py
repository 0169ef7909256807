"""Training checkpoints without pickle: one safetensors file per checkpoint, its tensors flattened from the nested
state dicts of modules, optimisers and schedules, and everything else (the step, scalars such as an optimiser's
param_groups or a schedule's counters, the structure itself) as JSON in the file's header metadata. Loading one
reads numbers and strings only, so a file planted in `OUT.partial/ckpt/` cannot run code; one rename writes it,
so a crash leaves the previous checkpoint or the new one, never half of each.

The structure is JSON with three tagged forms besides plain lists, string-keyed dicts and scalars:
    {"__tensor__": "3"}                  tensor number 3 of the file
    {"__tuple__": [...]}                 a tuple (Adam's betas)
    {"__dict__": [[key, value], ...]}    a dict with keys that are not strings (an optimiser's per-parameter state)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError
from .files import save_atomically

FORMAT = "erasure-suite-checkpoint/1"


def flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON-ready data, its tensors moved into `tensors` (keyed by their number)."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: flatten(v, tensors) for k, v in value.items()}
        return {"__dict__": [[k, flatten(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [flatten(v, tensors) for v in value]}
    if isinstance(value, list):
        return [flatten(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint holds tensors, numbers, strings, lists and dicts, not {type(value).__name__}")


def unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"}:
        return tuple(unflatten(v, tensors) for v in value["__tuple__"])
    if set(value) == {"__dict__"}:
        return {k: unflatten(v, tensors) for k, v in value["__dict__"]}
    return {k: unflatten(v, tensors) for k, v in value.items()}


def rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda{i}"] for i in range(sum(k.startswith("cuda") for k in states))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: Path, step: int, states: dict[str, Any]) -> None:
    """Write `states` (name -> state dict) and the step to `path` (.safetensors) atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = flatten({"states": states, "rng": rng_states()}, tensors)
    # safetensors refuses tensors that share memory (tied weights) and wants contiguous CPU tensors.
    seen: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    metadata = {"format": FORMAT, "step": str(step), "structure": json.dumps(structure)}
    save_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: Path) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
    """(step, name -> state dict, RNG states) from a checkpoint of `save_checkpoint`; a truncated, corrupt or
    foreign file is a UsageError that says how to start again."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError("not an erasure-suite checkpoint")
            tensors = {key: file.get_tensor(key) for key in file.keys()}
        step = int(metadata["step"])
        content = unflatten(json.loads(metadata["structure"]), tensors)
        states, rng = content["states"], content["rng"]
        if step < 0 or not isinstance(states, dict) or not isinstance(rng, dict):
            raise ValueError("malformed content")
    except Exception as error:  # noqa: BLE001 - whatever is wrong with the file, the remedy is the same
        raise corrupt_checkpoint(path, error) from None
    return step, states, rng


def corrupt_checkpoint(path: Path, error: BaseException | str) -> UsageError:
    if not isinstance(error, str):
        first = str(error).splitlines()[0] if str(error) else ""
        error = f"{type(error).__name__}: {first[:120]}"
    reason = error
    return UsageError(f"cannot resume from {path} ({reason.rstrip(': ')}); it is truncated, corrupt or not this "
                      f"run's: pass --restart to start from scratch (or delete {path.parent})")
