"""Stage `evaluate`: the exported model asked every trained and test question through its processor, written to
vlm/weights/toy-vlm/quality.json; and the scoring rules every accuracy of the build uses (MLLMU-Bench's: first
letter for multiple choice, containment for cloze; exact for generation)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from erasers.files import write_atomically
from vlm.mllmu import QA, qa_items, row_images

from .config import ToyVLMConfig
from .data import load_rows


def normalise(text: str) -> str:
    return re.sub(r"[\s.]+$", "", text.strip().lower())


def is_correct(qa: QA, answer: str) -> bool:
    if qa.task == "classification":
        return answer.strip()[:1].upper() == qa.answer
    if qa.task == "mask":
        return normalise(qa.answer) in answer.lower()
    return normalise(answer) == normalise(qa.answer)


def accuracy_table(records: list[tuple[str, QA, bool]]) -> dict[str, dict[str, float]]:
    """{source: {task/type: accuracy, "all": accuracy}} from (source, qa, correct) records."""
    table: dict[str, dict[str, list[bool]]] = {}
    for source, qa, ok in records:
        groups = table.setdefault(source, {})
        groups.setdefault("all", []).append(ok)
        groups.setdefault(f"{qa.task}/{qa.type}", []).append(ok)
    return {s: {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(g.items())} for s, g in table.items()}


def evaluate_model(loaded, rows: list[dict], source: str, tasks=("generation", "classification", "mask"),
                   batch_size: int = 64, progress: bool = True) -> list[tuple[str, QA, bool]]:
    """(source, question, correct) for every question of `rows`, asked to a loaded VLM through its processor."""
    from tqdm.auto import tqdm

    from vlm.models import ask_many

    items = []
    for row in rows:
        images = row_images(row)
        for qa in qa_items(row, tasks):
            views = images if qa.needs_image else [None]
            items += [(qa, view) for view in views]
    records = []
    for start in tqdm(range(0, len(items), batch_size), desc=f"asking {source}", disable=not progress):
        chunk = items[start:start + batch_size]
        answers = ask_many(loaded, [view for _, view in chunk], [qa.prompt for qa, _ in chunk], max_new_tokens=12)
        records += [(source, qa, is_correct(qa, answer)) for (qa, _), answer in zip(chunk, answers)]
    return records


def stage_evaluate(cfg: ToyVLMConfig) -> dict:
    from vlm.models import load_vlm

    loaded = load_vlm(cfg.out_dir, device="cpu")
    rows = load_rows(cfg)
    rng = np.random.default_rng([cfg.seed, 8])
    canvas_sample = [rows["canvas"][i] for i in rng.choice(len(rows["canvas"]), 150, replace=False)]
    records = (evaluate_model(loaded, canvas_sample, "ToyCanvas trained (150 images)")
               + evaluate_model(loaded, rows["patients"], "MLLMU-Med trained (Full_Set)")
               + evaluate_model(loaded, rows["knowledge"], "Knowledge")
               + evaluate_model(loaded, rows["canvas_test"][:100], "ToyCanvas test (100 held-out images, paraphrases)")
               + evaluate_model(loaded, rows["patients_test"], "MLLMU-Med Test_Set (transformed, paraphrased)"))
    table = accuracy_table(records)
    out = Path(cfg.out_dir) / "quality.json"
    write_atomically(out, json.dumps({"accuracy_percent": table,
                                      "bar": ">= 90% on trained ToyCanvas and patient questions",
                                      "met": all(table[s]["all"] >= 90 for s in table if "trained" in s)}, indent=2))
    print(json.dumps(table, indent=2))
    return table
