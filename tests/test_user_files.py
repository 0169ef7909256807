"""A run removes or overwrites only what it made (issue 46): the user's own `X.tmp/`, `X.old/`, `X.partial/` and
output folders survive byte for byte; a second run on the same `--out` refuses while the first holds
`X.partial/`; a full disk is one line and leaves no temporary folder; a dangling `--out` link is refused up front.
Library calls only, no model."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from erasers.errors import UsageError
from erasers.files import (
    MARKER,
    atomic_dir,
    check_output_path,
    discard,
    publish,
    save_atomically,
    write_atomically,
    writing_into,
)
from erasers.outputs import RunDirectory, claim_output_dir, claimed_output_dir, mark_run_dir, resumable_run

SIGNATURE = {"method": "esd-x", "concept": "arrow"}
ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` with its bytes (files), target (links) or None (folders)."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            entries[key] = ("link", os.readlink(path))
        elif path.is_file():
            entries[key] = path.read_bytes()
        else:
            entries[key] = None
    return entries


def users_folder(path: Path) -> dict:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("the user's own notes\n")
    (path / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    (path / "run.json").write_text('{"mine": true}')
    return snapshot(path)


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_saving_an_edit_leaves_the_users_tmp_and_old_folders_alone(tmp_path):
    kept = {name: users_folder(tmp_path / name) for name in ("X.tmp", "X.old")}
    with writing_into(tmp_path / "X") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".X.") and tmp.name.endswith(".tmp")
        (tmp / "model.safetensors").write_bytes(b"weights")
    assert snapshot(tmp_path / "X") == {"model.safetensors": b"weights"}, "the marker is not published"
    assert {name: snapshot(tmp_path / name) for name in kept} == kept
    assert hidden_leftovers(tmp_path) == []

    # The old two-step API, and replacing a folder the caller owns: X.old is still the user's.
    tmp = atomic_dir(tmp_path / "X")
    (tmp / "model.safetensors").write_bytes(b"new weights")
    publish(tmp, tmp_path / "X", replace=True)
    assert snapshot(tmp_path / "X") == {"model.safetensors": b"new weights"}
    assert {name: snapshot(tmp_path / name) for name in kept} == kept
    assert hidden_leftovers(tmp_path) == []


def test_publish_refuses_an_existing_output_unless_asked(tmp_path):
    kept = users_folder(tmp_path / "X")
    tmp = atomic_dir(tmp_path / "X")
    (tmp / "edit.bin").write_bytes(b"edit")
    with pytest.raises(UsageError, match="X already exists; choose a new --out"):
        publish(tmp, tmp_path / "X")
    assert snapshot(tmp_path / "X") == kept and hidden_leftovers(tmp_path) == []
    with pytest.raises(UsageError, match="already exists"), writing_into(tmp_path / "X") as tmp:
        (tmp / "edit.bin").write_bytes(b"edit")
    assert snapshot(tmp_path / "X") == kept and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("content", ["no record", "another run's record", "a file", "a link"])
def test_a_users_partial_folder_is_refused_and_kept(tmp_path, content, restart):
    partial = tmp_path / "X.partial"
    if content == "a file":
        partial.write_text("mine")
    elif content == "a link":
        (tmp_path / "elsewhere").mkdir()
        partial.symlink_to(tmp_path / "elsewhere")
    else:
        users_folder(partial)
        if content == "no record":
            (partial / "run.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match=r"X\.partial .*not an interrupted erasure run's; move it away or choose "
                                         "another --out") as error, resumable_run(tmp_path / "X", SIGNATURE, restart):
        pass
    assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match="move it away"), resumable_run(tmp_path / "X", SIGNATURE, restart):
        pass
    assert snapshot(tmp_path) == before and hidden_leftovers(tmp_path) == []


def test_an_erasure_runs_own_partial_folder_resumes_or_is_replaced(tmp_path):
    out = tmp_path / "X"
    with pytest.raises(RuntimeError, match="interrupted"), resumable_run(out, SIGNATURE) as work_dir:
        assert work_dir == tmp_path / "X.partial" and (work_dir / MARKER).is_file()
        (work_dir / "ckpt").mkdir()
        (work_dir / "ckpt" / "step-4.safetensors").write_bytes(b"checkpoint")
        raise RuntimeError("interrupted")
    assert (tmp_path / "X.partial" / "ckpt" / "step-4.safetensors").read_bytes() == b"checkpoint", "kept to resume"

    before = snapshot(tmp_path)
    with pytest.raises(UsageError), resumable_run(out, SIGNATURE):
        raise UsageError("a bad input found after resuming")
    assert snapshot(tmp_path) == before, "a refused run leaves OUT.partial byte for byte"
    with resumable_run(out, SIGNATURE) as work_dir:
        assert (work_dir / "ckpt" / "step-4.safetensors").exists(), "the same run resumes"
    assert not (tmp_path / "X.partial").exists(), "a finished run removes its work directory"

    with pytest.raises(RuntimeError), resumable_run(out, SIGNATURE) as work_dir:
        (work_dir / "ckpt").mkdir()
        raise RuntimeError
    with resumable_run(out, {**SIGNATURE, "concept": "star"}) as work_dir:
        assert sorted(p.name for p in work_dir.iterdir()) == [MARKER, "run.json"], "another run's is replaced"
        assert json.loads((work_dir / "run.json").read_text())["concept"] == "star"
        (work_dir / "ckpt").mkdir()
        with pytest.raises(UsageError, match="another erasure run is using"):
            RunDirectory(out).lock()  # a second run in this very process, too
    assert not (tmp_path / "X.partial").exists()


def test_restart_and_a_previous_versions_partial_folder(tmp_path):
    # A previous version wrote run.json but no marker: its own run resumes (and marks it), --restart then works.
    partial = tmp_path / "X.partial"
    (partial / "ckpt").mkdir(parents=True)
    (partial / "run.json").write_text(json.dumps(SIGNATURE))
    (partial / "ckpt" / "a.safetensors").write_bytes(b"a")
    with pytest.raises(RuntimeError), resumable_run(tmp_path / "X", SIGNATURE) as work_dir:
        assert (work_dir / "ckpt" / "a.safetensors").exists() and (work_dir / MARKER).is_file()
        raise RuntimeError
    with pytest.raises(RuntimeError), resumable_run(tmp_path / "X", SIGNATURE, restart=True) as work_dir:
        assert sorted(p.name for p in work_dir.iterdir()) == [MARKER, "run.json"]
        raise RuntimeError

    # An erasure run's folder with an unreadable run.json: reported with the remedy that works.
    (partial / "run.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(UsageError, match="corrupt.*pass --restart"), resumable_run(tmp_path / "X", SIGNATURE):
        pass
    with resumable_run(tmp_path / "X", SIGNATURE, restart=True) as work_dir:
        assert work_dir == partial
        assert json.loads((partial / "run.json").read_text()) == SIGNATURE


def test_mark_run_dir_makes_a_hand_built_partial_folder_an_erasure_runs(tmp_path):
    partial = tmp_path / "X.partial"
    (partial / "ckpt").mkdir(parents=True)
    (partial / "run.json").write_bytes(b"binary \x00")
    mark_run_dir(partial)
    with pytest.raises(UsageError, match="pass --restart"), resumable_run(tmp_path / "X", SIGNATURE):
        pass


HOLDER = textwrap.dedent("""
    import sys
    from erasers.files import atomic_dir
    from erasers.outputs import resumable_run
    with resumable_run(sys.argv[1], {"method": "esd-x", "concept": "arrow"}) as work_dir:
        (work_dir / "ckpt").mkdir(exist_ok=True)
        (work_dir / "ckpt" / "step-2.safetensors").write_bytes(b"live checkpoint")
        atomic_dir(sys.argv[2])
        print("locked", flush=True)
        sys.stdin.read()  # killed here: the lock goes with the process, the work directory stays
