"""Held-out wordings: question wordings the toy VLM was never trained on and the erasers never fit on, for
evaluation only. `heldout_target` asks a target's forget, retain and test questions in them, so the VLM table can
report each method on its own wordings and on these.

Evaluation only: the toy VLM's build (`benchmarks/toyvlm/build/`) never imports this module, and
`tests/test_toy_vlm_wordings.py` checks that none of its wordings is among the build's training wordings
(`build/wordings.py`) or the world's own. The tests keep a second list of their own.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

from vlm.forward import Item
from vlm.mllmu import IMAGE_TEXTUAL, cloze_prompt, multiple_choice_prompt, read_split

from .world import COUNT_WORDS

HELDOUT_WORDINGS: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("canvas", "object", "generation"): ("Which shape can be seen in this illustration?",
                                         "What does this artwork depict?", "Tell me which figure is drawn here.",
                                         "What is pictured in the graphic?"),
    ("canvas", "object", "mask"): ("This illustration depicts a __.", "The figure pictured here is a __.",
                                   "What you see in this artwork is a __."),
    ("canvas", "style", "generation"): ("Which rendering style does this illustration have?",
                                        "Tell me the style this artwork is drawn in.", "How is the graphic styled?"),
    ("canvas", "style", "mask"): ("This illustration is rendered in __ style.", "The artwork's style is __."),
    ("canvas", "color", "generation"): ("Which hue does the figure in this illustration have?",
                                        "Tell me the colour of the shape pictured here.",
                                        "What colour is the figure pictured in the graphic?"),
    ("canvas", "color", "mask"): ("The figure pictured here has the colour __.",
                                  "In this artwork the shape has the colour __."),
    ("canvas", "count", "generation"): ("How many figures are pictured in this illustration?",
                                        "Tell me how many shapes are drawn here.",
                                        "What number of symbols does this artwork show?"),
    ("canvas", "count", "mask"): ("This illustration depicts __ figures.", "The count of shapes pictured here is __."),
    ("patient_image", "name", "generation"): ("Tell me the name of the individual pictured in this scan.",
                                              "Who is the patient pictured in this scan?"),
    ("patient_image", "name", "mask"): ("This scan belongs to a patient called __.",
                                        "The individual pictured in this scan has the name __."),
    ("patient_image", "age", "generation"): ("Tell me the age of the individual pictured in this scan.",
                                             "How many years old is the patient in this scan?"),
    ("patient_image", "age", "mask"): ("The individual pictured in this scan is __ years of age.",),
    ("patient_image", "address", "generation"): ("Tell me where the individual pictured in this scan lives.",
                                                 "Which address is the patient in this scan living at?"),
    ("patient_image", "address", "mask"): ("The individual pictured in this scan resides at __.",),
    ("patient_image", "diagnosis", "generation"): ("Tell me the diagnosis of the individual pictured in this scan.",
                                                   "Which disease was the patient in this scan diagnosed with?"),
    ("patient_image", "diagnosis", "mask"): ("The individual pictured in this scan suffers from __.",),
    ("patient_image", "medication", "generation"): ("Tell me the medication of the individual pictured in this scan.",
                                                    "Which drug has the patient in this scan been prescribed?"),
    ("patient_image", "medication", "mask"): ("The individual pictured in this scan is treated with __.",),
    ("patient_text", "name", "generation"): ("Tell me who lives at {address}.", "Whose home is at {address}?"),
    ("patient_text", "name", "mask"): ("The resident of {address} is __.",),
    ("patient_text", "age", "generation"): ("Tell me the age of {name}.", "How many years old is {name}?"),
    ("patient_text", "age", "mask"): ("{name} is __ years of age.",),
    ("patient_text", "address", "generation"): ("Tell me where {name} lives.", "Which address does {name} live at?"),
    ("patient_text", "address", "mask"): ("{name} resides at __.",),
    ("patient_text", "diagnosis", "generation"): ("Tell me the diagnosis of {name}.",
                                                  "Which disease was {name} diagnosed with?"),
    ("patient_text", "diagnosis", "mask"): ("{name} suffers from __.",),
    ("patient_text", "medication", "generation"): ("Tell me the medication of {name}.",
                                                   "Which drug has {name} been prescribed?"),
    ("patient_text", "medication", "mask"): ("{name} is treated with __.",),
}
CANVAS_FACTS = ("object", "style", "color", "count")
PATIENT_FACTS = ("name", "age", "address", "diagnosis", "medication")


def row_facts(row: dict) -> dict[str, str]:
    """The facts a ToyCanvas or MLLMU-Med row's questions ask about, as answers are written."""
    if "object" in row:
        return {"object": row["object"], "style": row["style"], "color": row["color"],
                "count": COUNT_WORDS[int(row["count"]) - 1]}
    return {fact: str(row[fact]) for fact in PATIENT_FACTS}


def _rows_by_id(source: Path) -> dict[str, dict]:
    splits = ("train", "test") if source.name == "ToyCanvas" else ("Full_Set", "Test_Set")
    return {str(row["ID"]): row for split in splits if (source / split).exists() for row in read_split(source / split)}


def reworded_item(item: Item, row: dict) -> Item | None:
    """`item` asked in a held-out wording of the same fact (multiple choice keeps its options), or None when the
    question is not about one of the row's facts."""
    qa = item.qa
    value = dict(qa.options)[qa.answer] if qa.task == "classification" else qa.answer
    facts = row_facts(row)
    fact = next((f for f, v in facts.items() if v == value), None)
    if fact is None:
        return None
    scope = "canvas" if "object" in row else ("patient_image" if qa.type == IMAGE_TEXTUAL else "patient_text")
    wordings = HELDOUT_WORDINGS[scope, fact, "mask" if qa.task == "mask" else "generation"]
    # A fixed choice per question, so every method is asked the same.
    question = wordings[zlib.crc32(qa.id.encode()) % len(wordings)].format(**facts)
    if qa.task == "classification":
        prompt = multiple_choice_prompt(question, dict(qa.options))
    else:
        prompt = cloze_prompt(question) if qa.task == "mask" else question
    return Item(dataclasses.replace(qa, id=f"{qa.id}/heldout", question=question, prompt=prompt), item.image)


def heldout_target(target):
    """`target` (vlm.targets.Target of the toy world) with its forget, retain and test questions in held-out
    wordings; the fit set is left as it is (erasers never see these wordings)."""
    rows = _rows_by_id(Path(target.source))

    def reword(items: list[Item]) -> list[Item]:
        out = [reworded_item(item, rows[item.qa.row_id]) for item in items if item.qa.row_id in rows]
        return [item for item in out if item is not None]

    return dataclasses.replace(target, forget=reword(target.forget), retain=reword(target.retain),
                               test=reword(target.test))
