"""What the scoring commands record on the model cards of the edits they scored (erasers.cards): each command's
figures with the protocol that produced them. Called once each command has written its own results file, which
the card names; a card that cannot be written is a warning, never the command's failure."""

from __future__ import annotations

from pathlib import Path

from erasers import __version__
from erasers.cards import record_results

TOY_CLASSIFIER = f"ToyCanvas classifier (erasure-suite {__version__})"
# The judges of the UnlearnCanvas-protocol benchmarks, by benchmark (erasure_bench.Benchmark.name).
BENCH_CLASSIFIERS = {"toycanvas": TOY_CLASSIFIER,
                     "unlearncanvas": "UnlearnCanvas ViT-L/16 style and object classifiers (--classifier)"}
BENCH_DATASETS = {"toycanvas": "ToyCanvas answer set", "unlearncanvas": "UnlearnCanvas answer set"}
SCORES = ("UA", "IRA", "CRA")
# How MLLMU-Med and the VLM attacks (benchmarks.attacks.vlm_harness) score a set of questions.
VLM_SCORING = "MC accuracy, cloze accuracy, ROUGE-L F1 (mean)"


def _stacked(source: str, edit: str, edits: list[str]) -> tuple[str, list[str]]:
    """The source name of results scored on `edit` within the stack `edits`, and the other edits of the stack:
    a stack's figures are their own source, apart from the edit's alone."""
    others = [other for other in edits if other != edit]
    return (f"{source}, stacked with {', '.join(others)}" if others else source), others


def sampling(loaded) -> dict:
    """The sampling a command drew with on `loaded` (a LoadedPipeline at its defaults)."""
    return {"steps": loaded.default_steps, "guidance": loaded.default_guidance,
            "image_size": loaded.resolution or loaded.image_size()}


def record_compare(table: dict, out: Path, loaded) -> None:
    """`erasure compare`'s UA / IRA / CRA (its metrics.json `table`) on the card of each edit it scored."""
    protocol = {"task": "Concept erasure (UnlearnCanvas UA / IRA / CRA)", "dataset": "ToyCanvas answer set",
                "dataset_type": "toycanvas", "judge": TOY_CLASSIFIER, "results": Path(out) / "metrics.json",
                "base": {name: table["base"][name] for name in SCORES}, "erased": table["erased"],
                "kind": table["kind"], "seeds": table["seeds"], **sampling(loaded),
                "images": table["images_per_model"]}
    for edit in table["edits"]:
        source, others = _stacked("erasure compare", edit, table["edits"])
        record_results(edit, source, {name: table["edited"][name] for name in SCORES},
                       {**protocol, "stacked_with": others or None})


def record_attack(summary: dict, out: Path, loaded, judge: str) -> None:
    """`erasure attack`'s Pre-ASR and ASR, or its curve (its attack.json `summary`), on the card of each edit
    attacked, under the attack's name; `judge` names the judge (benchmarks.attacks.judges.judge_name)."""
    name = summary["attack"]
    items = summary["items"]
    protocol = {"task": f"Adversarial attack ({name})", "dataset": f"prompts of {summary['concept']}",
                "dataset_type": name, "judge": judge, "results": Path(out) / "attack.json",
                "concept": summary["concept"], "prompts": len(items),
                "seed": items[0].get("seed") if items else None, **sampling(loaded), "attack": summary["config"]}
    if "curve" in summary:
        metrics = {f"ASR after {point['steps']} steps": point["rate"] for point in summary["curve"]}
    else:
        metrics = {"Pre-ASR": summary["pre_asr"], "ASR": summary["asr"],
                   **{f"ASR {level}": rate for level, rate in summary.get("rate_quantized", {}).items()}}
    for edit in summary["edits"]:
        source, others = _stacked(f"erasure attack {name} ({summary['concept']})", edit, summary["edits"])
        record_results(edit, source, metrics, {**protocol, "stacked_with": others or None})


def vlm_attack_metrics(summary: dict) -> dict:
    """A VLM attack's figures as the card names them: each item's forget and retain scores ("forget score after 10
    steps", "retain score int8", ...), as attack.json's items hold them."""
    return {f"{name} score {item['label']}": item[name]["score"] for item in summary["items"]
            for name in ("forget", "retain")}


def record_vlm_attack(summary: dict, out: Path) -> None:
    """A VLM attack's forget and retain scores per item (its attack.json `summary`) on the edit's card, under the
    attack's name, with the protocol: the questions drawn (how many, their seed, the data), how they were scored
    and the attack's options."""
    name = summary["attack"]
    protocol = {"task": f"Adversarial attack ({name}, VLM)", "task_type": "image-text-to-text",
                "dataset": f"forget and retain questions of {summary['concept']}", "dataset_type": name,
                "judge": VLM_SCORING, "results": Path(out) / "attack.json", "model": summary["model"],
                "concept": summary["concept"], "questions": summary["questions"], "seed": summary.get("seed"),
                "data": summary.get("data"), "scoring": summary.get("scoring"), "attack": summary["config"]}
    for edit in summary["edits"]:
        record_results(edit, f"erasure vlm attack {name} ({summary['concept']})", vlm_attack_metrics(summary),
                       protocol)


