"""Every edit carries a model card (erasers/cards.py): README.md in the Hub's format, written when the edit is saved,
that states the figures the scoring commands printed, each with its protocol, and never overwrites a README.md that
is not the suite's card."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from apps.cli import main
from erasers.cards import CARD, card_results, record_results, write_card
from erasers.edits import METADATA

SCORES = ("UA", "IRA", "CRA")


@pytest.fixture
def small_compare(monkeypatch):
    """compare on 2 objects x 2 styles (4 images a model, not 100): the same tables and writes in seconds."""
    import benchmarks.compare
    from benchmarks.unlearncanvas import AnswerSet

    monkeypatch.setattr(benchmarks.compare, "AnswerSet",
                        lambda seeds: AnswerSet(objects=("arrow", "star"), styles=("Flat", "Stripes"), seeds=seeds))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def by_source(edit: Path) -> dict[str, dict]:
    """{source: {metric: (value, base value), ...}} of the card's results."""
    found: dict[str, dict] = {}
    for result in card_results(edit):
        found.setdefault(result.source_name, {})[result.metric_name] = (
            result.metric_value, (result.metric_args or {}).get("base_model"))
    return found


def test_erase_then_compare_puts_its_figures_on_the_card_and_a_second_compare_replaces_them(tmp_path, capsys,
                                                                                            small_compare):
    edit = tmp_path / "no-arrow"
    code, _, err = run(capsys, "erase", "--method", "uce", "--concept", "arrow", "--device", "cpu", "--out", edit)
    assert code == 0, err
    card = ModelCard.load(edit / CARD)
    assert card.data.library_name == "erasure-suite" and card.data.base_model == "toy"
    assert card.data.method == "uce" and card.data.concepts == ["arrow"] and "uce" in card.data.tags
    assert card.data.config == json.loads((edit / METADATA).read_text())["config"]
    assert card_results(edit) == [] and "None yet" in card.text

    code, out, err = run(capsys, "compare", "--edit", edit, "--device", "cpu")
    assert code == 0, err
    metrics = json.loads((edit / "compare" / "metrics.json").read_text())
    assert by_source(edit) == {"erasure compare": {m: (metrics["edited"][m], metrics["base"][m]) for m in SCORES}}
    text = (edit / CARD).read_text()
    for row in ("base", "edited"):  # the figures compare printed, as it printed them
        printed = next(line for line in out.splitlines() if line.startswith(f"| {row} |")).split("|")[2:5]
        assert all(f"| {cell.strip()} |" in text for cell in printed), (printed, text)
    result = card_results(edit)[0]
    assert result.dataset_args["seeds"] == [188] and result.dataset_args["images"] == metrics["images_per_model"]
    assert {"steps", "guidance", "image_size"} <= result.dataset_args.keys()
    assert "ToyCanvas classifier" in result.metric_config and result.source_url == "compare/metrics.json"

    code, out, err = run(capsys, "attack", "--edit", edit, "--prompts", "1", "--iterations", "1", "--device", "cpu",
                         "--out", tmp_path / "attack")
    assert code == 0, err
    attack = json.loads((tmp_path / "attack" / "attack.json").read_text())
    assert by_source(edit)["erasure attack unlearndiffatk (arrow)"] == {"Pre-ASR": (attack["pre_asr"], None),
                                                                        "ASR": (attack["asr"], None)}

    code, _, err = run(capsys, "compare", "--edit", edit, "--seeds", "288", "--device", "cpu")
    assert code == 0, err
    metrics = json.loads((edit / "compare" / "metrics.json").read_text())
    assert list(by_source(edit)) == ["erasure compare", "erasure attack unlearndiffatk (arrow)"], \
        "replaced in place, not added"
    assert by_source(edit)["erasure compare"] == {m: (metrics["edited"][m], metrics["base"][m]) for m in SCORES}
    assert card_results(edit)[0].dataset_args["seeds"] == [288]
    assert len(ModelCard.load(edit / CARD).data.eval_results) == 5


