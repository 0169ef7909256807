"""The README's method table: erase an object and a style with each method on ToyCanvas, score UA / IRA / CRA on
the answer set (every object x style at the given seeds) beside the base model's accuracy, with run time, peak
memory and storage of each edit. Resumable: finished rows are kept in the results file.

    python -m benchmarks.method_table --methods esd-x,esd-u,uce --concepts star,Stripes
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.toycanvas import CLASSIFIER_DIR, world
from benchmarks.toycanvas.classifier import ToyClassifier
from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score
from erasers.edits import apply_edits, read_edit
from erasers.models import load_pipeline
from erasers.run import erase

RESULTS = Path(__file__).parent / "results" / "method_table.json"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def run(methods: list[str], concepts: list[str], seeds: tuple[int, ...], results_path: Path = RESULTS,
        options: dict[str, dict] | None = None) -> dict:
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    answers = AnswerSet(seeds=seeds)
    key = f"seeds={list(seeds)}"
    results.setdefault(key, {})
    table = results[key]
    base_records = None
    for concept in concepts:
        if f"base/{concept}" not in table:
            if base_records is None:
                base_records, _ = classify_answer_set(load_pipeline("toy"), classifier, answers)
            kind = world.concept_kind(concept)
            table[f"base/{concept}"] = {"method": "base", "concept": concept, **score(base_records, [concept], kind)}
            _save(results, results_path)
        for method in methods:
            row_key = f"{method}/{concept}"
            if row_key in table:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out = erase("toy", method, [concept], Path(tmp) / "edit", options=(options or {}).get(method))
                meta = read_edit(out)
                loaded = load_pipeline("toy")
                apply_edits(loaded, [out])
                records, _ = classify_answer_set(loaded, classifier, answers)
            table[row_key] = {"method": method, "concept": concept, **score(records, [concept], meta["kind"]),
                              "cost": meta["cost"], "config": meta["config"]}
            _save(results, results_path)
    return table


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def markdown(table: dict) -> str:
    lines = ["| method | erased | UA % | IRA % | CRA % | time s | peak RSS MiB | edit MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table.values():
        cost = row.get("cost", {})
        seconds = f"{cost['seconds']:.1f}" if cost else "-"
        memory = f"{cost['peak_memory_bytes'] / 2**20:.0f}" if cost.get("peak_memory_bytes") else "-"
        storage = f"{cost['storage_bytes'] / 2**20:.2f}" if cost else "-"
        lines.append(f"| {row['method']} | {row['concept']} | {_pct(row['UA'])} | {_pct(row['IRA'])} | "
                     f"{_pct(row['CRA'])} | {seconds} | {memory} | {storage} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="esd-x,esd-u,uce")
    parser.add_argument("--concepts", default="star,Stripes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[188, 288])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    table = run(args.methods.split(","), args.concepts.split(","), tuple(args.seeds), Path(args.results))
    print(markdown(table))


if __name__ == "__main__":
    main()
