"""The attacks' VLM forms and `erasure vlm robustness` on the toy VLM: relearning brings a GA edit's forgotten star
back above the edit's own forget score; int8 quantization of the base model scores as the unquantized model does
and really quantizes it; the report holds the base row beside the edit's and a rerun recomputes nothing; the
registry says which attacks have a VLM form. Skipped when the toy VLM is not built."""

from __future__ import annotations

import json
import sys

import pytest

from apps.cli import main
from benchmarks.attacks import available_attacks, vlm_form
from benchmarks.attacks.vlm_harness import VLMAttackRun, run_vlm_attack
from erasers.errors import UsageError
from vlm.models import TOY_VLM_DIR

pytestmark = pytest.mark.skipif(not (TOY_VLM_DIR / "config.json").exists(), reason="toy VLM not built")
QUESTIONS = 30


@pytest.fixture(scope="module")
def ga_star(tmp_path_factory):
    import benchmarks  # noqa: F401 - registers the toy world
    from vlm.run import erase

    return erase("toy-vlm", "ga", "star", tmp_path_factory.mktemp("vlm-edits") / "ga-star", device="cpu")


def test_relearn_and_quantize_have_vlm_forms_and_the_other_attacks_refuse_vlm_edits():
    with_vlm = sorted(name for name, entry in available_attacks().items() if "vlm" in entry.model_kinds)
    assert with_vlm == ["quantize", "relearn"]
    with pytest.raises(UsageError, match="diffusion edits only"):
        vlm_form("ringabell")


@pytest.mark.slow
def test_relearning_brings_a_ga_edits_forgotten_star_back(ga_star, tmp_path):
    run = VLMAttackRun(count=QUESTIONS, device="cpu", out=tmp_path / "relearn", progress=False)
    summary = run_vlm_attack("relearn", "toy-vlm", ga_star, config={"steps": "0,60", "lr": 3e-3}, run=run)
    erased, relearned = (point["rate"] for point in summary["curve"])
    assert summary["curve"][0]["steps"] == 0
    assert relearned > erased + 0.3, summary["curve"]  # the held-out forget questions, not the 20 trained on
    layout = json.loads((tmp_path / "relearn" / "attack.json").read_text())
    assert layout["model_kind"] == "vlm" and [r["steps"] for r in layout["items"]] == [0, 60]


def test_int8_quantization_scores_the_base_model_as_unquantized_and_quantizes_it(tmp_path, monkeypatch):
    from optimum.quanto import QModuleMixin

    from benchmarks.attacks import vlm_quantize

    quantized_layers = []
    original = vlm_quantize.quantized_edit

    def counting(*args):
        manager = original(*args)

        class Counted:
            def __enter__(self):
                loaded = manager.__enter__()
                quantized_layers.append(sum(isinstance(m, QModuleMixin) for m in loaded.model.modules()))
                return loaded

            def __exit__(self, *exc):
                return manager.__exit__(*exc)

        return Counted()

    monkeypatch.setattr(vlm_quantize, "quantized_edit", counting)
    run = VLMAttackRun(count=QUESTIONS, device="cpu", progress=False)
    summary = run_vlm_attack("quantize", "toy-vlm", None, "star", config={"levels": "int8"}, run=run)
    assert quantized_layers and quantized_layers[0] > 10
    assert abs(summary["rate_quantized"]["int8"] - summary["rate_unquantized"]) <= 0.1, summary
    assert abs(summary["retain_quantized"]["int8"] - summary["retain_unquantized"]) <= 0.1, summary
    assert summary["rate_unquantized"] > 0.5  # the base model knows the star


