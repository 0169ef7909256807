"""UnlearnCanvas-protocol benchmarks of erasure methods, on ToyCanvas or on the real UnlearnCanvas data:

    for each method x concept: erase (or reuse the edit in DIR/edits/), generate the answer set (every style x
    object x seed) with the base model and every edit, classify it, score UA / IRA / CRA (benchmarks.metrics) and
    FID, and write DIR/results.json and the report (benchmarks.report).

With a --sequence, each method also erases its concepts one after another, a chain of edits scored step by step
(benchmarks.sequence). Resumable and split across processes by benchmarks.runner; erases are split across processes
too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from benchmarks.card_results import record_bench
from benchmarks.failures import (
    blank_failures,
    check_bases,
    failed_row,
    given_failures,
    recorded_failures,
)
from benchmarks.fid import fid_record
from benchmarks.metrics import Record, accuracy_scores, unlearncanvas_scores
from benchmarks.runner import ImageJob, Runner
from benchmarks.sequence import erase_unit, erase_units, orphaned_steps, sequence_fields, unit_finished, unit_name
from erasers.chains import chain_name
from erasers.edits import apply_edits, read_edit
from erasers.errors import UsageError
from erasers.files import write_atomically
from erasers.registry import REGISTRY, available_methods, get_method

CLASSIFY_BATCH_SIZE = 64  # images per classifier batch


@dataclass
class FeatureExtractor:
    """Image features for FID: `name` is what the report says was used; `extract` maps a list of images to an
    (N, d) tensor."""

    name: str
    extract: Callable[[list[Image.Image]], torch.Tensor]


@dataclass
class Benchmark:
    """What differs between ToyCanvas and UnlearnCanvas: concepts, sampling, classifier, FID's reference."""

    name: str
    model: str
    objects: tuple[str, ...]
    styles: tuple[str, ...]
    seeds: tuple[int, ...]
    template: str = "A {object} image in {style} style."
    steps: int | None = None
    guidance: float | None = None
    size: int | None = None
    scheduler: str | None = None          # "ddim": UnlearnCanvas samples with DDIM, eta 0
    suffix: str = ".png"
    # images -> (objects, styles) as the classifier reads them
    classify: Callable[[list[Image.Image]], tuple[list[str], list[str]]] | None = None
    features: FeatureExtractor | None = None
    # reference images for FID, without the erased concepts: (excluded concepts) -> list of (key, image loader)
    reference: Callable[[set[str]], list[tuple[str, Callable[[], Image.Image]]]] | None = None
    device: str | None = None
    extra: dict = field(default_factory=dict)
    # Load given edits made for another base model (--allow-other-base); refused otherwise.
    allow_other_base: bool = False
    # What identifies the classifier and the data ({"classifier": digest, ...}), recorded in results.json so that
    # `--report` merges only runs of one protocol (benchmarks.merge).
    fingerprint: Callable[[], dict] | None = None
    # Robustness columns (benchmarks.bench_attacks, on the main process): the attacks run on every edit and on the base
    # model, and their prompts per attack (None: each attack's toy default).
    attacks: tuple[str, ...] = ()
    attack_prompts: int | None = None

    def concept_kind(self, concept: str) -> str:
        if concept in self.objects:
            return "object"
        if concept in self.styles:
            return "style"
        raise UsageError(f"unknown concept {concept!r} for {self.name}; objects: {', '.join(self.objects)}; "
                         f"styles: {', '.join(self.styles)}")

    def canonical(self, concept: str) -> str:
        """The concept as the benchmark spells it ("stripes" -> "Stripes")."""
        for name in (*self.objects, *self.styles):
            if name.lower() == concept.lower():
                return name
        self.concept_kind(concept)  # raises with the list of concepts
        return concept

    def jobs(self) -> list[ImageJob]:
        """The answer set (benchmarks.unlearncanvas.AnswerSet) in UnlearnCanvas' file naming:
        {style}_{object}_seed{seed}."""
        from benchmarks.unlearncanvas import AnswerSet

        answers = AnswerSet(self.objects, self.styles, self.seeds, self.template)
        return [ImageJob(f"{style}_{obj}_seed{seed}", answers.prompt(obj, style), seed, self.steps, self.guidance,
                         self.size, self.size, (("object", obj), ("style", style)))
                for obj, style, seed in answers.items()]


