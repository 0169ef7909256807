"""What is erased and what must stay: a concept name resolved to forget, retain and test questions.

Two kinds of concept:
  * a ToyCanvas object ("star", ...): forget = the object question (generation, multiple choice, cloze) on
    training pictures of that object; test = the same question paraphrased, on held-out pictures of it; retain =
    every question on pictures of the other objects.
  * an MLLMU-Bench forget split ("forget_5", "forget_10", "forget_15"), of the toy MLLMU-Med world or of any
    directory in the MLLMU-Bench layout (`data=`): forget = every question on the forget profiles; retain = the
    matching retain_{100-N} split; test = the Test_Set rows of the forget profiles (new images, paraphrases), as
    MLLMU-Bench's test set measures whether forgetting generalises.
Erasers fit on `forget` and `retain_fit`; evaluation uses `forget`, `test` and `retain`, which holds other rows than
`retain_fit`, so a method is never scored on the very retain questions it was fitted to keep. The fine-tuning
baselines train on `finetune_data()`: with MLLMU-Bench data, its fine-tuning QA of the forget and retain profiles
(`ft_Data/`), which the benchmark's evaluation questions are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from erasers.errors import UsageError
from erasers.inputs import check_input

from .forward import Item
from .mllmu import finetune_items, qa_items, read_split, row_images

FORGET_SPLIT = re.compile(r"^forget_(\d+)$")
FINETUNE_DIR = "ft_Data"  # MLLMU-Bench's fine-tuning QA (rows of ID, image, metadata)


@dataclass
class Target:
    concept: str
    kind: str  # "object" or "profiles"
    forget: list[Item]
    retain_fit: list[Item]
    retain: list[Item]
    test: list[Item]
    source: str
    finetune_forget: list[Item] | None = None  # ft_Data's QA of the forget profiles, when the data has it
    finetune_retain: list[Item] | None = None
    user_data: bool = False  # an MLLMU-Bench directory given with --data (not the toy world)

    def finetune_data(self) -> tuple[list[Item], list[Item]]:
        """(forget, retain) questions a fine-tuning baseline trains on: the benchmark's fine-tuning QA when the data
        has it; the toy world's forget questions and `retain_fit` otherwise (the toy VLM learned those)."""
        if self.finetune_forget is not None:
            return self.finetune_forget, self.finetune_retain or []
        if self.user_data:
            raise UsageError(f"{self.source} has no {FINETUNE_DIR}/: the fine-tuning baselines train on MLLMU-Bench's "
                             f"fine-tuning QA, never on its evaluation questions; add the release's {FINETUNE_DIR}/")
        return self.forget, self.retain_fit

    def concept_images(self, count: int) -> list[Item]:
        """Up to `count` forget items with an image, one per distinct image (what SAUCE contrasts)."""
        return _distinct_images(self.forget, count)

    def neutral_images(self, count: int) -> list[Item]:
        return _distinct_images(self.retain_fit, count)


def _distinct_images(items: list[Item], count: int) -> list[Item]:
    seen, chosen = set(), []
    for item in items:
        if item.image is not None and id(item.image) not in seen:
            seen.add(id(item.image))
            chosen.append(item)
        if len(chosen) == count:
            break
    return chosen


def _items(rows: list[dict], keep=lambda row, qa: True, all_views: bool = True) -> list[Item]:
    items = []
    for row in rows:
        images = row_images(row)
        for qa in qa_items(row):
            if not keep(row, qa):
                continue
            views = (images if all_views else images[:1]) if qa.needs_image else [None]
            items += [Item(qa, view) for view in views]
    return items


def _asks_object(row: dict, qa) -> bool:
    value = dict(qa.options)[qa.answer] if qa.task == "classification" else qa.answer
    return value == row["object"]


# ----------------------------------------------------------------------------------------------------------------
# The toy world


# The toy VLM's world (ToyCanvas QA and MLLMU-Med in the MLLMU-Bench layout) is data that benchmarks.toyvlm renders;
# importing it registers here the function that returns the world's directory and the objects it shows (the
# `erasure` command and the tests import it). The library renders nothing itself.
TOY_WORLD: dict[str, object] = {}


