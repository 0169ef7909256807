"""No user file is ever lost (issue 46), through the `erasure` command: two erases on the same --out at once (one
refuses, the other finishes intact); a user's `X.old/`, `X.tmp/`, `X.partial/` and an existing --out folder survive
every writing command byte for byte; a Q16 pickle is never unpickled; the app, driven through a whole session with
an empty HOME and TMPDIR, writes only under --output."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY_CSV = str(ROOT / "benchmarks" / "toycanvas" / "prompts" / "i2p_skull.csv")


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` with its bytes (files), target (links) or None (folders)."""
    entries = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            entries[key] = ("link", os.readlink(path))
        elif path.is_file():
            entries[key] = path.read_bytes()
        else:
            entries[key] = None
    return entries


def users_folders(root: Path, name: str, suffixes=(".old", ".tmp", ".partial")) -> dict:
    """The user's own `NAME.old/`, `NAME.tmp/` and `NAME.partial/` (no erasure run's record) beside `root/NAME`."""
    root.mkdir(parents=True, exist_ok=True)
    for suffix in suffixes:
        folder = root / f"{name}{suffix}"
        (folder / "sub").mkdir(parents=True)
        (folder / "notes.txt").write_text(f"the user's own {suffix} notes\n")
        (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    return snapshot(root)


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("erasure: error:")]


# ----------------------------------------------------------------------------------------------------------------
# The app: a whole session in its own process, HOME and TMPDIR fresh and empty

# Logs every write the interpreter makes (files opened for writing, folders made, renames, removals) outside
# --output; writes made by compiled libraries (onnxruntime's telemetry, sqlite) show up in HOME or TMPDIR instead.
AUDITED_APP = """
import os, sys
output = os.path.realpath(sys.argv[1])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate", "shutil.rmtree"}

staged = os.path.join(os.path.dirname(output), "." + os.path.basename(output) + ".")  # made, then renamed output

def outside(path):
    if isinstance(path, int) or path is None:
        return False
    path = os.path.realpath(os.fsdecode(path))
    return not (path == output or path.startswith((output + os.sep, staged, "/dev/", "/proc/")))

def audit(event, args):
    if event == "os.mkdir" and os.path.isdir(args[0]):
        return  # makedirs(exist_ok=True) on a folder that exists
    if event == "open" and isinstance(args[2], int) and args[2] & WRITE_FLAGS and outside(args[0]) or \\
            event in EVENTS and outside(args[0]):
        sys.__stderr__.write(f"WROTE OUTSIDE --output: {event} {args[0]}\\n")

sys.addaudithook(audit)
from apps.cli import main
sys.exit(main(["app", "--output", sys.argv[1], "--edits", sys.argv[2], "--port", sys.argv[3]]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, app: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if app.poll() is not None:
            pytest.fail(f"the app exited with {app.returncode}: {app.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer at {url} within {seconds} s")


@pytest.mark.heavy  # about 40 s: an app process with its models, a comparison and a VLM question
def test_the_app_writes_only_under_its_output_folder(tmp_path, shared_edit, capsys):
    from gradio_client import Client, handle_file

    home, tmp, cwd, edits = (tmp_path / name for name in ("home", "tmp", "cwd", "edits"))
    for folder in (home, tmp, cwd, edits):
        folder.mkdir()
    (edits / "no-star").symlink_to(shared_edit["edit"], target_is_directory=True)
    image = tmp_path / "question.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "yellow").save(image)
    edits_before = snapshot(shared_edit["edit"])
    output, port = tmp_path / "app-output", _free_port()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    for variable in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "GRADIO_TEMP_DIR"):
        env.pop(variable, None)  # the defaults under HOME and TMPDIR are what a user has
    # -B: the interpreter's own bytecode cache is Python's, not the app's (and stale when files are being edited).
    app = subprocess.Popen([sys.executable, "-B", "-c", AUDITED_APP, str(output), str(edits), str(port)], cwd=cwd,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, app)
        client = Client(url, verbose=False, download_files=str(tmp_path / "client"))
        gallery = client.predict("A star image in Flat style.", 0, 2, 5.0, ["no-star"], False, api_name="/generate")
        assert len(gallery) == 2 and "uce erasing star" in gallery[1]["caption"]
        base, edited = client.predict(handle_file(str(image)), "What object is in this image?", None,
                                     api_name="/ask_vlm")
        assert isinstance(base, str) and edited == "(choose an edit)"
    finally:
        app.send_signal(signal.SIGINT)
        try:
            _, stderr = app.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            app.kill()
            _, stderr = app.communicate()
    outside = [line for line in stderr.splitlines() if line.startswith("WROTE OUTSIDE")]
    assert outside == [], "\n".join(outside)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert snapshot(home) == {} and snapshot(tmp) == {} and snapshot(cwd) == {}, "written outside --output"
    assert snapshot(shared_edit["edit"]) == edits_before
    assert any(output.rglob("*.png")), "gradio's image cache is under --output"


# ----------------------------------------------------------------------------------------------------------------
# One edit for the module, made where the user keeps `edit.old/` and `edit.tmp/`

@pytest.fixture(scope="module")
def shared_edit(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    kept = users_folders(root, "edit", (".old", ".tmp"))
    code = main(["erase", "--method", "uce", "--concept", "star", "--device", "cpu", "--out", str(root / "edit")])
    return {"root": root, "edit": root / "edit", "code": code, "kept": kept}


def test_an_erase_beside_the_users_old_and_tmp_folders_leaves_them(shared_edit):
    from erasers.edits import apply_edits, read_edit
    from erasers.models import load_pipeline

    assert shared_edit["code"] == 0
    root = shared_edit["root"]
    assert {k: v for k, v in snapshot(root).items() if not k.startswith("edit/") and k != "edit"} == \
        shared_edit["kept"]
    assert read_edit(shared_edit["edit"])["method"] == "uce"
    apply_edits(load_pipeline("toy", device="cpu"), [shared_edit["edit"]])
