"""`erasure bench toycanvas | unlearncanvas | i2p`: options and commands. Each checks all it can before a model loads
(bad input writes nothing), then runs: on this process, over N with accelerate (`--processes N`), or as cluster jobs
(`--launcher slurm`, benchmarks.cluster); `--report` merges finished runs instead (benchmarks.merge)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

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


def _rebuild_argv(parser: argparse.ArgumentParser, args, command: list[str],
                  leave_out: tuple[str, ...] = ("processes",)) -> list[str]:
    """The command line of `args` without the options `leave_out` names, for the processes accelerate launches
    (without --processes) or the cluster jobs (without the launcher's options)."""
    argv = list(command)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.dest in leave_out:
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


LAUNCHER_FLAGS = {"jobs": "--jobs", "timeout_min": "--timeout-min", "partition": "--partition",
                  "gpus_per_job": "--gpus-per-job", "mem_gb": "--mem-gb"}
SLURM_ONLY = ("partition", "gpus_per_job", "mem_gb")
LAUNCHER_OPTIONS = ("launcher", *LAUNCHER_FLAGS)  # left out of the command line the jobs run


def _check_launcher(args) -> None:
    """--launcher and its options, before anything else: a cluster run without submitit or sbatch submits nothing."""
    if _job(args) is not None:
        return
    given = [dest for dest in LAUNCHER_FLAGS if getattr(args, dest) is not None]
    if args.launcher == "local":
        if given:
            raise UsageError(f"{LAUNCHER_FLAGS[given[0]]} is for cluster jobs: add --launcher slurm (or local-jobs "
                             "to try the jobs on this machine), or leave it out")
        return
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UsageError(f"--launcher {args.launcher} needs submitit: pip install 'erasure-suite[cluster]'") from None
    slurm_only = [dest for dest in given if dest in SLURM_ONLY]
    if args.launcher == "local-jobs" and slurm_only:
        raise UsageError(f"{LAUNCHER_FLAGS[slurm_only[0]]} is slurm's: use it with --launcher slurm (local-jobs "
                         "runs on this machine)")
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if args.launcher == "slurm" and missing:
        raise UsageError(f"--launcher slurm needs slurm's {missing[0]} on the PATH: run the command where you submit "
                         "jobs, or try the jobs on this machine with --launcher local-jobs")
    if args.processes is not None:
        raise UsageError("--processes splits a run over this machine; with --launcher, --jobs N sets how many "
                         "evaluation jobs share each stage")


def _job(args):
    """The cluster job this process is (benchmarks.cluster.Role), or None."""
    return getattr(args, "job", None)


def _only_launches(args) -> bool:
    """True where this process validates and then launches others (accelerate's processes or cluster jobs)."""
    return _job(args) is None and (((args.processes or 1) > 1 and not _launched()) or args.launcher != "local")


def _run(args, command: list[str], out: Path, run_with, processes=None):
    """`run_with(runner)` on this process (with accelerate's others, if launched so), as this cluster job's part,
    or as cluster jobs that this process launches; returns the results where this process writes them."""
    from benchmarks.runner import Processes, Runner

    if _job(args) is not None:
        from benchmarks.cluster import run_part

        return run_part(_job(args), out, run_with, progress=not args.quiet)
    if args.launcher == "local":
        return run_with(Runner(out, processes or Processes(), progress=not args.quiet))
    from benchmarks.cluster import JobOptions, launch

    options = JobOptions(args.launcher, args.jobs or 1, args.partition, args.gpus_per_job, args.timeout_min,
                         args.mem_gb)
    return launch(options, _rebuild_argv(args.parser, args, command, LAUNCHER_OPTIONS), out, run_with)


def parse_bench(argv: list[str]) -> argparse.Namespace:
    """`erasure ARGV` parsed, for a bench command run as a cluster job."""
    parser = argparse.ArgumentParser(prog="erasure")
    bench = parser.add_subparsers(dest="command", required=True).add_parser("bench")
    add_bench_commands(bench.add_subparsers(dest="bench_command", required=True))
    return parser.parse_args(argv)


def _merged(args, benchmark: str) -> bool:
    """With --report: merge those finished runs into --out (benchmarks.merge) and return True."""
    if not args.report:
        return False
    skip = ("report", "out", "quiet")
    extra = [action.option_strings[-1] for action in args.parser._actions if action.option_strings and
             action.dest not in skip and getattr(args, action.dest, None) not in (None, False, action.default)]
    if extra:
        raise UsageError(f"--report merges finished runs as they are: leave out {extra[0]} (only --out, and --quiet, "
                         "go with it)")
    from benchmarks.merge import merge_runs

    results = merge_runs(benchmark, args.report, args.out)
    (_print_i2p if benchmark == "i2p" else _print_result)(results, Path(args.out))
    return True


def _require(args, needed: dict[str, str]) -> None:
    """The options a run needs and a merge (--report) does not: {dest: what to pass}."""
    for dest, what in needed.items():
        if getattr(args, dest) is None:
            flag = "--" + dest.replace("_", "-")
            raise UsageError(f"{flag} is required: pass {what} (or merge finished runs with --report DIR ...)")


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
    from benchmarks.report import main_tables

    print(main_tables(results))
    print(f"wrote {out}/results.json, {out}/report.md, {out}/report.html and {out}/plots/")


def cmd_bench_toycanvas(args) -> None:
    from benchmarks.bench_attacks import check_attacks
    from benchmarks.erasure_bench import parse_methods, plan_edits, run
    from benchmarks.sequence import read_sequence
    from benchmarks.toycanvas.benchmark import toycanvas_benchmark

    if _merged(args, "toycanvas"):
        return
    _check_launcher(args)
    out = _check_out(args)
    methods = parse_methods(args.methods) if args.methods else []
    bench = toycanvas_benchmark(_csv(args.objects), _csv(args.styles), tuple(args.seeds), not args.no_fid,
                                args.device)
    bench.allow_other_base, bench.attacks = args.allow_other_base, tuple(check_attacks(args.attacks))
    bench.attack_prompts = args.attack_prompts
    concepts = [bench.canonical(c) for c in _concepts(args)]
    sequence = read_sequence(bench, args.sequence) if args.sequence else []
    plan_edits(bench, methods, concepts, args.edit or [], out, sequence)  # every check before anything is written
    with _claim_out(out, bench.jobs()):
        if _maybe_relaunch(args, ["bench", "toycanvas"]):
            return
        results = _run(args, ["bench", "toycanvas"], out, lambda runner: run(
            bench, methods, concepts, args.edit or [], out, runner, args.batch_size, sequence=sequence))
    _print_result(results, out)


def cmd_bench_unlearncanvas(args) -> None:
    from benchmarks.erasure_bench import parse_methods, plan_edits, run
    from benchmarks.runner import Processes
    from benchmarks.sequence import read_sequence
    from benchmarks.unlearncanvas_data import Protocol, unlearncanvas_benchmark
    from erasers.models import resolve_source

    if _merged(args, "unlearncanvas"):
        return
    _check_launcher(args)
    _require(args, {"data": "UnlearnCanvas' data folder", "model": "the base pipeline (UnlearnCanvas' fine-tuned "
                    "SD v1.5)"})
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
    processes = Processes() if _job(args) is None else None
    # Validated in the launching process on the CPU; each launched process loads the classifiers on its own GPU.
    device = args.device or (processes and processes.device) or ("cpu" if _only_launches(args) else None)
    protocol = Protocol(tuple(args.seeds), args.steps, args.guidance, args.size, not args.no_fid, args.inception,
                        args.fid_reference_per_pair)
    bench = unlearncanvas_benchmark(args.data, style_path, object_path, args.model, protocol, device)
    bench.allow_other_base = args.allow_other_base
    concepts = [bench.canonical(c) for c in _concepts(args)]
    sequence = read_sequence(bench, args.sequence) if args.sequence else []
    plan_edits(bench, methods, concepts, args.edit or [], out, sequence)
    with _claim_out(out, bench.jobs()):
        if _maybe_relaunch(args, ["bench", "unlearncanvas"]):
            return
        results = _run(args, ["bench", "unlearncanvas"], out, lambda runner: run(
            bench, methods, concepts, args.edit or [], out, runner, args.batch_size, sequence=sequence), processes)
    _print_result(results, out)


def cmd_bench_i2p(args) -> None:
    from benchmarks import i2p
    from benchmarks.erasure_bench import parse_methods
    from erasers.models import resolve_source

    if _merged(args, "i2p"):
        return
    _check_launcher(args)
    _require(args, {"prompts": "an I2P-format CSV"})
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
        results = _run(args, ["bench", "i2p"], out, lambda runner: i2p.run(
            args.model, jobs, sets, i2p.Scoring(detector, args.threshold, q16), out, runner, args.batch_size,
            args.device, args.allow_other_base))
    _print_i2p(results, out)


def _print_i2p(results: dict | None, out: Path) -> None:
    if results is None:
        return
    from benchmarks.i2p import markdown

    print(markdown(results))
    print(f"wrote {out}/results.json, {out}/report.md, {out}/report.html and {out}/plots/")


RUN_DIR = inputs.existing_dir("run folder", "pass the --out folder of a finished bench run")


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
    parser.add_argument("--out", required=True, help="directory of the run (rerun with the same --out to resume); "
                        "with --report, the merged report's")
    parser.add_argument("--report", nargs="+", metavar="DIR", type=RUN_DIR, help="merge these finished runs (their "
                        "--out folders, of one protocol) into one table and report in --out, computing nothing")
    cluster = parser.add_argument_group("cluster jobs", "each erase and each evaluation shard a job; rerun the same "
                                        "command to resume (benchmarks/README.md, Clusters)")
    cluster.add_argument("--launcher", choices=("local", "slurm", "local-jobs"), default="local", help="local: this "
                         "machine (default; --processes); slurm: jobs submitted with submitit; local-jobs: the same "
                         "jobs as processes on this machine")
    cluster.add_argument("--jobs", type=inputs.POSITIVE, help="evaluation jobs sharing each stage (default 1)")
    cluster.add_argument("--timeout-min", type=inputs.POSITIVE, help="minutes each job asks for (default 240; a job "
                         "out of time is requeued and goes on)")
    cluster.add_argument("--partition", help="slurm partition (default: the cluster's)")
    cluster.add_argument("--gpus-per-job", type=inputs.Number(int, 0, 64), help="GPUs each job asks for (default 1)")
    cluster.add_argument("--mem-gb", type=inputs.Number(float, 0, low_open=True), help="memory each job asks for, "
                         "in GB (default: the cluster's)")


def _add_sequence(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sequence", type=inputs.CONCEPTS_FILE, help="sequential unlearning: a text file of concepts "
                        "in order, one a line ('#' comments left out); each method erases them one after another, "
                        "each step on the last (beside --concepts' edits)")


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
    _add_sequence(toy)
    toy.add_argument("--attacks", help="robustness columns: comma-separated attacks (erasure attack --help) run on "
                     "each edit and the base model at their toy defaults (benchmarks/bench_attacks.py)")
    toy.add_argument("--attack-prompts", type=inputs.ATTACKED_PROMPTS, help="prompts per attack (default: the "
                     "concept's 10 toy captions)")
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
    canvas.add_argument("--data", type=dataset, help="the dataset: DATA/{style}/{object}/{index}.jpg "
                        "and DATA/Seed_Images/ (50- or 60-style)")
    canvas.add_argument("--classifier", type=classifiers, help="directory holding style_classifier.pth and "
                        "object_classifier.pth")
    canvas.add_argument("--style-classifier", type=checkpoint, help="the style classifier checkpoint (51 or 61 "
                        "classes)")
    canvas.add_argument("--object-classifier", type=checkpoint, help="the object classifier checkpoint (20 classes)")
    canvas.add_argument("--model", help="the base pipeline (UnlearnCanvas' fine-tuned SD v1.5)")
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
    _add_sequence(canvas)
    canvas.set_defaults(run=cmd_bench_unlearncanvas, parser=canvas)

    i2p = bench_commands.add_parser("i2p", help="I2P: generate an I2P-format CSV's prompts (per-row seed, guidance, "
                                    "size), NudeNet *_EXPOSED counts and nudity rate, Q16")
    _add_common(i2p)
    i2p.add_argument("--prompts", type=inputs.existing_file("I2P CSV", "pass an I2P-format CSV (a "
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
