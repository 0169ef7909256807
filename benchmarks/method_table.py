"""The README's method table: erase an object and a style with each method on ToyCanvas, score UA / IRA / CRA on
the answer set (every object x style at the given seeds) beside the base model's accuracy, with run time, peak
memory and storage of each edit, and the UnlearnDiffAtk attack success rate on the concepts named by --attack.
A method written "a+b" erases with each and stacks the edits (a text-encoder edit with a UNet edit); its time and
storage are the sums. "doco-nosurgery" and "doco-noadv" are DoCo with surgery=false / adversarial=false,
"coerasing-norefine" Co-Erasing with refine=false (their registry entries' variants). The rows of
--paraphrase-methods also get UA on the paraphrase prompts. Resumable: finished rows are kept in the results file,
and a missing attack or paraphrase cell is added to its row without rescoring it.

    python -m benchmarks.method_table --methods esd-x,esd-u,uce,hirm,advunlearn,doco,doco-nosurgery,doco-noadv \
        --concepts arrow,Stripes --attack arrow --attack-prompts 20
    python -m benchmarks.method_table --methods coerasing,coerasing-norefine --concepts arrow,Stripes
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.attack import attack_success_rate
from benchmarks.erasure_bench import erase_in_fresh_process
from benchmarks.toycanvas import CLASSIFIER_DIR, world
from benchmarks.toycanvas.classifier import ToyClassifier
from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score
from erasers import inputs
from erasers.edits import apply_edits, read_edit
from erasers.files import write_atomically
from erasers.models import load_pipeline
from erasers.registry import available_methods

RESULTS = Path(__file__).parent / "results" / "method_table.json"
# Stacked rows: a text-encoder edit with a UNet edit (`a+b`: both erased, both loaded).
STACKS = ["hirm+esd-u", "hirm+uce"]


def variants() -> dict[str, tuple[str, dict]]:
    """Table rows that are a registered method with options changed (its entry's `variants`: DoCo's and
    Co-Erasing's ablations), "doco-noadv" -> ("doco", {"adversarial": False})."""
    return {f"{name}-{suffix}": (name, options) for name, entry in sorted(available_methods().items())
            for suffix, options in entry.variants.items()}


def plan() -> list[str]:
    """The table's rows by default: every registered eraser (esd-te excepted: the toy erasures of the text encoder
    are HiRM's and AdvUnlearn's rows) with its variants after it, then the stacks."""
    rows = []
    for name in available_methods():
        if name != "esd-te":
            rows += [name, *(row for row, (method, _) in variants().items() if method == name)]
    return rows + STACKS


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def run(methods: list[str], concepts: list[str], seeds: tuple[int, ...], results_path: Path = RESULTS,
        options: dict[str, dict] | None = None, attacked: tuple[str, ...] = (), attack_prompts: int = 10,
        attacked_methods: tuple[str, ...] | None = None, paraphrased_methods: tuple[str, ...] = ()) -> dict:
    """Fill the table's missing cells: a row not yet in the results file is erased and scored; a row there but
    wanting its attack or its paraphrase UA gets the edit made again (seeded: the same edit) and only that
    cell added."""
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    answers = AnswerSet(seeds=seeds)
    key = f"seeds={list(seeds)}"
    results.setdefault(key, {})
    table = results[key]
    base_records = None
    for concept in concepts:
        kind = world.concept_kind(concept)
        if f"base/{concept}" not in table:
            if base_records is None:
                base_records, _ = classify_answer_set(load_pipeline("toy"), classifier, answers)
            table[f"base/{concept}"] = {"method": "base", "concept": concept, **score(base_records, [concept], kind)}
            _save(results, results_path)
        if paraphrased_methods and "paraphrase_UA" not in table[f"base/{concept}"]:
            table[f"base/{concept}"]["paraphrase_UA"] = paraphrase_ua(load_pipeline("toy"), classifier, concept, seeds)
            _save(results, results_path)
        for method in methods:
            row_key = f"{method}/{concept}"
            row = table.get(row_key)
            wants_attack = concept in attacked and (attacked_methods is None or method in attacked_methods)
            needs_attack = wants_attack and (row is None or "asr" not in row)
            needs_paraphrases = method in paraphrased_methods and (row is None or "paraphrase_UA" not in row)
            if row is not None and not needs_attack and not needs_paraphrases:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                edits = [_erase_in_fresh_process(part, concept, Path(tmp) / part, (options or {}).get(part))
                         for part in method.split("+")]
                metas = [read_edit(edit) for edit in edits]
                loaded = load_pipeline("toy")
                apply_edits(loaded, edits)
                if row is None:
                    records, _ = classify_answer_set(loaded, classifier, answers)
                    row = {"method": method, "concept": concept, **score(records, [concept], metas[0]["kind"]),
                           "cost": {name: sum(m["cost"][name] for m in metas)
                                    for name in ("seconds", "peak_memory_bytes", "storage_bytes")},
                           "config": {m["method"]: m["config"] for m in metas}}
                if needs_paraphrases:
                    row["paraphrase_UA"] = paraphrase_ua(loaded, classifier, concept, seeds)
                if needs_attack:
                    attack = attack_success_rate("toy", edits, concept, count=attack_prompts, progress=False)
                    row.update(pre_asr=attack["pre_asr"], asr=attack["asr"])
            table[row_key] = row
            _save(results, results_path)
    return table


def paraphrase_ua(loaded, classifier, concept: str, seeds: tuple[int, ...]) -> float:
    """UA on wordings no model was trained on (world.PARAPHRASE_TEMPLATES, each with the concept's and the other
    kind's own names: 40 prompts per seed): the share of images in which the classifier does not find the concept.
    Tells whether an erasure reaches the concept or only the training captions' wording. (The synonyms of
    world.OBJECT_SYNONYMS are left out: the toy text encoder never saw them, so the base model does not draw them.)"""
    kind = world.concept_kind(concept)
    pairs = [(concept, s) for s in world.STYLES] if kind == "object" else [(o, concept) for o in world.OBJECTS]
    prompts = [template.format(object=o, style=s) for o, s in pairs for template in world.PARAPHRASE_TEMPLATES]
    items = [(prompt, seed) for seed in seeds for prompt in prompts]
    images = loaded.generate([p for p, _ in items], seeds=[s for _, s in items], batch_size=50, progress=False)
    objects, styles = classifier.predict(images)
    found = objects if kind == "object" else styles
    return sum(f != concept for f in found) / len(found)


def _erase_in_fresh_process(method: str, concept: str, out: Path, options: dict | None) -> Path:
    """The method's variant options, erased in a new process (its recorded peak memory is its own)."""
    method, variant_options = variants().get(method, (method, {}))
    options = {**variant_options, **(options or {})}
    return erase_in_fresh_process("toy", method, [concept], out, options)


def _save(results: dict, path: Path) -> None:
    write_atomically(path, json.dumps(results, indent=2))


def markdown(table: dict, methods: list[str], concepts: list[str]) -> str:
    """The rows of `table` for `concepts` x (base + `methods`), in that order, whichever run wrote them."""
    lines = ["| method | erased | UA % | IRA % | CRA % | UA paraphrases % | ASR % (pre) | time s | peak RSS MiB | "
             "edit MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [table[key] for concept in concepts for method in ["base", *methods]
            if (key := f"{method}/{concept}") in table]
    for row in rows:
        cost = row.get("cost", {})
        seconds = f"{cost['seconds']:.1f}" if cost else "-"
        memory = f"{cost['peak_memory_bytes'] / 2**20:.0f}" if cost.get("peak_memory_bytes") else "-"
        storage = f"{cost['storage_bytes'] / 2**20:.2f}" if cost else "-"
        asr = f"{_pct(row['asr'])} ({_pct(row['pre_asr'])})" if "asr" in row else "-"
        paraphrased = _pct(row["paraphrase_UA"]) if "paraphrase_UA" in row else "-"
        lines.append(f"| {row['method']} | {row['concept']} | {_pct(row['UA'])} | {_pct(row['IRA'])} | "
                     f"{_pct(row['CRA'])} | {paraphrased} | {asr} | {seconds} | {memory} | {storage} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated rows (default: plan(), every registered eraser)")
    parser.add_argument("--concepts", default="arrow,Stripes")
    parser.add_argument("--attack", default="arrow", help="concepts whose rows also get the attack success rate "
                        "(UnlearnDiffAtk, toy settings); '' for none")
    parser.add_argument("--attack-methods",
                        default="esd-x,uce,hirm,advunlearn,doco,doco-nosurgery,doco-noadv,coerasing",
                        help="methods whose rows are attacked ('all' for every one; an attack of 20 prompts takes "
                        "about 8 minutes on 2 cores)")
    parser.add_argument("--attack-prompts", type=inputs.ATTACKED_PROMPTS, default=20)
    parser.add_argument("--paraphrase-methods",
                        default="esd-x,esd-u,doco,doco-nosurgery,doco-noadv,coerasing,coerasing-norefine",
                        help="methods whose rows also get UA on the paraphrase prompts (world.PARAPHRASE_TEMPLATES "
                        "and object synonyms, never trained on); '' for none")
    parser.add_argument("--seeds", type=inputs.SEED, nargs="+", default=[188, 288])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    methods, concepts = (args.methods.split(",") if args.methods else plan()), args.concepts.split(",")
    attacked_methods = tuple(methods if args.attack_methods == "all" else args.attack_methods.split(","))
    table = run(methods, concepts, tuple(args.seeds), Path(args.results),
                attacked=tuple(c for c in args.attack.split(",") if c), attack_prompts=args.attack_prompts,
                attacked_methods=attacked_methods,
                paraphrased_methods=tuple(m for m in args.paraphrase_methods.split(",") if m))
    print(markdown(table, methods, concepts))


if __name__ == "__main__":
    main()
