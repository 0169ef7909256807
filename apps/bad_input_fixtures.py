"""The files the bad-input cases of apps/bad_inputs.py need: garbage JSON in a pipeline, non-UTF-8 prompt
files, edits with wrong field types, a decompression-bomb PNG, garbage parquet, damaged or planted checkpoints in
`OUT.partial/`. Each fixture makes its file(s) in the case's directory and returns the path the command line gets."""

from __future__ import annotations

import functools
import importlib
import json
import pickle
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import torch

from erasers.outputs import mark_run_dir

# name -> function(root) -> the string that replaces {name} in a case's command line
FIXTURES: dict[str, Callable[[Path], str]] = {}


def fixture(function):
    FIXTURES[function.__name__] = function
    return function


GARBAGE_TEXT = b'{"_class_name": "StableDiffusionPipeline", oops'
GARBAGE_BINARY = bytes(range(256)) * 4


def toy_pipeline_dir() -> Path:
    from benchmarks.toycanvas import PIPELINE_DIR

    return PIPELINE_DIR


def mirror_pipeline(root: Path, replaced: dict[str, bytes]) -> str:
    """The toy pipeline as symlinks, but for the files in `replaced` (relative path -> content)."""
    source, pipe = toy_pipeline_dir(), root / "pipe"
    pipe.mkdir()
    touched_dirs = {Path(rel).parts[0] for rel in replaced if len(Path(rel).parts) > 1}
    for entry in source.iterdir():
        if entry.name in touched_dirs:
            (pipe / entry.name).mkdir()
            for file in entry.iterdir():
                (pipe / entry.name / file.name).symlink_to(file)
        elif entry.name not in replaced:
            (pipe / entry.name).symlink_to(entry)
    for rel, content in replaced.items():
        target = pipe / rel
        if target.is_symlink():
            target.unlink()
        target.write_bytes(content)
    return str(pipe)


@fixture
def pipe_index_text(root):
    return mirror_pipeline(root, {"model_index.json": GARBAGE_TEXT})


@fixture
def pipe_index_binary(root):
    return mirror_pipeline(root, {"model_index.json": GARBAGE_BINARY})


@fixture
def pipe_index_list(root):
    return mirror_pipeline(root, {"model_index.json": b"[1, 2, 3]"})


@fixture
def pipe_unet_config_text(root):
    return mirror_pipeline(root, {"unet/config.json": b'{"sample_size": 16,'})


@fixture
def pipe_text_encoder_config_binary(root):
    return mirror_pipeline(root, {"text_encoder/config.json": GARBAGE_BINARY})


@fixture
def pipe_scheduler_config_binary(root):
    return mirror_pipeline(root, {"scheduler/scheduler_config.json": GARBAGE_BINARY})


@fixture
def unet_garbage(root):
    unet = root / "my-unet"
    unet.mkdir()
    (unet / "config.json").write_bytes(GARBAGE_BINARY)
    return str(unet)


def text_file(root: Path, name: str, content: bytes) -> str:
    (root / name).write_bytes(content)
    return str(root / name)


@fixture
def latin1_prompts(root):
    return text_file(root, "prompts.txt", "A star image in Caf\u00e9 style.\n".encode("latin-1"))


@fixture
def utf16_prompts(root):
    return text_file(root, "prompts.txt", "A star image.\n".encode("utf-16"))


@fixture
def three_prompts(root):
    return text_file(root, "prompts.txt", b"a star\na circle\na square\n")


@fixture
def ten_thousand_prompts(root):
    return text_file(root, "prompts.txt", b"A star image in Flat style.\n" * 10_000)


@fixture
def huge_prompt_file(root):
    path = root / "huge.txt"
    with path.open("wb") as file:  # sparse: 11 MiB of nothing on disk
        file.truncate(11 * 2 ** 20)
    return str(path)


@fixture
def file(root):
    return text_file(root, "a-file", b"not a directory\n")


