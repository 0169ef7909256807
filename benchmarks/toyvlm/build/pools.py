"""What training steps draw from (Pools), how one step's rows are drawn, and the fixed samples evaluated during
training."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from vlm.mllmu import QA, qa_items

from .batches import Sample, prompt_for
from .config import ToyVLMConfig


@dataclass
class Pools:
    """What each step draws from: images with their questions (patients: any view of the scan) and text-only
    questions (patients by name, and the medical knowledge facts)."""

    canvas: list[tuple[tuple[str, int], list[QA]]]
    patients: list[tuple[list[tuple[str, int]], list[QA]]]
    text: list[QA]

    @cached_property
    def multiple_choice(self) -> list[QA]:
        return [q for _, items in self.canvas + self.patients for q in items if q.task == "classification"] + \
            [q for q in self.text if q.task == "classification"]


def training_pools(cfg: ToyVLMConfig, rows: dict[str, list[dict]]) -> Pools:
    canvas = [(("canvas", i), qa_items(r)) for i, r in enumerate(rows["canvas"])]
    patients, text = [], []
    for i, row in enumerate(rows["patients"]):
        items = qa_items(row)
        views = [("patients", i * cfg.patient_views + v) for v in range(cfg.patient_views)]
        patients.append((views, [q for q in items if q.needs_image]))
        text += [q for q in items if not q.needs_image]
    text += [q for r in rows["knowledge"] for q in qa_items(r)]
    return Pools(canvas, patients, text)


def draw_rows(cfg: ToyVLMConfig, pools: Pools, generator: torch.Generator, reshuffle: float | None = None,
              choices_per_image: int | None = None):
    """One step's rows for the Packer: image rows (patients, then ToyCanvas) and text rows. With
    `choices_per_image`, each image row carries that many multiple-choice questions and the rest of its
    `questions_per_image` from the image's other questions."""
    reshuffle = cfg.reshuffle if reshuffle is None else reshuffle

    def pick(n: int, k: int) -> list[int]:
        return torch.randperm(n, generator=generator)[:k].tolist()

    def questions(items: list[QA], image) -> list[tuple[Sample, str]]:
        if choices_per_image is None:
            chosen = [items[j] for j in pick(len(items), cfg.questions_per_image)]
        else:
            choices = [q for q in items if q.task == "classification"]
            others = [q for q in items if q.task != "classification"]
            chosen = [choices[j] for j in pick(len(choices), choices_per_image)]
            chosen += [others[j] for j in pick(len(others), cfg.questions_per_image - len(chosen))]
        return [prompt_for(Sample(qa, image), generator, reshuffle) for qa in chosen]

    image_rows = []
    for i in torch.randint(len(pools.patients), (cfg.patient_rows,), generator=generator).tolist():
        views, items = pools.patients[i]
        view = views[int(torch.randint(len(views), (1,), generator=generator))]
        image_rows.append((view, questions(items, view)))
    for i in torch.randint(len(pools.canvas), (cfg.canvas_rows,), generator=generator).tolist():
        image, items = pools.canvas[i]
        image_rows.append((image, questions(items, image)))
    picked = torch.randint(len(pools.text), (cfg.text_rows * cfg.text_per_row,), generator=generator).tolist()
    text = [prompt_for(Sample(pools.text[i], None), generator, reshuffle) for i in picked]
    text_rows = [(None, text[r * cfg.text_per_row:(r + 1) * cfg.text_per_row]) for r in range(cfg.text_rows)]
    return image_rows, text_rows


def eval_samples(cfg: ToyVLMConfig, rows: dict[str, list[dict]], count: int) -> dict[str, list[Sample]]:
    """Fixed seeded samples of trained questions (image views: the original), for accuracy during training."""
    rng = np.random.default_rng([cfg.seed, 7])
    canvas = [Sample(q, ("canvas", i)) for i, r in enumerate(rows["canvas"]) for q in qa_items(r)]
    patients = [Sample(q, ("patients", i * cfg.patient_views) if q.needs_image else None)
                for i, r in enumerate(rows["patients"]) for q in qa_items(r)]
    pick = {"canvas": canvas, "patient_image": [s for s in patients if s.image is not None],
            "patient_text": [s for s in patients if s.image is None]}
    return {k: [v[i] for i in rng.choice(len(v), min(count, len(v)), replace=False)] for k, v in pick.items()}
