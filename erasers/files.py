"""What a run writes and where: outputs written under a unique temporary name and renamed, so a crash never leaves
a half-written model; the locked `OUT.partial/` an interrupted training run resumes from; the output folders a
command may write into; the peak memory an erase reports.

A run removes or writes into a folder only if it made it: the folders it makes beside the user's files carry a
`.erasure-run` marker, and the user's own `X.tmp/`, `X.old/` or `X.partial/` are never touched."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import resource
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import UsageError

MARKER = ".erasure-run"
_MADE_BY = "erasure-suite"
# Temporary directories this process made, each with its marker's open, flock'ed descriptor: a later run sweeps
# away only abandoned ones (marker present and no longer locked, because their process died).
_TEMP_LOCKS: dict[Path, int] = {}


def atomic_dir(final: Path) -> Path:
    """A fresh temporary directory beside `final` (`.NAME.<random>.tmp`, a name no user folder has); pass it to
    `publish` once everything is written into it, or use `writing_into`, which also handles a full disk."""
    final = Path(final)
    _sweep_abandoned(final)
    tmp = _new_sibling(final, ".tmp", directory=True)
    try:
        # The marker stays empty: publish_with_metadata sums the folder's bytes as the edit's storage.
        _TEMP_LOCKS[tmp] = _lock(os.open(tmp / MARKER, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def publish(tmp: Path, final: Path, replace: bool = False) -> None:
    """Move a completed temporary directory to `final`. An existing `final` is refused unless `replace` (for
    folders the caller itself owns, such as the toy build's stages); `tmp` is removed if it cannot be moved."""
    tmp, final = Path(tmp), Path(final)
    try:
        if (final.exists() or final.is_symlink()) and not replace:
            raise UsageError(f"{final} already exists; choose a new --out or remove it first")
        (tmp / MARKER).unlink(missing_ok=True)
        if final.exists() or final.is_symlink():
            _swap_in(tmp, final)
        else:
            try:
                os.rename(tmp, final)
            except OSError as error:  # a folder appeared at `final` meanwhile: never replace it
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise UsageError(f"{final} already exists; choose a new --out or remove it first") from None
    except BaseException:
        discard(tmp)
        raise
    _unlock(_TEMP_LOCKS.pop(tmp, None))


def _swap_in(tmp: Path, final: Path) -> None:
    # The old `final` waits in a fresh marked holder, never in a fixed `final.old` that could be the user's.
    holder = _new_sibling(final, ".old", directory=True)
    lock = _lock(os.open(holder / MARKER, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644))
    try:
        os.rename(final, holder / final.name)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(holder / final.name, final)
            raise
    finally:
        shutil.rmtree(holder, ignore_errors=True)
        _unlock(lock)


def discard(tmp: Path) -> None:
    """Remove a temporary directory from `atomic_dir`; anything else (no marker, or a live run's) is left alone."""
    tmp = Path(tmp)
    lock = _TEMP_LOCKS.pop(tmp, None)
    if lock is None:
        lock = _try_lock_marker(tmp)
    if lock is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        _unlock(lock)


@contextmanager
def writing_into(final: Path, replace: bool = False) -> Iterator[Path]:
    """`with writing_into(out) as tmp:` write into `tmp`; on success it is published as `out` (unless the body
    published it already), on any error removed. A full disk becomes one UsageError line naming `out`."""
    final, tmp = Path(final), None
    try:
        tmp = atomic_dir(final)
        yield tmp
        if tmp.exists():
            publish(tmp, final, replace)
    except BaseException as error:
        full = _disk_is_full(error, final.parent)  # judged before removing the temporary files frees space
        if tmp is not None:
            discard(tmp)
        if full:
            raise _full_disk(final) from None
        raise


def work_file(work_dir: str | Path | None, name: str) -> Path | None:
    """Where a method keeps `name` (drawn images, a mask) in a resumable run's work directory; None without one."""
    return Path(work_dir) / name if work_dir is not None else None


def save_atomically(path: str | Path, save: Callable[[Path], None]) -> Path:
    """Write one file: `save(tmp)` writes a unique hidden file beside `path` (same suffix, so savers that go by
    it work), which then replaces `path` in one rename; on any error it is removed. A full disk becomes one
    UsageError line naming `path`."""
    path, tmp = Path(path), None
    try:
        tmp = _new_sibling(path, ".tmp" + path.suffix, directory=False)
        save(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        full = _disk_is_full(error, path.parent)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if full:
            raise _full_disk(path) from None
        raise
    return path


def write_atomically(path: str | Path, data: bytes | str) -> Path:
    """`path` holds `data` (str as UTF-8) or, after an error, what it held before."""
    content = data.encode() if isinstance(data, str) else data
    return save_atomically(path, lambda tmp: tmp.write_bytes(content))


def _full_disk(path: Path) -> UsageError:
    return UsageError(f"the disk is full: could not write {path}; free some space and run the command again")


_FULL_DISK_TEXT = ("no space left on device", "storagefull", "disk quota exceeded", "os error 28")


def _disk_is_full(error: BaseException, directory: Path) -> bool:
    """Savers report a full disk in their own ways: OSError (Python), SafetensorError text (safetensors' Rust
    writer), "file write failed" with no errno at all (torch.save)."""
    for _ in range(8):  # the chain of causes
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error).lower()
        if any(sign in text for sign in _FULL_DISK_TEXT):
            return True
        if "write failed" in text:
            try:
                return shutil.disk_usage(directory).free < 1 << 20
            except OSError:
                return False
        error = error.__cause__ or error.__context__
    return False


def _marker_fields(directory: Path) -> dict:
    marker = Path(directory) / MARKER
    if Path(directory).is_symlink() or marker.is_symlink():
        return {}
    try:
        fields = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}


