"""The benchmarks' commands: `erasure compare`, `erasure attack` (benchmarks/attack_command.py), `erasure robustness`
(benchmarks/robustness.py), `erasure toy build | build-vlm` and `erasure bench mllmu-med | mllmu`, with `erasure
bench toycanvas | unlearncanvas | i2p` from benchmarks.bench_commands."""

from __future__ import annotations

from pathlib import Path

from benchmarks.attack_command import add_attack_command
from benchmarks.bench_commands import add_bench_commands
from benchmarks.robustness import add_robustness_command
from erasers import inputs
from erasers.commands import add_edit_arguments
from erasers.errors import UsageError
from erasers.outputs import claim_output_dir
from vlm.commands import add_precision_argument


def cmd_compare(args) -> None:
    from benchmarks.compare import compare, metrics_markdown

    out = args.out or str(Path(args.edit[0]) / "compare")
    table = compare(args.model, args.edit, out, tuple(args.seeds), args.device,
                    allow_other_base=args.allow_other_base)
    print(metrics_markdown(table))
    print(f"wrote {out}/compare.png, {out}/metrics.md and {out}/metrics.json")


def cmd_toy_build(args) -> None:
    from benchmarks.toycanvas import build

    unknown = [s for s in args.stages if s not in build.STAGES]
    if unknown:
        raise UsageError(f"unknown stage {unknown[0]!r}; stages are {', '.join(build.STAGES)}")
    config = build.BuildConfig(build_dir=args.build_dir)
    prepare_build_dir(config.build_dir, args.restart)
    build.run(config, tuple(args.stages or build.STAGES), args.threads)


def cmd_toy_build_vlm(args) -> None:
    from benchmarks.toyvlm import build as toy

    unknown = [s for s in args.stages if s not in toy.STAGES]
    if unknown:
        raise UsageError(f"unknown stage {unknown[0]!r}; stages are {', '.join(toy.STAGES)}")
    config = toy.ToyVLMConfig(build_dir=args.build_dir, threads=args.threads)
    prepare_build_dir(config.build_dir, args.restart)
    if args.from_shipped:
        toy.seed_from_shipped(config)
    toy.run(config, tuple(args.stages or toy.STAGES))


BUILD_MARK = "toy-build"  # what a toy build's folder marker names (erasers.outputs)


def prepare_build_dir(build_dir: str, restart: bool) -> None:
    """The build's folder, made now and marked as the build's or one carrying that marker: a user's folder is never
    written into. --restart discards its checkpoints (finished stages' outputs stay: delete one to redo it)."""
    import shutil

    existing = Path(build_dir).is_dir()
    try:
        path = claim_output_dir(build_dir, BUILD_MARK, "--build-dir")
    except UsageError:
        if not existing:  # a file, a dangling link: claim_output_dir's own line
            raise
        why = "--restart clears checkpoints only in a folder a toy build made" if restart else \
            "a toy build writes only into a folder it made"
        remedy = "delete its ckpt/ yourself, or build" if restart else "build"
        raise UsageError(f"{why}, and --build-dir {build_dir} carries no build marker: {remedy} into a new "
                         "--build-dir") from None
    if restart:
        shutil.rmtree(path / "ckpt", ignore_errors=True)


def cmd_bench_mllmu_med(args) -> None:
    from benchmarks.mllmu_med import EvalConfig, report_markdown, run

    published = args.bench_command == "mllmu"
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, benchmark=args.bench_command,
                     precision=args.precision, **({"shots": args.shots, "seed": args.seed} if published else {}))
    result = run(args.model, args.concept, args.edit, args.data, args.out, cfg, args.device,
                 allow_other_base=args.allow_other_base)
    print(report_markdown(result))
    if args.out:
        print(f"wrote {args.out}/results.json and {args.out}/report.md")


def add_vlm_commands(vlm_commands) -> None:
    """`erasure vlm robustness`, added to the `erasure vlm` subcommands."""
    from benchmarks.vlm_robustness import add_vlm_robustness_command

    add_vlm_robustness_command(vlm_commands)


