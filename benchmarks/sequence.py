"""UnlearnCanvas' sequential unlearning in `erasure bench toycanvas | unlearncanvas --sequence FILE`: each method
erases the file's first concept, then the second on top of that edit (`erasure erase --base-edit`,
erasers.chains), and so on; every step is scored like any edit on all the concepts erased so far, and the report's
Sequential table (benchmarks.report) shows per step the UA of each earlier concept (how much of it comes back) and
IRA / CRA.

Step k of method M is the edit DIR/edits/M-seq{k}-{concept}, whose erasure.json names its parents in order. A
method's chain is erased as one unit, claimed whole by one process or one cluster job (a step waits for its
parent), step by step: a rerun goes on from the last finished step, and a step's erase from its OUT.partial. A step
whose erase failed ends its chain; the steps after it are failed rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.failures import erase_or_record, recorded_failures
from benchmarks.metrics import Record, unlearncanvas_scores
from benchmarks.runner import Runner
from erasers.chains import chain_name
from erasers.edits import read_edit
from erasers.errors import UsageError
from erasers.registry import get_method

if TYPE_CHECKING:
    from benchmarks.erasure_bench import Benchmark, Edit


def read_sequence(bench: Benchmark, path: str) -> list[str]:
    """--sequence's concepts in order (one a line, '#' comments and blank lines left out), as the benchmark spells
    them: at least 2, each once, all known to the benchmark and of one kind (a chain erases one kind)."""
    from erasers.commands import read_concepts_file

    given = read_concepts_file(path)
    try:
        sequence = [bench.canonical(concept) for concept in given]
    except UsageError as error:
        raise UsageError(f"--sequence {path}: {error}") from None
    for index, concept in enumerate(sequence):
        if concept in sequence[:index]:
            raise UsageError(f"--sequence {path} names {given[index]!r} twice; a sequence erases each concept once")
    if len(sequence) < 2:
        raise UsageError(f"--sequence {path} holds one concept; a sequence needs at least 2 (score a single concept "
                         "with --concepts)")
    kinds = {concept: bench.concept_kind(concept) for concept in sequence}
    if len(set(kinds.values())) > 1:
        style = next(c for c, kind in kinds.items() if kind == "style")
        thing = next(c for c, kind in kinds.items() if kind == "object")
        raise UsageError(f"--sequence {path} holds the style {style!r} and the object {thing!r}: a chain erases one "
                         "kind, as UnlearnCanvas scores each kind apart; make a sequence of each in separate runs")
    return sequence


def plan_sequence(bench: Benchmark, methods: list[str], sequence: list[str], out: Path) -> list[Edit]:
    """Each method's chain of steps over `sequence` (none without one); a step already in DIR/edits must be that
    step of that chain, else one line."""
    from benchmarks.erasure_bench import Edit

    if not sequence:
        return []
    if not methods:
        raise UsageError("--sequence needs --methods: the erasers that erase it in sequence")
    for method in methods:
        entry = get_method(method)
        if entry.trains and entry.apply is not None:  # a trained edit installed by `apply` is an adapter (spm)
            raise UsageError(f"{method}'s edit is an adapter, which an erase cannot continue from (erasers/README, "
                             f"erasure in sequence): leave {method} out of --methods (for 'all': list the others) "
                             "with --sequence")
    kind = bench.concept_kind(sequence[0])
    steps = []
    for method in methods:
        parent = None
        for number, concept in enumerate(sequence, 1):
            name = f"{method}-seq{number}-{concept}"
            path = Path(out) / "edits" / name
            _check_step(path, method, sequence[:number])
            steps.append(Edit(name, path, method, tuple(sequence[:number]), kind, True, step=number, parent=parent,
                              sequence=tuple(sequence)))
            parent = path
    return steps


def _check_step(path: Path, method: str, concepts: list[str]) -> None:
    if not (path / "erasure.json").exists():
        return
    from benchmarks.erasure_bench import spelled

    meta = read_edit(path)
    if chain_name(meta) != " then ".join([method] * len(concepts)) or \
            [spelled(c) for c in meta["concepts"]] != [spelled(c) for c in concepts]:
        raise UsageError(f"{path} holds {chain_name(meta)} of {', '.join(meta['concepts'])}, not step "
                         f"{len(concepts)} of {method}'s --sequence ({', '.join(concepts)}): remove it or choose "
                         "another --out")


def erase_units(edits: list[Edit]) -> list[tuple[Edit, ...]]:
    """The erases to claim, each unit whole: an edit alone, or a method's chain of steps in order."""
    units: dict[str, list[Edit]] = {}
    for edit in edits:
        units.setdefault(unit_name((edit,)), []).append(edit)
    return [tuple(unit) for unit in units.values()]


def unit_name(unit: tuple[Edit, ...]) -> str:
    """Its lock's name (and its cluster job's): the edit's set name, or "{method}-sequence" for a chain."""
    return f"{unit[0].method}-sequence" if unit[0].step else unit[0].name


def unit_finished(unit: tuple[Edit, ...], failures: dict[str, str]) -> bool:
    """Every step made, or the chain ended by a failed one."""
    for edit in unit:
        if edit.name in failures:
            return True
        if not (edit.path / "erasure.json").exists():
            return False
    return True


def erase_unit(runner: Runner, unit: tuple[Edit, ...], erase: Callable[[Edit], object]) -> None:
    """`erase(edit)` for each edit of `unit` not yet made, in order, until one fails (recorded in the manifest)."""
    for edit in unit:
        if edit.name in recorded_failures(runner):
            return
        if (edit.path / "erasure.json").exists():
            continue
        after = f" after {edit.parent.name}" if edit.parent is not None else ""
        print(f"erasing {edit.erased_here[0]} with {edit.method}{after} -> {edit.path}", flush=True)
        if not erase_or_record(runner, edit.name, lambda edit=edit: erase(edit)):
            return


def orphaned_steps(edits: list[Edit], failed: dict[str, str]) -> dict[str, str]:
    """{set name: why} for the steps never erased because a step before them failed."""
    orphans: dict[str, str] = {}
    for edit in edits:
        if edit.parent is None or edit.name in failed or (edit.path / "erasure.json").exists():
            continue
        if edit.parent.name in failed or edit.parent.name in orphans:
            orphans[edit.name] = f"not erased: step {edit.step - 1} ({edit.parent.name}) failed"
    return orphans


def sequence_fields(edit: Edit, records: list[Record]) -> dict:
    """What results.json's row of an edit of several concepts adds: each concept's UA alone (a chain's first
    concepts can come back), and for a --sequence step its number and the sequence."""
    fields = {}
    if len(edit.concepts) > 1:
        fields["UA_per_concept"] = {c: unlearncanvas_scores(records, [c], edit.kind)["UA"] for c in edit.concepts}
    if edit.step:
        fields.update(step=edit.step, sequence=list(edit.sequence))
    return fields
