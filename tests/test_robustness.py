"""The quantize attack and `erasure robustness`: on the toy, int8 quantization of a UCE edit draws nearly its
unquantized images and the same rates, int4 further off, and both are reported; a backend that is not installed is
refused in one line before any model loads; the robustness report holds the base row and a column per attack, and a
rerun recomputes nothing."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from apps.cli import main
from benchmarks.attacks import get_attack
from benchmarks.attacks.harness import run_attack
from benchmarks.attacks.results import summary_lines
from erasers.run import erase

# Ring-A-Bell small enough for seconds a prompt on the toy.
CHEAP_RINGABELL = ["--set", "ringabell.generations=2", "--set", "ringabell.population=4",
                   "--set", "ringabell.tokens=4"]


@pytest.fixture(scope="module")
def uce_arrow(tmp_path_factory):
    return erase("toy", "uce", ["arrow"], tmp_path_factory.mktemp("edits") / "uce-arrow", device="cpu")


def _pixels(out, record, role):
    name = record["image"] if role == record["image_level"] else record["images"][role]
    return np.asarray(Image.open(out / name), dtype=float) / 255


def test_quantize_int8_keeps_the_unquantized_edits_images_and_rates_and_reports_int4(uce_arrow, tmp_path):
    out = tmp_path / "quantize"
    summary = run_attack("quantize", "toy", [uce_arrow], count=2, config={"levels": "int8,int4"}, device="cpu",
                         out=out, progress=False)
    assert json.loads((out / "attack.json").read_text()) == json.loads(json.dumps(summary))
    n = summary["n"]
    rates = summary["rate_quantized"]
    assert set(rates) == {"int8", "int4"} and all(0 <= rate <= 1 for rate in rates.values())
    assert abs(rates["int8"] - summary["rate_unquantized"]) <= 1 / n
    kept = summary["unrelated"]
    assert kept["n"] == n and "arrow" not in kept["concepts"] and set(kept["rate_quantized"]) == {"int8", "int4"}
    assert abs(kept["rate_quantized"]["int8"] - kept["rate_unquantized"]) <= 1 / n
    differences = {level: [] for level in rates}
    for record in summary["items"]:
        assert record["unrelated"]["prompt"] == record["prompt"].replace("arrow", record["unrelated"]["concept"])
        assert record["success"] == any(v["success"] for v in record["quantized"].values())
        unquantized = _pixels(out, record, "erased")
        for level in rates:
            differences[level].append(np.abs(_pixels(out, record, level) - unquantized).mean())
    # Measured: int8 0.002-0.018 of the pixel range from the unquantized image, int4 0.027-0.053.
    assert 0 < np.mean(differences["int8"]) < 0.03, "int8 is quantized, and close to the unquantized edit"
    assert np.mean(differences["int4"]) > np.mean(differences["int8"])
    lines = summary_lines(summary)
    assert "int8" in lines[0] and "int4" in lines[0] and "unquantized" in lines[1]
    assert "ASR int4" in (uce_arrow / "README.md").read_text()


def test_a_quantization_backend_not_installed_is_refused_in_one_line_before_any_model_loads(
        uce_arrow, tmp_path, capsys, monkeypatch):
    import benchmarks.attacks.harness as harness

    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # importing it now fails, as when not installed

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(harness, "load_pipeline", no_model)
    out = tmp_path / "out"
    code = main(["attack", "--attack", "quantize", "--edit", str(uce_arrow), "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("erasure: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "needs optimum-quanto, which is not installed" in errors[0] and "erasure-suite[quantize]" in errors[0]
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == []


def test_robustness_reports_base_and_edit_per_attack_and_a_rerun_recomputes_nothing(
        uce_arrow, tmp_path, capsys, monkeypatch):
    report_dir = tmp_path / "report"
    argv = ["robustness", "--edit", str(uce_arrow), "--attacks", "ringabell,quantize", "--prompts", "1",
            *CHEAP_RINGABELL, "--set", "quantize.levels=int8", "--set", "quantize.unrelated=none",
            "--out", str(report_dir)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((report_dir / "robustness.json").read_text())
    assert report["attacks"] == ["ringabell", "quantize"] and set(report["rows"]) == {"base", "edit"}
    for attack in report["attacks"]:
        for row in ("base", "edit"):
            saved = json.loads((report_dir / attack / row / "attack.json").read_text())
            assert saved["edits"] == ([] if row == "base" else [str(uce_arrow)])
            assert report["rows"][row][attack]["rate"] == saved["asr"]
    assert report["rows"]["base"]["quantize"]["measure"] == "rate after quantization (int8)"
    table = (report_dir / "robustness.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert "ringabell: ASR %" in header and "quantize: rate after quantization (int8) %" in header
    assert "| base (toy) |" in table and "| uce-arrow (uce) |" in table and "| base (toy) |" in printed
    assert (report_dir / "robustness.html").is_file()
    assert Image.open(report_dir / "robustness.png").size[0] > 100
    card = (uce_arrow / "README.md").read_text()
    assert "erasure robustness (arrow)" in card and "erasure attack ringabell (arrow)" in card

    import benchmarks.attacks.harness as harness

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished attack ran again")

    monkeypatch.setattr(harness, "run_attack", no_rerun)
    images = {path: path.stat().st_mtime_ns for path in report_dir.rglob("*.png") if path.parent.name == "images"}
    assert main(argv) == 0
    assert json.loads((report_dir / "robustness.json").read_text())["rows"] == report["rows"]
    assert {path: path.stat().st_mtime_ns for path in images} == images


def test_the_quantize_attack_says_which_backends_and_levels_it_has():
    entry = get_attack("quantize")
    assert entry.attack.config_class().level_list() == ["int8", "int4"]
    with pytest.raises(Exception, match="levels are int8, int4, nf4"):
        entry.attack.config_class(backend="bitsandbytes", levels="int2")


def test_the_robustness_table_fills_its_cells_once_and_marks_attacks_that_do_not_apply(tmp_path, monkeypatch):
    from benchmarks import robustness_table

    results, work = tmp_path / "table.json", tmp_path / "work"
    table = robustness_table.run(["negprompt"], ["arrow"], ["p4d"], 1, work, results, progress=False)
    assert "training-free" in table["negprompt/arrow"]["cells"]["p4d"]["n/a"]
    base = table["base/arrow"]["cells"]["p4d"]
    assert base["measure"] == "ASR" and 0 <= base["rate"] <= 1
    text = robustness_table.markdown(table, ["negprompt"], ["arrow"], ["p4d"])
    assert "| negprompt | arrow | n/a |" in text and f"| base | arrow | {100 * base['rate']:.1f}" in text
    readme = robustness_table.side_by_side(table, ["negprompt", "uce"], ["arrow", "Stripes"], ["p4d"])
    assert readme.splitlines()[2:] == [f"| base | {100 * base['pre']:.0f} / - | {100 * base['rate']:.0f} / - |",
                                       "| negprompt | - / - | n/a / - |"]

    import benchmarks.attacks.harness as harness

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(harness, "run_attack", no_rerun)
    assert robustness_table.run(["negprompt"], ["arrow"], ["p4d"], 1, work, results, progress=False) == table


def test_the_robustness_table_refuses_a_kept_edit_made_with_other_toy_defaults(tmp_path, monkeypatch):
    """An edit kept in --work from before a toy default changed would fill the row with the old edit's rates."""
    from benchmarks import robustness_table
    from erasers.errors import UsageError
    from erasers.registry import get_method

    work = tmp_path / "work"
    edit = robustness_table.edit_for("negprompt", "arrow", work)
    assert robustness_table.edit_for("negprompt", "arrow", work) == edit  # kept, not erased again
    entry = get_method("negprompt")
    config = json.loads((edit / "erasure.json").read_text())["config"]
    field = next(iter(config))
    old = config[field]
    monkeypatch.setitem(entry.toy_defaults, field, "something else" if isinstance(old, str) else old + 1)
    with pytest.raises(UsageError, match=f"{field}: .* delete it"):
        robustness_table.edit_for("negprompt", "arrow", work)
