"""The toy-world behaviour check the erasers' heavy tests share: UA/IRA/CRA of the erased objects before and after a
short erase of them, on a small answer set (every caption of each erased object, a few other objects in three
styles, one seed)."""

from __future__ import annotations

from erasers import load_pipeline
from erasers.edits import apply_edits
from erasers.run import erase


def scores_before_and_after(tmp_path, method: str, concepts: list[str], other_objects,
                            options: dict) -> tuple[dict, dict]:
    """UA/IRA/CRA on every caption of each object of `concepts` and `other_objects` in three styles (seed 188),
    before and after one erase of all `concepts` with `method` and `options`: {concept: its own scores, "all": the
    erased objects' together (IRA on the other objects alone)}."""
    from benchmarks.toycanvas import CLASSIFIER_DIR, world
    from benchmarks.toycanvas.classifier import ToyClassifier
    from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score

    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    pairs = [(concept, s) for concept in concepts for s in world.STYLES]
    pairs += [(o, s) for o in other_objects for s in ("Flat", "Stripes", "Dots")]
    answers = AnswerSet(seeds=(188,), pairs=pairs)
    base_records, _ = classify_answer_set(load_pipeline("toy", device="cpu"), classifier, answers, progress=False)
    out = erase("toy", method, list(concepts), tmp_path / "edit", device="cpu", options=options)
    loaded = load_pipeline("toy", device="cpu")
    apply_edits(loaded, [out])
    records, _ = classify_answer_set(loaded, classifier, answers, progress=False)

    def scores(found) -> dict:
        return {**{concept: score(found, [concept], "object") for concept in concepts},
                "all": score(found, list(concepts), "object")}

    return scores(base_records), scores(records)


def arrow_scores_before_and_after(tmp_path, method: str, other_objects, options: dict) -> tuple[dict, dict]:
    """UA/IRA/CRA of the arrow on every arrow caption and `other_objects` in three styles (seed 188), before and
    after an erase of the arrow with `method` and `options`."""
    before, after = scores_before_and_after(tmp_path, method, ["arrow"], other_objects, options)
    return before["arrow"], after["arrow"]
