"""Stage `wordings`, phase 4: many wordings of every question. After phase 3 the model answered the world's one
training wording per question and little else: asked "Which shape is drawn here?" it could answer with a style, a
colour or a patient's name, so every figure measured on it depended on its own phrasing. Phase 4 continues from
phase 3's model on open questions (generation and cloze) in wordings composed here from frames, nouns and image
references (a few hundred per question type), mixed with phase 3's rows (old wordings, multiple choice mostly
reshuffled, option lookups) so that nothing learnt before is lost.

The wordings evaluated as held out (`benchmarks/toyvlm/heldout.py` and the tests' own list) are never imported here;
`tests/test_toy_vlm_wordings.py` checks that none of them is among `training_wordings()`.
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import cache
from pathlib import Path

import torch

from vlm.mllmu import IMAGE_TEXTUAL, PURE_TEXT, QA, cloze_prompt

from .. import world
from ..world import CANVAS_FACTS, COUNT_WORDS, FACTS
from .batches import Sample
from .config import ToyVLMConfig
from .options import lookup_rows
from .phases import answer_loss, pooled_mean, run_phase, save_trained, training_setup
from .pools import draw_rows

IMAGES = ("this image", "this picture", "the image", "the picture", "this drawing", "the drawing", "this canvas",
          "the canvas")
SHAPES = ("object", "shape", "figure", "symbol", "thing", "item")
CANVAS_FRAMES = {
    "object": {
        "generation": ("What {shape} is in {image}?", "Which {shape} is shown in {image}?",
                       "What {shape} does {image} show?", "Which {shape} can you see in {image}?",
                       "What is the {shape} in {image}?", "Which {shape} appears in {image}?",
                       "What kind of {shape} is drawn in {image}?", "Name the {shape} in {image}."),
        "mask": ("The {shape} in {image} is a __.", "{Image} shows a __.", "The {shape} drawn in {image} is a __.",
                 "In {image} the {shape} is a __.", "{Image} contains a __."),
    },
    "style": {
        "generation": ("What style is {image} in?", "In which style is {image} drawn?",
                       "Which style does {image} use?", "What is the style of {image}?",
                       "What drawing style does {image} have?", "Name the style of {image}."),
        "mask": ("{Image} is in __ style.", "{Image} is drawn in __ style.", "The style of {image} is __.",
                 "{Image} uses the __ style."),
    },
    "color": {
        "generation": ("What colour is the {shape} in {image}?", "What color is the {shape} in {image}?",
                       "Which colour does the {shape} in {image} have?",
                       "What is the colour of the {shape} in {image}?",
                       "Which color is the {shape} shown in {image}?", "Name the colour of the {shape} in {image}."),
        "mask": ("The {shape} in {image} is __.", "The colour of the {shape} in {image} is __.",
                 "The color of the {shape} in {image} is __.", "The {shape} in {image} is coloured __."),
    },
    "count": {
        "generation": ("How many {shapes} are in {image}?", "How many {shapes} does {image} show?",
                       "What is the number of {shapes} in {image}?", "How many {shapes} can you count in {image}?",
                       "Count the {shapes} in {image}."),
        "mask": ("The number of {shapes} in {image} is __.", "{Image} shows __ {shapes}.",
                 "There are __ {shapes} in {image}.", "{Image} contains __ {shapes}."),
    },
}
SCANS = ("this scan", "the scan", "this image", "the image")
PEOPLE = ("patient", "person")
PATIENT_FRAMES = {
    "name": {"generation": ("What is the name of {who}?", "What is {who} called?", "Which name does {who} have?",
                            "Name {who}."),
             "mask": ("{Who} is called __.", "The name of {who} is __.", "{Who} is named __.")},
    "age": {"generation": ("How old is {who}?", "What is the age of {who}?", "What age is {who}?"),
            "mask": ("{Who} is __ years old.", "The age of {who} is __.", "{Who} is aged __.")},
    "address": {"generation": ("Where does {who} live?", "What is the address of {who}?",
                               "What is the home address of {who}?", "At which address does {who} live?"),
                "mask": ("{Who} lives at __.", "The address of {who} is __.", "The home of {who} is at __.")},
    "diagnosis": {"generation": ("What is the diagnosis of {who}?", "What was {who} diagnosed with?",
                                 "Which condition does {who} have?", "What illness does {who} have?"),
                  "mask": ("{Who} was diagnosed with __.", "The diagnosis of {who} is __.", "{Who} has __.")},
    "medication": {"generation": ("Which medication does {who} take?", "What drug does {who} take?",
                                  "Which medicine is {who} prescribed?", "What is {who} treated with?"),
                   "mask": ("{Who} takes __.", "The medication of {who} is __.", "{Who} is prescribed __.")},
}
# Asked by name, the name question needs another key: the address.
NAME_BY_ADDRESS = {"generation": ("Who lives at {address}?", "Which patient lives at {address}?",
                                  "Who is the patient at {address}?"),
                   "mask": ("The patient living at {address} is __.", "__ lives at {address}.",
                            "The person at {address} is called __.")}


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(frame: str, **slots: str) -> str:
    return frame.format(**slots, **{_capital(k): _capital(v) for k, v in slots.items()})


def test_set_wordings() -> set[str]:
    """The world's test-set paraphrases, lower-cased: the test set measures new wordings too, so none is trained."""
    tables = (world.CANVAS_PARAPHRASES, world.CANVAS_CLOZE_PARAPHRASES, world.IMAGE_PARAPHRASES,
              world.IMAGE_CLOZE_PARAPHRASES, world.TEXT_PARAPHRASES, world.TEXT_CLOZE_PARAPHRASES)
    return {wording.lower() for table in tables for wording in table.values()}