@dataclass(frozen=True)
class Edit:
    name: str            # the set's name: "{method}-{concept}", or the edit directory's name
    path: Path
    method: str
    concepts: tuple[str, ...]
    kind: str
    made_here: bool      # erased by this benchmark into DIR/edits (False: reused or given with --edit)
    # A step of a --sequence chain (benchmarks.sequence): its number from 1, the edit it continues from (None for
    # the first), the whole sequence; its `concepts` are those erased so far.
    step: int | None = None
    parent: Path | None = None
    sequence: tuple[str, ...] = ()

    @property
    def erased_here(self) -> list[str]:
        """What its own erase removes: a step's concept, or all of an edit's."""
        return [self.concepts[-1]] if self.step else list(self.concepts)


def parse_methods(spec: str | list[str]) -> list[str]:
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    if names == ["all"]:
        return sorted(available_methods())
    for name in names:
        get_method(name)  # UsageError naming the available methods
    return names


def plan_edits(bench: Benchmark, methods: list[str], concepts: list[str], given: list[str], out: Path,
               sequence: list[str] | tuple[str, ...] = ()) -> list[Edit]:
    """The edits to score: one per method x concept, a chain per method for `sequence` (benchmarks.sequence), and
    the given ones; each edit already in DIR/edits checked to be what its name says."""
    from benchmarks.sequence import plan_sequence

    edits = []
    for concept in concepts:
        kind = bench.concept_kind(concept)
        for method in methods:
            path = out / "edits" / f"{method}-{concept}"
            if (path / "erasure.json").exists():
                meta = read_edit(path)
                if meta["method"] != method or [spelled(c) for c in meta["concepts"]] != [spelled(concept)]:
                    raise UsageError(f"{path} holds a {meta['method']} edit of {meta['concepts']}, not {method} of "
                                     f"{concept}; remove it or choose another --out")
            edits.append(Edit(f"{method}-{concept}", path, method, (concept,), kind, True))
    edits += plan_sequence(bench, methods, list(sequence), out)
    for directory in given:
        meta = read_edit(directory)
        names = tuple(bench.canonical(c.replace(" ", "_") if c.replace(" ", "_") in (*bench.objects, *bench.styles)
                                     else c) for c in meta["concepts"])
        kinds = {bench.concept_kind(c) for c in names}
        if len(kinds) != 1:
            raise UsageError(f"{directory} erases objects and styles together; score it with `erasure compare`")
        # A chain (erase --base-edit) by its methods in order ("esd-x then uce"), its concepts the whole chain's.
        edits.append(Edit(Path(directory).name, Path(directory), chain_name(meta), names, kinds.pop(), False))
    if len({e.name for e in edits}) != len(edits):
        raise UsageError("two edits share a name; give --edit directories distinct names")
    if not edits:
        raise UsageError("nothing to benchmark: pass --methods and --concepts, or --edit directories")
    return edits


# What every erase imports, loaded once by the fork server rather than once per erase (about 7 s on a CPU).
def _erase_preload() -> list[str]:
    return ["torch", "diffusers", "transformers", "benchmarks", "erasers.run",
            *sorted({entry.eraser.__module__ for entry in REGISTRY.available().values()})]


