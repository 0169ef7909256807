"""The run the attacks' VLM forms share (`run_vlm_attack`; `erasure vlm robustness`), the VLM counterpart of
harness.py:

 1. inputs checked before any model loads: the edit is a VLM edit the attack applies to (the registry's
    `model_kinds`), the attack's options and what it needs of the machine (a quantization backend), --out;
 2. the model loads and the edit is checked against it (vlm.edits.check_applies); the concept's questions are
    drawn: `count` forget and `count` retain questions (vlm.targets: the same sets MLLMU-Med scores), at `seed`;
 3. the attack yields one record per item (a step count, a quantization level), each scored as MLLMU-Med scores
    a set (benchmarks.mllmu_med.evaluate_set: multiple choice, cloze and ROUGE-L, their mean the set's score) and
    kept in OUT.partial/ as it finishes, so an interrupted run resumes at the next item;
 4. the summary (`VLMAttack.summarise`) in results.py's layout: OUT/attack.json, "model_kind": "vlm", the forget
    set's score in place of a rate, the questions' seed and data and their scoring; with an edit, each item's
    forget and retain scores recorded on its model card (benchmarks.card_results.record_vlm_attack).

No edit attacks the base model itself (`erasure vlm robustness`' reference row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from erasers.core import check_new_output
from erasers.edits import edit_kind
from erasers.errors import UsageError
from erasers.outputs import RunDirectory

from . import build_vlm_attack_config, check_model_kinds, get_attack, vlm_form
from .results import ItemStore, Outcome, write_results

# The toy VLM answers in a few tokens; MLLMU-Med's protocol allows 50 (benchmarks.mllmu_med), which the toy does
# not need and which would make each scored set several times slower.
TOY_ANSWER_TOKENS = 8
DEFAULT_QUESTIONS = 60


@dataclass
class VLMAttackContext:
    """What a VLM attack works with: the loaded model (the edit not yet applied), the edit (None: the base model)
    and its erasure.json, the concept's questions (`target`, vlm.targets.Target), the scored sets (`sets`: forget
    and retain) and how they are scored."""

    loaded: Any
    edit: Path | None
    metadata: dict | None
    target: Any
    sets: dict[str, list]
    scoring: Any
    progress: bool = True
    # OUT.partial/, taken on the first call (None when the run writes nothing): checkpoints of an attack that trains.
    work_dir: Callable[[], Path | None] = lambda: None

    def score(self, loaded=None) -> dict:
        """{"forget": metrics, "retain": metrics} of `loaded` (default: the context's model, as it is now)."""
        from benchmarks.mllmu_med import evaluate_set

        model = loaded or self.loaded
        return {name: _kept(evaluate_set(model, items, self.scoring)) for name, items in self.sets.items()}


def _kept(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "examples"}


class VLMAttack:
    """An attack's VLM form: built from its config; `run_vlm_attack` calls `check_environment`, then `run` with the
    items still to do, and `summarise` over every item's record."""

    config_class: ClassVar[type]

    def __init__(self, config):
        self.config = config

    def check_environment(self, device: str | None) -> None:
        """A UsageError for what this machine lacks (a library not installed, a GPU), before any model loads."""

    def items(self) -> list[Any]:
        """The items, in order (step counts, quantization levels); a record is kept per item."""
        raise NotImplementedError

    def run(self, context: VLMAttackContext, pending: set[int]) -> Iterator[tuple[int, dict]]:
        """(index, record) for every item whose index is in `pending`, in order."""
        raise NotImplementedError

    def summarise(self, records: list[dict]) -> dict:
        raise NotImplementedError


@dataclass
class VLMAttackRun:
    """Where and on what a VLM attack runs: `count` forget and retain questions drawn at `seed` (None: 60), the
    MLLMU-Bench layout directory `data` (None: the toy world), the device, `out` (None: nothing written)."""

    count: int | None = None
    seed: int = 188
    data: str | Path | None = None
    device: str | None = None
    out: str | Path | None = None
    progress: bool = True
    allow_other_base: bool = False
    restart: bool = False
    options: dict = field(default_factory=dict)


def check_vlm_edit(name: str, edit: str | Path | None) -> None:
    """Attack `name` has a VLM form, and `edit` (when given) is a VLM edit, each refused in one line."""
    entry = get_attack(name)
    if edit is not None:
        check_model_kinds(entry, [edit])
        if edit_kind(edit) == "diffusion":
            raise UsageError(f"{edit} is a diffusion-model edit; attack it with `erasure robustness` or `erasure "
                             "attack` (`erasure vlm robustness` takes edits of `erasure vlm erase`)")
    vlm_form(name)


def vlm_attack_config(name: str, model: str, options: dict | None, device: str | None):
    """The VLM form's config (its toy defaults on the toy VLM) and its machine check, before any model loads."""
    from vlm.models import TOY_VLM

    config = build_vlm_attack_config(name, model == TOY_VLM, options or {})
    vlm_form(name).attack(config).check_environment(device)
    return config


def run_vlm_attack(name: str, model: str, edit: str | Path | None, concept: str | None = None, config=None,
                   run: VLMAttackRun | None = None) -> dict:
    """Attack `name`'s VLM form on `edit` (None: the base model, `concept` required) of `model`; returns the summary
    and, with `run.out`, writes it (results.py's layout)."""
    from vlm.edits import check_applies, read_vlm_edit
    from vlm.models import load_vlm
    from vlm.targets import resolve_target

    run = run or VLMAttackRun()
    check_vlm_edit(name, edit)
    metadata = read_vlm_edit(edit) if edit is not None else None
    concept = concept or (metadata or {}).get("concept")
    if not concept:
        raise UsageError("pass --concept, or an --edit that names one")
    if not dataclasses.is_dataclass(config):
        config = vlm_attack_config(name, model, config, run.device)
    attack = vlm_form(name).attack(config)
    out = None if run.out is None else check_new_output(Path(run.out))
    target = resolve_target(concept, run.data)
    with RunDirectory(out) if out is not None else contextlib.nullcontext() as run_dir:
        loaded = load_vlm(model, device=run.device)
        loaded.allow_other_base = run.allow_other_base
        check_applies(loaded, edit)  # an edit that does not fit fails before any work
        sets = question_sets(target, run.count or DEFAULT_QUESTIONS, run.seed)
        scoring = scoring_config(loaded)
        items = attack.items()
        signature = {"command": "vlm attack", "attack": name, "config": dataclasses.asdict(config), "model": model,
                     "edit": str(edit) if edit else None, "concept": concept, "count": run.count, "seed": run.seed,
                     "data": str(run.data or ""), "items": [str(item) for item in items]}
        resumed = run_dir is not None and not run_dir.fresh
        store = ItemStore(run_dir.prepare(signature, run.restart) if resumed else None)

        def work_dir() -> Path | None:
            nonlocal store
            if run_dir is not None and store.work_dir is None:
                store = ItemStore(run_dir.prepare(signature, run.restart))
            return store.work_dir

        context = VLMAttackContext(loaded, None if edit is None else Path(edit), metadata, target, sets, scoring,
                                   run.progress, work_dir)
        pending = {index for index in range(len(items)) if index not in store.finished()}
        for index, record in attack.run(context, pending):
            work_dir()
            store.save(index, Outcome(record))
        records = store.records()
        summary = {"attack": name, "model_kind": "vlm", "model": model, "edits": [str(edit)] if edit else [],
                   "concept": concept, "config": dataclasses.asdict(config),
                   "questions": {name: len(items) for name, items in sets.items()}, "n": len(sets["forget"]),
                   "seed": run.seed, "data": str(run.data) if run.data else None,
                   "scoring": dataclasses.asdict(scoring), **attack.summarise(records), "items": records}
        if out is not None:
            write_results(out, summary, store)
            from benchmarks.card_results import record_vlm_attack

            record_vlm_attack(summary, out)  # on the edit's model card (erasers.cards), as `erasure attack` does
    return summary


def question_sets(target, count: int, seed: int) -> dict[str, list]:
    """`count` forget and `count` retain questions of `target`, drawn at `seed` (all of a smaller set)."""
    rng = random.Random(seed)
    return {name: rng.sample(items, min(count, len(items)))
            for name, items in (("forget", target.forget), ("retain", target.retain))}


def scoring_config(loaded):
    """MLLMU-Med's protocol (benchmarks.mllmu_med.EvalConfig) in the precision the model runs in, with short answers
    on the toy VLM."""
    from benchmarks.mllmu_med import EvalConfig

    short = {"max_new_tokens": TOY_ANSWER_TOKENS} if loaded.is_toy else {}
    return EvalConfig(precision=loaded.precision, **short)


def score_lines(summary: dict) -> list[str]:
    """What `erasure vlm robustness` says of one VLM attack's run: the forget and retain scores per item."""
    lines = []
    for record in summary["items"]:
        lines.append(f"{summary['concept']}: {record['label']}: forget {_pct(record['forget']['score'])}%, "
                     f"retain {_pct(record['retain']['score'])}%")
    return lines


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