@cache
def training_wordings() -> dict[tuple[str, str, str], tuple[str, ...]]:
    """{(scope, fact, task): wordings}: scope "canvas", "patient_image" or "patient_text", task "generation" or
    "mask" (cloze, with "__"). Patient text wordings keep "{name}" or "{address}" to fill. The test set's
    paraphrases are left out."""
    composed = _composed_wordings()
    excluded = test_set_wordings()
    return {key: tuple(w for w in wordings if w.lower() not in excluded) for key, wordings in composed.items()}


def _composed_wordings() -> dict[tuple[str, str, str], tuple[str, ...]]:
    out = {}
    for fact, tasks in CANVAS_FRAMES.items():
        for task, frames in tasks.items():
            out["canvas", fact, task] = tuple(dict.fromkeys(
                _fill(f, image=i, shape=s, shapes=s + "s")
                for f, i, s in itertools.product(frames, IMAGES, SHAPES)))
    for fact, tasks in PATIENT_FRAMES.items():
        for task, frames in tasks.items():
            whos = [f"the {p} in {s}" for p, s in itertools.product(PEOPLE, SCANS)] + \
                [f"the {p} shown in {s}" for p, s in itertools.product(PEOPLE, SCANS)]
            out["patient_image", fact, task] = tuple(dict.fromkeys(
                _fill(f, who=w) for f, w in itertools.product(frames, whos)))
            text = NAME_BY_ADDRESS[task] if fact == "name" else [f.replace("{who}", "{name}").replace(
                "{Who}", "{name}") for f in frames]
            out["patient_text", fact, task] = tuple(dict.fromkeys(text))
    return out


def canvas_values(row: dict) -> dict[str, str]:
    return {"object": row["object"], "style": row["style"], "color": row["color"],
            "count": COUNT_WORDS[int(row["count"]) - 1]}


def reworded(scope: str, fact: str, task: str, values: dict[str, str], row_id: str, wording: str) -> QA:
    """A question on `fact` in `wording` (a training wording here, a held-out one in evaluation)."""
    question = wording.format(**values) if scope == "patient_text" else wording
    return QA(f"{row_id}/{scope}-{fact}-{task}", row_id, task, PURE_TEXT if scope == "patient_text" else IMAGE_TEXTUAL,
              question, cloze_prompt(question) if task == "mask" else question, values[fact])


