"""`python -m benchmarks.vlm_table`: every VLM method on the toy VLM, one table (benchmarks/vlm_table.md).

For each concept (default: the ToyCanvas object "star", and the MLLMU-Med split forget_10) the base model is
evaluated once, then each method erases the concept with its toy defaults and the edit is evaluated with
`benchmarks.mllmu_med` (forget / test / retain scores, UES) twice: in the world's own wordings, which the erasers
fit on, and in held-out wordings that neither the toy VLM nor any eraser ever saw (`benchmarks.toyvlm.heldout`),
so a claim does not rest on the model's own phrasing. Edits go to runs/vlm-table/ and per-method results
to runs/vlm-table/results.json, so an interrupted run resumes with the methods not yet measured; the finished
figures are copied to benchmarks/vlm_table.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks.mllmu_med import EvalConfig, evaluate_target, unlearning_efficiency
from erasers import inputs
from erasers.files import write_atomically

# (row label, method, option overrides)
RUNS = (
    ("SAUCE (clamp to zero)", "sauce", {"clamp": "zero"}),
    ("SAUCE (clamp negative)", "sauce", {"clamp": "negative"}),
    ("MLLMEraser", "mllmeraser", {}),
    ("GA", "ga", {}),
    ("GradDiff", "graddiff", {}),
    ("KL", "kl", {}),
    ("NPO", "npo", {}),
)
TABLE = Path(__file__).parent / "vlm_table.md"


def _pct(metrics: dict, key: str = "score") -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{100 * value:.1f}"


def _parts(metrics: dict) -> str:
    return " / ".join(_pct(metrics, key) for key in ("mc", "cloze", "rouge_l"))


def _ues(u: dict | None) -> str:
    if u is None:
        return "-"
    parts = ", ".join("-" if u[k] is None else f"{u[k]:.2f}"
                      for k in ("forget_efficacy", "test_efficacy", "retain_preservation"))
    return f"{u['ues']:.2f} ({parts})"


def markdown(results: dict) -> str:
    lines = ["Toy VLM (`toy-vlm`), zero-shot greedy, protocol of `benchmarks/mllmu_med.py`. Score = mean of "
             "multiple-choice accuracy, cloze accuracy and generation ROUGE-L, in %; UES and its parts as defined "
             "there. Written by `python -m benchmarks.vlm_table`.", ""]
    for concept, entry in results.items():
        base = entry["base"]
        lines += [f"### {concept}: forget n={base['forget']['n']}, test n={base['test']['n']}, "
                  f"retain n={base['retain']['n']}", "",
                  "| method | forget score | forget MC / cloze / ROUGE-L | test score | retain score | "
                  "retain MC / cloze / ROUGE-L | UES (F, T, R) | held-out wordings: forget / test / retain | "
                  "held-out UES | erase time |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        rows = [("base model", base, entry.get("base_heldout"), None, None, None)] + [
            (label, r["edited"], r.get("heldout", {}).get("edited"), r["unlearning_efficiency"],
             r.get("heldout", {}).get("unlearning_efficiency"), r["seconds"]) for label, r in entry["methods"].items()]
        for label, m, held, u, held_u, seconds in rows:
            held_scores = "-" if held is None else " / ".join(_pct(held[k]) for k in ("forget", "test", "retain"))
            held_ues = "-" if held_u is None else f"{held_u['ues']:.2f}"
            lines.append(f"| {label} | {_pct(m['forget'])} | {_parts(m['forget'])} | {_pct(m['test'])} | "
                         f"{_pct(m['retain'])} | {_parts(m['retain'])} | {_ues(u)} | {held_scores} | "
                         f"{held_ues} | "
                         f"{'-' if seconds is None else f'{seconds:.0f} s'} |")
        lines.append("")
    return "\n".join(lines)


def save_json(data: dict, path: Path) -> None:
    write_atomically(path, json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["star", "forget_10"])
    parser.add_argument("--methods", nargs="+", help="row labels' methods to run (default: all)")
    parser.add_argument("--work-dir", default="runs/vlm-table")
    parser.add_argument("--threads", type=inputs.POSITIVE, default=1)
    parser.add_argument("--max-new-tokens", type=inputs.POSITIVE, default=EvalConfig.max_new_tokens)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.toyvlm.heldout import heldout_target
    from vlm.models import load_vlm
    from vlm.run import erase_loaded
    from vlm.targets import resolve_target

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens)
    loaded = load_vlm("toy-vlm", device="cpu")
    for concept in args.concepts:
        target = resolve_target(concept)
        held = heldout_target(target)
        entry = results.setdefault(concept, {"methods": {}})
        if "base_heldout" not in entry:
            entry["base"] = evaluate_target(loaded, target, None, cfg, progress=True)
            entry["base_heldout"] = evaluate_target(loaded, held, None, cfg, progress=True)
            save_json(results, results_file)
        for label, method, options in RUNS:
            # A row from before the held-out wordings is measured again.
            done = "heldout" in entry["methods"].get(label, {})
            if done or (args.methods and method not in args.methods):
                continue
            out = work / f"{concept}-{label.split()[0].lower()}-{options.get('clamp', '')}".rstrip("-")
            shutil.rmtree(out, ignore_errors=True)
            started = time.time()
            erase_loaded(loaded, method, concept, out, options)
            seconds = time.time() - started
            edited = evaluate_target(loaded, target, out, cfg, progress=True)
            edited_held = evaluate_target(loaded, held, out, cfg, progress=True)
            held_ues = unlearning_efficiency(entry["base_heldout"], edited_held)
            entry["methods"][label] = {"method": method, "options": options, "seconds": round(seconds, 1),
                                       "edited": edited,
                                       "unlearning_efficiency": unlearning_efficiency(entry["base"], edited),
                                       "heldout": {"edited": edited_held, "unlearning_efficiency": held_ues}}
            save_json(results, results_file)
            scores = {k: (edited[k]["score"], edited_held[k]["score"]) for k in ("forget", "test", "retain")}
            print(label, concept, "(own, held-out wordings)", scores, flush=True)
    write_atomically(TABLE, markdown(results))
    save_json(results, TABLE.with_suffix(".json"))  # every figure, with example answers, beside the table
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
