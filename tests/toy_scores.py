"""The toy-world behaviour check the erasers' heavy tests share: UA/IRA/CRA of the arrow before and after a short
erase of it, on a small answer set (every arrow caption, a few other objects in three styles, one seed)."""

from __future__ import annotations

from erasers import load_pipeline
from erasers.edits import apply_edits
from erasers.run import erase


def arrow_scores_before_and_after(tmp_path, method: str, other_objects, options: dict) -> tuple[dict, dict]:
    """UA/IRA/CRA of the arrow on every arrow caption and `other_objects` in three styles (seed 188), before and
    after an erase of the arrow with `method` and `options`."""
    from benchmarks.toycanvas import CLASSIFIER_DIR, world
    from benchmarks.toycanvas.classifier import ToyClassifier
    from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score

    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    pairs = [("arrow", s) for s in world.STYLES]
    pairs += [(o, s) for o in other_objects for s in ("Flat", "Stripes", "Dots")]
    answers = AnswerSet(seeds=(188,), pairs=pairs)
    base_records, _ = classify_answer_set(load_pipeline("toy", device="cpu"), classifier, answers, progress=False)
    out = erase("toy", method, ["arrow"], tmp_path / "edit", device="cpu", options=options)
    loaded = load_pipeline("toy", device="cpu")
    apply_edits(loaded, [out])
    records, _ = classify_answer_set(loaded, classifier, answers, progress=False)
    return score(base_records, ["arrow"], "object"), score(records, ["arrow"], "object")