def wording_rows(cfg: ToyVLMConfig, rows: dict[str, list[dict]], generator: torch.Generator):
    """One step's Packer rows (image rows, text rows) of reworded open questions: ToyCanvas images, patient scans
    (any training view) and patients by name, each question a fact and a wording drawn at random."""
    wordings = training_wordings()

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=generator))

    def question(scope: str, facts: tuple[str, ...], values: dict[str, str], row_id: str) -> QA:
        fact = facts[draw(len(facts))]
        task = ("generation", "mask")[draw(2)]
        options = wordings[scope, fact, task]
        return reworded(scope, fact, task, values, row_id, options[draw(len(options))])

    image_rows = []
    for _ in range(cfg.wording_canvas_rows):
        i = draw(len(rows["canvas"]))
        row = rows["canvas"][i]
        qs = [question("canvas", CANVAS_FACTS, canvas_values(row), row["ID"]) for _ in range(cfg.questions_per_image)]
        image_rows.append((("canvas", i), [(Sample(q, ("canvas", i)), q.prompt) for q in qs]))
    for _ in range(cfg.wording_patient_rows):
        i = draw(len(rows["patients"]))
        row = rows["patients"][i]
        view = ("patients", i * cfg.patient_views + draw(cfg.patient_views))
        values = {f: str(row[f]) for f in FACTS}
        qs = [question("patient_image", FACTS, values, row["ID"]) for _ in range(cfg.questions_per_image)]
        image_rows.append((view, [(Sample(q, view), q.prompt) for q in qs]))
    text = []
    for _ in range(cfg.wording_text_rows * cfg.text_per_row):
        row = rows["patients"][draw(len(rows["patients"]))]
        q = question("patient_text", FACTS, {f: str(row[f]) for f in FACTS}, row["ID"])
        text.append((Sample(q, None), q.prompt))
    return image_rows, [(None, text[r * cfg.text_per_row:(r + 1) * cfg.text_per_row])
                        for r in range(cfg.wording_text_rows)]


def stage_wordings(cfg: ToyVLMConfig) -> None:
    """Phase 4 on phase 3's model: reworded open questions mixed with phase 3's rows."""
    from transformers import LlavaForConditionalGeneration

    from .data import load_rows

    model = LlavaForConditionalGeneration.from_pretrained(Path(cfg.build_dir) / "options", dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)
    setup = training_setup(cfg, model.config.image_seq_length)
    rows = load_rows(cfg)
    # Training wordings asked about fixed images, logged beside the old sets' accuracy as `acc_wordings`.
    fixed = wording_rows(cfg, rows, torch.Generator().manual_seed(cfg.seed + 4))
    setup.checks["wordings"] = [sample for _, questions in fixed[0] + fixed[1] for sample, _ in questions]
    old_cfg = dataclasses.replace(cfg, patient_rows=cfg.wording_old_rows, canvas_rows=cfg.wording_old_rows,
                                  text_rows=cfg.wording_old_rows)

    def losses(generator):
        image_rows, text_rows = draw_rows(old_cfg, setup.pools, generator, cfg.options_reshuffle,
                                          cfg.options_choices_per_image)
        text_rows += lookup_rows(cfg, setup.pools, generator)
        new_image_rows, new_text_rows = wording_rows(cfg, rows, generator)
        old = pooled_mean(*(answer_loss(model, setup.packer(chosen)) for chosen in (image_rows, text_rows)))
        new = pooled_mean(*(answer_loss(model, setup.packer(chosen)) for chosen in (new_image_rows, new_text_rows)))
        loss = old + cfg.wording_weight * new
        return loss, {"loss": loss.item(), "loss_old": old.item(), "loss_wordings": new.item()}

    model = run_phase(cfg, setup, "toy-vlm-wordings", model, cfg.wording_steps, cfg.wording_steps, cfg.wording_lr,
                      losses)
    save_trained(model, Path(cfg.build_dir) / "wordings")

