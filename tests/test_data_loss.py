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
from test_user_files import snapshot  # tests/ is on the path (conftest.py), as for tiny_pipelines

from apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY_CSV = str(ROOT / "benchmarks" / "toycanvas" / "prompts" / "i2p_skull.csv")


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


@pytest.mark.heavy  # about 15 s: an app process with its models, a comparison and a VLM question
def test_the_app_writes_only_under_its_output_folder(tmp_path, shared_edit):
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


# ----------------------------------------------------------------------------------------------------------------
# Two erases on the same --out at once

@pytest.mark.heavy  # two erase processes side by side: about 20 s
def test_two_erases_on_the_same_out_at_once_one_refuses_and_the_other_finishes_intact(tmp_path):
    from erasers.edits import apply_edits, read_edit
    from erasers.models import load_pipeline

    out = tmp_path / "edit"
    # Long enough (about 7 s of training) that the later of two runs started together reaches the lock first.
    argv = [sys.executable, "-m", "apps.cli", "erase", "--method", "hirm", "--concept", "star", "--set",
            "iterations=100", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = sorted((run.wait(timeout=300), run.stderr.read()) for run in runs)
    (finished, finished_err), (refused, refused_err) = results
    assert finished == 0, finished_err[-2000:]
    errors = [line for line in refused_err.splitlines() if line.startswith("erasure: error:")]
    assert refused == 2 and len(errors) == 1 and "Traceback" not in refused_err, refused_err[-2000:]
    assert f"another erasure run is using {out}.partial" in errors[0] and "choose another --out" in errors[0]
    assert read_edit(out)["config"]["iterations"] == 100
    apply_edits(load_pipeline("toy", device="cpu"), [out])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit"], "no partial or temporary folder left"


# ----------------------------------------------------------------------------------------------------------------
# The user's folders beside --out, and an existing user folder as --out

REFUSED = {
    "erase beside a user's X.partial": (["erase", "--method", "uce", "--concept", "star", "--out", "{X}"],
                                        "X.partial holds no erasure run's record"),
    "erase into a user's folder": (["erase", "--method", "uce", "--concept", "star", "--out", "{mine}"],
                                   "already exists"),
    "vlm erase beside a user's X.partial": (["vlm", "erase", "--method", "ga", "--concept", "star", "--set",
                                             "steps=1", "--out", "{X}"], "X.partial holds no erasure run's record"),
    "vlm erase into a user's folder": (["vlm", "erase", "--method", "ga", "--concept", "star", "--out", "{mine}"],
                                       "already exists"),
    "compare into a user's folder": (["compare", "--edit", "{edit}", "--out", "{mine}"], "not made by this command"),
    "attack into a user's folder": (["attack", "--edit", "{edit}", "--out", "{mine}"], "already exists"),
    "attack beside a user's X.partial": (["attack", "--edit", "{edit}", "--out", "{X}"],
                                         "X.partial holds no erasure run's record"),
    "bench i2p into a user's folder": (["bench", "i2p", "--prompts", TOY_CSV, "--limit", "1", "--out", "{mine}"],
                                       "not made by this command"),
    "generate onto a user's image": (["generate", "--prompt", "a", "--out", "{mine}/sub/picture.png"],
                                     "--overwrite"),
    "app into a user's folder": (["app", "--output", "{mine}"], "not made by this command"),
    "bench toycanvas into a user's folder": (["bench", "toycanvas", "--edit", "{edit}", "--objects", "star",
                                             "--styles", "Flat", "--no-fid", "--out", "{mine}"],
                                            "not made by this command"),
    # --data and --classifier only need to be folders: --out is refused before either is read.
    "bench unlearncanvas into a user's folder": (["bench", "unlearncanvas", "--data", "{X}.old", "--classifier",
                                                  "{X}.old", "--model", "toy", "--out", "{mine}"],
                                                 "not made by this command"),
    "bench mllmu-med into a user's folder": (["bench", "mllmu-med", "--concept", "star", "--out", "{mine}"],
                                             "not made by this command"),
    # Refused only: writing the toy build's data stage takes about a minute (build-vlm's world is a writer below).
    "toy build into a user's folder": (["toy", "build", "data", "--build-dir", "{mine}"], "carries no build marker"),
    "toy build-vlm into a user's folder": (["toy", "build-vlm", "world", "--build-dir", "{mine}"],
                                           "carries no build marker"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_command_refuses_the_users_folders_with_one_line_and_leaves_them_byte_for_byte(case, tmp_path,
                                                                                          shared_edit, capsys):
    argv, expected = REFUSED[case]
    users_folders(tmp_path, "X")
    mine = tmp_path / "mine"  # an existing folder of the user's, given as --out
    (mine / "sub").mkdir(parents=True)
    (mine / "report.md").write_text("the user's own report\n")
    (mine / "sub" / "picture.png").write_bytes(b"the user's picture")
    before = snapshot(tmp_path)
    fields = {"X": tmp_path / "X", "mine": mine, "edit": shared_edit["edit"]}
    code, errors = run_cli([part.format(**fields) for part in argv], capsys)
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert snapshot(tmp_path) == before


def _small_answer_set(seeds):
    from benchmarks.unlearncanvas import AnswerSet

    return AnswerSet(objects=("star", "circle"), styles=("Flat",), seeds=seeds)


WRITERS = {
    "vlm erase": ["vlm", "erase", "--method", "ga", "--concept", "star", "--set", "steps=1", "--set", "batch_size=2",
                  "--device", "cpu", "--out", "{X}"],
    "compare": ["compare", "--edit", "{edit}", "--device", "cpu", "--out", "{X}"],
    "attack": ["attack", "--edit", "{edit}", "--prompts", "1", "--iterations", "1", "--device", "cpu", "--out", "{X}"],
    "bench i2p": ["bench", "i2p", "--prompts", TOY_CSV, "--limit", "1", "--quiet", "--device", "cpu", "--out", "{X}"],
    "generate": ["generate", "--prompt", "a star", "--steps", "1", "--device", "cpu", "--out", "{X}.png"],
    # The edit given, not erased here: the bench's own erases write inside --out, never beside it.
    "bench toycanvas": ["bench", "toycanvas", "--edit", "{edit}", "--objects", "star", "--styles", "Flat",
                        "--no-fid", "--quiet", "--device", "cpu", "--out", "{X}"],
    "bench unlearncanvas": ["bench", "unlearncanvas", "--data", "{canvas[data]}", "--classifier",
                            "{canvas[classifiers]}", "--model", "{canvas[model]}", "--methods", "uce", "--concepts",
                            "Bricks", "--seeds", "188", "--steps", "2", "--size", "16", "--no-fid", "--quiet",
                            "--device", "cpu", "--out", "{X}"],
    "bench mllmu-med": ["bench", "mllmu-med", "--model", "{med[model]}", "--data", "{med[data]}", "--concept",
                        "forget_10", "--max-new-tokens", "2", "--batch-size", "64", "--device", "cpu", "--out", "{X}"],
    "toy build-vlm": ["toy", "build-vlm", "world", "--build-dir", "{X}"],
}


@pytest.fixture(scope="module")
def canvas(tmp_path_factory, tiny_pipeline_dirs):
    """A miniature UnlearnCanvas and a tiny SD pipeline for `bench unlearncanvas`."""
    from test_bench_unlearncanvas import build_miniature

    return {**build_miniature(tmp_path_factory.mktemp("canvas")), "model": tiny_pipeline_dirs["sd"]}


@pytest.fixture(scope="module")
def med(tmp_path_factory):
    """A small MLLMU-Med world and a tiny random LLaVA for `bench mllmu-med`."""
    from test_vlm_models import build_llava

    from benchmarks.toyvlm.world import WorldConfig, build_world

    root = tmp_path_factory.mktemp("med")
    world = build_world(root / "world", WorldConfig(patients=20, canvas_train=10, canvas_test=10))
    return {"data": world / "MLLMU-Med", "model": build_llava(root / "llava")}


@pytest.mark.parametrize("command", WRITERS)
def test_a_command_writing_a_free_out_leaves_the_users_folders_beside_it(command, tmp_path, shared_edit, capsys,
                                                                        monkeypatch, request):
    import benchmarks.compare
    import benchmarks.toycanvas.benchmark

    monkeypatch.setattr(benchmarks.compare, "AnswerSet", _small_answer_set)  # 4 images, not 200: the same writes
    toycanvas_benchmark = benchmarks.toycanvas.benchmark.toycanvas_benchmark

    def two_steps(*args, **kwargs):  # not the toy's 25: the same writes in a few seconds
        bench = toycanvas_benchmark(*args, **kwargs)
        bench.steps = 2
        return bench

    monkeypatch.setattr(benchmarks.toycanvas.benchmark, "toycanvas_benchmark", two_steps)
    name = "X.png" if command == "generate" else "X"
    # An erase and an attack (both resume from X.partial) refuse a user's X.partial (above); the others never use
    # one, so it is there for them too.
    resumes = "erase" in command or command == "attack"
    kept = users_folders(tmp_path, name, (".old", ".tmp") if resumes else (".old", ".tmp", ".partial"))
    fields = {"X": tmp_path / "X", "edit": shared_edit["edit"]}
    for inputs in ("canvas", "med"):  # made only for the commands that read them
        if any(f"{{{inputs}[" in part for part in WRITERS[command]):
            fields[inputs] = request.getfixturevalue(inputs)
    argv = [part.format(**fields) for part in WRITERS[command]]
    code, errors = run_cli(argv, capsys)
    assert code == 0 and errors == []
    assert {k: v for k, v in snapshot(tmp_path).items() if k != name and not k.startswith(name + "/")} == kept
    assert (tmp_path / name).exists()


# ----------------------------------------------------------------------------------------------------------------
# Q16's embeddings: never unpickled on the read path; converted only when the user trusts the file

def test_a_q16_pickle_is_refused_and_converted_only_with_trust(tmp_path, capsys):
    import pickle

    import numpy as np

    from apps.bad_input_fixtures import Planted
    from benchmarks.q16_convert import main as convert
    from benchmarks.toycanvas import CLIP_DIR

    (tmp_path / "evil.p").write_bytes(pickle.dumps(Planted(str(tmp_path / "PLANTED"))))
    published = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float16)
    (tmp_path / "prompts.p").write_bytes(pickle.dumps(published))
    bench = ["bench", "i2p", "--prompts", TOY_CSV, "--limit", "1", "--quiet", "--device", "cpu", "--q16-clip",
             CLIP_DIR, "--out", tmp_path / "i2p"]
    before = snapshot(tmp_path)
    code, errors = run_cli([*bench, "--q16-prompts", tmp_path / "evil.p"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"python -m benchmarks.q16_convert {tmp_path / 'evil.p'} --trust --out" in errors[0]

    assert convert([str(tmp_path / "evil.p"), "--out", str(tmp_path / "q16.npy")]) == 2
    err = capsys.readouterr().err
    assert "is a pickle" in err and "nothing was read" in err and "--trust" in err
    assert snapshot(tmp_path) == before and not (tmp_path / "PLANTED").exists()

    assert convert([str(tmp_path / "prompts.p"), "--trust", "--out", str(tmp_path / "q16.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "q16.npy", allow_pickle=False), published.astype(np.float32))
    assert convert([str(tmp_path / "prompts.p"), "--trust", "--out", str(tmp_path / "q16.npy")]) == 2, "never over"
    code, errors = run_cli([*bench, "--q16-prompts", tmp_path / "q16.npy"], capsys)
    assert code == 0, errors
    assert 0 <= json.loads((tmp_path / "i2p" / "results.json").read_text())["rows"][0]["q16_rate"] <= 1


def test_q16_files_that_are_not_files_are_named_by_what_they_are(tmp_path, capsys):
    from benchmarks.q16_convert import main as convert
    from benchmarks.q16_convert import read_q16_prompts
    from erasers.errors import UsageError

    os.mkfifo(tmp_path / "pipe.npy")
    for source, found in ((tmp_path, "is a directory, not a file"), (tmp_path / "pipe.npy", "is a named pipe"),
                          (tmp_path / "absent.p", "does not exist")):
        with pytest.raises(UsageError, match=found):
            read_q16_prompts(source)
        assert convert([str(source), "--trust", "--out", str(tmp_path / "q16.npy")]) == 2
        assert found in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.npy"]
