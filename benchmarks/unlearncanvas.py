"""UnlearnCanvas-style evaluation of an edit: generate the answer set (every object x style, fixed seeds) with the
base and the edited pipeline, classify, and score UA / IRA / CRA. On ToyCanvas by default; the same code takes
a user's object/style lists and classifier (anything with `predict(images) -> (objects, styles)`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.metrics import Record, accuracy_scores, unlearncanvas_scores
from benchmarks.toycanvas import world

# UnlearnCanvas samples its answer set at seeds 188, 288, 588, 688, 888.
UNLEARNCANVAS_SEEDS = (188, 288, 588, 688, 888)


@dataclass
class AnswerSet:
    objects: tuple[str, ...] = world.OBJECTS
    styles: tuple[str, ...] = world.STYLES
    seeds: tuple[int, ...] = UNLEARNCANVAS_SEEDS[:1]
    template: str = world.CAPTION_TEMPLATE
    pairs: list[tuple[str, str]] | None = field(default=None)

    @classmethod
    def for_concept(cls, concept: str, kind: str, seeds: tuple[int, ...] = UNLEARNCANVAS_SEEDS[:1],
                    objects: tuple[str, ...] = world.OBJECTS, styles: tuple[str, ...] = world.STYLES) -> AnswerSet:
        """The concept's prompt subset: every prompt naming the concept, then one unrelated prompt per other concept
        of the same kind (the i-th object drawn in the (i mod n)-th style, or the reverse for a style)."""
        if kind == "object":
            pairs = [(concept, s) for s in styles]
            pairs += [(o, styles[i % len(styles)]) for i, o in enumerate(objects) if o != concept]
        elif kind == "style":
            pairs = [(o, concept) for o in objects]
            pairs += [(objects[i % len(objects)], s) for i, s in enumerate(styles) if s != concept]
        else:
            raise ValueError(f"kind must be object or style, not {kind!r}")
        return cls(objects=tuple(objects), styles=tuple(styles), seeds=tuple(seeds), pairs=pairs)

    def items(self) -> list[tuple[str, str, int]]:
        pairs = self.pairs or [(o, s) for s in self.styles for o in self.objects]
        return [(o, s, seed) for seed in self.seeds for o, s in pairs]

    def shown(self, erased: list[str], kind: str, per_side: int = 10) -> list[int]:
        """Indices into `items()` for a before/after grid: the first `per_side` items naming an erased concept,
        then `per_side` of the others, spread evenly."""
        position = 0 if kind == "object" else 1
        items = self.items()
        targeted = [i for i, item in enumerate(items) if item[position] in erased]
        others = [i for i, item in enumerate(items) if item[position] not in erased]
        return targeted[:per_side] + others[:: max(1, len(others) // per_side)][:per_side]

    def prompt(self, object_name: str, style: str) -> str:
        return self.template.format(object=object_name, style=style.replace("_", " "))


def classify_answer_set(loaded, classifier, answers: AnswerSet, progress: bool = True):
    items = answers.items()
    images = loaded.generate([answers.prompt(o, s) for o, s, _ in items], seeds=[seed for _, _, seed in items],
                             batch_size=50, progress=progress)
    predicted_objects, predicted_styles = classifier.predict(images)
    records = [Record(o, s, po, ps) for (o, s, _), po, ps in zip(items, predicted_objects, predicted_styles)]
    return records, images


def score(records: list[Record], erased: list[str], kind: str) -> dict:
    return {**unlearncanvas_scores(records, erased, kind), "accuracy": accuracy_scores(records)}
