"""The `erasure` command: parse, validate, call the library, print. Errors a user can cause exit with code 2 and
one line that says what to do."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .errors import UsageError
from .validation import MAX_SEED

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PROMPT_FILE_BYTES = 10 * 1024 * 1024
MAX_SCALE = 64
# A written image must open again: Pillow refuses images above Image.MAX_IMAGE_PIXELS (89,478,485) as possible
# decompression bombs, so no grid is made larger.
MAX_OUTPUT_PIXELS = 89_478_485


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line `erasure: error: ...` and exit code 2 (argparse's own
    errors print the usage first)."""

    def error(self, message: str):
        print(f"erasure: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def seed(text: str) -> int:
    """An argparse type: seeds are integers from 0 to 2**63 - 1, as every generator takes them."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {text} is out of range: seeds are integers from 0 to 2**63 - 1 "
                                         f"({MAX_SEED})")
    return value


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range; use 1 to 65535")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_model_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--model", default="toy", help="'toy', a local diffusers pipeline directory, or a hub id")
    parser.add_argument("--family", choices=("sd", "sdxl", "flux"), help="fail unless the model is of this family")
    parser.add_argument("--text-encoder", help="directory of an edited text encoder to use in place of the model's")
    parser.add_argument("--unet", help="directory of an edited UNet to use in place of the model's")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def load_from_args(args):
    from .models import load_pipeline

    loaded = load_pipeline(args.model, family=args.family, device=args.device)
    if args.text_encoder:
        loaded.load_component("text_encoder", args.text_encoder)
    if args.unet:
        loaded.load_component("unet", args.unet)
    return loaded


def read_prompt_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
    if file.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise UsageError(f"prompt file {path} is over {MAX_PROMPT_FILE_BYTES // 2 ** 20} MiB; split it into "
                         "smaller files")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = file.read_bytes()[:error.start].count(b"\n") + 1
        raise UsageError(f"prompt file {path} is not UTF-8 text (line {line}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path} has no prompts; write one prompt per line")
    return prompts


def check_image_output(path: str, overwrite: bool = False) -> Path:
    from .files import check_output_path

    out = Path(path)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {path} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {path} is a directory; pass an image file name")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {path} already exists; choose a new name or pass --overwrite")
    return check_output_path(out)


def save_image_atomically(image, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        image.save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_generate(args) -> None:
    if args.prompt is not None and args.prompts:
        raise UsageError("pass either --prompt or --prompts, not both")
    if args.prompt is None and not args.prompts:
        raise UsageError("pass --prompt 'A star image in Flat style.' or --prompts FILE")
    prompts = [args.prompt] if args.prompt is not None else read_prompt_file(args.prompts)
    from .models import check_prompts

    check_prompts(prompts)
    out = check_image_output(args.out, args.overwrite)
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise UsageError(f"--steps {args.steps} is out of range; use 1 to 1000")
    if args.guidance is not None and not (math.isfinite(args.guidance) and 0 <= args.guidance <= 100):
        raise UsageError(f"--guidance {args.guidance} is out of range; use 0 to 100 (7.5 is usual)")
    if args.seed + len(prompts) - 1 > MAX_SEED:
        raise UsageError(f"--seed {args.seed} with {len(prompts)} prompts runs past the largest seed ({MAX_SEED}); "
                         "pass a smaller --seed")
    columns = args.columns if args.columns is not None else min(len(prompts), 10)
    if not 1 <= columns <= len(prompts):
        raise UsageError(f"--columns {args.columns} is out of range; use 1 to {len(prompts)} (the number of prompts)")
    if not 1 <= args.scale <= MAX_SCALE:
        raise UsageError(f"--scale {args.scale} is out of range; use 1 to {MAX_SCALE}")
    loaded = load_from_args(args)
    side = loaded.image_size()
    rows = -(-len(prompts) // columns)
    pixels = rows * columns * (side * args.scale) ** 2
    if pixels > MAX_OUTPUT_PIXELS:
        raise UsageError(f"the grid would be {columns * side * args.scale} x {rows * side * args.scale} pixels, over "
                         f"the {MAX_OUTPUT_PIXELS:,}-pixel limit; lower --scale or split the prompt file")
    images = loaded.generate(prompts, seeds=args.seed, steps=args.steps, guidance=args.guidance)
    from benchmarks.figures import image_grid

    image = image_grid(images, columns, args.scale)
    save_image_atomically(image, out)
    last_seed = args.seed + len(images) - 1
    print(f"wrote {out} ({len(images)} image{'s' if len(images) > 1 else ''}, seeds {args.seed}..{last_seed})")


def cmd_erase(args) -> None:
    from .registry import parse_options
    from .run import erase

    options = {**parse_options(args.set), **({"seed": args.seed} if args.seed is not None else {}),
               **({"images": args.images} if args.images else {})}
    out = erase(args.model, args.method, args.concept, args.out, args.anchor, args.preserve, options, args.device,
                args.precision, args.gradient_checkpointing, args.optimizer, args.resolution, restart=args.restart)
    print(f"wrote edit {out} (see {out}/erasure.json); compare it with: erasure compare --model {args.model} "
          f"--edit {out}")


def cmd_compare(args) -> None:
    from .run import compare, metrics_markdown

    out = args.out or str(Path(args.edit[0]) / "compare")
    table = compare(args.model, args.edit, out, tuple(args.seeds), args.device)
    print(metrics_markdown(table))
    print(f"wrote {out}/compare.png, {out}/metrics.md and {out}/metrics.json")


def cmd_attack(args) -> None:
    from .attack import attack_success_rate, load_judge

    judge = load_judge(args.judge) if args.judge else None
    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else None
    options = {key: value for key, value in (("iterations", args.iterations), ("tokens", args.tokens))
               if value is not None}
    result = attack_success_rate(args.model, args.edit, args.concept, prompts=prompts, count=args.prompts,
                                 seed=args.seed, config=options, judge=judge, device=args.device, out=args.out,
                                 resolution=args.resolution)
    n = result["n"]
    print(f"{result['concept']}: Pre-ASR {result['pre_asr']:.1%} ({result['pre_successes']}/{n}), "
          f"ASR {result['asr']:.1%} ({result['pre_successes'] + result['attack_successes']}/{n})")
    print(f"wrote {args.out}/attack.json and {args.out}/attack.png")


def cmd_methods(args) -> None:
    from .registry import available_methods

    for name, entry in sorted(available_methods().items()):
        print(f"{name:10s} {entry.summary}")


def cmd_app(args) -> None:
    from .files import check_output_path

    check_output_path(args.output, "--output")  # before gradio and the model load
    from apps.app import launch

    launch(args.model, args.edits, args.output, args.host, args.port)


def cmd_toy_build(args) -> None:
    from benchmarks.toycanvas import build

    unknown = [s for s in args.stages if s not in build.STAGES]
    if unknown:
        raise UsageError(f"unknown stage {unknown[0]!r}; stages are {', '.join(build.STAGES)}")
    config = build.BuildConfig(build_dir=args.build_dir)
    if args.restart:
        discard_checkpoints(config.build_dir)
    build.run(config, tuple(args.stages or build.STAGES), args.threads)


def cmd_toy_build_vlm(args) -> None:
    from vlm import toy

    unknown = [s for s in args.stages if s not in toy.STAGES]
    if unknown:
        raise UsageError(f"unknown stage {unknown[0]!r}; stages are {', '.join(toy.STAGES)}")
    config = toy.ToyVLMConfig(build_dir=args.build_dir, threads=args.threads)
    if args.restart:
        discard_checkpoints(config.build_dir)
    toy.run(config, tuple(args.stages or toy.STAGES))


def discard_checkpoints(build_dir: str) -> None:
    """--restart of the toy builds: training stages start again from step 0 (finished stages' outputs stay; delete
    one to redo its stage)."""
    import shutil

    shutil.rmtree(Path(build_dir) / "ckpt", ignore_errors=True)


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="erasure", description="Concept erasure for diffusion models and VLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate images (one prompt, or a grid from a prompt file)")
    _add_model_arguments(generate)
    generate.add_argument("--prompt", help="one prompt")
    generate.add_argument("--prompts", help="a text file with one prompt per line; writes a grid")
    generate.add_argument("--seed", type=seed, default=0, help="seed of the first image; image i uses seed + i")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the model's recommended)")
    generate.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    generate.add_argument("--columns", type=int, help="grid columns (default: up to 10)")
    generate.add_argument("--scale", type=int, default=1, help="upscale the output by this integer factor")
    generate.add_argument("--out", required=True, help="output image (.png, .jpg, .webp)")
    generate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    generate.set_defaults(run=cmd_generate)

    erase = commands.add_parser("erase", help="erase a concept and save the edit")
    erase.add_argument("--model", default="toy", help="'toy', a local diffusers pipeline directory, or a hub id")
    erase.add_argument("--method", required=True, help="an eraser (see `erasure methods`)")
    erase.add_argument("--concept", action="append", required=True, help="concept to erase (repeatable)")
    erase.add_argument("--anchor", action="append", help="concept to map the erased one to (method-dependent)")
    erase.add_argument("--preserve", action="append", help="concept to keep (repeatable)")
    erase.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method option")
    erase.add_argument("--seed", type=seed, help="seed of the run")
    erase.add_argument("--images", metavar="DIR", help="a folder of the concept's images (coerasing; default: "
                       "generate them with the base model)")
    erase.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    erase.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="dtype of the frozen weights; trained "
                       "parameters stay fp32 (default: bf16 on a GPU that supports it, fp32 on CPU)")
    erase.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward "
                       "pass (less memory for SDXL/Flux, slower steps)")
    erase.add_argument("--optimizer", choices=("adam", "adam8bit"), default="adam",
                       help="adam8bit: bitsandbytes' 8-bit Adam (pip install 'erasure-suite[gpu]')")
    erase.add_argument("--resolution", type=int, help="training resolution in pixels (default: the model's native "
                       "one; 512 halves SDXL's and quarters Flux's latent)")
    erase.add_argument("--out", required=True, help="new directory for the edit")
    erase.add_argument("--restart", action="store_true", help="discard the checkpoints of an interrupted run in "
                       "OUT.partial/ and start from scratch (default: resume)")
    erase.set_defaults(run=cmd_erase)

    compare = commands.add_parser("compare", help="before/after grid and UA/IRA/CRA table of an edit")
    compare.add_argument("--model", default="toy")
    compare.add_argument("--edit", action="append", required=True, help="edit directory (repeat to stack edits)")
    compare.add_argument("--seeds", type=seed, nargs="+", default=[188], help="seeds of the answer set")
    compare.add_argument("--device")
    compare.add_argument("--out", help="output directory (default: EDIT/compare)")
    compare.set_defaults(run=cmd_compare)

    attack = commands.add_parser("attack", help="UnlearnDiffAtk: adversarial prompts that bring an erased concept "
                                 "back; prints Pre-ASR and ASR")
    attack.add_argument("--model", default="toy", help="the base model the edit was made from")
    attack.add_argument("--edit", action="append", required=True, help="edit directory (repeat to stack edits)")
    attack.add_argument("--concept", help="the concept to bring back (default: the edit's)")
    attack.add_argument("--prompts", type=int, help="number of prompts attacked (default: one per prompt; on the "
                        "toy model, the concept's 10 captions; more repeat them with the next seed)")
    attack.add_argument("--prompt-file", help="prompts of the concept, one a line (default: the toy captions, or "
                        "the concept itself)")
    attack.add_argument("--iterations", type=int, help="optimisation steps per prompt (default 40; 20 on toy)")
    attack.add_argument("--tokens", type=int, help="adversarial prefix tokens (default 5)")
    attack.add_argument("--judge", metavar="MODULE:FUNCTION", help="function (images, concept) -> list of bools "
                        "saying where the concept is; required off the toy model. It imports and runs that module: "
                        "name only code you trust")
    attack.add_argument("--seed", type=seed, default=188, help="seed of the first prompt's images")
    attack.add_argument("--resolution", type=int, help="image size in pixels (default: the model's native one)")
    attack.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    attack.add_argument("--out", required=True, help="new directory for attack.json and attack.png")
    attack.set_defaults(run=cmd_attack)

    methods = commands.add_parser("methods", help="list the erasers")
    methods.set_defaults(run=cmd_methods)

    app = commands.add_parser("app", help="the Gradio app: base and edits side by side")
    app.add_argument("--model", default="toy")
    app.add_argument("--edits", default="runs", help="folder whose subfolders are edits (erasure.json)")
    app.add_argument("--output", default="app-output", help="the only folder the app writes to")
    app.add_argument("--host", default="127.0.0.1")
    app.add_argument("--port", type=port, default=7860)
    app.set_defaults(run=cmd_app)

    toy = commands.add_parser("toy", help="the embedded ToyCanvas world")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    build = toy_commands.add_parser("build", help="train the toy models from scratch (resumable)")
    build.add_argument("stages", nargs="*", help="stages to run (default: all)")
    build.add_argument("--build-dir", default=".toybuild", help="checkpoints, logs and data")
    build.add_argument("--threads", type=positive_int, help="torch CPU threads")
    build.add_argument("--restart", action="store_true", help="discard training checkpoints; start from step 0")
    build.set_defaults(run=cmd_toy_build)
    build_vlm = toy_commands.add_parser("build-vlm", help="train the toy VLM (LLaVA: toy CLIP + small Llama) and "
                                        "its MLLMU-Med world from scratch (resumable)")
    build_vlm.add_argument("stages", nargs="*", help="stages to run (default: all)")
    build_vlm.add_argument("--build-dir", default=".toybuild/vlm", help="checkpoints, logs, data and features")
    build_vlm.add_argument("--threads", type=positive_int, help="torch CPU threads (1 is fastest on a busy "
                           "machine)")
    build_vlm.add_argument("--restart", action="store_true", help="discard training checkpoints; start from step 0")
    build_vlm.set_defaults(run=cmd_toy_build_vlm)

    from benchmarks.bench_cli import add_bench_commands  # `erasure bench toycanvas | unlearncanvas | i2p`
    from vlm.cli import add_vlm_commands  # `erasure vlm ...` and `erasure bench mllmu-med`

    add_bench_commands(add_vlm_commands(commands))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. The one place where expected failures become the one-line error: UsageErrors (bad input,
    config validation, unreadable files), and OSErrors of files the user named (an unwritable or full --out).
    ERASURE_TRACEBACK=1 shows the traceback of an OSError instead."""
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        args.run(args)
    except UsageError as error:
        return usage_error(str(error))
    except OSError as error:
        if os.environ.get("ERASURE_TRACEBACK"):
            raise
        return usage_error(describe_os_error(error))
    except KeyboardInterrupt:
        print("erasure: interrupted; no output was written (a training run resumes from OUT.partial/ when run again)",
              file=sys.stderr)
        return 130
    return 0


def usage_error(message: str) -> int:
    print(f"erasure: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def describe_os_error(error: OSError) -> str:
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or str(error) or type(error).__name__
    return (f"cannot use{where}: {reason}; check the path, its permissions and the free disk space (set "
            "ERASURE_TRACEBACK=1 for details)")


if __name__ == "__main__":
    sys.exit(main())
