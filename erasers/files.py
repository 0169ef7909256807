"""Writing outputs under a temporary name and renaming them, so a crash never leaves a half-written model; the
`OUT.partial/` directory an interrupted training run resumes from; the peak memory an erase reports."""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

import torch


def atomic_dir(final: Path) -> Path:
    """A fresh temporary directory beside `final`; pass it to `publish` once everything is written into it."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Move a completed temporary directory into place, replacing what was there."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def resumable_work_dir(out: Path, signature: dict) -> Path:
    """`OUT.partial/` for checkpoints of the run that will write `out`. Checkpoints left there by an interrupted run
    of the same command (same `signature`: method, config, concept, base model) are kept, so it resumes; any other
    run's are removed."""
    out = Path(out)
    work_dir = out.with_name(out.name + ".partial")
    run_file = work_dir / "run.json"
    if work_dir.exists() and (not run_file.exists() or json.loads(run_file.read_text()) != signature):
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(signature))
    return work_dir


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """This process's peak resident memory, model loading included. On Linux, VmHWM: ru_maxrss survives exec, so a
    process spawned by a large parent (a benchmark running each erase in a fresh process) would report the
    parent's peak, while VmHWM belongs to the process's own address space."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Without /proc: ru_maxrss, in KiB on most Unix systems (bytes on macOS, as before).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