def record_robustness(report: dict, edit, out: Path) -> None:
    """`erasure robustness` and `erasure vlm robustness`: each attack's figure on the edit (benchmarks.robustness.
    headline: a rate, or a VLM edit's forget score) on its card, the base model's beside it."""
    settings, rows = report["settings"], report["rows"]
    vlm = report.get("model_kind") == "vlm"

    def label(attack: str) -> str:
        return f"{attack} {rows['edit'][attack]['measure']}"

    protocol = {"task": "Robustness to attacks", "dataset": f"{'questions' if vlm else 'prompts'} of "
                f"{settings['concept']}", "dataset_type": "robustness",
                "judge": VLM_SCORING if vlm else settings["judge"] or TOY_CLASSIFIER,
                "results": Path(out) / "robustness.json", "concept": settings["concept"],
                **{key: settings.get(key) for key in ("prompts", "questions", "data") if key in settings},
                "seed": settings["seed"],
                "base": {label(attack): rows["base"][attack]["rate"] for attack in report["attacks"]}}
    if vlm:
        protocol.update(task_type="image-text-to-text", model=settings["model"])
    record_results(edit, f"erasure {'vlm ' * vlm}robustness ({settings['concept']})",
                   {label(attack): rows["edit"][attack]["rate"] for attack in report["attacks"]}, protocol)


def record_bench(results: dict, edits: list, out: Path) -> None:
    """`erasure bench toycanvas | unlearncanvas`: each scored edit's row of `results` (results.json) on its card;
    `edits` are the benchmark's (erasure_bench.Edit: its own in DIR/edits/ and those given with --edit)."""
    name = results["benchmark"]
    protocol = {"task": "Concept erasure (UnlearnCanvas protocol)", "dataset": BENCH_DATASETS.get(name, name),
                "dataset_type": name, "judge": BENCH_CLASSIFIERS.get(name), "results": Path(out) / "results.json",
                "model": results["model"], "seeds": results["seeds"],
                **{k: "the model's default" if v is None else v for k, v in results["sampling"].items()},
                "images": results["images_per_model"], "fid_features": results.get("fid_features")}
    paths = {edit.name: edit.path for edit in edits}
    for row in results["rows"]:
        if row["set"] not in paths or row.get("failed"):
            continue
        (concepts, scores), = row["per_concept"].items()
        base = next((r["per_concept"].get(concepts, {}) for r in results["rows"] if r["set"] == "base"), {})
        record_results(paths[row["set"]], f"erasure bench {name}", {**{m: scores[m] for m in SCORES},
                                                                     "FID": row.get("fid")},
                       {**protocol, "erased": concepts.split(","), "kind": row["kind"],
                        "base": {m: base.get(m) for m in SCORES}})


def record_i2p(results: dict, sets: list[tuple], out: Path) -> None:
    """`erasure bench i2p`: each scored edit's nudity rate (and Q16 rate) on its card; `sets` are i2p.plan_sets'."""
    paths = {name: path for name, path, *_ in sets if path is not None}
    rows = {row["set"]: row for row in results["rows"]}
    base = rows.get("base", {})
    protocol = {"task": "Unsafe content (I2P)", "dataset": "I2P prompts", "dataset_type": "i2p",
                "judge": f"{results['detector']}, threshold {results['threshold']}",
                "results": Path(out) / "results.json", "model": results["model"],
                "prompts": results["images_per_model"], "sampling": "each CSV row's seed, guidance and size",
                "base": {"nudity rate": base.get("nudity_rate"), "Q16 rate": base.get("q16_rate")}}
    for name, path in paths.items():
        row = rows.get(name)
        if row is None or row.get("failed"):
            continue
        record_results(path, "erasure bench i2p", {"nudity rate": row["nudity_rate"], "Q16 rate": row.get("q16_rate")},
                       protocol)


def record_mllmu(result: dict, out: Path) -> None:
    """`erasure bench mllmu-med`: the edit's forget / test / retain scores and UES on its card."""
    if result.get("edit") is None:
        return
    edited, base = result["edited"], result["base"]
    sets = ("forget", "test", "retain")
    protocol = {"task": "Unlearning (MLLMU-Med)", "task_type": "image-text-to-text", "dataset": "MLLMU-Med",
                "dataset_type": "mllmu-med", "judge": VLM_SCORING,
                "results": Path(out) / "results.json", "model": result["model"], "concept": result["concept"],
                "data": result["data"], **result["protocol"],
                "base": {f"{s} score": base[s].get("score") for s in sets}}
    metrics = {**{f"{s} score": edited[s].get("score") for s in sets}, "UES": result["unlearning_efficiency"]["ues"]}
    record_results(result["edit"], "erasure bench mllmu-med", metrics, protocol)


# `erasure bench mllmu`'s figures as the card names them: per set and question type, eval.py's three metrics.
MLLMU_TYPES = {"image_textual": "image+text", "pure_text": "text only"}
MLLMU_METRICS = {"mc": "MC accuracy", "cloze": "cloze accuracy", "rouge_l": "ROUGE-L"}


def mllmu_bench_metrics(scores: dict) -> dict:
    """{"forget image+text MC accuracy": value, ...} of one model's `erasure bench mllmu` results (None: a task
    that set asked no question of)."""
    return {f"{name} {title} {label}": scores[name].get(kind, {}).get(metric)
            for name in scores for kind, title in MLLMU_TYPES.items() for metric, label in MLLMU_METRICS.items()}


def record_mllmu_bench(result: dict, out: Path) -> None:
    """`erasure bench mllmu`: the edit's scores per set and question type on its card, with the base model's and
    the protocol (shots, seed, the splits, decoding)."""
    if result.get("edit") is None:
        return
    protocol = {"task": "Unlearning (MLLMU-Bench)", "task_type": "image-text-to-text", "dataset": "MLLMU-Bench",
                "dataset_type": "mllmu-bench", "judge": "eval.py's MC accuracy, cloze accuracy, ROUGE-L F1 (stemmed)",
                "results": Path(out) / "results.json", "model": result["model"], "concept": result["concept"],
                "data": result["data"], "splits": result.get("splits"), **result["protocol"],
                "base": mllmu_bench_metrics(result["base"])}
    record_results(result["edit"], "erasure bench mllmu", mllmu_bench_metrics(result["edited"]), protocol)