def test_a_stacked_compare_is_recorded_on_each_edit_apart_from_its_own(tmp_path, capsys, small_compare):
    from erasers.run import erase

    first = erase("toy", "uce", ["arrow"], tmp_path / "uce", device="cpu")
    second = erase("toy", "negprompt", ["arrow"], tmp_path / "neg", device="cpu")
    record_results(first, "erasure compare", {"UA": 0.5}, {"dataset": "ToyCanvas answer set"})
    code, _, err = run(capsys, "compare", "--edit", first, "--edit", second, "--device", "cpu", "--out",
                       tmp_path / "stack")
    assert code == 0, err
    metrics = json.loads((tmp_path / "stack" / "metrics.json").read_text())
    stacked = {m: (metrics["edited"][m], metrics["base"][m]) for m in SCORES}
    assert by_source(first) == {"erasure compare": {"UA": (0.5, None)},
                                f"erasure compare, stacked with {second}": stacked}
    assert by_source(second) == {f"erasure compare, stacked with {first}": stacked}
    assert f"Scored stacked with {first}" in (second / CARD).read_text()


def test_a_readme_that_is_not_the_suites_card_is_left_with_one_warning(tmp_path, capsys):
    from erasers.run import erase

    edit = erase("toy", "negprompt", ["arrow"], tmp_path / "edit", device="cpu")
    capsys.readouterr()
    for own in ("my notes on this edit\n", "---\nlibrary_name: diffusers\nbase_model: toy\n---\n# A Hub card\n",
                "---\n: not: yaml: [\n---\n"):
        (edit / CARD).write_text(own)
        assert not record_results(edit, "erasure compare", {"UA": 1.0}, {"dataset": "ToyCanvas answer set"})
        assert not write_card(edit)
        warnings = capsys.readouterr().err.splitlines()
        assert len(warnings) == 2 and all(w.startswith("erasure: warning:") and "left as it is" in w
                                          for w in warnings), warnings
        assert (edit / CARD).read_text() == own and card_results(edit) == []


def test_a_readme_of_the_users_makes_compare_warn_not_fail(tmp_path, capsys, small_compare):
    from erasers.run import erase

    edit = erase("toy", "negprompt", ["arrow"], tmp_path / "edit", device="cpu")
    (edit / CARD).write_text("mine\n")
    code, _, err = run(capsys, "compare", "--edit", edit, "--device", "cpu")
    assert code == 0 and (edit / "compare" / "metrics.json").exists()
    assert [line for line in err.splitlines() if line.startswith("erasure:")] == [
        f"erasure: warning: {edit / CARD} is not an erasure-suite model card (a file of your own?); left as it is, "
        "so the edit's card and results are not written there"]
    assert (edit / CARD).read_text() == "mine\n"


def test_a_training_free_edit_has_a_card_and_the_card_is_not_counted_as_storage(tmp_path):
    from erasers.run import erase

    free = erase("toy", "negprompt", ["arrow"], tmp_path / "free", device="cpu")
    card = ModelCard.load(free / CARD)
    assert card.data.method == "negprompt" and card.data.components == [] and "holds no weights" in card.text
    assert json.loads((free / METADATA).read_text())["cost"]["storage_bytes"] == 0
    weights = erase("toy", "uce", ["arrow"], tmp_path / "weights", device="cpu")
    stored = sum(f.stat().st_size for f in (weights / "unet").rglob("*") if f.is_file())
    assert json.loads((weights / METADATA).read_text())["cost"]["storage_bytes"] == stored


def test_results_on_a_parents_card_leave_the_chain_and_the_app_as_they_were(tmp_path):
    from apps.app import AppState
    from erasers.chains import chain_problems, edit_fingerprint
    from erasers.run import erase

    parent = erase("toy", "uce", ["arrow"], tmp_path / "edits" / "a", device="cpu")
    chain = erase("toy", "uce", ["star"], tmp_path / "edits" / "a-then-b", device="cpu", base_edit=parent)
    card = ModelCard.load(chain / CARD)
    assert card.data.concepts == ["arrow", "star"] and "erasure-chain" in card.data.tags
    assert [(p["method"], p["concepts"]) for p in card.data.parents] == [("uce", ["arrow"])]
    fingerprint = edit_fingerprint(parent, ["unet"])
    for edit in (parent, chain):
        record_results(edit, "erasure compare", {"UA": 1.0}, {"dataset": "ToyCanvas answer set", "seeds": [188]})
    assert edit_fingerprint(parent, ["unet"]) == fingerprint and chain_problems(chain) == []
    state = AppState("toy", tmp_path / "edits")
    assert sorted(state.edits()) == ["a", "a-then-b"] and state.skipped == {}


