"""Writing outputs under a temporary name and renaming them, so a crash never leaves a half-written model; the
`OUT.partial/` directory an interrupted training run resumes from; the peak memory an erase reports."""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

import torch

from .errors import UsageError


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


def resumable_work_dir(out: Path, signature: dict, restart: bool = False) -> Path:
    """`OUT.partial/` for checkpoints of the run that will write `out`. Checkpoints left there by an interrupted run
    of the same command (same `signature`: method, config, concept, base model) are kept, so it resumes; any other
    run's are removed. With `restart` they are removed too; a `run.json` that cannot be read is reported (pass
    --restart), never silently discarded."""
    out = Path(out)
    work_dir = out.with_name(out.name + ".partial")
    run_file = work_dir / "run.json"
    if restart and (work_dir.exists() or work_dir.is_symlink()):
        _remove(work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise UsageError(f"{work_dir} is a file, not an interrupted run's directory; pass --restart to replace it")
    if work_dir.exists():
        previous = read_json(run_file, "--restart to start from scratch") if run_file.exists() else None
        if previous != signature:
            shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(signature))
    return work_dir


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def read_json(path: str | Path, remedy: str, kind: type = dict):
    """The JSON value in `path` (a dict unless `kind` says otherwise); unreadable, not JSON (binary or text
    garbage) or of another kind, it is a UsageError ending in `remedy` ("pass --restart ...")."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except OSError as error:
        raise UsageError(f"cannot read {path} ({error.strerror}); {remedy}") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError (binary garbage) alike
        raise UsageError(f"{path} is corrupt: not valid JSON ({str(error).splitlines()[0][:80]}); {remedy}") from None
    if not isinstance(value, kind):
        raise UsageError(f"{path} is corrupt: it holds a JSON {type(value).__name__}, not an object; {remedy}")
    return value


def check_output_path(path: str | Path, flag: str = "--out") -> Path:
    """Fail before any work if `path` cannot be created: its nearest existing ancestor must be a writable
    directory (not a file)."""
    path = Path(path)
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path} cannot be created: {ancestor} is a file, not a directory; choose another "
                         f"{flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only_filesystem(ancestor):
        raise UsageError(f"{flag} {path} cannot be created: {ancestor} is not writable; choose another {flag}")
    return path


def _read_only_filesystem(directory: Path) -> bool:
    # os.access does not see a read-only mount for root.
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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
