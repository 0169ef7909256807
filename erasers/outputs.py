"""The output policy of a run: the locked `OUT.partial/` an interrupted training run resumes from, and the folders a
command may write its results into. A run clears or removes only folders carrying an erasure run's marker
(erasers.files.MARKER); everything else beside `--out` is the user's and refused with one line."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UsageError
from .files import (
    _MADE_BY,
    MARKER,
    _create_marked,
    _lock,
    _marker_fields,
    _remove,
    _same_file,
    _unlock,
    check_output_path,
    read_json,
    write_atomically,
)


class RunDirectory:
    """`OUT.partial/` of the run that will write `out`, flock'ed for as long as the run works in it, so a second
    run on the same `--out` refuses instead of deleting a live run's checkpoints. Only a folder carrying an
    erasure run's marker is ever cleared or removed; the lock goes with the process if it dies.

        with RunDirectory(out) as run:       # lock early: a second run refuses before loading a model
            ...
            work_dir = run.prepare(signature, restart)
            ...                              # train, save the edit; on success OUT.partial/ is removed
    """

    def __init__(self, out: str | Path):
        out = Path(out)
        self.path = out.with_name(out.name + ".partial")
        self._fd: int | None = None
        self._created = self._prepared = False

    def __enter__(self) -> RunDirectory:
        self.lock()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(finished=kind is None)

    @property
    def fresh(self) -> bool:
        """Whether `lock` made the folder now (nothing to resume), so a run may `prepare` it only once it has work
        to keep: bad input found before then leaves nothing behind."""
        return self._created

    def lock(self) -> None:
        """Take the lock, making `OUT.partial/` if absent; refuse a folder that is not an erasure run's or that a
        live run holds. A previous version's folder (run.json, no marker) is judged by `prepare`."""
        for _ in range(20):  # each turn loses a race with another run making or removing the folder
            path = self.path
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise self._foreign("is not a folder")
            if not path.exists():
                fd = _create_marked(path, _run_marker())
                if fd is not None:
                    self._fd, self._created = fd, True
                    return
                continue
            marker = path / MARKER
            if not marker.is_file() or marker.is_symlink():
                if not (path / "run.json").is_file():
                    raise self._foreign("holds no erasure run's record")
                return  # a previous version's run: prepare decides with the signature
            fd = self._lock_existing(marker)
            if fd is not None:
                self._fd = fd
                return
        raise UsageError(f"another erasure run keeps replacing {self.path}; wait for it or choose another --out")

    def _lock_existing(self, marker: Path) -> int | None:
        try:
            fd = os.open(marker, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            _lock(fd)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another erasure run is using {self.path} (pid {_lock_holder(marker)}); wait for it "
                             "or choose another --out") from None
        if not _same_file(fd, marker):  # removed by its finished run between open and flock
            _unlock(fd)
            return None
        if _marker_fields(self.path).get("made_by") != _MADE_BY:
            _unlock(fd)
            raise self._foreign("holds a .erasure-run file erasure did not write")
        return fd

    def prepare(self, signature: dict, restart: bool = False) -> Path:
        """The locked work directory with this run's `signature` (method, config, concept, base model) in run.json:
        checkpoints of an interrupted run with the same signature are kept, so it resumes; another erasure
        run's, or any with `restart`, are removed. An unreadable run.json is reported, never discarded."""
        run_file = self.path / "run.json"
        if self._fd is None:
            self.lock()
        if self._fd is None:  # a previous version's run directory: ours only if it is this very run's
            try:
                previous = json.loads(run_file.read_bytes())
            except (OSError, ValueError):
                previous = None
            if previous != signature:
                raise self._foreign("holds another run's or an unreadable run.json and no erasure marker")
            fd = _create_marked(self.path / MARKER, _run_marker(), file=True)
            self._fd = fd if fd is not None else self._lock_existing(self.path / MARKER)
            if self._fd is None:
                raise UsageError(f"another erasure run is using {self.path}; wait for it or choose another --out")
        self._prepared = True
        if not restart and (run_file.exists() or run_file.is_symlink()):
            if read_json(run_file, "pass --restart to start from scratch") == signature:
                return self.path  # resumed untouched: a run refused later leaves it byte for byte
        self._clear()  # restarted, another run's, or one that died before writing run.json
        write_atomically(run_file, json.dumps(signature))
        return self.path

    def _clear(self) -> None:
        for entry in self.path.iterdir():
            if entry.name != MARKER:
                _remove(entry)

    def close(self, finished: bool) -> None:
        """Release the lock; when the run `finished` (its output saved), or when it never began to work in a
        folder it made itself, the folder goes too."""
        if self._fd is not None and (finished or (self._created and not self._prepared)):
            shutil.rmtree(self.path, ignore_errors=True)
        _unlock(self._fd)
        self._fd = None

    def _foreign(self, why: str) -> UsageError:
        return UsageError(f"{self.path} {why}, so it is not an interrupted erasure run's; move it away or choose "
                          "another --out")