@fixture
def users_folder(root):
    (root / "mine" / "sub").mkdir(parents=True)
    (root / "mine" / "sub" / "report.md").write_text("the user's own report\n")
    return str(root / "mine")


@fixture
def foreign_partial(root):
    # The user's own edit.partial/ (no erasure run's record) beside the --out: never cleared, never resumed.
    Path(users_folder(root)).rename(root / "edit.partial")
    return str(root / "edit")


@fixture
def dangling(root):
    (root / "link").symlink_to(root / "nowhere")
    return str(root / "link")


# Shipped files named by path: the toy I2P CSV, the toy CLIP (for Q16).
for _name, _module, _attribute in (("toy_i2p_csv", "benchmarks.i2p", "TOY_CSV"),
                                   ("toy_clip", "benchmarks.toycanvas", "CLIP_DIR")):
    FIXTURES[_name] = lambda root, m=_module, a=_attribute: str(getattr(importlib.import_module(m), a))


def planted(root: Path, name: str) -> str:
    return text_file(root, name, pickle.dumps(Planted(str(root / "PLANTED"))))


for _kind in ("p", "npy", "pt"):  # Q16's own pickle, and pickles named as the formats --q16-prompts reads
    FIXTURES[f"q16_pickle_{_kind}"] = functools.partial(planted, name=f"prompts.{_kind}")


@fixture
def existing_png(root):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(root / "old.png")
    return str(root / "old.png")


@fixture
def unwritable(root):
    # /proc/sys refuses new files to every user, root included, on any Linux.
    return "/proc/sys/erasure-bad-inputs"


def edit_dir(root: Path, metadata: dict | bytes, components=("unet",), name="edit") -> str:
    edit = root / name
    edit.mkdir()
    for component in components:
        (edit / component).mkdir()
    content = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
    (edit / "erasure.json").write_bytes(content)
    return str(edit)


GOOD_EDIT = {"method": "uce", "concepts": ["star"], "kind": "object", "components": ["unet"], "config": {}}


@fixture
def edit_ok(root):
    return edit_dir(root, GOOD_EDIT)


@fixture
def negprompt_edit(root):
    return edit_dir(root, {**GOOD_EDIT, "method": "negprompt", "components": []}, components=())


@fixture
def edit_components_int(root):
    return edit_dir(root, {**GOOD_EDIT, "components": 5})


@fixture
def edit_concepts_string(root):
    return edit_dir(root, {**GOOD_EDIT, "concepts": "star"})


@fixture
def edit_kind_list(root):
    return edit_dir(root, {**GOOD_EDIT, "kind": ["object"]})


@fixture
def edit_traversal(root):
    return edit_dir(root, {**GOOD_EDIT, "components": ["../../.."]}, components=())


@fixture
def edit_binary(root):
    return edit_dir(root, GARBAGE_BINARY)


@fixture
def edit_json_list(root):
    return edit_dir(root, b"[]")


VLM_EDIT = {"model_kind": "vlm", "method": "sauce", "concept": "star", "files": ["edit.safetensors"], "config": {},
            "info": {}, "base_model": "toy-vlm", "base_family": "llava", "base_fingerprint": "0"}


@fixture
def vlm_edit(root):
    path = edit_dir(root, VLM_EDIT, components=())
    (Path(path) / "edit.safetensors").write_bytes(b"")
    return path


@fixture
def vlm_edit_files_int(root):
    return edit_dir(root, {**VLM_EDIT, "files": 5}, components=())


@fixture
def vlm_edit_files_outside(root):
    return edit_dir(root, {**VLM_EDIT, "files": ["../../secret"]}, components=())


@fixture
def vlm_edit_binary(root):
    return edit_dir(root, GARBAGE_BINARY, components=())


@fixture
def vlm_model_binary_config(root):
    model = root / "my-vlm"
    model.mkdir()
    (model / "config.json").write_bytes(GARBAGE_BINARY)
    return str(model)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@fixture
def bomb_png(root):
    # A 16000 x 16000 PNG header (256 megapixels) with no pixel data: Pillow refuses it when opening.
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16000, 16000, 8, 2, 0, 0, 0))
    content = b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    return text_file(root, "bomb.png", content)