def toy_world_dir() -> Path:
    if "directory" not in TOY_WORLD:
        raise UsageError("the toy VLM's world is made by benchmarks.toyvlm (import it first), or pass --data DIR")
    return TOY_WORLD["directory"]()


def object_names() -> tuple[str, ...]:
    return tuple(TOY_WORLD.get("objects", ()))


def object_target(concept: str, world: Path, forget_rows: int = 60, retain_rows: int = 60,
                  fit_rows: int = 60) -> Target:
    train = read_split(world / "ToyCanvas" / "train")
    test = read_split(world / "ToyCanvas" / "test")
    concept_rows = [r for r in train if r["object"] == concept][:forget_rows]
    others = [r for r in train if r["object"] != concept]
    fit_rows = min(fit_rows, len(others) // 2)
    if not concept_rows:
        raise UsageError(f"the world at {world} has no pictures of {concept!r}")
    return Target(concept, "object",
                  forget=_items(concept_rows, _asks_object),
                  retain_fit=_items(others[:fit_rows]),
                  retain=_items(others[fit_rows:fit_rows + retain_rows]),
                  test=_items([r for r in test if r["object"] == concept], _asks_object),
                  source=str(world / "ToyCanvas"))


def split_target(concept: str, data: Path, retain_rows: int = 20, fit_rows: int = 40) -> Target:
    percent = int(FORGET_SPLIT.match(concept).group(1))
    forget_dir, retain_dir = data / concept, data / f"retain_{100 - percent}"
    for needed in (forget_dir, retain_dir):
        if not needed.exists():
            raise UsageError(f"{data} has no {needed.name}/; pass an MLLMU-Bench directory holding {concept}/, "
                             f"retain_{100 - percent}/ and Test_Set/")
    forget = read_split(forget_dir)
    retain = read_split(retain_dir)
    forget_ids = {r["ID"] for r in forget}
    test_rows = [r for r in read_split(data / "Test_Set") if r["ID"] in forget_ids] \
        if (data / "Test_Set").exists() else []
    fit_rows = min(fit_rows, len(retain) // 2)  # a small split still leaves rows to evaluate on
    target = Target(concept, "profiles", forget=_items(forget), retain_fit=_items(retain[:fit_rows]),
                    retain=_items(retain[fit_rows:fit_rows + retain_rows]), test=_items(test_rows), source=str(data))
    if (data / FINETUNE_DIR).exists():
        target.finetune_forget = finetune_profiles(data, forget_ids)
        target.finetune_retain = finetune_profiles(data, {r["ID"] for r in retain})
    return target


def finetune_profiles(data: Path, ids: set) -> list[Item]:
    """The fine-tuning QA (ft_Data/) of the profiles `ids`, each asked with the profile's image."""
    rows = [row for row in read_split(data / FINETUNE_DIR, ("ID", "metadata")) if row["ID"] in ids]
    if not rows:
        raise UsageError(f"{data / FINETUNE_DIR} holds none of the profiles {sorted(ids)[:3]}...; pass the release's "
                         "ft_Data/ of the same profiles")
    return [Item(qa, row_images(row)[0]) for row in rows for qa in finetune_items(row)]


def resolve_target(concept: str, data: str | Path | None = None) -> Target:
    """The forget/retain/test questions of `concept`: a ToyCanvas object, or forget_N of the MLLMU-Bench layout
    directory `data` (default: the toy world's MLLMU-Med)."""
    concept = concept.strip()
    if FORGET_SPLIT.match(concept):
        if data is not None:
            path = check_input(data, "data directory", "pass a directory in the MLLMU-Bench layout", want_dir=True)
            target = split_target(concept, path)
            target.user_data = True
            return target
        return split_target(concept, toy_world_dir() / "MLLMU-Med")
    if concept in object_names():
        if data is not None:
            raise UsageError(f"{concept!r} is a ToyCanvas object; --data is only for forget_N splits")
        return object_target(concept, toy_world_dir())
    raise UsageError(f"unknown concept {concept!r}: pass a ToyCanvas object ({', '.join(object_names())}) or an "
                     "MLLMU-Bench forget split (forget_5, forget_10, forget_15)")
