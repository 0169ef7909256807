"""The README's robustness table on ToyCanvas: rows the base model and each diffusion eraser erasing arrow and
Stripes, a column per registered attack (benchmarks/attacks/), each cell the attack's headline rate
(benchmarks.robustness.headline: its ASR, a curve's last point, the rate after quantization) with the rate before
the attack in brackets, at the attack's toy defaults on `--prompts` prompts of the concept (default: its 10 toy
captions). The rows are the method table's (benchmarks/method_table.py plan: every registered eraser but esd-te,
with their toy defaults; variants such as doco-noadv by name) and esd-te, erased as it erases them, so the edits are
the same;
a cell an attack does not apply to (P4D on a training-free edit) reads "n/a".

Resumable: each finished cell is kept in the results file (benchmarks/results/robustness_table.json) and never
rerun; the edits and each attack's own results stay in --work (WORK/edits/METHOD-CONCEPT,
WORK/METHOD-CONCEPT/ATTACK), so an interrupted attack resumes where it stopped and an edit is erased once; a kept
edit erased with options other than the method's toy defaults now is refused, naming what to delete.

    python -m benchmarks.robustness_table
    python -m benchmarks.robustness_table --methods uce,negprompt --concepts arrow --attacks quantize --prompts 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from benchmarks.robustness import RobustnessRun, attack_once, choose_attacks, headline
from erasers import inputs
from erasers.errors import UsageError
from erasers.files import plain_json, read_json, write_atomically

RESULTS = Path(__file__).parent / "results" / "robustness_table.json"


def edit_for(method: str, concept: str, work: Path) -> Path:
    """The toy-default edit of `method` (a method-table row: a variant's options too) erasing `concept`, made once in
    WORK/edits/ (an interrupted erase resumes there)."""
    from benchmarks.method_table import variants
    from erasers.run import erase

    out = work / "edits" / f"{method}-{concept}"
    name, options = variants().get(method, (method, {}))
    if (out / "erasure.json").is_file():
        check_current(out, name, options, method, concept, work)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return erase("toy", name, [concept], out, options=options)


def check_current(edit: Path, name: str, options: dict, method: str, concept: str, work: Path) -> None:
    """A kept edit made with other options than the method's toy defaults now (a default changed since) would
    fill the row with the old edit's rates: refused, naming what to delete."""
    from erasers.edits import read_edit
    from erasers.registry import build_config

    made = read_edit(edit)["config"]
    wanted = plain_json(dataclasses.asdict(build_config(name, True, options)))
    changed = sorted(key for key in made.keys() | wanted.keys() if made.get(key) != wanted.get(key))
    if changed:
        raise UsageError(f"{edit} was erased with other {name} options than its toy defaults now "
                         f"({', '.join(f'{k}: {made.get(k)!r} -> {wanted.get(k)!r}' for k in changed)}); delete it, "
                         f"{work / f'{method}-{concept}'} and the row {method}/{concept} in the results file to "
                         "measure it again")


def not_applying(attack: str, edits: list[Path]) -> str | None:
    """Why `attack` does not apply to the edit (a "n/a" cell), or None."""
    from erasers.edits import read_edit

    if not edits:
        return None
    try:
        choose_attacks(attack, edits[0], read_edit(edits[0]))
    except UsageError as error:
        return str(error)
    return None


def run(methods: list[str], concepts: list[str], attacks: list[str], count: int | None, work: Path,
        results_path: Path = RESULTS, progress: bool = True) -> dict:
    """Fill the table's missing cells (rows base and `methods`, per concept; columns `attacks`); returns the table
    of these settings ({"METHOD/CONCEPT": {"method", "concept", "cells": {attack: cell}}})."""
    results = read_json(results_path, "delete it to start the table again") if results_path.exists() else {}
    table = results.setdefault(f"prompts={count}", {})
    for concept in concepts:
        for method in ["base", *methods]:
            row = table.setdefault(f"{method}/{concept}", {"method": method, "concept": concept, "cells": {}})
            for attack in (a for a in attacks if a not in row["cells"]):
                edits = [] if method == "base" else [edit_for(method, concept, work)]
                reason = not_applying(attack, edits)
                if reason is None:
                    out = work / f"{method}-{concept}" / attack
                    out.parent.mkdir(parents=True, exist_ok=True)
                    summary = attack_once(RobustnessRun(concept=concept, count=count, progress=progress), attack,
                                          edits, out)
                    row["cells"][attack] = headline(summary)
                else:
                    row["cells"][attack] = {"n/a": reason}
                write_atomically(results_path, json.dumps(results, indent=2))
    return table


def markdown(table: dict, methods: list[str], concepts: list[str], attacks: list[str]) -> str:
    """The rows of `table` for `concepts` x (base + `methods`), a column per attack, whichever run wrote them."""
    rows = [table[key] for concept in concepts for method in ["base", *methods]
            if (key := f"{method}/{concept}") in table]
    measures = {attack: next((row["cells"][attack]["measure"] for row in rows
                              if "measure" in row["cells"].get(attack, {})), "ASR") for attack in attacks}
    lines = ["| method | erased | " + " | ".join(f"{a}: {measures[a]} % (before)" for a in attacks) + " |",
             "|---|---|" + "---|" * len(attacks)]
    for row in rows:
        lines.append(f"| {row['method']} | {row['concept']} | " +
                     " | ".join(cell_text(row["cells"].get(attack)) for attack in attacks) + " |")
    return "\n".join(lines)


def side_by_side(table: dict, methods: list[str], concepts: list[str], attacks: list[str]) -> str:
    """The README's form: a row per method, the concept's rate on the edit with no attack (the first attack's rate
    before it), then each attack's rate, every concept in one cell ("arrow / Stripes")."""
    def unattacked(row: dict | None) -> str:
        pre = next((cell["pre"] for cell in (row or {}).get("cells", {}).values() if cell.get("pre") is not None),
                   None)
        return "-" if pre is None else f"{100 * pre:.0f}"

    names = " / ".join(concepts)  # said once in the header: every cell holds one rate per concept in this order
    lines = [f"| method ({names}) | no attack | " + " | ".join(attacks) + " |",
             "|---|---|" + "---|" * len(attacks)]
    for method in ["base", *methods]:
        rows = [table.get(f"{method}/{concept}") for concept in concepts]
        if not any(rows):
            continue
        cells = [" / ".join(unattacked(row) for row in rows)]
        cells += [" / ".join(cell_text(row["cells"].get(attack) if row else None, before=False) for row in rows)
                  for attack in attacks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell_text(cell: dict | None, before: bool = True) -> str:
    if cell is None:
        return "-"
    if "n/a" in cell:
        return "n/a"
    if not before:
        return f"{100 * cell['rate']:.0f}"
    pre = "" if cell.get("pre") is None else f" ({100 * cell['pre']:.1f})"
    return f"{100 * cell['rate']:.1f}{pre}"


def main() -> None:
    from benchmarks.attacks import available_attacks
    from benchmarks.method_table import plan, variants
    from erasers.registry import available_methods

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated rows (default: the method table's, without its stacks, "
                        "and esd-te)")
    parser.add_argument("--concepts", default="arrow,Stripes")
    parser.add_argument("--attacks", help="comma-separated columns (default: every registered attack)")
    parser.add_argument("--prompts", type=inputs.ATTACKED_PROMPTS, help="prompts per attack (default: the "
                        "concept's 10 toy captions)")
    parser.add_argument("--work", default="runs/robustness_table", help="where the edits and each attack's results "
                        "are kept while the table is filled")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    # esd-te too, which the method table leaves to HiRM's and AdvUnlearn's rows: its edit is attacked like any other.
    methods = args.methods.split(",") if args.methods else [row for row in plan() if "+" not in row] + ["esd-te"]
    attacks = args.attacks.split(",") if args.attacks else sorted(available_attacks())
    concepts = args.concepts.split(",")
    choose_attacks(",".join(attacks), None, None)  # unknown attacks refused before any erase
    unknown = [m for m in methods if m not in available_methods() and m not in variants()]
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; the method table's rows are {', '.join(plan())}")
    results = Path(args.results)
    try:
        table = run(methods, concepts, attacks, args.prompts, Path(args.work), results)
    except UsageError as error:
        parser.exit(2, f"erasure: error: {error}\n")
    text = markdown(table, methods, concepts, attacks)
    write_atomically(results.with_suffix(".md"), text + "\n\n" + side_by_side(table, methods, concepts, attacks)
                     + "\n")
    print(text)


if __name__ == "__main__":
    main()
