"""The `erasure vlm ...` and `erasure bench mllmu-med` commands, added to the `erasure` parser by
`add_vlm_commands`. Thin: parse, validate, call vlm.run / benchmarks.mllmu_med, print; user errors are UsageErrors
(one line, exit code 2)."""

from __future__ import annotations


def cmd_vlm_methods(args) -> None:
    from .registry import available_vlm_methods

    for name, entry in sorted(available_vlm_methods().items()):
        print(f"{name:11s} {entry.summary}")


def cmd_vlm_erase(args) -> None:
    from erasers.registry import parse_options

    from .run import erase

    options = {**parse_options(args.set), **({"seed": args.seed} if args.seed is not None else {})}
    out = erase(args.model, args.method, args.concept, args.out, options, args.data, args.device, args.restart)
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
    loaded = load_vlm(args.model, device=args.device)
    before, after = ask_before_after(loaded, args.edit, image, args.question, args.max_new_tokens)
    print(f"base:   {before}")
    if after is not None:
        print(f"edited: {after}")


def cmd_bench_mllmu_med(args) -> None:
    from benchmarks.mllmu_med import EvalConfig, report_markdown, run

    cfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    result = run(args.model, args.concept, args.edit, args.data, args.out, cfg, args.device)
    print(report_markdown(result))
    if args.out:
        print(f"wrote {args.out}/results.json and {args.out}/report.md")


def add_vlm_commands(commands):
    """Add `vlm` (methods, erase, ask) and `bench mllmu-med` to the subcommands of the `erasure` parser; returns
    the `bench` subcommands, for the other benchmarks."""
    from erasers.cli import positive_int, seed

    vlm = commands.add_parser("vlm", help="concept erasure for vision-language models (LLaVA, Qwen2.5-VL, toy-vlm)")
    sub = vlm.add_subparsers(dest="vlm_command", required=True)
    methods = sub.add_parser("methods", help="list the VLM erasers")
    methods.set_defaults(run=cmd_vlm_methods)

    erase = sub.add_parser("erase", help="erase a concept from a VLM and save the edit")
    erase.add_argument("--model", default="toy-vlm", help="'toy-vlm', a local model directory, or a hub id")
    erase.add_argument("--method", required=True, help="a VLM eraser (see `erasure vlm methods`)")
    erase.add_argument("--concept", required=True, help="a ToyCanvas object (star, ...) or forget_5/10/15")
    erase.add_argument("--data", help="MLLMU-Bench layout directory holding forget_N/, retain_M/, Test_Set/ "
                       "(default: the toy world's MLLMU-Med)")
    erase.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method option")
    erase.add_argument("--seed", type=seed, help="seed of the run")
    erase.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    erase.add_argument("--out", required=True, help="new directory for the edit")
    erase.add_argument("--restart", action="store_true", help="discard the checkpoints of an interrupted run in "
                       "OUT.partial/ and start from scratch (default: resume)")
    erase.set_defaults(run=cmd_vlm_erase)

    ask = sub.add_parser("ask", help="a question about an image, answered by the base model and the edited one")
    ask.add_argument("--model", default="toy-vlm")
    ask.add_argument("--edit", help="edit directory of `erasure vlm erase`")
    ask.add_argument("--image", help="image file (leave out for a text-only question)")
    ask.add_argument("--question", required=True)
    ask.add_argument("--max-new-tokens", type=positive_int, default=50, help="longest answer, in tokens")
    ask.add_argument("--device")
    ask.set_defaults(run=cmd_vlm_ask)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    med = bench_sub.add_parser("mllmu-med", help="forget / test / retain accuracy, ROUGE-L and UES of a VLM edit")
    med.add_argument("--model", default="toy-vlm")
    med.add_argument("--edit", help="edit directory (leave out to evaluate the base model alone)")
    med.add_argument("--concept", help="ToyCanvas object or forget_5/10/15 (default: the edit's)")
    med.add_argument("--data", help="MLLMU-Bench layout directory (default: the toy world's MLLMU-Med)")
    med.add_argument("--max-new-tokens", type=positive_int, default=50)
    med.add_argument("--batch-size", type=positive_int, default=32)
    med.add_argument("--device")
    med.add_argument("--out", help="directory for results.json and report.md")
    med.set_defaults(run=cmd_bench_mllmu_med)
    return bench_sub

