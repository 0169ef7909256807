"""Bad-input rows about paths given as inputs (erasers.inputs): what was found is named, not "does not exist" for
something that exists: a FIFO or a device where a file is wanted, a directory where a file is wanted and the
reverse (`--edit`, `--data`, `--images` given a file), a symbolic link loop, a dangling link, a missing path."""

from __future__ import annotations

import os

from apps.bad_input_fixtures import fixture
from apps.bad_inputs import Case


@fixture
def fifo(root):
    os.mkfifo(root / "pipe")
    return str(root / "pipe")


@fixture
def link_loop(root):
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    return str(root / "loop-a")


PIPE, DEVICE, DIRECTORY, FILE, LOOP = ("named pipe", "character device", "is a directory, not a file",
                                       "is a file, not a directory", "symbolic link loop")
CANVAS = "bench unlearncanvas --model toy --out {root}/r"

CASES = [
    # a file is wanted
    Case("paths: generate --prompts is a FIFO", "generate --prompts {fifo} --out {root}/a.png", PIPE),
    Case("paths: generate --prompts is /dev/zero", "generate --prompts /dev/zero --out {root}/a.png", DEVICE),
    Case("paths: generate --prompts is a symlink loop", "generate --prompts {link_loop} --out {root}/a.png", LOOP),
    Case("paths: generate --prompts is a dangling symlink", "generate --prompts {dangling} --out {root}/a.png",
         "which does not exist"),
    Case("paths: generate --prompts is missing", "generate --prompts {root}/none.txt --out {root}/a.png",
         "does not exist"),
    Case("paths: attack --prompt-file is a directory", "attack --edit {edit_ok} --prompt-file {root} --out {root}/a",
         DIRECTORY),
    Case("paths: vlm ask --image is /dev/zero", "vlm ask --question q --image /dev/zero", DEVICE),
    Case("paths: vlm ask --image is a directory", "vlm ask --question q --image {root}", DIRECTORY),
    Case("paths: vlm ask --image is a FIFO", "vlm ask --question q --image {fifo}", PIPE),
    Case("paths: bench i2p --prompts is a FIFO", "bench i2p --prompts {fifo} --out {root}/r", PIPE),
    Case("paths: bench i2p --prompts is a directory", "bench i2p --prompts {root} --out {root}/r", DIRECTORY),
    Case("paths: bench i2p --q16-prompts is /dev/zero", "bench i2p --prompts {toy_i2p_csv} --q16-clip {toy_clip} "
         "--q16-prompts /dev/zero --out {root}/r", DEVICE),
    Case("paths: bench unlearncanvas --style-classifier is a directory", f"{CANVAS} --data {{root}} "
         "--style-classifier {root} --object-classifier {file}", DIRECTORY),
    Case("paths: bench unlearncanvas --inception is a FIFO", f"{CANVAS} --data {{root}} --classifier {{root}} "
         "--inception {fifo}", PIPE),
    # a directory is wanted
    Case("paths: generate --edit is a file", "generate --edit {file} --prompt a --out {root}/a.png", FILE),
    Case("paths: generate --unet is a file", "generate --unet {file} --prompt a --out {root}/a.png", FILE),
    Case("paths: compare --edit is a file", "compare --edit {file}", FILE),
    Case("paths: compare --edit is a symlink loop", "compare --edit {link_loop}", LOOP),
    Case("paths: compare --edit is a FIFO", "compare --edit {fifo}", PIPE),
    Case("paths: compare --edit is missing", "compare --edit {root}/none", "does not exist"),
    Case("paths: attack --edit is a file", "attack --edit {file} --out {root}/a", FILE),
    Case("paths: erase --images is a file", "erase --method coerasing --concept arrow --images {file} "
         "--out {root}/e", FILE),
    Case("paths: vlm ask --edit is a file", "vlm ask --question q --edit {file}", FILE),
    Case("paths: vlm erase --data is a file", "vlm erase --method ga --concept forget_5 --data {file} "
         "--out {root}/e", FILE),
    Case("paths: bench mllmu-med --data is a file", "bench mllmu-med --concept forget_5 --data {file}", FILE),
    Case("paths: bench mllmu-med --edit is /dev/zero", "bench mllmu-med --edit /dev/zero", DEVICE),
    Case("paths: bench toycanvas --edit is a file", "bench toycanvas --edit {file} --out {root}/r", FILE),
    Case("paths: bench unlearncanvas --data is a file", f"{CANVAS} --data {{file}} --classifier {{root}}", FILE),
    Case("paths: bench unlearncanvas --classifier is a file", f"{CANVAS} --data {{root}} --classifier {{file}}",
         FILE),
    Case("paths: app --edits is a file", "app --edits {file}", FILE),
    Case("paths: app --edits is a symlink loop", "app --edits {link_loop}", LOOP),
]
