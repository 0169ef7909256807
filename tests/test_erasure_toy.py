"""Erasure behaviour on the toy world: after erasing a concept the classifier finds it less, and unrelated
objects and styles hold. Fast configs on one seed; the full table is benchmarks/method_table.py's."""

import pytest

from benchmarks.compare import compare
from benchmarks.toycanvas import CLASSIFIER_DIR
from benchmarks.toycanvas.classifier import ToyClassifier
from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score
from erasers.edits import apply_edits
from erasers.models import load_pipeline
from erasers.run import erase

SEEDS = (188,)


@pytest.fixture(scope="module")
def classifier():
    return ToyClassifier.from_pretrained(CLASSIFIER_DIR)


def answer_set() -> AnswerSet:
    """The whole 10 x 10 grid on one seed (about 10 s of CPU per model): one unrelated prompt per other concept
    proved too few, since the base pipeline itself draws about 70% of objects right and nine prompts swing by 30
    points."""
    return AnswerSet(seeds=SEEDS)


@pytest.fixture(scope="module")
def base_scores(classifier):
    records, _ = classify_answer_set(load_pipeline("toy", device="cpu"), classifier, answer_set(), progress=False)
    return {concept: score(records, [concept], kind) for concept, kind in (("arrow", "object"), ("Stripes", "style"))}


# Fast configs where a method's toy default takes minutes; benchmarks/method_table.py runs the defaults on the full
# answer set (README). HiRM and UCE run their defaults here (UCE through `compare`, below), AdvUnlearn half of its
# 200 iterations (its default erases the arrow at 100% in the method table; its 4 minutes here were a third of the
# suite; at 60 iterations it missed the bars: UA 70%, IRA 38.9%).
@pytest.mark.heavy  # longest first: AdvUnlearn's erase is twice the others'
@pytest.mark.parametrize("method, concept, kind, options", [
    ("advunlearn", "arrow", "object", {"iterations": 100, "warmup": 25}),
    ("esd-x", "arrow", "object", {"iterations": 150}),
    # The toy default guides away from "A star image in painting style.": on this UNet, guided away from the empty
    # prompt, ESD-x erases the objects of the Stripes captions and leaves the stripes (benchmarks/results/NOTES.md).
    ("esd-x", "Stripes", "style", {"iterations": 150}),
    # ESD-u's direction on the toy (68 s) runs with -m slow; test_families checks its erase on every family.
    pytest.param("esd-u", "arrow", "object", {"iterations": 100}, marks=pytest.mark.slow),
    ("hirm", "Stripes", "style", {}),
])
def test_erased_concept_disappears_and_unrelated_concepts_hold(tmp_path, classifier, base_scores, method, concept,
                                                               kind, options):
    out = erase("toy", method, [concept], tmp_path / "edit", options=options, device="cpu")
    loaded = load_pipeline("toy", device="cpu")
    apply_edits(loaded, [out])
    records, _ = classify_answer_set(loaded, classifier, answer_set(), progress=False)
    assert_erased_and_unrelated_hold(base_scores[concept], score(records, [concept], kind))


def assert_erased_and_unrelated_hold(base: dict, edited: dict) -> None:
    assert edited["UA"] >= base["UA"] + 0.25, (base, edited)
    # Chance is 10%: the other concepts must still be drawn and recognised far above it. ESD-x is known to cost
    # retain accuracy (README method table), so the bar is four times chance, not the base model's accuracy.
    assert edited["IRA"] >= 0.4 and edited["CRA"] >= 0.4, (base, edited)


@pytest.mark.heavy
def test_compare_writes_grid_and_table_of_uce_erasing_stripes(tmp_path):
    """`erasure compare` scores base and edit on the same answer set as the test above, so UCE's default erasing
    Stripes is held to the same bars here."""
    out = erase("toy", "uce", ["Stripes"], tmp_path / "no-stripes", device="cpu")
    table = compare("toy", [str(out)], tmp_path / "cmp", seeds=SEEDS, device="cpu", progress=False)
    assert (tmp_path / "cmp" / "compare.png").exists() and (tmp_path / "cmp" / "metrics.md").exists()
    assert table["images_per_model"] == len(answer_set().items()) == 100
    assert table["erased"] == ["Stripes"] and table["kind"] == "style"
    assert_erased_and_unrelated_hold(table["base"], table["edited"])


@pytest.mark.slow  # about 9 minutes on 2 cores: bf16 matmuls are slow on CPUs without bf16 instructions
def test_mixed_precision_erase_matches_fp32_on_the_toy(tmp_path, classifier, base_scores):
    """ESD-x's toy default trained in bf16 (frozen weights bf16, trained cross-attention fp32 under autocast) erases
    the arrow and keeps the rest as fp32 does (README: UA 100, IRA 66.7, CRA 96.7 at seed 188). With autocast's cast
    cache on, every forward read the step-0 weights and the blind steps wrecked the model (UA 100, IRA 12.2, CRA
    44.4, benchmarks/results/NOTES.md)."""
    out = erase("toy", "esd-x", ["arrow"], tmp_path / "edit", device="cpu", precision="bf16")
    loaded = load_pipeline("toy", device="cpu")
    apply_edits(loaded, [out])
    records, _ = classify_answer_set(loaded, classifier, answer_set(), progress=False)
    edited = score(records, ["arrow"], "object")
    base = base_scores["arrow"]
    assert edited["UA"] >= base["UA"] + 0.8, (base, edited)
    assert edited["IRA"] >= 0.6 and edited["CRA"] >= 0.85, (base, edited)