@fixture
def garbage_png(root):
    return text_file(root, "image.png", GARBAGE_BINARY)


def mllmu_dir(root: Path, write: Callable[[Path], None]) -> str:
    data = root / "data"
    for split in ("forget_5", "retain_95", "Test_Set"):
        (data / split).mkdir(parents=True)
        write(data / split / "train-00000-of-00001.parquet")
    return str(data)


@fixture
def mllmu_garbage_parquet(root):
    return mllmu_dir(root, lambda path: path.write_bytes(b"PAR1" + GARBAGE_BINARY + b"PAR1"))


@fixture
def mllmu_garbage_cells(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"ID": ["1"], "Classification_Task": ["not a task"], "Generation_Task": [5],
                      "image": [{"bytes": b"not an image", "path": None}]})
    return mllmu_dir(root, lambda path: pq.write_table(table, path))


# Interrupted runs: OUT.partial/ holds the signature of exactly the run the case's command makes (so it would
# resume) and a damaged or planted checkpoint.
HIRM_OPTIONS = {"iterations": "2"}


@functools.cache
def hirm_signature() -> dict:
    from erasers.edits import base_fingerprint
    from erasers.models import load_pipeline
    from erasers.prompts import make_request
    from erasers.registry import build_config
    from erasers.run import run_signature

    loaded = load_pipeline("toy", device="cpu")
    request = make_request(["star"], loaded.tokenizer, loaded.vocabulary, None, None)
    return run_signature("hirm", build_config("hirm", True, HIRM_OPTIONS), request, base_fingerprint(loaded))


def partial_run(root: Path, signature: dict | bytes, files: dict[str, bytes]) -> str:
    out = root / "edit"
    partial = root / "edit.partial"
    (partial / "ckpt").mkdir(parents=True)
    (partial / "logs").mkdir()
    (partial / "run.json").write_bytes(signature if isinstance(signature, bytes) else json.dumps(signature).encode())
    mark_run_dir(partial)  # made by an erasure run, as an interrupted one's is
    for name, content in files.items():
        (partial / "ckpt" / name).write_bytes(content)
    return str(out)


def checkpoint_bytes(states: dict) -> bytes:
    from erasers.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.safetensors"
        save_checkpoint(path, 1, states)
        return path.read_bytes()


class Planted:
    """Unpickling this creates the file PLANTED_MARKER: a loader that unpickles would be caught writing it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@fixture
def hirm_partial_truncated(root):
    encoder = torch.nn.Linear(4, 4)
    content = checkpoint_bytes({"encoder": encoder.state_dict(), "opt": {}})
    return partial_run(root, hirm_signature(), {"hirm.safetensors": content[: len(content) // 2]})


@fixture
def hirm_partial_garbage(root):
    return partial_run(root, hirm_signature(), {"hirm.safetensors": GARBAGE_BINARY})


@fixture
def hirm_partial_foreign(root):
    content = checkpoint_bytes({"model": torch.nn.Linear(4, 4).state_dict()})
    return partial_run(root, hirm_signature(), {"hirm.safetensors": content})


@fixture
def hirm_partial_pickle(root):
    return partial_run(root, hirm_signature(), {"hirm.pt": pickle.dumps(Planted(str(root / "PLANTED")))})


@fixture
def partial_run_json_binary(root):
    return partial_run(root, GARBAGE_BINARY, {})


@functools.cache
def vlm_ga_signature() -> dict:
    from vlm.models import load_vlm
    from vlm.registry import build_vlm_config
    from vlm.run import vlm_run_signature

    loaded = load_vlm("toy-vlm", device="cpu")
    return vlm_run_signature(loaded, "ga", build_vlm_config("ga", True, {"steps": "2"}), "star", None)


@fixture
def vlm_partial_pickle(root):
    return partial_run(root, vlm_ga_signature(), {"gradientascent.pt": pickle.dumps(Planted(str(root / "PLANTED")))})
