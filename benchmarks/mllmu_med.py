"""MLLMU-Med evaluation: how much a VLM edit forgets, keeps and generalises, MLLMU-Bench style.

    erasure bench mllmu-med --model toy-vlm --edit runs/vlm-no-star                 # concept from the edit
    erasure bench mllmu-med --model toy-vlm --concept forget_10                     # the base model alone
    erasure bench mllmu-med --model llava-hf/llava-1.5-7b-hf --data MLLMU-Bench/ --concept forget_5 --edit DIR

Sets (vlm.targets): forget (what was erased), test (the forget profiles or concept on new images and paraphrased
questions) and retain (other profiles or objects, not the ones the eraser fitted on). In the toy world the
privacy scenario is a patient's personal facts and the incorrectness scenario the injected wrong prescriptions;
each row carries `scenario`, and forget/retain/test figures are also reported per scenario when rows have one.

Protocol, fixed so figures compare across methods: zero-shot (no examples in the prompt: the toy VLM learned its
questions without), the model's own chat template, the world's prompts of `vlm.mllmu` (multiple choice: the
question, one "X: option" line each, "Just give ONE letter representing the answer directly."; cloze: "Fill in the
blank: ..."; generation: the question; the toy VLM was trained on them), greedy decoding, 50 new tokens at most.
Metrics as MLLMU-Bench's eval.py scores them (`benchmarks.mllmu_scoring`): multiple-choice accuracy (the answer's
first letter), fill-in-the-blank accuracy (the ground truth, lower-cased, contained in the answer), generation
ROUGE-L F1 (rouge-score, stemmed). A set's score is the mean of the three (each in [0, 1]).
MLLMU-Bench itself, with its own prompts, few-shot examples, sets and per-question-type report, is
`erasure bench mllmu` (`benchmarks/mllmu_bench.py`), on the same evaluation code below.

Unlearning Efficiency Score (our definition; MLLMU-Med's own is not public), from the base and edited scores:
    forget efficacy      F = clip(1 - forget_edit / forget_base, 0, 1)   share of the forget knowledge removed
    test efficacy        T = clip(1 - test_edit / test_base, 0, 1)       ... on unseen views of it
    retain preservation  R = clip(retain_edit / retain_base, 0, 1)       share of the rest kept
    UES = 3 / (1/F + 1/T + 1/R)   (the harmonic mean: 0 when any part is 0; without a test set, of F and R)
It is reported with its parts beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.card_results import record_mllmu, record_mllmu_bench
from benchmarks.mllmu_scoring import score_answer, summarise
from erasers.errors import UsageError
from erasers.files import write_atomically
from erasers.outputs import claim_output_dir
from erasers.validation import validate_config

MAX_NEW_TOKENS = 50
RESULTS = "results.json"  # a folder holding it is an earlier run's, which a rerun refreshes
BENCHMARKS = ("mllmu-med", "mllmu")


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 32
    shots: int = field(default=0, metadata={"min": 0, "max": 2})  # few-shot examples: `erasure bench mllmu` only
    seed: int = 0  # which profiles are the examples, which Test_Set image each question is shown
    # "mllmu-med" (forget / test / retain, UES) or "mllmu" (MLLMU-Bench as published, benchmarks.mllmu_bench)
    benchmark: str = "mllmu-med"
    precision: str | None = None  # the model's dtype: vlm.models.vlm_dtype's (None: "auto")

    def __post_init__(self):
        validate_config(self, "mllmu-med")
        if self.benchmark not in BENCHMARKS:
            raise UsageError(f"unknown benchmark {self.benchmark!r}; choose {' or '.join(BENCHMARKS)}")


def answer_items(loaded, items, cfg: EvalConfig = EvalConfig(), progress: bool = False) -> list[str]:
    from tqdm.auto import tqdm

    from vlm.forward import chunks
    from vlm.models import ask_many

    answers = []
    for chunk in tqdm(list(chunks(items, cfg.batch_size)), desc="asking", disable=not progress):
        answers += ask_many(loaded, [i.image for i in chunk], [i.prompt for i in chunk], cfg.max_new_tokens,
                            examples=[i.shots for i in chunk])
    return answers


def evaluate_set(loaded, items, cfg: EvalConfig = EvalConfig(), scenarios: dict[str, str] | None = None,
                 progress: bool = False, by_type: bool = False) -> dict:
    """Metrics of a list of `vlm.forward.Item`; `scenarios` maps row ids to a scenario for a per-scenario split;
    `by_type` adds image+text and text-only questions apart."""
    if not items:
        return {"n": 0, "score": None}
    answers = answer_items(loaded, items, cfg, progress)
    scored = [(item.qa, score_answer(item.qa, answer)) for item, answer in zip(items, answers)]
    result = summarise(scored, by_type)
    if scenarios:
        for scenario in sorted(set(scenarios.values())):
            part = [(qa, s) for qa, s in scored if scenarios.get(qa.row_id) == scenario]
            if part:
                result[scenario] = summarise(part)
    result["examples"] = [{"prompt": item.prompt[:120], "expected": item.answer, "answer": answer}
                          for item, answer in list(zip(items, answers))[:3]]
    return result


def scenario_map(target) -> dict[str, str]:
    """Row id -> scenario for MLLMU-Med rows (those with a `scenario` column)."""
    if target.kind != "profiles":
        return {}
    from vlm.mllmu import read_split

    mapping = {}
    for split in Path(target.source).iterdir():
        if split.is_dir() and split.name.startswith(("forget_", "retain_")):
            for row in read_split(split):
                if row.get("scenario"):
                    mapping[str(row["ID"])] = row["scenario"]
    return mapping


def evaluate_sets(loaded, sets: dict[str, list], edit: str | Path | None = None, cfg: EvalConfig = EvalConfig(),
                  scenarios: dict[str, str] | None = None, progress: bool = False, by_type: bool = False) -> dict:
    """{set name: metrics} of the loaded model, with `edit` applied when given."""
    from vlm.edits import applied

    with applied(loaded, edit):
        return {name: evaluate_set(loaded, items, cfg, scenarios, progress, by_type) for name, items in sets.items()}


def evaluate_target(loaded, target, edit: str | Path | None = None, cfg: EvalConfig = EvalConfig(),
                    progress: bool = False) -> dict:
    """{"forget", "retain", "test"} metrics of the loaded model, with `edit` applied when given."""
    sets = {name: getattr(target, name) for name in ("forget", "retain", "test")}
    return evaluate_sets(loaded, sets, edit, cfg, scenario_map(target), progress)


def unlearning_efficiency(base: dict, edited: dict) -> dict:
    """UES and its parts (see the module docstring) from two `evaluate_target` results."""
    def ratio(name: str) -> float | None:
        before, after = base[name].get("score"), edited[name].get("score")
        if before is None or after is None:
            return None
        return min(max(after / before, 0.0), 1.0) if before > 0 else 1.0

    forget, test, retain = ratio("forget"), ratio("test"), ratio("retain")
    parts = {"forget_efficacy": None if forget is None else 1 - forget,
             "test_efficacy": None if test is None else 1 - test, "retain_preservation": retain}
    present = [v for v in parts.values() if v is not None]
    ues = 0.0 if any(v <= 0 for v in present) else len(present) / sum(1 / v for v in present)
    return {"ues": round(ues, 4), **{k: None if v is None else round(v, 4) for k, v in parts.items()}}


def run(model: str, concept: str | None = None, edit: str | Path | None = None, data: str | Path | None = None,
        out: str | Path | None = None, cfg: EvalConfig = EvalConfig(), device: str | None = None,
        progress: bool = True, allow_other_base: bool = False) -> dict:
    """Evaluate the base model and, with `edit`, the edited one on `concept`'s sets; writes results.json and
    report.md under `out` when given. `cfg.benchmark` says which protocol ("mllmu" needs `data`).
    `allow_other_base` applies an edit made for another base model too."""
    from vlm.edits import check_applies, read_vlm_edit
    from vlm.models import load_vlm

    benchmark = cfg.benchmark
    if out is not None:  # a folder this command did not make is refused before any work
        claim_output_dir(out, RESULTS, create=False)
    metadata = read_vlm_edit(edit) if edit is not None else None
    concept = concept or (metadata or {}).get("concept")
    if not concept:
        raise UsageError("pass --concept (a ToyCanvas object or forget_5/10/15), or an --edit that names one")
    if metadata and metadata["concept"] != concept:
        raise UsageError(f"the edit erased {metadata['concept']!r}, not {concept!r}; leave out --concept")
    sets, source, scenarios = _sets(benchmark, concept, data, cfg)
    loaded = load_vlm(model, device=device, precision=cfg.precision)
    loaded.allow_other_base = allow_other_base
    check_applies(loaded, edit)  # an edit that does not fit fails now, not after the base model's evaluation
    published = benchmark == "mllmu"
    result = {"benchmark": benchmark, "model": model, "precision": loaded.precision, "concept": concept,
              "data": source, "edit": str(edit) if edit else None, "protocol": asdict(cfg)}
    if published:
        from benchmarks.mllmu_bench import split_names

        result["splits"] = split_names(source, concept)
    result["base"] = evaluate_sets(loaded, sets, None, cfg, scenarios, progress, published)
    if edit is not None:
        result["method"] = metadata["method"]
        result["edited"] = evaluate_sets(loaded, sets, edit, cfg, scenarios, progress, published)
        if not published:  # the UES is ours, for MLLMU-Med; MLLMU-Bench reports the metrics themselves
            result["unlearning_efficiency"] = unlearning_efficiency(result["base"], result["edited"])
    if out is not None:
        write_report(result, Path(out))
        # On the edit's model card (erasers.cards).
        (record_mllmu_bench if published else record_mllmu)(result, Path(out))
    return result


def _sets(benchmark: str, concept: str, data, cfg: EvalConfig) -> tuple[dict[str, list], str, dict[str, str]]:
    """(the sets' items, where they come from, row id -> scenario) of `benchmark`, checked before a model loads."""
    if benchmark == "mllmu":
        from benchmarks.mllmu_bench import published_sets
        from erasers.inputs import check_input

        if data is None:
            raise UsageError("erasure bench mllmu needs --data: the MLLMU-Bench release's directory (forget_5/, "
                             "retain_95/, ..., Test_Set/, Retain_Set/)")
        path = check_input(data, "data directory", "pass a directory in the MLLMU-Bench layout", want_dir=True)
        return published_sets(path, concept, cfg.shots, cfg.seed), str(path), {}
    from vlm.targets import resolve_target

    if cfg.shots:
        raise UsageError(f"mllmu-med asks zero-shot (the toy VLM learned its questions without examples), not "
                         f"shots={cfg.shots}; few-shot examples are MLLMU-Bench's: erasure bench mllmu --shots")
    target = resolve_target(concept, data)
    return {name: getattr(target, name) for name in ("forget", "retain", "test")}, target.source, scenario_map(target)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report_markdown(result: dict) -> str:
    if result.get("benchmark") == "mllmu":
        from benchmarks.mllmu_bench import report_markdown as published_report

        return published_report(result)
    lines = [f"MLLMU-Med evaluation of {result['model']} on {result['concept']} ({result['data']})", "",
             "| model | set | n | MC acc | cloze acc | ROUGE-L | score |", "|---|---|---|---|---|---|---|"]
    for label in ("base", "edited"):
        if label in result:
            for name in ("forget", "test", "retain"):
                m = result[label][name]
                lines.append(f"| {label} | {name} | {m['n']} | {_percent(m.get('mc'))} | {_percent(m.get('cloze'))} "
                             f"| {_percent(m.get('rouge_l'))} | {_percent(m.get('score'))} |")
    if "unlearning_efficiency" in result:
        u = result["unlearning_efficiency"]
        lines += ["", f"UES {u['ues']:.3f} (forget efficacy {u['forget_efficacy']}, test efficacy "
                  f"{u['test_efficacy']}, retain preservation {u['retain_preservation']})"]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path) -> None:
    """results.json and report.md in `out`: a folder made now, or one an earlier run of this command made."""
    out = claim_output_dir(out, RESULTS)
    for name, text in ((RESULTS, json.dumps(result, indent=2)), ("report.md", report_markdown(result))):
        write_atomically(out / name, text)
