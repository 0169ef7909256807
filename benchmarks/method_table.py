"""The README's method table: erase an object and a style with each method on ToyCanvas, score UA / IRA / CRA on
the answer set (every object x style at the given seeds) beside the base model's accuracy, with run time, peak
memory and storage of each edit, and the UnlearnDiffAtk attack success rate on the concepts named by --attack.
A method written "a+b" erases with each and stacks the edits (a text-encoder edit with a UNet edit); its time and
storage are the sums. A method written "name:key=value" runs with that option (an ablation row, such as
"coerasing:refine=false"). --paraphrase names concepts whose rows also get the UA on the world's paraphrase prompts
(benchmarks/toycanvas/world.py: other wordings and synonyms no eraser trains on). --edit ROW=DIR scores an edit
made earlier by `erasure erase` with the row's method and toy defaults instead of erasing again. Resumable:
finished rows are kept in the results file.

    python -m benchmarks.method_table --methods esd-x,esd-u,uce,hirm,advunlearn,hirm+esd-u,hirm+uce \
        --concepts arrow,Stripes --attack arrow --attack-methods esd-x,uce,hirm,advunlearn --attack-prompts 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.toycanvas import CLASSIFIER_DIR, world
from benchmarks.toycanvas.classifier import ToyClassifier
from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score
from erasers.attack import attack_success_rate
from erasers.edits import apply_edits, read_edit
from erasers.models import load_pipeline
from erasers.run import erase

RESULTS = Path(__file__).parent / "results" / "method_table.json"
METHODS = ["esd-x", "esd-u", "uce", "hirm", "advunlearn", "hirm+esd-u", "hirm+uce", "coerasing"]


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def run(methods: list[str], concepts: list[str], seeds: tuple[int, ...], results_path: Path = RESULTS,
        options: dict[str, dict] | None = None, attacked: tuple[str, ...] = (), attack_prompts: int = 10,
        attacked_methods: tuple[str, ...] | None = None, paraphrased: tuple[str, ...] = (),
        made: dict[str, str] | None = None) -> dict:
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
        if concept in paraphrased and "paraphrase_ua" not in table[f"base/{concept}"]:
            table[f"base/{concept}"]["paraphrase_ua"] = paraphrase_ua(load_pipeline("toy"), classifier, concept, seeds)
            _save(results, results_path)
        for method in methods:
            row_key = f"{method}/{concept}"
            wants_attack = concept in attacked and (attacked_methods is None or method in attacked_methods)
            if row_key in table and (not wants_attack or "asr" in table[row_key]) and (
                    concept not in paraphrased or "paraphrase_ua" in table[row_key]):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                edits = ([Path((made or {})[row_key])] if row_key in (made or {}) else
                         [_erase_in_fresh_process(*_method_options(part, (options or {}).get(part)), concept,
                                                  Path(tmp) / part) for part in method.split("+")])
                metas = [read_edit(edit) for edit in edits]
                loaded = load_pipeline("toy")
                apply_edits(loaded, edits)
                records, _ = classify_answer_set(loaded, classifier, answers)
                row = {"method": method, "concept": concept, **score(records, [concept], metas[0]["kind"]),
                       "cost": {name: sum(m["cost"][name] for m in metas)
                                for name in ("seconds", "peak_memory_bytes", "storage_bytes")},
                       "config": {m["method"]: m["config"] for m in metas}}
                if wants_attack:
                    attack = attack_success_rate("toy", edits, concept, count=attack_prompts, progress=False)
                    row.update(pre_asr=attack["pre_asr"], asr=attack["asr"])
                if concept in paraphrased:
                    row["paraphrase_ua"] = paraphrase_ua(loaded, classifier, concept, seeds)
            table[row_key] = row
            _save(results, results_path)
    return table


def _method_options(part: str, options: dict | None) -> tuple[str, dict]:
    """"coerasing:refine=false" -> ("coerasing", {"refine": "false"}), merged over `options`."""
    method, *pairs = part.split(":")
    return method, {**(options or {}), **dict(pair.split("=", 1) for pair in pairs)}


def paraphrase_ua(loaded, classifier, concept: str, seeds: tuple[int, ...]) -> float:
    """Share of the concept's paraphrase prompts (every template and synonym, every other concept, first seed)
    whose images the classifier does not read as the concept."""
    kind = world.concept_kind(concept)
    pairs = ([(concept, s) for s in world.STYLES] if kind == "object" else [(o, concept) for o in world.OBJECTS])
    prompts = [(o, text) for o, s in pairs for text in world.paraphrases(o, s)]
    images = loaded.generate([text for _, text in prompts], seeds=seeds[0], batch_size=50, progress=False)
    predicted_objects, predicted_styles = classifier.predict(images)
    found = predicted_objects if kind == "object" else predicted_styles
    return sum(f != concept for f in found) / len(found)


def _erase_in_fresh_process(method: str, options: dict | None, concept: str, out: Path) -> Path:
    """Each erase runs in a new process, so its recorded peak memory (the process's peak RSS on a CPU) is its own,
    not the benchmark's running maximum."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(erase, "toy", method, [concept], out, options=options).result()


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def markdown(table: dict, methods: list[str], concepts: list[str]) -> str:
    """The rows of `table` for `concepts` x (base + `methods`), in that order, whichever run wrote them."""
    lines = ["| method | erased | UA % | IRA % | CRA % | paraphrase UA % | ASR % (pre) | time s | peak RSS MiB | "
             "edit MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [table[key] for concept in concepts for method in ["base", *methods]
            if (key := f"{method}/{concept}") in table]
    for row in rows:
        cost = row.get("cost", {})
        seconds = f"{cost['seconds']:.1f}" if cost else "-"
        memory = f"{cost['peak_memory_bytes'] / 2**20:.0f}" if cost.get("peak_memory_bytes") else "-"
        storage = f"{cost['storage_bytes'] / 2**20:.2f}" if cost else "-"
        asr = f"{_pct(row['asr'])} ({_pct(row['pre_asr'])})" if "asr" in row else "-"
        paraphrase = _pct(row["paraphrase_ua"]) if "paraphrase_ua" in row else "-"
        lines.append(f"| {row['method']} | {row['concept']} | {_pct(row['UA'])} | {_pct(row['IRA'])} | "
                     f"{_pct(row['CRA'])} | {paraphrase} | {asr} | {seconds} | {memory} | {storage} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--concepts", default="arrow,Stripes")
    parser.add_argument("--attack", default="arrow", help="concepts whose rows also get the attack success rate "
                        "(UnlearnDiffAtk, toy settings); '' for none")
    parser.add_argument("--attack-methods", default="esd-x,uce,hirm,advunlearn",
                        help="methods whose rows are attacked ('all' for every one; an attack of 20 prompts takes "
                        "about 8 minutes on 2 cores)")
    parser.add_argument("--attack-prompts", type=int, default=20)
    parser.add_argument("--paraphrase", default="", help="concepts whose rows also get the UA on paraphrase prompts")
    parser.add_argument("--edit", action="append", default=[], metavar="METHOD/CONCEPT=DIR",
                        help="score this earlier `erasure erase` output as that row instead of erasing again")
    parser.add_argument("--seeds", type=int, nargs="+", default=[188, 288])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    methods, concepts = args.methods.split(","), args.concepts.split(",")
    attacked_methods = tuple(methods if args.attack_methods == "all" else args.attack_methods.split(","))
    table = run(methods, concepts, tuple(args.seeds), Path(args.results),
                attacked=tuple(c for c in args.attack.split(",") if c), attack_prompts=args.attack_prompts,
                attacked_methods=attacked_methods, paraphrased=tuple(c for c in args.paraphrase.split(",") if c),
                made=dict(pair.split("=", 1) for pair in args.edit))
    print(markdown(table, methods, concepts))


if __name__ == "__main__":
    main()
