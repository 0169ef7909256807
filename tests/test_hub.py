"""Edits on the Hub (erasers/hub.py), against a stand-in for the Hub's HTTP API on 127.0.0.1 (tests/hub_stand_in.py;
huggingface_hub is pointed at it, never at the real Hub): `erasure push` uploads an edit's components, erasure.json
and model card, and its Hub id then loads wherever an edit goes (generate --edit, erase --base-edit) exactly as the
directory does; a local path of the same spelling wins; each bad input is one line, exit code 2, and no commit,
checked before any request where it can be and before any model loads."""

import argparse
import json
import shutil
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
from hub_stand_in import USER, HubStandIn
from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from PIL import Image
from safetensors.torch import load_file

from apps.cli import main
from erasers.inputs import EDIT_DIR
from erasers.run import erase

REPO = f"{USER}/sd-no-cat"


def write_card(edit, results: bool = True) -> None:
    """The edit's model card README.md, with a UA result in its model-index (or, without `results`, none)."""
    scores = [EvalResult(task_type="text-to-image", dataset_type="toycanvas", dataset_name="ToyCanvas",
                         metric_type="accuracy", metric_name="UA", metric_value=1.0)] if results else None
    ModelCard.from_template(ModelCardData(model_name=edit.name, eval_results=scores)).save(edit / "README.md")


@pytest.fixture(scope="module")
def sd(tiny_pipeline_dirs):
    return str(tiny_pipeline_dirs["sd"])


@pytest.fixture(scope="module")
def edit(sd, tmp_path_factory):
    """A UCE edit of the tiny SD pipeline with its model card, and compare's output beside them (not pushed)."""
    path = erase(sd, "uce", ["a cat"], tmp_path_factory.mktemp("edit") / "sd-no-cat", device="cpu")
    write_card(path)
    (path / "compare").mkdir()
    (path / "compare" / "grid.png").write_bytes(b"not part of the edit")
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in, with huggingface_hub's endpoint, cache and saved login pointed into this test (its module
    constants, read when it was imported, and the variables), HF_TOKEN its one valid token, and no offline mode."""
    with HubStandIn(claimed_as={f"{USER}/a-dataset": "dataset"}) as server:
        settings = {"ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": False,
                    "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
                    "HF_TOKEN_PATH": str(tmp_path / "no-login" / "token"),
                    "HF_STORED_TOKENS_PATH": str(tmp_path / "no-login" / "stored_tokens")}
        for name, value in settings.items():
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", server.token)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.chdir(tmp_path)
        yield server


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.startswith("erasure: error:")]


def edit_files(path) -> dict[str, bytes]:
    """What an edit directory holds but compare's output: relative path -> content."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(Path(path).rglob("*"))
            if f.is_file() and "compare" not in f.relative_to(path).parts}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_a_pushed_edit_loads_by_its_hub_id_as_from_its_directory(hub, edit, sd, tmp_path, capsys):
    code, out, errors = run(capsys, "push", edit, "--repo", REPO, "--commit-message", "UCE, a cat")
    assert (code, errors) == (0, []) and f"--edit {REPO}" in out
    pushed = {"repo": REPO, "revision": "main", "message": "UCE, a cat", "paths": sorted(edit_files(edit))}
    assert hub.commits == [pushed], "the components, erasure.json and the card, in one commit; compare/ stays"
    assert hub.files(REPO) == {**edit_files(edit), ".gitattributes": ANY}

    images = {}
    for name, source in (("local", edit), ("hub", REPO)):
        code, _, errors = run(capsys, "generate", "--model", sd, "--edit", source, "--prompt", "a cat", "--steps", 2,
                              "--out", tmp_path / f"{name}.png")
        assert (code, errors) == (0, [])
        images[name] = pixels(tmp_path / f"{name}.png")
    code, _, _ = run(capsys, "generate", "--model", sd, "--prompt", "a cat", "--steps", 2, "--out", tmp_path / "b.png")
    assert not np.array_equal(pixels(tmp_path / "b.png"), images["local"]), "the edit changes the image"
    np.testing.assert_array_equal(images["hub"], images["local"])

    chains = {}
    for name, source in (("local", edit), ("hub", REPO)):
        out_dir = tmp_path / f"chain-{name}"
        code, _, errors = run(capsys, "erase", "--model", sd, "--method", "uce", "--concept", "a dog", "--base-edit",
                              source, "--device", "cpu", "--out", out_dir)
        assert (code, errors) == (0, [])
        chains[name] = load_file(next((out_dir / "unet").glob("*.safetensors")))
        assert json.loads((out_dir / "erasure.json").read_text())["concepts"] == ["a cat", "a dog"]
    assert chains["hub"].keys() == chains["local"].keys()
    for key, value in chains["local"].items():
        assert chains["hub"][key].equal(value), key


def test_a_branch_loads_by_owner_name_at_revision_and_a_local_path_of_that_spelling_wins(hub, edit, capsys):
    code, out, errors = run(capsys, "push", edit, "--repo", REPO, "--revision", "dev")
    assert (code, errors) == (0, []) and f"--edit {REPO}@dev" in out
    assert [(c["repo"], c["revision"]) for c in hub.commits] == [(REPO, "dev")]
    assert list(hub.files(REPO, "main")) == [".gitattributes"], "main keeps only what the new repo had"
    downloaded = Path(EDIT_DIR(f"{REPO}@dev"))
    assert downloaded != edit and edit_files(downloaded) == {**edit_files(edit), ".gitattributes": ANY}

    shutil.copytree(edit, REPO)  # ./tester/sd-no-cat, in this test's working directory
    asked = len(hub.requests)
    assert EDIT_DIR(REPO) == REPO and len(hub.requests) == asked, "a local directory is read, the Hub not asked"