def test_the_cards_python_loads_the_edit_with_diffusers(tmp_path):
    import re

    from erasers.run import erase

    edit = erase("toy", "uce", ["arrow"], tmp_path / "edit", device="cpu")
    code = re.search(r"```python\n(.*?)```", (edit / CARD).read_text(), re.S)[1]
    scope: dict = {}
    exec(code, scope)
    assert scope["pipe"].unet.config == scope["unet"].config and scope["pipe"].unet is scope["unet"]


def test_mllmu_med_records_a_vlm_edits_scores_on_its_card(tmp_path, capsys, monkeypatch):
    import dataclasses

    import vlm.targets

    resolve_target = vlm.targets.resolve_target

    def a_few_questions(*args, **kwargs):  # 6 a set, not 960 in all: the same figures and writes in seconds
        target = resolve_target(*args, **kwargs)
        return dataclasses.replace(target, forget=target.forget[:6], retain=target.retain[:6], test=target.test[:6])

    monkeypatch.setattr(vlm.targets, "resolve_target", a_few_questions)
    edit, report = tmp_path / "vlm-no-star", tmp_path / "report"
    code, _, err = run(capsys, "vlm", "erase", "--method", "ga", "--concept", "star", "--set", "steps=1", "--set",
                       "batch_size=2", "--device", "cpu", "--out", edit)
    assert code == 0, err
    card = ModelCard.load(edit / CARD)
    assert card.data.method == "ga" and card.data.concepts == ["star"] and card.data.base_model == "toy-vlm"
    assert "erasure vlm ask" in card.text
    code, _, err = run(capsys, "bench", "mllmu-med", "--edit", edit, "--max-new-tokens", "2", "--batch-size", "64",
                       "--device", "cpu", "--out", report)
    assert code == 0, err
    results = json.loads((report / "results.json").read_text())
    expected = {f"{s} score": (results["edited"][s]["score"], results["base"][s]["score"])
                for s in ("forget", "test", "retain")}
    expected["UES"] = (results["unlearning_efficiency"]["ues"], None)
    assert by_source(edit) == {"erasure bench mllmu-med": {k: v for k, v in expected.items() if v[0] is not None}}


def test_the_benches_record_each_scored_edits_row_on_its_card(tmp_path, capsys, monkeypatch):
    import benchmarks.toycanvas.benchmark
    from benchmarks.i2p import TOY_CSV
    from erasers.run import erase

    toycanvas_benchmark = benchmarks.toycanvas.benchmark.toycanvas_benchmark

    def two_steps(*args, **kwargs):  # not the toy's 25: the same rows in seconds
        bench = toycanvas_benchmark(*args, **kwargs)
        bench.steps = 2
        return bench

    monkeypatch.setattr(benchmarks.toycanvas.benchmark, "toycanvas_benchmark", two_steps)
    given = erase("toy", "negprompt", ["star"], tmp_path / "given", device="cpu")
    code, _, err = run(capsys, "bench", "toycanvas", "--methods", "uce", "--concepts", "star", "--edit", given,
                       "--objects", "star,arrow", "--styles", "Flat", "--no-fid", "--quiet", "--device", "cpu",
                       "--out", tmp_path / "bench")
    assert code == 0, err
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    rows = {row["set"]: row for row in results["rows"]}
    base = rows["base"]["per_concept"]["star"]
    for name, edit in (("uce-star", tmp_path / "bench" / "edits" / "uce-star"), ("given", given)):
        scores = rows[name]["per_concept"]["star"]
        assert by_source(edit) == {"erasure bench toycanvas": {m: (scores[m], base[m]) for m in SCORES}}, name
        assert card_results(edit)[0].dataset_args["steps"] == 2

    code, _, err = run(capsys, "bench", "i2p", "--prompts", TOY_CSV, "--limit", "1", "--edit", given, "--quiet",
                       "--device", "cpu", "--out", tmp_path / "i2p")
    assert code == 0, err
    rows = {row["set"]: row for row in json.loads((tmp_path / "i2p" / "results.json").read_text())["rows"]}
    assert by_source(given)["erasure bench i2p"] == {"nudity rate": (rows["given"]["nudity_rate"],
                                                                     rows["base"]["nudity_rate"])}
    assert list(by_source(given)) == ["erasure bench toycanvas", "erasure bench i2p"]
    assert "threshold 0.6" in card_results(given)[-1].metric_config
