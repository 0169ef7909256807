"""Bad and hostile inputs, each run through the `erasure` CLI in-process: every one must end with exit code 2, one
line `erasure: error: ...`, no traceback, and nothing written. tests/test_bad_inputs.py runs the same table.

    python -m apps.bad_inputs        # prints "N bad inputs tried, N handled" (and each failure)

A case is a command line whose `{name}` fields are files made by the fixture of that name in the case's own
fresh directory (garbage JSON, a non-UTF-8 prompt file, a planted checkpoint...); `{root}` is that directory.
Out-of-range config values are generated for every registered method from its config's fields, so a new method
is covered as soon as it registers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import torch

from .bad_input_fixtures import FIXTURES


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    command: str      # the CLI arguments, {fixture} fields filled in
    expect: str       # a phrase the error line must contain
    skip: Callable[[], str | None] = lambda: None   # a reason to skip on this machine, or None


@dataclasses.dataclass
class Outcome:
    code: int | None
    errors: list[str]
    stderr: str
    changes: list[str]

    def problems(self, case: Case) -> list[str]:
        found = []
        if self.code != 2:
            found.append(f"exit code {self.code}, not 2")
        if len(self.errors) != 1:
            found.append(f"{len(self.errors)} 'erasure: error:' lines, not 1")
        elif case.expect.lower() not in self.errors[0].lower():
            found.append(f"the error line lacks {case.expect!r}")
        if "Traceback" in self.stderr:
            found.append("a traceback on stderr")
        if self.changes:
            found.append(f"wrote {', '.join(self.changes[:3])}")
        return found


# ----------------------------------------------------------------------------------------------------------------
# The table

def _without_cuda() -> str | None:
    return "this machine has CUDA" if torch.cuda.is_available() else None


def _without_bf16_gpu() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (one without bf16)"
    return "this GPU supports bf16" if torch.cuda.is_bf16_supported() else None


BIG_SEED = str(2 ** 64)
MAX_SEED = str(2 ** 63 - 1)

FIXED_CASES = [
    # generate: model files
    Case("generate: model_index.json is text garbage", "generate --model {pipe_index_text} --prompt a "
         "--out {root}/a.png", "not valid JSON"),
    Case("generate: model_index.json is binary", "generate --model {pipe_index_binary} --prompt a "
         "--out {root}/a.png", "not valid JSON"),
    Case("generate: model_index.json is a list", "generate --model {pipe_index_list} --prompt a --out {root}/a.png",
         "not an object"),
    Case("generate: unet/config.json is truncated", "generate --model {pipe_unet_config_text} --prompt a "
         "--out {root}/a.png", "unet/config.json is corrupt"),
    Case("generate: text_encoder/config.json is binary", "generate --model {pipe_text_encoder_config_binary} "
         "--prompt a --out {root}/a.png", "text_encoder/config.json is corrupt"),
    Case("generate: scheduler config is binary", "generate --model {pipe_scheduler_config_binary} --prompt a "
         "--out {root}/a.png", "scheduler_config.json is corrupt"),
    Case("generate: --unet with a binary config.json", "generate --unet {unet_garbage} --prompt a --out {root}/a.png",
         "not valid JSON"),
    Case("generate: --model is a file", "generate --model {file} --prompt a --out {root}/a.png", "is a file"),
    # generate: prompt files
    Case("generate: prompt file in Latin-1", "generate --prompts {latin1_prompts} --out {root}/a.png", "not UTF-8"),
    Case("generate: prompt file in UTF-16", "generate --prompts {utf16_prompts} --out {root}/a.png", "not UTF-8"),
    Case("generate: prompt file over 10 MiB", "generate --prompts {huge_prompt_file} --out {root}/a.png", "MiB"),
    Case("generate: prompt file is a directory", "generate --prompts {root} --out {root}/a.png", "is a directory"),
    Case("generate: 10,000 prompts at --scale 8", "generate --prompts {ten_thousand_prompts} --scale 8 "
         "--out {root}/a.png", "pixel limit"),
    # generate: seeds
    Case("generate: --seed 2**64", f"generate --prompt a --seed {BIG_SEED} --out {{root}}/a.png", "2**63 - 1"),
    Case("generate: --seed -1", "generate --prompt a --seed -1 --out {root}/a.png", "2**63 - 1"),
    Case("generate: --seed not a number", "generate --prompt a --seed 1e3 --out {root}/a.png", "not an integer"),
    Case("generate: last seed past 2**63 - 1", f"generate --prompts {{three_prompts}} --seed {MAX_SEED} "
         "--out {root}/a.png", "largest seed"),
    # generate: sizes and devices
    Case("generate: --columns -3", "generate --prompts {three_prompts} --columns -3 --out {root}/a.png", "--columns"),
    Case("generate: --columns 0", "generate --prompts {three_prompts} --columns 0 --out {root}/a.png", "--columns"),
    Case("generate: --columns 50 for 3 prompts", "generate --prompts {three_prompts} --columns 50 --out {root}/a.png",
         "--columns"),
    Case("generate: --scale 100000", "generate --prompt a --scale 100000 --out {root}/a.png", "--scale"),
    Case("generate: --scale 0", "generate --prompt a --scale 0 --out {root}/a.png", "--scale"),
    Case("generate: --steps 0", "generate --prompt a --steps 0 --out {root}/a.png", "--steps"),
    Case("generate: --guidance nan", "generate --prompt a --guidance nan --out {root}/a.png", "--guidance"),
    Case("generate: --guidance inf", "generate --prompt a --guidance inf --out {root}/a.png", "--guidance"),
    Case("generate: --device bogus", "generate --prompt a --device bogus --out {root}/a.png", "not a device"),
    Case("generate: --device cuda:99", "generate --prompt a --device cuda:99 --out {root}/a.png", "cuda"),
    Case("generate: --device cuda without CUDA", "generate --prompt a --device cuda --out {root}/a.png",
         "CUDA is not available", _without_cuda),
    Case("generate: --device tpu", "generate --prompt a --device xla --out {root}/a.png", "not supported"),
    # generate: outputs
    Case("generate: --out in an unwritable directory", "generate --prompt a --out {unwritable}/a.png",
         "not writable"),
    Case("generate: --out under a file", "generate --prompt a --out {file}/a.png", "is a file"),
    Case("generate: --out exists", "generate --prompt a --out {existing_png}", "--overwrite"),
    Case("generate: --out is a directory", "generate --prompt a --out {root}", "must end in"),
    Case("generate: --out is .txt", "generate --prompt a --out {root}/a.txt", "must end in"),
    Case("generate: a negative-prompt edit without guidance", "generate --edit {negprompt_edit} --prompt a "
         "--guidance 1 --out {root}/a.png", "classifier-free guidance"),
    Case("erase: a training-free method asked to train", "erase --method sld --concept star --set iterations=10 "
         "--out {root}/e", "training-free"),
    Case("erase: a training-free method with --gradient-checkpointing", "erase --method negprompt --concept star "
         "--gradient-checkpointing --out {root}/e", "training-free"),
    Case("generate: unknown argument", "generate --prompt a --out {root}/a.png --colour red", "unrecognized"),
    # erase
    Case("erase: --out under a file", "erase --method uce --concept star --out {file}/edit", "is a file"),
    Case("erase: --out unwritable", "erase --method uce --concept star --out {unwritable}/edit", "not writable"),
    Case("erase: --seed 2**64", f"erase --method uce --concept star --seed {BIG_SEED} --out {{root}}/e", "2**63 - 1"),
    Case("erase: --seed -1", "erase --method uce --concept star --seed -1 --out {root}/e", "2**63 - 1"),
    Case("erase: --set without =", "erase --method hirm --concept star --set lr --out {root}/e", "KEY=VALUE"),
    Case("erase: --set int field to text", "erase --method hirm --concept star --set iterations=many "
         "--out {root}/e", "wants a int"),
    Case("erase: --set int field to 2.5", "erase --method hirm --concept star --set iterations=2.5 --out {root}/e",
         "wants a int"),
    Case("erase: --device bogus", "erase --method uce --concept star --device bogus --out {root}/e", "not a device"),
    Case("erase: --model with binary model_index.json", "erase --model {pipe_index_binary} --method uce "
         "--concept star --out {root}/e", "not valid JSON"),
    Case("erase: truncated checkpoint in OUT.partial", "erase --method hirm --concept star --set iterations=2 "
         "--device cpu --out {hirm_partial_truncated}", "--restart"),
    Case("erase: garbage checkpoint in OUT.partial", "erase --method hirm --concept star --set iterations=2 "
         "--device cpu --out {hirm_partial_garbage}", "--restart"),
    Case("erase: another model's checkpoint in OUT.partial", "erase --method hirm --concept star --set iterations=2 "
         "--device cpu --out {hirm_partial_foreign}", "--restart"),
    Case("erase: pickle planted in OUT.partial/ckpt", "erase --method hirm --concept star --set iterations=2 "
         "--device cpu --out {hirm_partial_pickle}", "pickle"),
    Case("erase: binary run.json in OUT.partial", "erase --method hirm --concept star --set iterations=2 "
         "--out {partial_run_json_binary}", "--restart"),
    Case("erase: coerasing's IP-Adapter folder is missing", "erase --method coerasing --concept arrow "
         "--set ip_adapter={root}/missing --out {root}/e", "does not exist"),
    Case("erase: coerasing's IP-Adapter folder has no weight file", "erase --method coerasing --concept arrow "
         "--set ip_adapter={root} --out {root}/e", "no readable weight file"),
    Case("erase: coerasing's refinement CLIP is missing", "erase --method coerasing --concept arrow "
         "--set refine_clip={root}/missing --out {root}/e", "could not load the CLIP text tower"),
    # compare
    Case("compare: --out is an existing file", "compare --edit {edit_ok} --out {file}", "is a file"),
    Case("compare: --out under a file", "compare --edit {edit_ok} --out {file}/cmp", "is a file"),
    Case("compare: --out unwritable", "compare --edit {edit_ok} --out {unwritable}/cmp", "not writable"),
    Case("compare: erasure.json components: 5", "compare --edit {edit_components_int}", "components"),
    Case("compare: erasure.json concepts is a string", "compare --edit {edit_concepts_string}", "concepts"),
    Case("compare: erasure.json kind is a list", "compare --edit {edit_kind_list}", "kind"),
    Case("compare: erasure.json component escapes the edit", "compare --edit {edit_traversal}", "component"),
    Case("compare: erasure.json is binary", "compare --edit {edit_binary}", "not valid JSON"),
    Case("compare: erasure.json is a list", "compare --edit {edit_json_list}", "not an object"),
    Case("compare: a VLM edit", "compare --edit {vlm_edit}", "VLM edit"),
    Case("compare: --seeds -1", "compare --edit {edit_ok} --seeds -1", "2**63 - 1"),
    Case("compare: --seeds 2**64", f"compare --edit {{edit_ok}} --seeds {BIG_SEED}", "2**63 - 1"),
    # attack
    Case("attack: --judge os:system", "attack --edit {edit_ok} --judge os:system --out {root}/a",
         "not (images, concept)"),
    Case("attack: --judge json:loads", "attack --edit {edit_ok} --judge json:loads --out {root}/a",
         "not (images, concept)"),
    Case("attack: --judge of a missing module", "attack --edit {edit_ok} --judge no_such_module:judge "
         "--out {root}/a", "cannot load the judge"),
    Case("attack: --judge not callable", "attack --edit {edit_ok} --judge math:pi --out {root}/a", "not callable"),
    Case("attack: --judge without a colon", "attack --edit {edit_ok} --judge judge --out {root}/a", "MODULE:FUNCTION"),
    Case("attack: --prompts 0", "attack --edit {edit_ok} --prompts 0 --out {root}/a", "--prompts"),
    Case("attack: --prompts 10**9", "attack --edit {edit_ok} --prompts 1000000000 --out {root}/a", "--prompts"),
    Case("attack: --iterations 0", "attack --edit {edit_ok} --iterations 0 --out {root}/a", "iterations"),
    Case("attack: --tokens -1", "attack --edit {edit_ok} --tokens -1 --out {root}/a", "tokens"),
    Case("attack: --seed -5", "attack --edit {edit_ok} --seed -5 --out {root}/a", "2**63 - 1"),
    Case("attack: --prompt-file in Latin-1", "attack --edit {edit_ok} --prompt-file {latin1_prompts} --out {root}/a",
         "not UTF-8"),
    Case("attack: --out under a file", "attack --edit {edit_ok} --out {file}/a", "is a file"),
    Case("attack: --edit with components: 5", "attack --edit {edit_components_int} --out {root}/a", "components"),
    # vlm ask
    Case("vlm ask: --max-new-tokens 0", "vlm ask --question q --max-new-tokens 0", "at least 1"),
    Case("vlm ask: --max-new-tokens -5", "vlm ask --question q --max-new-tokens -5", "at least 1"),
    Case("vlm ask: 16000 x 16000 PNG", "vlm ask --question q --image {bomb_png}", "pixels"),
    Case("vlm ask: --image is not an image", "vlm ask --question q --image {garbage_png}", "not a readable image"),
    Case("vlm ask: --image missing", "vlm ask --question q --image {root}/none.png", "does not exist"),
    Case("vlm ask: empty --question", "vlm ask --question ' '", "--question is empty"),
    Case("vlm ask: erasure.json files: 5", "vlm ask --question q --edit {vlm_edit_files_int}", "files"),
    Case("vlm ask: erasure.json file outside the edit", "vlm ask --question q --edit {vlm_edit_files_outside}",
         "lists a file"),
    Case("vlm ask: erasure.json is binary", "vlm ask --question q --edit {vlm_edit_binary}", "not valid JSON"),
    Case("vlm ask: a diffusion edit", "vlm ask --question q --edit {edit_ok}", "diffusion-model edit"),
    Case("vlm ask: --device bogus", "vlm ask --question q --device bogus", "not a device"),
    Case("vlm ask: --model with a binary config.json", "vlm ask --question q --model {vlm_model_binary_config}",
         "not valid JSON"),
    # vlm erase
    Case("vlm erase: --seed -1", "vlm erase --method sauce --concept star --seed -1 --out {root}/e", "2**63 - 1"),
    Case("vlm erase: --out under a file", "vlm erase --method sauce --concept star --out {file}/e", "is a file"),
    Case("vlm erase: pickle planted in OUT.partial/ckpt", "vlm erase --method ga --concept star --set steps=2 "
         "--device cpu --out {vlm_partial_pickle}", "pickle"),
    # VLM --precision: what the device cannot run, before any weight is read
    Case("vlm erase: --precision fp16 on CPU", "vlm erase --method mllmeraser --concept star --device cpu "
         "--precision fp16 --out {root}/e", "fp16 needs a CUDA GPU"),
    Case("vlm ask: --precision fp16 on CPU", "vlm ask --question q --device cpu --precision fp16",
         "fp16 needs a CUDA GPU"),
    Case("bench mllmu-med: --precision fp16 on CPU", "bench mllmu-med --concept star --device cpu --precision fp16 "
         "--out {root}/r", "fp16 needs a CUDA GPU"),
    Case("vlm ask: --precision fp64", "vlm ask --question q --precision fp64", "invalid choice"),
    Case("vlm ask: --precision bf16 on a GPU without bf16", "vlm ask --question q --device cuda --precision bf16",
         "does not support bf16", _without_bf16_gpu),
    # bench mllmu-med
    Case("bench mllmu-med: --batch-size 0", "bench mllmu-med --concept star --batch-size 0", "at least 1"),
    Case("bench mllmu-med: --max-new-tokens 0", "bench mllmu-med --concept star --max-new-tokens 0", "at least 1"),
    Case("bench mllmu-med: garbage parquet files", "bench mllmu-med --concept forget_5 --data {mllmu_garbage_parquet}",
         "not a readable parquet"),
    Case("bench mllmu-med: parquet with garbage cells", "bench mllmu-med --concept forget_5 "
         "--data {mllmu_garbage_cells}", "row '1'"),
    Case("bench mllmu-med: --out is a file", "bench mllmu-med --concept star --out {file}", "is a file"),
    Case("bench mllmu-med: --out under a file", "bench mllmu-med --concept star --out {file}/r", "is a file"),
    Case("bench mllmu-med: --edit with binary erasure.json", "bench mllmu-med --edit {vlm_edit_binary}",
         "not valid JSON"),
    # never a user's files: a folder the run did not make is refused, before any work
    Case("erase: a user's X.partial/ beside --out X", "erase --method uce --concept star --out {foreign_partial}",
         "not an interrupted erasure run's"),
    Case("vlm erase: a user's X.partial/ beside --out X", "vlm erase --method ga --concept star --set steps=2 "
         "--out {foreign_partial}", "not an interrupted erasure run's"),
    Case("erase: --out is a user's folder", "erase --method uce --concept star --out {users_folder}",
         "already exists"),
    Case("compare: --out is a user's folder", "compare --edit {edit_ok} --out {users_folder}",
         "not made by this command"),
    Case("bench i2p: --out is a user's folder", "bench i2p --prompts {toy_i2p_csv} --limit 1 --out {users_folder}",
         "not made by this command"),
    Case("app: --output is a user's folder", "app --output {users_folder}", "not made by this command"),
    Case("erase: --out is a dangling symlink", "erase --method uce --concept star --out {dangling}", "symbolic link"),
    Case("compare: --out is a dangling symlink", "compare --edit {edit_ok} --out {dangling}", "symbolic link"),
    Case("attack: --out is a dangling symlink", "attack --edit {edit_ok} --out {dangling}", "symbolic link"),
    Case("bench i2p: --out is a dangling symlink", "bench i2p --prompts {toy_i2p_csv} --limit 1 --out {dangling}",
         "symbolic link"),
    # bench i2p: Q16's embeddings are never unpickled
    *(Case(f"bench i2p: --q16-prompts is a pickle named {kind}", "bench i2p --prompts {toy_i2p_csv} --limit 1 "
           f"--q16-clip {{toy_clip}} --q16-prompts {{q16_pickle_{kind[1:]}}} --out {{root}}/r",
           "python -m benchmarks.q16_convert") for kind in (".p", ".npy", ".pt")),
    # app and toy builds
    Case("app: --port 0", "app --port 0", "at least 1"),
    Case("app: --port 70000", "app --port 70000", "65535"),
    Case("app: --output under a file", "app --output {file}/out", "is a file"),
    Case("toy build: --threads 0", "toy build --threads 0", "at least 1"),
    Case("toy build-vlm: unknown stage", "toy build-vlm paint", "unknown stage"),
]


def out_of_range(field: dataclasses.Field) -> list[str]:
    """Values of a config field that its validation rule refuses (below its minimum; nan for floats)."""
    from erasers.validation import bounds

    limits = bounds(field)
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    values = []
    if limits is not None and limits[0] is not None:
        low = limits[0]
        values.append(str(low if limits[2] else low - 1))
    if kind == "float" and (field.name == "lr" or limits is None):
        values.append("nan")
    if field.name == "lr":
        values.append("inf")
    return values


def config_cases() -> list[Case]:
    """For every registered method (diffusion and VLM): each config field set out of its range."""
    from erasers.registry import available_methods
    from vlm.registry import available_vlm_methods

    cases = []
    for command, methods in (("erase", available_methods()), ("vlm erase", available_vlm_methods())):
        for method, entry in sorted(methods.items()):
            for field in dataclasses.fields(entry.eraser.config_class):
                for value in out_of_range(field):
                    cases.append(Case(f"{command} {method}: --set {field.name}={value}",
                                      f"{command} --method {method} --concept star --set {field.name}={value} "
                                      "--out {root}/edit", field.name))
    return cases


def all_cases() -> list[Case]:
    from .bad_input_cases import topic_cases

    return FIXED_CASES + topic_cases() + config_cases()


# ----------------------------------------------------------------------------------------------------------------
# Running a case

def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with a digest of its content (symlinks by their target)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


class _Fields(dict):
    def __init__(self, root: Path):
        super().__init__(root=str(root))
        self.root = root

    def __missing__(self, name: str) -> str:
        self[name] = FIXTURES[name](self.root)
        return self[name]


def run_case(case: Case, root: Path) -> Outcome:
    """Run `case` through `erasure` in this process, in `root` (the working directory meanwhile)."""
    from apps.cli import main

    root = Path(root)
    fields = _Fields(root)
    argv = [part.format_map(fields) for part in shlex.split(case.command)]
    before = snapshot(root)
    stderr, stdout = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:  # noqa: BLE001 - an escaped exception is what the table catches
                traceback.print_exc()
                code = None
    finally:
        os.chdir(cwd)
    after = snapshot(root)
    changes = sorted(p for p in after.keys() | before.keys() if after.get(p) != before.get(p))
    text = stderr.getvalue()
    errors = [line for line in text.splitlines() if line.startswith("erasure: error:")]
    return Outcome(code, errors, text, changes)


def main() -> int:
    from tqdm.auto import tqdm

    cases = all_cases()
    tried = handled = 0
    failures = []
    for case in tqdm(cases, desc="bad inputs", unit="case"):
        if case.skip():
            continue
        tried += 1
        with tempfile.TemporaryDirectory() as tmp:
            problems = run_case(case, Path(tmp)).problems(case)
        if problems:
            failures.append(f"{case.name}: {'; '.join(problems)}")
        else:
            handled += 1
    for failure in failures:
        print("NOT HANDLED", failure)
    print(f"{tried} bad inputs tried, {handled} handled")
    return 0 if handled == tried else 1


if __name__ == "__main__":
    sys.exit(main())
