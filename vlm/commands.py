"""The `erasure vlm ...` commands, added to the `erasure` parser by apps/cli.py. Thin: parse, validate, call vlm.run,
print; user errors are UsageErrors (one line, exit code 2)."""

from __future__ import annotations


def cmd_vlm_methods(args) -> None:
    from .registry import available_vlm_methods

    for name, entry in sorted(available_vlm_methods().items()):
        print(f"{name:11s} {entry.summary}")


def cmd_vlm_erase(args) -> None:
    from erasers.registry import parse_options

    from .run import erase

    options = {**parse_options(args.set), **({"seed": args.seed} if args.seed is not None else {})}
    out = erase(args.model, args.method, args.concept, args.out, options, args.data, args.device, args.restart,
                args.precision)
    print(f"wrote edit {out} (see {out}/erasure.json); try it with: erasure vlm ask --model {args.model} "
          f"--edit {out} --image IMAGE --question QUESTION")


def cmd_vlm_ask(args) -> None:
    from erasers.errors import UsageError

    from .edits import read_vlm_edit
    from .models import load_vlm
    from .run import ask_before_after, open_image

    if not args.question.strip():
        raise UsageError("--question is empty; ask something, e.g. --question 'What object is in this image?'")
    image = open_image(args.image)
    if args.edit:
        read_vlm_edit(args.edit)  # a bad edit fails before the model loads
    loaded = load_vlm(args.model, device=args.device, precision=args.precision)
    loaded.allow_other_base = args.allow_other_base
    before, after = ask_before_after(loaded, args.edit, image, args.question, args.max_new_tokens)
    print(f"base:   {before}")
    if after is not None:
        print(f"edited: {after}")


def add_precision_argument(parser) -> None:
    """`--precision` of every command that loads a VLM (vlm.models.vlm_dtype)."""
    from .models import VLM_PRECISIONS

    parser.add_argument("--precision", choices=VLM_PRECISIONS, default="auto", help="dtype the model is held and "
                        "run in (auto: bf16 on a CUDA GPU that supports it, else fp16 on CUDA, fp32 on CPU)")


def add_commands(commands):
    """`erasure vlm methods | erase | ask`, added to the `erasure` parser's subcommands; returns the `vlm`
    subcommands, to which apps/cli.py adds those of higher layers (`robustness`)."""
    from erasers.commands import add_edit_arguments
    from erasers.inputs import MLLMU_DATA_DIR, POSITIVE, SEED, VLM_EDIT_DIR, existing_file

    vlm = commands.add_parser("vlm", help="concept erasure for vision-language models (LLaVA, Qwen2.5-VL, toy-vlm)")
    sub = vlm.add_subparsers(dest="vlm_command", required=True)
    methods = sub.add_parser("methods", help="list the VLM erasers")
    methods.set_defaults(run=cmd_vlm_methods)

    erase = sub.add_parser("erase", help="erase a concept from a VLM and save the edit")
    erase.add_argument("--model", default="toy-vlm", help="'toy-vlm', a local model directory, or a hub id")
    erase.add_argument("--method", required=True, help="a VLM eraser (see `erasure vlm methods`)")
    erase.add_argument("--concept", required=True, help="a ToyCanvas object (star, ...) or forget_5/10/15")
    erase.add_argument("--data", type=MLLMU_DATA_DIR, help="MLLMU-Bench layout directory holding forget_N/, retain_M/, "
                       "Test_Set/ (default: the toy world's MLLMU-Med)")
    erase.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method option")
    erase.add_argument("--seed", type=SEED, help="seed of the run")
    erase.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_precision_argument(erase)
    erase.add_argument("--out", required=True, help="new directory for the edit")
    erase.add_argument("--restart", action="store_true", help="discard the checkpoints of an interrupted run in "
                       "OUT.partial/ and start from scratch (default: resume)")
    erase.set_defaults(run=cmd_vlm_erase)

    ask = sub.add_parser("ask", help="a question about an image, answered by the base model and the edited one")
    ask.add_argument("--model", default="toy-vlm")
    add_edit_arguments(ask, "edit directory of `erasure vlm erase`", VLM_EDIT_DIR, repeat=False)
    ask.add_argument("--image", type=existing_file("image", "pass an image file (.png, .jpg)"),
                     help="image file (leave out for a text-only question)")
    ask.add_argument("--question", required=True)
    ask.add_argument("--max-new-tokens", type=POSITIVE, default=50, help="longest answer, in tokens")
    ask.add_argument("--device")
    add_precision_argument(ask)
    ask.set_defaults(run=cmd_vlm_ask)
    return sub
