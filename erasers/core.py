"""The erase skeleton both sides share (diffusion: erasers.run; VLMs: vlm.run): refuse an existing output, work in
the locked, resumable `OUT.partial/` (erasers.outputs.RunDirectory), measure time and peak memory, save, and remove
the work directory once the edit is in place. What differs (loading, the eraser, what is saved) comes in as two
functions.

    with RunDirectory(out) as run:           # a second run on the same --out refuses here, before any model loads
        loaded = ...
        return run_resumably(run, signature, restart, loaded.device, erase, save)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError
from .files import (
    check_output_path,
    peak_memory_bytes,
    peak_resident_bytes,
    read_json,
    reset_peak_memory,
    write_atomically,
)
from .outputs import RunDirectory
from .validation import check_field


def check_new_output(out: Path) -> Path:
    """An edit is written to a new directory only: fail before any work if `out` exists or cannot be created."""
    out = check_output_path(Path(out))  # first: a dangling or looping link is named as such
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists; choose a new --out or remove it first")
    return out


def run_resumably(run: RunDirectory, signature: dict, restart: bool, device: torch.device,
                  erase: Callable[[Path], Any], save: Callable[[Any, dict], Path]) -> Path:
    """`erase(work_dir)` in the locked `run` directory (resuming the checkpoints of an interrupted run with the
    same `signature`, unless `restart`), then `save(content, cost)` with cost = {"seconds", "peak_memory_bytes",
    "runs"}: the total over the runs the edit took, the interrupted ones' kept in the work directory's cost.json.
    The work directory goes when `run`'s block ends well; it stays, resumable, when it fails."""
    work_dir = run.prepare(signature, restart)
    earlier = earlier_cost(work_dir)
    reset_peak_memory(device)
    started = time.time()
    try:
        content = erase(work_dir)
    except BaseException:
        # Interrupted (Ctrl-C) or failed after it saved work: its time counts when the edit is finished. A run
        # refused before it wrote anything leaves the work directory as it was; one killed outright (SIGKILL)
        # cannot record its time.
        if _written_since(work_dir, started):
            with contextlib.suppress(OSError, UsageError):  # a full disk: the error that stopped the run matters
                _record_cost(work_dir, earlier.plus(time.time() - started, peak_memory_bytes(device)))
        raise
    total = earlier.plus(time.time() - started, peak_memory_bytes(device))
    return save(content, dataclasses.asdict(total))


COST_FILE = "cost.json"


@dataclasses.dataclass(frozen=True)
class RunCost:
    """What the runs of one edit have cost so far, kept in OUT.partial/cost.json between runs."""

    seconds: float = field(default=0.0, metadata={"min": 0})
    peak_memory_bytes: int | None = field(default=None, metadata={"min": 0})
    runs: int = field(default=0, metadata={"min": 0})

    def plus(self, seconds: float, peak_memory_bytes: int | None) -> RunCost:
        peaks = [p for p in (self.peak_memory_bytes, peak_memory_bytes) if p is not None]
        return RunCost(self.seconds + seconds, max(peaks) if peaks else None, self.runs + 1)


def earlier_cost(work_dir: Path) -> RunCost:
    """The cost the earlier, interrupted runs in `work_dir` recorded (nothing for a fresh one)."""
    path = Path(work_dir) / COST_FILE
    if not path.exists():
        return RunCost()
    values = read_json(path, "pass --restart to start from scratch")
    try:
        for spec in dataclasses.fields(RunCost):
            check_field(f"{path}:", spec, values.get(spec.name, spec.default), noun="field")
    except UsageError as error:
        raise UsageError(f"{error}; pass --restart to start from scratch") from None
    return RunCost(**{spec.name: values.get(spec.name, spec.default) for spec in dataclasses.fields(RunCost)})


def _written_since(work_dir: Path, started: float) -> bool:
    return any(f.stat().st_mtime >= started for f in Path(work_dir).rglob("*") if f.is_file())


def _record_cost(work_dir: Path, cost: RunCost) -> None:
    write_atomically(Path(work_dir) / COST_FILE, json.dumps(dataclasses.asdict(cost)))


def describe_cost(seconds: float) -> str:
    """The line a command ends with: its wall time and this process's peak memory (the GPU's too when it used
    CUDA), e.g. "took 83.2 s, peak memory 2.10 GiB GPU, 3.41 GiB RAM"."""
    memory = f"{peak_resident_bytes() / 2 ** 30:.2f} GiB RAM"
    if torch.cuda.is_initialized():
        memory = f"{peak_memory_bytes(torch.device('cuda')) / 2 ** 30:.2f} GiB GPU, {memory}"
    return f"took {seconds:.1f} s, peak memory {memory}"