def _new_sibling(final: Path, suffix: str, directory: bool) -> Path:
    """A new hidden name beside `final`, made with O_EXCL semantics so it is nobody else's, its mode from the
    umask as for a plain mkdir or open (mkdtemp would make it 0700)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = final.with_name(f".{final.name[:200]}.{secrets.token_hex(4)}{suffix}")
        try:
            if directory:
                candidate.mkdir()
            else:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue


def _create_marked(target: Path, marker: str, file: bool = False) -> int | None:
    """Make `target` (a folder holding a marker with `marker`; with `file`, the marker file itself) already
    marked and locked, by renaming it into place: no other run ever sees it unmarked. None if `target` appeared
    meanwhile; else the lock's descriptor."""
    staged, fd = _new_sibling(target, ".tmp", directory=not file), None
    try:
        fd = _lock(os.open(staged if file else staged / MARKER, os.O_CREAT | os.O_RDWR, 0o644))
        os.pwrite(fd, marker.encode(), 0)
        if file:
            os.link(staged, target)  # link, unlike rename, never replaces an existing file
            staged.unlink()
        else:
            os.rename(staged, target)  # fails on an existing non-empty folder
        return fd
    except BaseException as error:
        if staged.exists():
            _remove(staged)
        _unlock(fd)
        if isinstance(error, OSError) and error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return None
        raise


def _lock(fd: int) -> int:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _try_lock_marker(directory: Path) -> int | None:
    """The lock of `directory`'s marker when nobody holds it (its run is over); None without a marker."""
    if directory.is_symlink() or not directory.is_dir():
        return None
    try:
        fd = os.open(directory / MARKER, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _lock(fd)
    except BlockingIOError:
        os.close(fd)
        return None


def _sweep_abandoned(final: Path) -> None:
    """Remove temporary folders beside `final` left by runs that died (their marker no longer locked)."""
    pattern = re.compile(rf"\.{re.escape(final.name[:200])}\.[0-9a-f]{{8}}\.(tmp|old)")
    try:
        entries = [entry for entry in final.parent.iterdir() if pattern.fullmatch(entry.name)]
    except OSError:
        return
    for entry in entries:
        lock = _try_lock_marker(entry)
        if lock is not None:
            shutil.rmtree(entry, ignore_errors=True)
            _unlock(lock)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def plain_json(value):
    """`value` as the plain JSON types it reads back as from a file (tuples as lists; what JSON cannot hold, as its
    text), so it compares equal to a saved copy of itself."""
    return json.loads(json.dumps(value, default=str))


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


def check_output_path(path: str | Path, flag: str = "--out", new: bool = False) -> Path:
    """Fail before any work if `path` cannot be created: its nearest existing ancestor must be a writable
    directory (not a file), and neither `path` nor an ancestor a broken symbolic link. With `new`, `path` must
    not exist at all (an output that is only ever written fresh)."""
    path = Path(path)
    broken = broken_link(path)
    if broken:
        raise UsageError(f"{flag} {path} is {broken}; pass a real path")
    if new and (path.exists() or path.is_symlink()):
        raise UsageError(f"{flag} {path} already exists; choose a new {flag} or remove it first")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        broken = broken_link(ancestor)
        if broken:
            raise UsageError(f"{flag} {path} cannot be created: {ancestor} is {broken}; choose another {flag}")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path} cannot be created: {ancestor} is a file, not a directory; choose another "
                         f"{flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only_filesystem(ancestor):
        raise UsageError(f"{flag} {path} cannot be created: {ancestor} is not writable; choose another {flag}")
    return path


def broken_link(path: Path) -> str | None:
    """How `path` is a symbolic link that leads nowhere: writing through it would fail only after the work."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return None


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