@contextmanager
def resumable_run(out: Path, signature: dict, restart: bool = False) -> Iterator[Path]:
    """`with resumable_run(out, signature, restart) as work_dir:` train and save; `OUT.partial/` is removed when
    the block succeeds and kept (resumable) when it fails; it is locked throughout."""
    with RunDirectory(out) as run:
        yield run.prepare(signature, restart)


def mark_run_dir(directory: Path) -> None:
    """Mark `directory` as made by an erasure run (tests and fixtures that build an interrupted run by hand)."""
    (Path(directory) / MARKER).write_text(_run_marker())


def claim_output_dir(out: str | Path, manifest: str, flag: str = "--out", create: bool = True) -> Path:
    """The folder a command writes its results into (compare, bench): one it makes now, or one that already
    holds its `manifest` file or its marker (a rerun resumes or refreshes it). Any other existing folder is the
    user's and refused. With `create` False it only checks (bad input found later must leave nothing behind)."""
    return _claim(out, manifest, flag, create)[0]


@contextmanager
def claimed_output_dir(out: str | Path, manifest: str, flag: str = "--out") -> Iterator[Path]:
    """`claim_output_dir` for the block: a folder made by this call is removed again when the block fails before
    writing anything into it, so bad input found late still leaves nothing behind; one holding work is kept."""
    out, made = _claim(out, manifest, flag, True)
    try:
        yield out
    except BaseException:
        if made and [entry.name for entry in out.iterdir()] == [MARKER]:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _claim(out: str | Path, manifest: str, flag: str, create: bool) -> tuple[Path, bool]:
    """(the folder, whether this call made it)."""
    out = check_output_path(out, flag)
    for _ in range(20):
        if not create and not out.exists():
            return out, False
        if out.exists():
            if not out.is_dir():
                raise UsageError(f"{flag} {out} is a file; this command writes a folder: choose a new {flag}")
            if (out / manifest).is_file() or _marker_fields(out).get("manifest") == manifest:
                return out, False
            raise UsageError(f"{flag} {out} already exists and was not made by this command; choose a new {flag}")
        fd = _create_marked(out, json.dumps({"made_by": _MADE_BY, "manifest": manifest}))
        if fd is not None:
            _unlock(fd)
            return out, True
    raise UsageError(f"{flag} {out} keeps changing under this command; choose a new {flag}")


def _run_marker() -> str:
    # Never rewritten while the folder lives: a refused or failed run must leave OUT.partial/ byte for byte.
    return json.dumps({"made_by": _MADE_BY})


def _lock_holder(marker: Path) -> str:
    """The pid holding `marker`'s flock, from Linux's /proc/locks ("unknown" elsewhere); the lock itself, not a
    pid written in a file, decides, so a dead run never blocks the next."""
    try:
        inode = os.stat(marker).st_ino
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if "->" not in fields and len(fields) > 5 and fields[1] == "FLOCK" and \
                        fields[5].rsplit(":", 1)[-1] == str(inode):
                    return fields[4]
    except (OSError, ValueError):
        pass
    return "unknown"


