"""The erase skeleton both sides share (diffusion: erasers.run; VLMs: vlm.run): refuse an existing output, work in
the locked, resumable `OUT.partial/` (erasers.outputs.RunDirectory), measure time and peak memory, save, and remove
the work directory once the edit is in place. What differs (loading, the eraser, what is saved) comes in as two
functions.

    with RunDirectory(out) as run:           # a second run on the same --out refuses here, before any model loads
        loaded = ...
        return run_resumably(run, signature, restart, loaded.device, erase, save)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError
from .files import check_output_path, peak_memory_bytes, peak_resident_bytes, reset_peak_memory
from .outputs import RunDirectory


def check_new_output(out: Path) -> Path:
    """An edit is written to a new directory only: fail before any work if `out` exists or cannot be created."""
    out = check_output_path(Path(out))  # first: a dangling or looping link is named as such
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists; choose a new --out or remove it first")
    return out


def run_resumably(run: RunDirectory, signature: dict, restart: bool, device: torch.device,
                  erase: Callable[[Path], Any], save: Callable[[Any, dict], Path]) -> Path:
    """`erase(work_dir)` in the locked `run` directory (resuming the checkpoints of an interrupted run with the
    same `signature`, unless `restart`), then `save(content, cost)` with cost = {"seconds", "peak_memory_bytes"}.
    The work directory goes when `run`'s block ends well; it stays, resumable, when it fails."""
    work_dir = run.prepare(signature, restart)
    reset_peak_memory(device)
    started = time.time()
    content = erase(work_dir)
    cost = {"seconds": time.time() - started, "peak_memory_bytes": peak_memory_bytes(device)}
    return save(content, cost)


def describe_cost(seconds: float) -> str:
    """The line a command ends with: its wall time and this process's peak memory (the GPU's too when it used
    CUDA), e.g. "took 83.2 s, peak memory 2.10 GiB GPU, 3.41 GiB RAM"."""
    memory = f"{peak_resident_bytes() / 2 ** 30:.2f} GiB RAM"
    if torch.cuda.is_initialized():
        memory = f"{peak_memory_bytes(torch.device('cuda')) / 2 ** 30:.2f} GiB GPU, {memory}"
    return f"took {seconds:.1f} s, peak memory {memory}"
