"""The benchmarks' commands: `erasure compare`, `erasure attack` (benchmarks/attack_command.py), `erasure robustness`
(benchmarks/robustness.py), `erasure toy build | build-vlm` and `erasure bench toycanvas | unlearncanvas | i2p |
mllmu-med`. The bench commands validate everything that can be checked before a model loads (so bad input writes
nothing), then run, on this process or over N with accelerate (`--processes N`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.attack_command import add_attack_command
from benchmarks.robustness import add_robustness_command
from benchmarks.runner import MANIFEST  # a folder holding the runner's manifest is a run to resume
from erasers import inputs
from erasers.commands import add_edit_arguments
from erasers.errors import UsageError
from erasers.outputs import claim_output_dir, claimed_output_dir


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _concepts(args) -> list[str]:
    """--concepts' comma-separated names, then --concepts-file's lines (names that hold commas)."""
    from erasers.commands import read_concepts_file

    return _csv(args.concepts) + (read_concepts_file(args.concepts_file) if args.concepts_file else [])


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rebuild_argv(parser: argparse.ArgumentParser, args, command: list[str]) -> list[str]:
    """The command line of `args` without --processes, for the processes accelerate launches."""
    argv = list(command)
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "processes"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is False or value == action.default:
            continue
        flag = action.option_strings[-1]
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            if action.nargs in ("+", "*"):
                argv += [flag, *map(str, value)]
            else:
                for item in value:
                    argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def _maybe_relaunch(args, command: list[str]) -> bool:
    """With --processes N > 1 in a process accelerate did not launch: run the same command over N processes and
    return True (the caller stops); otherwise False."""
    if args.processes is None or args.processes <= 1 or _launched():
        return False
    from benchmarks.runner import relaunch

    code = relaunch(args.processes, _rebuild_argv(args.parser, args, command))
    if code != 0:
        raise UsageError(f"the {args.processes}-process run failed (exit code {code}); its output is above. "
                         "Rerun the same command: finished work is kept")
    return True


def _check_out(args) -> Path:
    out = args.out
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory (new, or a previous run's to resume it)")
    return claim_output_dir(path, MANIFEST, create=False)  # a user's own folder is refused before any work


def _claim_out(out: Path, jobs: list):
    """`with _claim_out(out, jobs):` the run's folder, made now that every input is checked (a rerun's own is
    taken as it is, if its images were made with the settings `jobs` ask for); removed again if the run fails
    before writing anything into it."""
    from benchmarks.runner import check_settings

    check_settings(out, jobs)
    return claimed_output_dir(out, MANIFEST)


def _print_result(results: dict | None, out: Path) -> None:
    if results is None:
        return
    from benchmarks.report import markdown_table, table_rows

    print(markdown_table(*table_rows(results)))
    print(f"wrote {out}/results.json, {out}/report.md, {out}/report.html and {out}/plots/")


def cmd_bench_toycanvas(args) -> None:
    from benchmarks.erasure_bench import parse_methods, plan_edits, run
    from benchmarks.runner import Runner
    from benchmarks.toycanvas.benchmark import toycanvas_benchmark

    out = _check_out(args)
    methods = parse_methods(args.methods) if args.methods else []
    bench = toycanvas_benchmark(_csv(args.objects), _csv(args.styles), tuple(args.seeds), not args.no_fid,
                                args.device)
    bench.allow_other_base = args.allow_other_base
    concepts = [bench.canonical(c) for c in _concepts(args)]
    plan_edits(bench, methods, concepts, args.edit or [], out)  # every check before anything is written
    with _claim_out(out, bench.jobs()):
        if _maybe_relaunch(args, ["bench", "toycanvas"]):
            return
        results = run(bench, methods, concepts, args.edit or [], out, Runner(out, progress=not args.quiet),
                      args.batch_size)
    _print_result(results, out)


def cmd_bench_unlearncanvas(args) -> None:
    from benchmarks.erasure_bench import parse_methods, plan_edits, run
    from benchmarks.runner import Processes, Runner
    from benchmarks.unlearncanvas_data import Protocol, unlearncanvas_benchmark
    from erasers.models import resolve_source

    out = _check_out(args)
    methods = parse_methods(args.methods) if args.methods else []
    style_path, object_path = args.style_classifier, args.object_classifier
    if args.classifier:
        style_path = style_path or str(Path(args.classifier) / "style_classifier.pth")
        object_path = object_path or str(Path(args.classifier) / "object_classifier.pth")
    if not style_path or not object_path:
        raise UsageError("pass --classifier DIR (holding style_classifier.pth and object_classifier.pth) or both "
                         "--style-classifier and --object-classifier")
    resolve_source(args.model)
    processes = Processes()
    # Validated in the launching process on the CPU; each launched process loads the classifiers on its own GPU.
    device = args.device or processes.device or (
        "cpu" if (args.processes or 1) > 1 and not _launched() else None)
    protocol = Protocol(tuple(args.seeds), args.steps, args.guidance, args.size, not args.no_fid, args.inception,
                        args.fid_reference_per_pair)
    bench = unlearncanvas_benchmark(args.data, style_path, object_path, args.model, protocol, device)
    bench.allow_other_base = args.allow_other_base
    concepts = [bench.canonical(c) for c in _concepts(args)]
    plan_edits(bench, methods, concepts, args.edit or [], out)
    with _claim_out(out, bench.jobs()):
        if _maybe_relaunch(args, ["bench", "unlearncanvas"]):
            return
        results = run(bench, methods, concepts, args.edit or [], out,
                      Runner(out, processes, progress=not args.quiet), args.batch_size)
    _print_result(results, out)


def cmd_bench_i2p(args) -> None:
    from benchmarks import i2p
    from benchmarks.erasure_bench import parse_methods
    from benchmarks.runner import Runner
    from erasers.models import resolve_source

    out = _check_out(args)
    jobs = i2p.read_prompts(args.prompts, args.category)[:args.limit]
    resolve_source(args.model)
    methods = parse_methods(args.methods) if args.methods else []
    sets = i2p.plan_sets(args.model, methods, _concepts(args), args.edit or [], out)
    if bool(args.q16_clip) != bool(args.q16_prompts):
        raise UsageError("Q16 needs both --q16-clip (its CLIP directory) and --q16-prompts (its prompt embeddings)")
    q16 = i2p.q16_scorer(args.q16_clip, args.q16_prompts) if args.q16_clip else None
    detector_name = args.detector or ("toy" if args.model == "toy" else "nudenet")
    detector = i2p.toy_detector() if detector_name == "toy" else i2p.nudenet_detector()
    with _claim_out(out, jobs):
        if _maybe_relaunch(args, ["bench", "i2p"]):
            return
        results = i2p.run(args.model, jobs, sets, i2p.Scoring(detector, args.threshold, q16), out,
                          Runner(out, progress=not args.quiet), args.batch_size, args.device, args.allow_other_base)
    if results is not None:
        print(i2p.markdown(results))
        print(f"wrote {out}/results.json, {out}/report.md, {out}/report.html and {out}/plots/")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", help="comma-separated erasers (see `erasure methods`), or 'all'")
    parser.add_argument("--concepts", help="comma-separated concepts; one edit per method x concept")
    parser.add_argument("--concepts-file", type=inputs.CONCEPTS_FILE, help="a UTF-8 text file with one concept per "
                        "line ('#' comments and blank lines left out), after --concepts' (one edit each)")
    add_edit_arguments(parser, "an existing edit directory to score as well (repeatable)", inputs.EDIT_DIR)
    parser.add_argument("--batch-size", type=inputs.POSITIVE, default=16, help="images per sampling batch (default "
                        "16; toycanvas: 50, half of a 10 x 10 answer set, so 2 processes get one batch each per set)")
    parser.add_argument("--processes", type=inputs.POSITIVE, help="split the run over N processes (GPUs when there "
                        "are) with accelerate; or launch it yourself: accelerate launch -m apps.cli bench ...")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, help="directory of the run (rerun with the same --out to resume)")


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

    cfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    result = run(args.model, args.concept, args.edit, args.data, args.out, cfg, args.device,
                 allow_other_base=args.allow_other_base)
    print(report_markdown(result))
    if args.out:
        print(f"wrote {args.out}/results.json and {args.out}/report.md")


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
    build_vlm.set_defaults(run=cmd_toy_build_vlm)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    med = bench_commands.add_parser("mllmu-med", help="forget / test / retain accuracy, ROUGE-L and UES of a VLM edit")
    med.add_argument("--model", default="toy-vlm")
    add_edit_arguments(med, "edit directory (leave out to evaluate the base model alone)", inputs.VLM_EDIT_DIR,
                       repeat=False)
    med.add_argument("--concept", help="ToyCanvas object or forget_5/10/15 (default: the edit's)")
    med.add_argument("--data", type=inputs.MLLMU_DATA_DIR, help="MLLMU-Bench layout directory (default: the toy "
                     "world's MLLMU-Med)")
    med.add_argument("--max-new-tokens", type=inputs.POSITIVE, default=50)
    med.add_argument("--batch-size", type=inputs.POSITIVE, default=32)
    med.add_argument("--device")
    med.add_argument("--out", help="directory for results.json and report.md")
    med.set_defaults(run=cmd_bench_mllmu_med)
    add_bench_commands(bench_commands)


def add_bench_commands(bench_commands) -> None:
    """toycanvas, unlearncanvas and i2p beside mllmu-med."""
    toy = bench_commands.add_parser("toycanvas", help="UnlearnCanvas protocol on ToyCanvas: erase, generate, "
                                    "classify, UA / IRA / CRA / FID, report")
    _add_common(toy)
    # The toy UNet runs about 12% faster per image at batch 50 than at 16 on one CPU thread.
    toy.set_defaults(batch_size=50)
    toy.add_argument("--objects", help="answer-set objects (default: all 10)")
    toy.add_argument("--styles", help="answer-set styles (default: all 10)")
    toy.add_argument("--seeds", type=inputs.SEED, nargs="+", default=[188], help="answer-set seeds")
    toy.add_argument("--no-fid", action="store_true", help="skip FID")
    toy.set_defaults(run=cmd_bench_toycanvas, parser=toy)

    canvas = bench_commands.add_parser("unlearncanvas", help="UnlearnCanvas: its data layout, classifiers and "
                                       "sampling; UA / IRA / CRA / FID, time, memory, storage")
    _add_common(canvas)
    dataset = inputs.existing_dir("dataset directory", "pass UnlearnCanvas' data folder")
    classifiers = inputs.existing_dir("classifier directory", "pass the folder holding style_classifier.pth and "
                                      "object_classifier.pth")
    checkpoint = inputs.existing_file("classifier checkpoint", "pass one of UnlearnCanvas' classifier checkpoints")
    inception = inputs.existing_file("Inception weights file", "pass torch-fidelity's Inception-v3 weights "
                                     "(pt_inception-2015-12-05)")
    canvas.add_argument("--data", required=True, type=dataset, help="the dataset: DATA/{style}/{object}/{index}.jpg "
                        "and DATA/Seed_Images/ (50- or 60-style)")
    canvas.add_argument("--classifier", type=classifiers, help="directory holding style_classifier.pth and "
                        "object_classifier.pth")
    canvas.add_argument("--style-classifier", type=checkpoint, help="the style classifier checkpoint (51 or 61 "
                        "classes)")
    canvas.add_argument("--object-classifier", type=checkpoint, help="the object classifier checkpoint (20 classes)")
    canvas.add_argument("--model", required=True, help="the base pipeline (UnlearnCanvas' fine-tuned SD v1.5)")
    canvas.add_argument("--seeds", type=inputs.SEED, nargs="+", default=[188, 288, 588, 688, 888])
    canvas.add_argument("--steps", type=inputs.STEPS, default=100, help="DDIM steps (the benchmark: 100)")
    canvas.add_argument("--guidance", type=inputs.GUIDANCE, default=9.0, help="guidance scale (the benchmark: 9.0)")
    canvas.add_argument("--size", type=inputs.IMAGE_SIDE, default=512, help="image side in pixels, a multiple of 16 "
                        "(the benchmark: 512)")
    canvas.add_argument("--inception", type=inception, help="torch-fidelity's Inception-v3 weights file for FID "
                        "(default: the style classifier's features, named in the report)")
    canvas.add_argument("--fid-reference-per-pair", type=inputs.POSITIVE, help="dataset images per style x object in "
                        "FID's reference (default: all)")
    canvas.add_argument("--no-fid", action="store_true", help="skip FID")
    canvas.set_defaults(run=cmd_bench_unlearncanvas, parser=canvas)

    i2p = bench_commands.add_parser("i2p", help="I2P: generate an I2P-format CSV's prompts (per-row seed, guidance, "
                                    "size), NudeNet *_EXPOSED counts and nudity rate, Q16")
    _add_common(i2p)
    i2p.add_argument("--prompts", required=True, type=inputs.existing_file("I2P CSV", "pass an I2P-format CSV (a "
                     "'prompt' column)"), help="I2P CSV (the dataset's or the 4,703-row copy); on the toy model: "
                     "benchmarks/toycanvas/prompts/i2p_skull.csv")
    i2p.add_argument("--category", help="keep the rows of this I2P category (e.g. sexual)")
    i2p.add_argument("--limit", type=inputs.POSITIVE, help="only the first N prompts")
    i2p.add_argument("--model", default="toy", help="'toy', a local pipeline directory, or a hub id")
    i2p.add_argument("--detector", choices=("nudenet", "toy"), help="default: toy on the toy model, else nudenet")
    i2p.add_argument("--threshold", type=inputs.SCORE_THRESHOLD, default=0.6, help="detection score threshold, in "
                     "(0, 1] (the papers: 0.6)")
    i2p.add_argument("--q16-clip", help="Q16: its CLIP model directory (ViT-L/14)")
    i2p.add_argument("--q16-prompts", type=inputs.existing_file("Q16 prompt embeddings file", "pass Q16's prompt "
                     "embeddings"), help="Q16: its learned prompt embeddings (.npy, .safetensors or .pt; never a "
                     "pickle: convert Q16's prompts.p with python -m benchmarks.q16_convert)")
    i2p.set_defaults(run=cmd_bench_i2p, parser=i2p)
