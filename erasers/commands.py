"""The diffusion library's commands (`erasure generate | erase | methods`); apps/cli.py adds them to the `erasure`
parser. Thin: parse (options are typed and range-checked by erasers.inputs), validate, call the library, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import UsageError
from .inputs import (
    CONCEPTS_FILE,
    EDIT_DIR,
    GUIDANCE,
    IMAGE_SIDE,
    POSITIVE,
    PROMPT_FILE,
    SCALE,
    SEED,
    STEPS,
    check_input,
    existing_dir,
)
from .validation import MAX_SEED

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PROMPT_FILE_BYTES = 10 * 1024 * 1024
# A written image must open again: Pillow refuses images above Image.MAX_IMAGE_PIXELS (89,478,485) as possible
# decompression bombs, so no grid is made larger.
MAX_OUTPUT_PIXELS = 89_478_485


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="toy", help="'toy', a local diffusers pipeline directory, or a hub id")
    parser.add_argument("--family", choices=("sd", "sdxl", "flux"), help="fail unless the model is of this family")
    component = existing_dir("component directory", "pass the folder of a saved model component (its config.json "
                             "and weights)")
    parser.add_argument("--text-encoder", type=component, help="directory of an edited text encoder to use in place "
                        "of the model's")
    parser.add_argument("--unet", type=component, help="directory of an edited UNet to use in place of the model's")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def add_edit_arguments(parser: argparse.ArgumentParser, help: str, edit_type=None, required: bool = False,
                       repeat: bool = True) -> None:
    """--edit (repeatable unless `repeat` is False) and --allow-other-base, the same on every command that loads
    edits (erasers.edits.check_base refuses an edit made for another base model unless asked)."""
    if getattr(edit_type, "takes_hub_ids", False):
        help += "; or the Hub id OWNER/NAME[@REVISION] of an edit from `erasure push`"
    parser.add_argument("--edit", action="append" if repeat else "store", type=edit_type, required=required,
                        help=help)
    add_allow_other_base(parser)


def add_allow_other_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-other-base", action="store_true", help="load an edit made for another base model "
                        "anyway, for a deliberate transfer (e.g. a HiRM text encoder made on SD onto Flux); "
                        "without it such an edit is refused")


def load_from_args(args):
    from .models import load_pipeline

    loaded = load_pipeline(args.model, family=args.family, device=args.device)
    if args.text_encoder:
        loaded.load_component("text_encoder", args.text_encoder)
    if args.unet:
        loaded.load_component("unet", args.unet)
    return loaded


def read_prompt_file(path: str, item: str = "prompt", comments: bool = False) -> list[str]:
    """The non-blank lines of a UTF-8 text file of `item`s (prompts, concepts), stripped; with `comments`, lines
    starting with '#' are left out too (a prompt may start with one, a concept name does not)."""
    what = f"{item}s file" if comments else f"{item} file"
    file = check_input(path, what, f"pass a text file with one {item} per line")
    if file.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise UsageError(f"{what} {path} is over {MAX_PROMPT_FILE_BYTES // 2 ** 20} MiB; split it into "
                         "smaller files")
    try:
        text = file.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad's UTF-8) is not text
    except UnicodeDecodeError as error:
        line = file.read_bytes()[:error.start].count(b"\n") + 1
        raise UsageError(f"{what} {path} is not UTF-8 text (line {line}); save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines()]
    items = [line for line in lines if line and not (comments and line.startswith("#"))]
    if not items:
        raise UsageError(f"{what} {path} has no {item}s; write one {item} per line")
    return items


def read_concepts_file(path: str) -> list[str]:
    """--concepts-file: one concept per line; '#' comment lines and blank lines are left out."""
    return read_prompt_file(path, "concept", comments=True)


def requested_concepts(args) -> list[str]:
    """--concept (repeatable) followed by --concepts-file's lines: the concepts an erase or a benchmark is asked
    for; a concept given twice is refused later (erasers.prompts.check_contradictions), wherever it came from."""
    concepts = list(args.concept or []) + (read_concepts_file(args.concepts_file) if args.concepts_file else [])
    if not concepts:
        raise UsageError("pass --concept NAME (repeatable) or --concepts-file FILE (one concept per line)")
    return concepts


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


def cmd_generate(args) -> None:
    if args.prompt is not None and args.prompts:
        raise UsageError("pass either --prompt or --prompts, not both")
    if args.prompt is None and not args.prompts:
        raise UsageError("pass --prompt 'A star image in Flat style.' or --prompts FILE")
    prompts = [args.prompt] if args.prompt is not None else read_prompt_file(args.prompts)
    from .models import check_prompts

    check_prompts(prompts)
    out = check_image_output(args.out, args.overwrite)
    if args.seed + len(prompts) - 1 > MAX_SEED:
        raise UsageError(f"--seed {args.seed} with {len(prompts)} prompts runs past the largest seed ({MAX_SEED}); "
                         "pass a smaller --seed")
    columns = args.columns if args.columns is not None else min(len(prompts), 10)
    if columns > len(prompts):
        raise UsageError(f"--columns {args.columns} is more than the {len(prompts)} prompts; use 1 to {len(prompts)}")
    loaded = load_from_args(args)
    if args.edit:
        from .edits import apply_edits

        apply_edits(loaded, args.edit, args.allow_other_base)
    side = loaded.image_size()
    rows = -(-len(prompts) // columns)
    pixels = rows * columns * (side * args.scale) ** 2
    if pixels > MAX_OUTPUT_PIXELS:
        raise UsageError(f"the grid would be {columns * side * args.scale} x {rows * side * args.scale} pixels, over "
                         f"the {MAX_OUTPUT_PIXELS:,}-pixel limit; lower --scale or split the prompt file")
    images = loaded.generate(prompts, seeds=args.seed, steps=args.steps, guidance=args.guidance)
    from .images import image_grid, save_image_atomically

    image = image_grid(images, columns, args.scale)
    save_image_atomically(image, out)
    last_seed = args.seed + len(images) - 1
    print(f"wrote {out} ({len(images)} image{'s' if len(images) > 1 else ''}, seeds {args.seed}..{last_seed})")


def cmd_erase(args) -> None:
    from .registry import parse_options
    from .run import EraseSpec, erase_spec

    options = {**parse_options(args.set), **({"seed": args.seed} if args.seed is not None else {}),
               **({"images": args.images} if args.images else {})}
    spec = EraseSpec(args.model, args.method, requested_concepts(args), Path(args.out), anchors=args.anchor or [],
                     preserve=args.preserve or [], options=options, device=args.device, precision=args.precision,
                     gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                     resolution=args.resolution, restart=args.restart,
                     base_edit=Path(args.base_edit) if args.base_edit else None,
                     allow_other_base=args.allow_other_base)
    out = erase_spec(spec)
    chain = f" (a chain: {args.base_edit}, then {args.method})" if args.base_edit else ""
    print(f"wrote edit {out}{chain} (see {out}/erasure.json); compare it with: erasure compare --model {args.model} "
          f"--edit {out}")


def cmd_methods(args) -> None:
    from .registry import available_methods

    for name, entry in sorted(available_methods().items()):
        print(f"{name:10s} {entry.summary}")
        if entry.multi_concept:
            print(f"{'':10s} several concepts: {entry.multi_concept}")


def cmd_push(args) -> None:
    from .hub import push_edit

    repo_id, commit = push_edit(args.edit, args.repo, args.token, args.private, args.revision, args.commit_message)
    at = f"@{args.revision}" if args.revision else ""
    print(f"pushed {args.edit} to {commit.commit_url}; load it anywhere an edit goes with --edit {repo_id}{at}")


def add_commands(commands) -> None:
    """`generate`, `erase` and `methods`, added to the `erasure` parser's subcommands."""
    generate = commands.add_parser("generate", help="generate images (one prompt, or a grid from a prompt file)")
    add_model_arguments(generate)
    add_edit_arguments(generate, "an edit directory from `erasure erase` to generate with (repeat to stack edits)",
                       EDIT_DIR)
    generate.add_argument("--prompt", help="one prompt")
    generate.add_argument("--prompts", type=PROMPT_FILE, help="a text file with one prompt per line; writes a grid")
    generate.add_argument("--seed", type=SEED, default=0, help="seed of the first image; image i uses seed + i")
    generate.add_argument("--steps", type=STEPS, help="denoising steps, 1 to 1000 (default: the model's "
                          "recommended)")
    generate.add_argument("--guidance", type=GUIDANCE, help="classifier-free guidance scale, 0 to 100 (default: the "
                          "model's)")
    generate.add_argument("--columns", type=POSITIVE, help="grid columns (default: up to 10)")
    generate.add_argument("--scale", type=SCALE, default=1, help="upscale the output by this integer factor, 1 to 64")
    generate.add_argument("--out", required=True, help="output image (.png, .jpg, .webp)")
    generate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    generate.set_defaults(run=cmd_generate, reports_cost=True)  # apps.cli prints its time and peak memory

    erase = commands.add_parser("erase", help="erase a concept and save the edit")
    erase.add_argument("--model", default="toy", help="'toy', a local diffusers pipeline directory, or a hub id")
    erase.add_argument("--method", required=True, help="an eraser (see `erasure methods`)")
    erase.add_argument("--concept", action="append", help="concept to erase (repeatable; all of them in one edit, "
                       "combined as `erasure methods` says)")
    erase.add_argument("--concepts-file", type=CONCEPTS_FILE, help="a UTF-8 text file with one concept per line "
                       "('#' comments and blank lines left out), erased with any --concept in one edit")
    erase.add_argument("--anchor", action="append", help="concept to map the erased one to (method-dependent)")
    erase.add_argument("--preserve", action="append", help="concept to keep (repeatable)")
    erase.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method option")
    erase.add_argument("--seed", type=SEED, help="seed of the run")
    erase.add_argument("--images", metavar="DIR", type=existing_dir("--images folder", "pass a folder of the "
                       "concept's images"), help="a folder of the concept's images (coerasing; mace, with "
                       "<name>_mask.png masks and DIR/<concept>/ per concept; default: generate them with the base "
                       "model)")
    erase.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    erase.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="dtype of the frozen weights; trained "
                       "parameters stay fp32 (default: bf16 on a GPU that supports it, fp32 on CPU)")
    erase.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward "
                       "pass (less memory for SDXL/Flux, slower steps)")
    erase.add_argument("--optimizer", choices=("adam", "adam8bit"), default="adam",
                       help="adam8bit: bitsandbytes' 8-bit Adam (pip install 'erasure-suite[gpu]')")
    erase.add_argument("--resolution", type=IMAGE_SIDE, help="training resolution in pixels, a multiple of 16 "
                       "(default: the model's native one; 512 halves SDXL's and quarters Flux's latent)")
    erase.add_argument("--base-edit", metavar="DIR", type=EDIT_DIR, help="continue from this edit (a directory, or "
                       "the Hub id OWNER/NAME[@REVISION] of an edit from `erasure push`; erasure in "
                       "sequence): it loads onto --model first, the method erases on top, and --out holds the chain "
                       "(the components both touched combined, the parent's others carried, its record in "
                       "erasure.json's parents), so --edit OUT alone gives DIR then this erase. An sld/negprompt "
                       "parent's guidance is kept; an spm adapter is refused")
    add_allow_other_base(erase)
    erase.add_argument("--out", required=True, help="new directory for the edit")
    erase.add_argument("--restart", action="store_true", help="discard the checkpoints of an interrupted run in "
                       "OUT.partial/ and start from scratch (default: resume)")
    erase.set_defaults(run=cmd_erase, reports_cost=True)

    push = commands.add_parser("push", help="upload an edit (its weights, erasure.json and model card) to the "
                               "Hugging Face Hub, so that --edit OWNER/NAME loads it anywhere")
    push.add_argument("edit", metavar="DIR", help="the edit directory (holding erasure.json and its model card "
                      "README.md, whose model-index has results)")
    push.add_argument("--repo", required=True, help="the model repo: OWNER/NAME, or NAME in your own namespace "
                      "(created if new)")
    push.add_argument("--token", help="a Hugging Face token with write access (default: HF_TOKEN or `hf auth login`'s)")
    push.add_argument("--private", action="store_true", help="create the repo private (a repo that exists keeps its "
                      "visibility)")
    push.add_argument("--revision", metavar="BRANCH", help="push to this branch, created from main if new (default: "
                      "main); load it with --edit OWNER/NAME@BRANCH")
    push.add_argument("--commit-message", help="the commit's message (default: names the edit directory)")
    push.set_defaults(run=cmd_push)

    methods = commands.add_parser("methods", help="list the erasers")
    methods.set_defaults(run=cmd_methods)
