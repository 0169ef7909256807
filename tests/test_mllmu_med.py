"""The MLLMU-Med evaluator: scoring rules on known answers, the Unlearning Efficiency Score, and a run over a
small world in the MLLMU-Bench parquet layout with a tiny random LLaVA."""

from __future__ import annotations

import json

import pytest
from test_vlm_models import build_llava

from benchmarks import mllmu_med
from benchmarks.mllmu_med import EvalConfig, evaluate_set, score_answer, summarise, unlearning_efficiency
from benchmarks.toyvlm.world import WorldConfig, build_world
from vlm.forward import Item
from vlm.mllmu import QA


def _qa(task, answer, row="P001"):
    return QA(f"{row}/{task}", row, task, "Pure_Text", "q", "q", answer)


def test_scoring_rules():
    mc = _qa("classification", "B")
    assert score_answer(mc, "B") == 1 and score_answer(mc, "b) asthma") == 1 and score_answer(mc, "asthma") == 0
    cloze = _qa("mask", "ferrous sulfate")  # eval.py: the ground truth, as it is, contained in the answer
    assert score_answer(cloze, "She takes Ferrous sulfate daily") == 1 and score_answer(cloze, "insulin") == 0
    gen = _qa("generation", "12 Elm Road, Dover")
    assert score_answer(gen, "12 Elm Road, Dover") == pytest.approx(1.0)
    assert score_answer(gen, "12 Elm Road") == pytest.approx(2 * 0.75 * 1.0 / 1.75, abs=1e-4)  # P 1, R 3/4
    assert score_answer(gen, "") == 0


def test_summary_and_ues():
    scored = [(_qa("classification", "A"), 1.0), (_qa("classification", "A"), 0.0), (_qa("mask", "x"), 1.0),
              (_qa("generation", "x"), 0.5)]
    summary = summarise(scored)
    assert summary == {"n": 4, "mc": 0.5, "cloze": 1.0, "rouge_l": 0.5, "score": pytest.approx(2 / 3, abs=1e-4)}
    base = {"forget": {"score": 0.8}, "test": {"score": 0.6}, "retain": {"score": 0.9}}
    edited = {"forget": {"score": 0.2}, "test": {"score": 0.3}, "retain": {"score": 0.81}}
    ues = unlearning_efficiency(base, edited)
    assert ues["forget_efficacy"] == 0.75 and ues["test_efficacy"] == 0.5 and ues["retain_preservation"] == 0.9
    assert ues["ues"] == pytest.approx(3 / (1 / 0.75 + 1 / 0.5 + 1 / 0.9), abs=1e-4)
    # Nothing forgotten: UES 0; the base model against itself likewise.
    assert unlearning_efficiency(base, base)["ues"] == 0
    no_test = {**edited, "test": {"score": None}}
    assert unlearning_efficiency(base, no_test)["ues"] == pytest.approx(2 / (1 / 0.75 + 1 / 0.9), abs=1e-4)


def test_evaluate_set_scores_answers_per_scenario(monkeypatch):
    items = [Item(_qa("classification", "A", "P1"), None), Item(_qa("mask", "gout", "P1"), None),
             Item(_qa("classification", "C", "P2"), None), Item(_qa("mask", "asthma", "P2"), None)]
    replies = {"P1/classification": "A", "P1/mask": "It is gout.", "P2/classification": "B", "P2/mask": "no idea"}
    import vlm.models

    monkeypatch.setattr(vlm.models, "ask_many",
                        lambda loaded, images, prompts, n, examples=None:
                        [replies[i.qa.id] for i in items][:len(prompts)])
    result = evaluate_set(None, items, EvalConfig(), {"P1": "privacy", "P2": "incorrectness"})
    assert result["mc"] == 0.5 and result["cloze"] == 0.5 and result["score"] == 0.5
    assert result["privacy"]["score"] == 1.0 and result["incorrectness"]["score"] == 0.0


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("med"), WorldConfig(patients=20, canvas_train=10, canvas_test=10))


def test_run_reads_the_mllmu_bench_layout(small_world, tmp_path):
    llava = build_llava(tmp_path / "llava")
    out = tmp_path / "report"
    result = mllmu_med.run(str(llava), "forget_10", data=small_world / "MLLMU-Med", out=out,
                           cfg=EvalConfig(max_new_tokens=3, batch_size=64), device="cpu", progress=False)
    base = result["base"]
    # forget_10 of 20 patients: 2 profiles x (10 generation + 10 multiple choice + 10 cloze) questions.
    assert base["forget"]["n"] == 60
    assert base["test"]["n"] > base["forget"]["n"]  # the Test_Set shows each scan twice
    assert base["retain"]["n"] > 0 and {"mc", "cloze", "rouge_l", "score"} <= set(base["retain"])
    assert "privacy" in base["retain"] or "incorrectness" in base["retain"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["concept"] == "forget_10" and (out / "report.md").read_text().count("| base |") == 3


def test_a_damaged_edit_fails_before_the_base_model_is_evaluated(tmp_path, monkeypatch):
    from apps.bad_input_cases.content import sauce_edit
    from erasers.errors import UsageError

    def evaluated(*args, **kwargs):
        raise AssertionError("the base model was evaluated before the edit was checked")

    monkeypatch.setattr(mllmu_med, "evaluate_target", evaluated)
    edit = sauce_edit(tmp_path, info={"layer": 60})
    with pytest.raises(UsageError, match="layer is 60, not a decoder layer of this model"):
        mllmu_med.run("toy-vlm", edit=edit, out=tmp_path / "report", device="cpu", progress=False)
    assert not (tmp_path / "report").exists()