@pytest.mark.slow
def test_vlm_robustness_reports_the_base_row_beside_the_edit_and_a_rerun_recomputes_nothing(ga_star, tmp_path,
                                                                                           monkeypatch):
    out = tmp_path / "report"
    argv = ["erasure", "vlm", "robustness", "--edit", str(ga_star), "--attacks", "quantize,relearn", "--questions",
            "10", "--set", "quantize.levels=int8", "--set", "relearn.steps=0,2", "--set", "relearn.questions=4",
            "--device", "cpu", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    report = json.loads((out / "robustness.json").read_text())
    assert set(report["rows"]) == {"base", "edit"} and report["attacks"] == ["quantize", "relearn"]
    base, edit = report["rows"]["base"]["quantize"], report["rows"]["edit"]["quantize"]
    assert base["pre"] > edit["pre"]  # the GA edit forgot what the base model scores
    text = (out / "robustness.md").read_text()
    assert "| base (toy-vlm) |" in text and "forget score" in text
    for name in ("robustness.html", "robustness.png", "quantize/base/attack.json", "relearn/edit/attack.json"):
        assert (out / name).is_file(), name
    from erasers.cards import card_results

    card = {r.metric_name: r for r in card_results(ga_star) if r.source_name == "erasure vlm robustness (star)"}
    for attack in ("quantize", "relearn"):
        row = report["rows"]["edit"][attack]
        result = card[f"{attack} {row['measure']}"]
        assert result.metric_value == row["rate"], attack
        assert result.metric_args == {"base_model": report["rows"]["base"][attack]["rate"]}, attack

    from benchmarks.attacks import vlm_harness

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished attack ran again")

    monkeypatch.setattr(vlm_harness, "run_vlm_attack", no_rerun)
    main()


def test_quantize_on_a_lora_edit_without_an_output_folder_leaves_no_merged_weights_behind(ga_star, tmp_path,
                                                                                       monkeypatch):
    """The GA edit is a LoRA adapter: quantizing it merges it into weights saved in a temporary folder, which is
    there while the quantized model scores and gone once the run ends."""
    import tempfile

    from benchmarks.attacks import vlm_quantize

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    merged = []
    original = vlm_quantize.merged_weights

    def recording(context, work):
        merged.append(original(context, work))
        assert (merged[-1] / "config.json").is_file()
        return merged[-1]

    monkeypatch.setattr(vlm_quantize, "merged_weights", recording)
    run = VLMAttackRun(count=4, device="cpu", progress=False)
    summary = run_vlm_attack("quantize", "toy-vlm", ga_star, config={"levels": "int8"}, run=run)
    assert set(summary["rate_quantized"]) == {"int8"}
    assert merged and merged[0].is_relative_to(scratch), merged
    assert not merged[0].exists() and list(scratch.iterdir()) == []


def test_a_vlm_attacks_scores_go_on_the_edits_card_as_attack_json_holds_them(ga_star, tmp_path):
    """Each item's forget and retain scores on the GA edit's card, equal to attack.json's, with the protocol (the
    questions' count, seed and scoring, the attack's options, the results file)."""
    from benchmarks.card_results import VLM_SCORING
    from erasers.cards import card_results

    out = tmp_path / "quantize"
    run = VLMAttackRun(count=4, seed=7, device="cpu", out=out, progress=False)
    run_vlm_attack("quantize", "toy-vlm", ga_star, config={"levels": "int8"}, run=run)
    written = json.loads((out / "attack.json").read_text())
    results = [r for r in card_results(ga_star) if r.source_name == "erasure vlm attack quantize (star)"]
    on_card = {r.metric_name: r.metric_value for r in results}
    expected = {f"{name} score {item['label']}": item[name]["score"] for item in written["items"]
                for name in ("forget", "retain")}
    assert {"forget score unquantized", "retain score int8"} <= set(on_card)
    assert on_card == {key: value for key, value in expected.items() if value is not None}
    protocol = results[0].dataset_args
    assert protocol["seed"] == 7 and protocol["questions"] == written["questions"] == {"forget": 4, "retain": 4}
    assert protocol["attack"] == written["config"] and protocol["scoring"] == written["scoring"]
    assert results[0].metric_config == VLM_SCORING and results[0].task_type == "image-text-to-text"
    assert results[0].source_url == str((out / "attack.json").resolve())