def push_case(hub, edit, tmp_path, monkeypatch, case):
    """The command line of a bad push `case`, after setting up what it needs."""
    directory = edit
    if case in ("no card", "no results", "not an edit"):
        directory = tmp_path / "copy"
        shutil.copytree(edit, directory, ignore=shutil.ignore_patterns("compare"))
        if case == "no card":
            (directory / "README.md").unlink()
        elif case == "no results":
            write_card(directory, results=False)
        else:
            (directory / "erasure.json").unlink()
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    if case == "invalid token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_the_token")
    if case == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repos = {"dataset prefix": "datasets/tester/x", "space prefix": "spaces/tester/x", "three parts": "a/b/c",
             "bad characters": "tester/no cat!", "server says dataset": f"{USER}/a-dataset"}
    return ["push", directory, "--repo", repos.get(case, REPO)]


@pytest.mark.parametrize("case, expect, asks_the_hub", [
    ("not an edit", "is not an edit (no readable erasure.json)", False),
    ("no card", "has no model card (README.md)", False),
    ("no results", "has no results", False),
    ("dataset prefix", "is a dataset repo; an edit goes to a model repo: pass --repo tester/x", False),
    ("space prefix", "is a Space repo", False),
    ("three parts", "is not a Hub repo id", False),
    ("bad characters", "is not a Hub repo id", False),
    ("no token", "needs a Hugging Face token with write access: pass --token, set HF_TOKEN", False),
    ("offline", "HF_HUB_OFFLINE is set, so nothing goes to the Hub", False),
    ("invalid token", "the Hub refused the token (401)", True),
    ("server says dataset", "is a dataset repo on the Hub", True),
])
def test_a_bad_push_is_one_line_and_uploads_nothing(hub, edit, tmp_path, monkeypatch, capsys, case, expect,
                                                    asks_the_hub):
    code, _, errors = run(capsys, *push_case(hub, edit, tmp_path, monkeypatch, case))
    assert code == 2 and len(errors) == 1 and expect in errors[0], errors
    assert hub.commits == [] and REPO not in hub.repos
    assert bool(hub.requests) == asks_the_hub, hub.requests


@pytest.mark.parametrize("argv, expect", [
    (["generate", "--edit", f"{USER}/missing", "--prompt", "a", "--out", "a.png"], "the Hub has no model repo"),
    (["generate", "--edit", f"{USER}/a-model", "--prompt", "a", "--out", "a.png"], "not an edit (no erasure.json)"),
    (["compare", "--edit", f"{USER}/sd-no-cat@nope"], "has no revision 'nope'"),
    (["erase", "--method", "uce", "--concept", "a dog", "--base-edit", f"{USER}/missing", "--out", "e"],
     "the Hub has no model repo"),
    (["generate", "--edit", "datasets/tester/x", "--prompt", "a", "--out", "a.png"], "would be a dataset repo"),
])
def test_a_hub_id_that_is_no_edit_is_refused_before_the_model_loads(hub, edit, tmp_path, capsys, argv, expect):
    hub.add_repo(f"{USER}/a-model", {"config.json": b"{}"})
    hub.add_repo(REPO, {"erasure.json": (edit / "erasure.json").read_bytes()})
    # An unknown --model would be the error if the model loaded first.
    code, _, errors = run(capsys, *argv, "--model", "no-such-model")
    assert code == 2 and len(errors) == 1 and expect in errors[0], errors
    assert {p.name for p in tmp_path.iterdir()} <= {"hf-cache"}, "nothing is written"


def test_a_downloaded_edit_loads_offline_from_the_cache_and_an_uncached_one_says_so(hub, edit, monkeypatch):
    hub.add_repo(REPO, edit_files(edit))
    downloaded = EDIT_DIR(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, read when huggingface_hub loaded
    asked = len(hub.requests)
    assert EDIT_DIR(REPO) == downloaded and len(hub.requests) == asked
    with pytest.raises(argparse.ArgumentTypeError, match="HF_HUB_OFFLINE is set and no copy is cached"):
        EDIT_DIR(f"{USER}/never-downloaded")


def test_a_vlm_edit_pushes_the_files_its_erasure_json_lists(hub, tmp_path, capsys):
    vlm_edit = tmp_path / "vlm-no-star"
    (vlm_edit / "adapter").mkdir(parents=True)
    (vlm_edit / "adapter" / "adapter_config.json").write_text("{}")
    (vlm_edit / "edit.safetensors").write_bytes(b"weights")
    (vlm_edit / "erasure.json").write_text(json.dumps({"model_kind": "vlm", "method": "sauce",
                                                       "files": ["edit.safetensors", "adapter"]}))
    (vlm_edit / "answers.jsonl").write_text("not part of the edit")
    write_card(vlm_edit)
    code, _, errors = run(capsys, "push", vlm_edit, "--repo", "vlm-no-star")  # NAME: the token's own namespace
    assert (code, errors) == (0, [])
    assert hub.commits[0]["repo"] == f"{USER}/vlm-no-star"
    assert hub.commits[0]["paths"] == ["README.md", "adapter/adapter_config.json", "edit.safetensors", "erasure.json"]