""")


def test_a_second_run_on_the_same_out_refuses_while_the_first_works(tmp_path):
    out, other = tmp_path / "X", tmp_path / "Y"
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(other)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline().strip() == "locked"
        live = snapshot(tmp_path)
        for restart in (False, True):
            with pytest.raises(UsageError, match=rf"another erasure run is using .*X\.partial \(pid {first.pid}\); "
                                                 "wait for it or choose another --out"), \
                    resumable_run(out, {**SIGNATURE, "concept": "star"}, restart):
                pass
        with pytest.raises(UsageError, match="another erasure run"), resumable_run(out, SIGNATURE):
            pass
        discard(atomic_dir(other))  # sweeps only abandoned temporary folders: the live run's stays
        assert snapshot(tmp_path) == live, "the live run's files are untouched"
        assert len([p for p in hidden_leftovers(tmp_path) if p.startswith(".Y.")]) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # The lock died with its process: the next run resumes from the checkpoint, and sweeps the dead temp folder.
    with resumable_run(out, SIGNATURE) as work_dir:
        assert (work_dir / "ckpt" / "step-2.safetensors").read_bytes() == b"live checkpoint"
    (tmp_path / ".Y.0123abcd.tmp").mkdir()  # looks like ours but has no marker: a user's, never swept
    with writing_into(other) as tmp:
        (tmp / "a").write_bytes(b"a")
    assert hidden_leftovers(tmp_path) == [".Y.0123abcd.tmp"]


def full_disk_save(target: Path) -> None:
    target.write_bytes(b"half a tensor")
    raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_full_disk(target: Path) -> None:
    target.write_bytes(b"half a tensor")
    raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                       'on device" })')


@pytest.mark.parametrize("save", [full_disk_save, safetensors_full_disk])
def test_a_full_disk_is_one_line_leaves_no_temporary_folder_and_keeps_the_partial_state(tmp_path, save):
    out = tmp_path / "edit"
    with pytest.raises(UsageError) as error, resumable_run(out, SIGNATURE) as work_dir:
        (work_dir / "ckpt").mkdir()
        (work_dir / "ckpt" / "last.safetensors").write_bytes(b"checkpoint")
        with writing_into(out) as tmp:
            (tmp / "unet").mkdir()
            save(tmp / "unet" / "model.safetensors")
    message = str(error.value)
    assert "\n" not in message and f"the disk is full: could not write {out}; free some space" in message
    assert not out.exists() and hidden_leftovers(tmp_path) == []
    assert (tmp_path / "edit.partial" / "ckpt" / "last.safetensors").read_bytes() == b"checkpoint", "resumable"


def test_single_files_are_replaced_atomically(tmp_path):
    target = tmp_path / "results.json"
    write_atomically(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    seen = []
    save_atomically(target, lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"{}"))
    assert target.read_bytes() == b"{}" and seen[0].startswith(".results.json.") and seen[0].endswith(".tmp.json")
    with pytest.raises(UsageError, match=f"the disk is full: could not write {target}"):
        save_atomically(target, full_disk_save)
    with pytest.raises(ValueError, match="broken"):
        save_atomically(target, lambda tmp: (_ for _ in ()).throw(ValueError("broken")))
    assert target.read_bytes() == b"{}" and hidden_leftovers(tmp_path) == []
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask()), "the umask decides, as for open()"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_dangling_or_existing_out_is_refused_up_front(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="--out .*dangling is a symbolic link to .*nowhere, which does not exist"):
        check_output_path(tmp_path / "dangling")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(UsageError, match="symbolic link loop"):
        check_output_path(tmp_path / "loop")
    with pytest.raises(UsageError, match="cannot be created: .*dangling is a symbolic link"):
        check_output_path(tmp_path / "dangling" / "edit")
    with pytest.raises(UsageError, match="dangling"):
        claim_output_dir(tmp_path / "dangling", "metrics.json")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    for existing in ("file", "folder", "dangling"):
        with pytest.raises(UsageError, match="already exists; choose a new --out|symbolic link"):
            check_output_path(tmp_path / existing, new=True)
    assert check_output_path(tmp_path / "new" / "edit", new=True) == tmp_path / "new" / "edit"
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "nowhere").exists()


def test_a_results_folder_is_one_the_command_made_or_holds_its_manifest(tmp_path):
    kept = users_folder(tmp_path / "mine")
    with pytest.raises(UsageError, match="--out .*mine already exists and was not made by this command; choose a "
                                         "new --out"):
        claim_output_dir(tmp_path / "mine", "metrics.json")
    assert snapshot(tmp_path / "mine") == kept

    made = claim_output_dir(tmp_path / "runs" / "compare", "metrics.json")
    assert made.is_dir() and claim_output_dir(made, "metrics.json") == made, "a rerun before the manifest exists"
    with pytest.raises(UsageError, match="not made by this command"):
        claim_output_dir(made, "results.json")  # another command's folder
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    assert claim_output_dir(tmp_path / "done", "results.json") == tmp_path / "done"
    (tmp_path / "report.md").write_text("mine")
    with pytest.raises(UsageError, match="is a file"):
        claim_output_dir(tmp_path / "report.md", "results.json")
    assert hidden_leftovers(tmp_path) == []


def test_a_run_that_fails_before_writing_removes_only_the_folder_it_made(tmp_path):
    with pytest.raises(UsageError), claimed_output_dir(tmp_path / "new", "results.json"):
        raise UsageError("bad input found late")
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt), claimed_output_dir(tmp_path / "worked", "results.json") as out:
        (out / "manifest.jsonl").write_text("{}\n")
        raise KeyboardInterrupt
    assert (tmp_path / "worked" / "manifest.jsonl").is_file(), "work done before the failure is kept to resume"
    made = claim_output_dir(tmp_path / "rerun", "results.json")
    with pytest.raises(UsageError), claimed_output_dir(made, "results.json"):
        raise UsageError("a rerun's failure")
    assert made.is_dir(), "a folder an earlier run made is not this run's to remove"


def test_toy_build_restart_clears_checkpoints_only_in_a_folder_a_build_made(tmp_path):
    from benchmarks.commands import prepare_build_dir

    prepare_build_dir(str(tmp_path / "build"), restart=False)  # new: made, marked as the build's
    (tmp_path / "build" / "ckpt").mkdir()
    (tmp_path / "build" / "ckpt" / "unet.safetensors").write_text("checkpoint")
    (tmp_path / "build" / "data").mkdir()
    prepare_build_dir(str(tmp_path / "build"), restart=False)  # its own folder: the build resumes in it
    assert (tmp_path / "build" / "ckpt" / "unet.safetensors").is_file()
    prepare_build_dir(str(tmp_path / "build"), restart=True)
    assert not (tmp_path / "build" / "ckpt").exists() and (tmp_path / "build" / "data").is_dir()
    (tmp_path / "mine" / "ckpt").mkdir(parents=True)
    (tmp_path / "mine" / "ckpt" / "notes.txt").write_text("mine")
    kept = snapshot(tmp_path / "mine")
    for restart in (True, False):
        with pytest.raises(UsageError, match="carries no build marker"):
            prepare_build_dir(str(tmp_path / "mine"), restart=restart)
    assert snapshot(tmp_path / "mine") == kept
