"""The robustness columns of `erasure bench toycanvas --attacks ringabell,quantize,...`: each chosen attack
(benchmarks/attacks/) on every scored edit and on the base model, a cell per edit and attack: the attack's headline
rate (benchmarks.robustness.headline, the rate before it in brackets), or "n/a" where the attack does not apply to
the edit (benchmarks.robustness_table.not_applying). The attacks run at their toy defaults on `prompts` prompts of
the edit's first concept (default: its toy captions), their own results in OUT/attacks/SET/ATTACK/ (an
interrupted attack resumes from its OUT.partial/); each finished cell is recorded in the bench's manifest, so a
rerun of the bench reads it back instead of attacking again.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.robustness import RobustnessRun, attack_once, choose_attacks, headline
from benchmarks.robustness_table import cell_text, not_applying
from erasers.errors import UsageError

STAGE = "attack"


def check_attacks(names: str | None) -> list[str]:
    """--attacks' names, each a registered attack named once (before anything is erased)."""
    if names is None:
        return []
    if not names.strip(",").strip():
        raise UsageError("--attacks names no attack; pass some of the registered attacks (erasure attack --help)")
    return choose_attacks(names, None, None)


def attack_columns(runner, edits: list, failed: dict, attacks: list[str], out: Path, prompts: int | None = None,
                   device: str | None = None) -> dict:
    """{"attacks", "rows": [{"set", "concept", "cells": {attack: cell}}]} for the base model (one row per concept
    erased) and each edit not failed."""
    rows = []
    targets = [("base", None, concept) for concept in dict.fromkeys(e.concepts[0] for e in edits)]
    targets += [(edit.name, edit.path, edit.concepts[0]) for edit in edits if edit.name not in failed]
    for name, path, concept in targets:
        label = name if path is not None else f"base-{concept}"
        cells = {}
        for attack in attacks:
            cells[attack] = runner.once(STAGE, f"{label}/{attack}", lambda attack=attack, path=path, concept=concept,
                                        label=label: _attack_cell(attack, path, concept, out / "attacks" / label /
                                                                  attack, prompts, device))
        rows.append({"set": name, "concept": concept, "cells": cells})
    return {"attacks": attacks, "rows": rows}


def _attack_cell(attack: str, path: Path | None, concept: str, out: Path, prompts: int | None,
                 device: str | None) -> dict:
    edits = [] if path is None else [path]
    reason = not_applying(attack, edits)
    if reason is not None:
        return {"n/a": reason}
    out.parent.mkdir(parents=True, exist_ok=True)
    run = RobustnessRun(concept=concept.replace("_", " "), count=prompts, device=device, progress=False)
    return headline(attack_once(run, attack, edits, out))


def robustness_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The report's robustness table: a row per set, a column per attack."""
    columns = results.get("robustness") or {"attacks": [], "rows": []}
    attacks = columns["attacks"]
    measures = {a: next((r["cells"][a]["measure"] for r in columns["rows"] if "measure" in r["cells"].get(a, {})),
                        "ASR") for a in attacks}
    header = ["Set", "Erased", *(f"{a}: {measures[a]} % (before)" for a in attacks)]
    body = [[row["set"], row["concept"], *(cell_text(row["cells"].get(a)) for a in attacks)] for row in columns["rows"]]
    return header, body