def vlm_evaluation_arguments(parser, part: str) -> None:
    """The arguments both MLLMU commands take: the model and edit ("head"), then decoding, device, precision and
    output ("tail"), so that their help lists them in the same order around each command's own."""
    if part == "head":
        parser.add_argument("--model", default="toy-vlm")
        add_edit_arguments(parser, "edit directory (leave out to evaluate the base model alone)",
                           inputs.VLM_EDIT_DIR, repeat=False)
        return
    parser.add_argument("--max-new-tokens", type=inputs.POSITIVE, default=50)
    parser.add_argument("--batch-size", type=inputs.POSITIVE, default=32)
    parser.add_argument("--device")
    add_precision_argument(parser)
    parser.add_argument("--out", help="directory for results.json and report.md")
    parser.set_defaults(run=cmd_bench_mllmu_med)


def add_commands(commands) -> None:
    """`compare`, `attack`, `toy` and `bench`, added to the `erasure` parser's subcommands."""
    compare = commands.add_parser("compare", help="before/after grid and UA/IRA/CRA table of an edit")
    compare.add_argument("--model", default="toy")
    add_edit_arguments(compare, "edit directory (repeat to stack edits)", inputs.EDIT_DIR, required=True)
    compare.add_argument("--seeds", type=inputs.SEED, nargs="+", default=[188], help="seeds of the answer set")
    compare.add_argument("--device")
    compare.add_argument("--out", help="output directory (default: EDIT/compare)")
    compare.set_defaults(run=cmd_compare, reports_cost=True)  # apps.cli prints its time and peak memory

    add_attack_command(commands)
    add_robustness_command(commands)

    toy = commands.add_parser("toy", help="the embedded ToyCanvas world")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    build = toy_commands.add_parser("build", help="train the toy models from scratch (resumable)")
    build.add_argument("stages", nargs="*", help="stages to run (default: all)")
    build.add_argument("--build-dir", default=".toybuild", help="checkpoints, logs and data")
    build.add_argument("--threads", type=inputs.POSITIVE, help="torch CPU threads")
    build.add_argument("--restart", action="store_true", help="discard training checkpoints; start from step 0")
    build.set_defaults(run=cmd_toy_build)
    build_vlm = toy_commands.add_parser("build-vlm", help="train the toy VLM (LLaVA: toy CLIP + small Llama) and "
                                        "its MLLMU-Med world from scratch (resumable)")
    build_vlm.add_argument("stages", nargs="*", help="stages to run (default: all)")
    build_vlm.add_argument("--build-dir", default=".toybuild/vlm", help="checkpoints, logs, data and features")
    build_vlm.add_argument("--threads", type=inputs.POSITIVE, help="torch CPU threads (1 is fastest on a busy "
                           "machine)")
    build_vlm.add_argument("--restart", action="store_true", help="discard training checkpoints; start from step 0")
    build_vlm.add_argument("--from-shipped", action="store_true", help="start from the shipped model (its tokenizer "
                           "and weights as phase 3's output) to run the later stages only: wordings export evaluate")
    build_vlm.set_defaults(run=cmd_toy_build_vlm)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    med = bench_commands.add_parser("mllmu-med", help="forget / test / retain accuracy, ROUGE-L and UES of a VLM edit")
    vlm_evaluation_arguments(med, "head")
    med.add_argument("--concept", help="ToyCanvas object or forget_5/10/15 (default: the edit's)")
    med.add_argument("--data", type=inputs.MLLMU_DATA_DIR, help="MLLMU-Bench layout directory (default: the toy "
                     "world's MLLMU-Med)")
    vlm_evaluation_arguments(med, "tail")

    bench = bench_commands.add_parser("mllmu", help="MLLMU-Bench as published (eval.py's prompts and few-shot "
                                      "examples): forget / test / retain / Retain_Set, image+text and text-only apart")
    vlm_evaluation_arguments(bench, "head")
    bench.add_argument("--concept", help="forget_5, forget_10 or forget_15 (default: the edit's)")
    bench.add_argument("--data", type=inputs.MLLMU_DATA_DIR, required=True, help="the MLLMU-Bench release's "
                       "directory: forget_N/, retain_M/, Test_Set/, Retain_Set/ (Full_Set/ for the examples)")
    shots = inputs.Number(int, 0, 2, rule="shots are 0, 1 or 2")
    bench.add_argument("--shots", type=shots, default=2, help="few-shot examples: profiles whose questions precede "
                       "each multiple-choice and cloze question (eval.py: 2 for LLaVA, 1 for idefics2)")
    bench.add_argument("--seed", type=inputs.SEED, default=0, help="seed of the examples and of each Test_Set "
                       "row's image")
    vlm_evaluation_arguments(bench, "tail")
    add_bench_commands(bench_commands)
