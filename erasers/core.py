"""The erase skeleton both sides share (diffusion: erasers.run; VLMs: vlm.run): refuse an existing output, work in
the resumable `OUT.partial/`, measure time and peak memory, save, and remove the work directory once the edit is
in place. What differs (loading, the eraser, what is saved) comes in as two functions."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError
from .files import check_output_path, peak_memory_bytes, reset_peak_memory, resumable_work_dir


def check_new_output(out: Path) -> Path:
    """An edit is written to a new directory only: fail before any work if `out` exists or cannot be created."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists; choose a new --out or remove it first")
    return check_output_path(out)


def run_resumably(out: Path, signature: dict, restart: bool, device: torch.device,
                  erase: Callable[[Path], Any], save: Callable[[Any, dict], Path]) -> Path:
    """`erase(work_dir)` in `out`.partial (resuming the checkpoints of an interrupted run with the same
    `signature`, unless `restart`), then `save(content, cost)` with cost = {"seconds", "peak_memory_bytes"}."""
    work_dir = resumable_work_dir(out, signature, restart)
    reset_peak_memory(device)
    started = time.time()
    content = erase(work_dir)
    cost = {"seconds": time.time() - started, "peak_memory_bytes": peak_memory_bytes(device)}
    saved = save(content, cost)
    shutil.rmtree(work_dir, ignore_errors=True)
    return saved