def run_in_fresh_process(function: Callable, *args, **kwargs):
    """`function(*args, **kwargs)` in a new process forked from a server that has imported the suite once
    (multiprocessing's forkserver), so its peak memory on a CPU (VmHWM) is its own, not the running maximum of a
    benchmark that erased before. The peak counts what the process touched, imports included, but not library
    pages it never used."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_erase_preload())  # read when the server starts, on the first call
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args, **kwargs).result()


def erase_in_fresh_process(model: str, method: str, concepts: list[str], out: Path, options: dict | None = None,
                           device: str | None = None, **settings) -> Path:
    """erasers.run.erase in a fresh process; `settings` are its other fields (base_edit, ...)."""
    return run_in_fresh_process(_erase, model, method, concepts, out, options=options, device=device, **settings)


def _erase(*args, **settings) -> Path:
    """erasers.run.erase, run from this module: a fresh process unpickling it imports `benchmarks`, which registers
    the model name "toy" there too."""
    from erasers.run import erase

    return erase(*args, **settings)


def erase_isolated(model: str, method: str, concepts: list[str], out: Path, options: dict | None,
                   device: str | None, base_edit: Path | None = None) -> Path:
    """An erase for a benchmark (continuing from `base_edit`, if given): in a fresh process on a CPU
    (`erase_in_fresh_process`); on a GPU in this process, where the peak is reset per erase."""
    from erasers.run import erase

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return erase(model, method, concepts, out, options=options, device=device, base_edit=base_edit)
    return erase_in_fresh_process(model, method, concepts, out, options, device, base_edit=base_edit)


def spelled(concept: str) -> str:
    """A concept as an edit's erasure.json may spell it: UnlearnCanvas' "Van_Gogh" is erased as "van gogh"."""
    return concept.replace("_", " ").lower()


def load_for_benchmark(bench: Benchmark, edit: Edit | None):
    """The base pipeline (plus an edit) as the benchmark samples it: its scheduler, no safety checker."""
    from erasers.models import load_pipeline

    loaded = load_pipeline(bench.model, device=bench.device)
    if getattr(loaded.pipeline, "safety_checker", None) is not None:
        loaded.pipeline.register_modules(safety_checker=None)
    if bench.scheduler == "ddim":
        from diffusers import DDIMScheduler

        loaded.pipeline.scheduler = DDIMScheduler.from_config(loaded.pipeline.scheduler.config)
    if edit is not None:
        apply_edits(loaded, [edit.path], bench.allow_other_base)
    return loaded


def run(bench: Benchmark, methods: list[str], concepts: list[str], given_edits: list[str], out: str | Path,
        runner: Runner | None = None, batch_size: int = 16, method_options: dict | None = None,
        sequence: list[str] | tuple[str, ...] = ()) -> dict | None:
    """The whole benchmark; returns results (on the main process; None on the others). An edit that makes no
    usable images is a row marked failed (benchmarks.failures), found as early as it can be. With `sequence`, each
    method also erases it in sequence (benchmarks.sequence); with `bench.attacks`, robustness columns."""
    out = Path(out)
    runner = runner or Runner(out)
    processes = runner.processes
    concepts = [bench.canonical(c) for c in concepts]
    edits = plan_edits(bench, methods, concepts, given_edits, out, sequence)
    bench.device = bench.device or processes.device
    given = [e for e in edits if not e.made_here]
    if given:  # an edit made for another base model is refused before any erase or image
        check_bases(load_for_benchmark(bench, None), [e.path for e in given], bench.allow_other_base)
    failed = given_failures([(e.name, e.path) for e in given])

    # A chain's steps are one unit, claimed whole: a step's erase waits for its parent's.
    for unit in processes.claim(erase_units([e for e in edits if e.made_here]),
                                lambda unit: out / "edits" / ".locks" / f"{unit_name(unit)}.lock",
                                lambda unit: unit_finished(unit, recorded_failures(runner))):
        # UnlearnCanvas writes its names with underscores; its prompts (and so the erased text) with spaces.
        erase_unit(runner, unit, lambda edit: erase_isolated(
            bench.model, edit.method, [c.replace("_", " ") for c in edit.erased_here], edit.path,
            (method_options or {}).get(edit.method), bench.device, edit.parent))
    jobs = bench.jobs()
    # The base model's share needs no edit: a process out of erases starts on it while the others finish theirs.
    runner.generate("base", jobs, lambda: load_for_benchmark(bench, None), batch_size, bench.suffix)
    processes.erases_done()
    failed.update(recorded_failures(runner))
    failed.update(orphaned_steps(edits, failed))

    sets: list[tuple[str, Edit | None]] = [("base", None)] + [(e.name, e) for e in edits]
    for name, edit in sets[1:]:
        if name not in failed:
            runner.generate(name, jobs, lambda edit=edit: load_for_benchmark(bench, edit), batch_size, bench.suffix)
    processes.wait()
    failed.update(blank_failures(runner, [name for name, _ in sets if name not in failed], jobs))
    scored = [(name, edit) for name, edit in sets if name not in failed]

    def classify(images: list[Image.Image]) -> list[dict]:
        objects, styles = bench.classify(images)
        return [{"predicted_object": o, "predicted_style": s} for o, s in zip(objects, styles)]

    for name, _ in scored:
        runner.classify(name, jobs, classify, CLASSIFY_BATCH_SIZE)
    processes.wait()

    if bench.features is not None and bench.reference is not None:
        for name, edit in processes.mine(scored):
            runner.once("fid", name, lambda name=name, edit=edit: fid_record(bench, runner, name, edit, jobs))
    processes.wait()
    if not processes.is_main:
        return None
    results = collect(bench, runner, sets, jobs, failed)
    if bench.attacks:
        from benchmarks.bench_attacks import attack_columns

        results["robustness"] = attack_columns(runner, edits, failed, list(bench.attacks), out, bench.attack_prompts,
                                               bench.device)
    write_atomically(out / "results.json", json.dumps(results, indent=2))
    record_bench(results, edits, out)  # each scored edit's row on its model card (erasers.cards)
    from benchmarks.report import write_report

    done = runner.manifest.read()  # once: a grid looks up hundreds of images (re-reading it took 80 s)
    write_report(results, out, lambda set_name, key: runner.image_path(done, set_name, ImageJob(key, "", 0)))
    return results


def records_of(runner: Runner, set_name: str, jobs: list[ImageJob]) -> list[Record]:
    done = runner.manifest.read()
    return [Record(job.label("object"), job.label("style"), done[("score", set_name, job.key)]["predicted_object"],
                   done[("score", set_name, job.key)]["predicted_style"]) for job in jobs]


def collect(bench: Benchmark, runner: Runner, sets: list[tuple[str, Edit | None]], jobs: list[ImageJob],
            failed: dict[str, str] | None = None) -> dict:
    """results.json: per set, the scores of each erased concept (the base model's for every concept), FID and the
    edit's cost, or a failed set's reason (`failed`) and no scores; per method, the UnlearnCanvas table's averages
    over the erased concepts of each kind (failed edits left out, and counted)."""
    done = runner.manifest.read()
    concepts = sorted({c for _, e in sets if e is not None for c in e.concepts})
    rows = []
    for name, edit in sets:
        if name in (failed or {}):
            rows.append(failed_row(name, edit, concepts, failed[name]))
            continue
        records = records_of(runner, name, jobs)
        fid = done.get(("fid", name, "-"), {})
        row = {"set": name, "method": edit.method if edit else "base", "accuracy": accuracy_scores(records),
               "fid": fid.get("fid"), "fid_features": fid.get("fid_features")}
        if edit is None:
            row["per_concept"] = {c: unlearncanvas_scores(records, [c], bench.concept_kind(c)) for c in concepts}
        else:
            meta = read_edit(edit.path)
            row.update(concepts=list(edit.concepts), kind=edit.kind, cost=meta["cost"], config=meta["config"],
                       per_concept={",".join(edit.concepts): unlearncanvas_scores(records, list(edit.concepts),
                                                                                   edit.kind)},
                       **sequence_fields(edit, records))
        rows.append(row)
    return {"benchmark": bench.name, "model": bench.model, "objects": list(bench.objects),
            "styles": list(bench.styles), "seeds": list(bench.seeds), "images_per_model": len(jobs),
            "sampling": {"steps": bench.steps, "guidance": bench.guidance, "size": bench.size,
                         "scheduler": bench.scheduler or "the model's"},
            "fid_features": bench.features.name if bench.features else None,
            "protocol": bench.fingerprint() if bench.fingerprint else {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": rows, "table": method_table(rows)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def method_table(rows: list[dict]) -> list[dict]:
    """One line per method, as UnlearnCanvas' table: UA / IRA / CRA averaged over the erased styles and over the
    erased objects, FID averaged over the method's edits, time, peak memory and storage averaged likewise."""
    table = []
    rows = [r for r in rows if "step" not in r]  # a --sequence's steps have their own table (benchmarks.report)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        line = {"method": method}
        for kind in ("style", "object"):
            if method == "base":
                scores = [s for r in mine for c, s in r["per_concept"].items() if _kind_of(c, rows) == kind]
            else:
                scores = [s for r in mine if r["kind"] == kind for s in r["per_concept"].values()]
            for metric in ("UA", "IRA", "CRA"):
                line[f"{kind}_{metric}"] = _mean([s[metric] for s in scores])
        line["FID"] = _mean([r["fid"] for r in mine])
        line["failed"] = sum(bool(r.get("failed")) for r in mine)
        for cost in ("seconds", "peak_memory_bytes", "storage_bytes"):
            line[cost] = _mean([r["cost"][cost] for r in mine if "cost" in r])
        table.append(line)
    return table


def _kind_of(concept: str, rows: list[dict]) -> str | None:
    for row in rows:
        if row.get("concepts") and concept in row["concepts"]:
            return row["kind"]
    return None
