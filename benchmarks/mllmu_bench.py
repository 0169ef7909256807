"""MLLMU-Bench as its authors publish it: which questions are asked, on which image, after which examples.

    erasure bench mllmu --model llava-hf/llava-1.5-7b-hf --data MLLMU-Bench/ --concept forget_5 --edit DIR

`--data` is the Hub release's layout: forget_5/10/15, retain_95/90/85, Test_Set, Retain_Set (and Full_Set,
ft_Data). Four sets, as the benchmark's `eval.py` evaluates them:
    forget   every profile of forget_N                         (unlearning efficacy)
    test     the Test_Set rows of those profiles: new images, paraphrased questions (generalisability)
    retain   every profile of retain_{100-N}: 475 / 450 / 425 on the release (model utility)
    utility  Retain_Set: the 153 real celebrities, known before fine-tuning (model utility)
Prompts are eval.py's (`vlm.mllmu.eval_py_prompt`). A Test_Set row holds several images; for each task, each row's
questions are shown one of them, drawn at random as eval.py draws one per row in each task (here seeded by seed,
row and task, so a rerun asks the same). Few-shot, as eval.py: `shots` profiles (eval.py: 2 for LLaVA, 1 for
idefics2) drawn (seeded) from the evaluated set's own IDs; their questions of a task, as Full_Set/ (else the forget
and retain splits) holds them, are shown with their answers before each question of the same kind (image+text
examples with their images, text-only without) and are left out of the evaluation. Multiple choice gets examples
on forget, test and retain, cloze on all four sets (for the celebrities none are found: Full_Set holds the
fictitious profiles only), generation never. Scoring: `benchmarks.mllmu_scoring`, reported per set and per
question type (image+text, text-only) apart, as the benchmark reports them; no combined score or UES (MLLMU-Med's).
"""

from __future__ import annotations

import random
from pathlib import Path

from erasers.errors import UsageError
from vlm.forward import Item
from vlm.mllmu import eval_py_prompt, qa_items, read_split, row_images, shot_text
from vlm.targets import FORGET_SPLIT

SETS = ("forget", "test", "retain", "utility")
SHOTS_IN = {"classification": ("forget", "test", "retain"), "mask": SETS, "generation": ()}


def split_dirs(data: Path, concept: str) -> dict[str, Path]:
    """The directories of `concept`'s sets in `data`, every one checked to be there."""
    match = FORGET_SPLIT.match(concept)
    if not match or match.group(1) not in ("5", "10", "15"):
        raise UsageError(f"MLLMU-Bench's forget splits are forget_5, forget_10 and forget_15, not {concept!r}")
    dirs = {"forget": data / concept, "test": data / "Test_Set", "retain": data / f"retain_{100 - int(match[1])}",
            "utility": data / "Retain_Set"}
    for name, path in dirs.items():
        if not path.is_dir():
            raise UsageError(f"{data} has no {path.name}/ (the {name} set); pass the MLLMU-Bench release's directory "
                             f"holding {concept}/, {dirs['retain'].name}/, Test_Set/ and Retain_Set/")
    return dirs


def split_names(data: str | Path, concept: str) -> dict[str, str]:
    """Which of the release's directories each set, and the few-shot examples, come from (for the results)."""
    dirs = split_dirs(Path(data), concept)
    examples = "Full_Set" if (Path(data) / "Full_Set").is_dir() else f"{dirs['forget'].name} + {dirs['retain'].name}"
    return {**{name: path.name for name, path in dirs.items()}, "examples": examples}


def published_sets(data: str | Path, concept: str, shots: int, seed: int) -> dict[str, list[Item]]:
    """{"forget", "test", "retain", "utility"}: the questions of each set as eval.py asks them."""
    data = Path(data)
    dirs = split_dirs(data, concept)
    rows = {name: read_split(path) for name, path in dirs.items()}
    forget_ids = {row["ID"] for row in rows["forget"]}
    rows["test"] = [row for row in rows["test"] if row["ID"] in forget_ids]
    if not rows["test"]:
        raise UsageError(f"{dirs['test']} holds none of {concept}'s profiles; pass the release's Test_Set/")
    pool = read_split(data / "Full_Set") if (data / "Full_Set").is_dir() else rows["forget"] + rows["retain"]
    shot_rows = {row["ID"]: row for row in pool}
    return {name: set_items(name, rows[name], shot_rows, shots, seed) for name in SETS}


def set_items(name: str, rows: list[dict], shot_rows: dict[str, dict], shots: int, seed: int) -> list[Item]:
    """The items of one set, task by task (cloze, multiple choice, generation: eval.py's order)."""
    items = []
    for task in ("mask", "classification", "generation"):
        examples, skipped = few_shot(name, task, rows, shot_rows, shots, seed)
        for row in rows:
            image = test_image(row, task, seed)
            for qa in qa_items(row, (task,)):
                if qa.id not in skipped:
                    items.append(Item(eval_py_prompt(qa), image if qa.needs_image else None,
                                      examples.get(qa.type, ())))
    return items


def few_shot(name: str, task: str, rows: list[dict], shot_rows: dict[str, dict], shots: int, seed: int):
    """({question type: ((image or None, text), ...)}, ids of the questions used as examples) for one set's task."""
    if not shots or name not in SHOTS_IN[task]:
        return {}, set()
    ids = sorted({row["ID"] for row in rows})
    chosen = random.Random(f"{seed}/{name}/{task}").sample(ids, min(shots, len(ids)))
    examples: dict[str, list] = {}
    skipped = set()
    for row_id in chosen:
        row = shot_rows.get(row_id)
        if row is None:
            continue
        image = row_images(row)[0]
        for qa in qa_items(row, (task,)):
            examples.setdefault(qa.type, []).append((image if qa.needs_image else None, shot_text(qa)))
            skipped.add(qa.id)
    return {kind: tuple(shots_of_kind) for kind, shots_of_kind in examples.items()}, skipped


def test_image(row: dict, task: str, seed: int):
    """The row's image; of a Test_Set row's several, one drawn for this task (seeded by seed, row and task)."""
    images = row_images(row)
    if len(images) == 1:
        return images[0]
    return random.Random(f"{seed}/{row['ID']}/{task}").choice(images)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report_markdown(result: dict) -> str:
    lines = [f"MLLMU-Bench evaluation of {result['model']} on {result['concept']} ({result['data']}), "
             f"{result['protocol']['shots']}-shot", "",
             "| model | set | questions | n | MC acc | cloze acc | ROUGE-L |", "|---|---|---|---|---|---|---|"]
    for label in ("base", "edited"):
        for name in SETS if label in result else ():
            for kind, title in (("image_textual", "image+text"), ("pure_text", "text only")):
                m = result[label][name].get(kind, {})
                lines.append(f"| {label} | {name} | {title} | {m.get('n', 0)} | {_percent(m.get('mc'))} | "
                             f"{_percent(m.get('cloze'))} | {_percent(m.get('rouge_l'))} |")
    return "\n".join(lines) + "\n"
