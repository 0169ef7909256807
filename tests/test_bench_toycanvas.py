"""`erasure bench toycanvas`: erase, generate, classify, score and report on a small answer set; a rerun reuses the
edit and every finished image and score; bad input writes nothing."""

import json

import pytest

from apps.cli import main


def test_toycanvas_bench_reports_and_a_rerun_recomputes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["bench", "toycanvas", "--methods", "uce", "--concepts", "arrow", "--objects", "arrow,star,circle,moon",
            "--styles", "Flat,Stripes,Dots", "--quiet", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    base, uce = results["table"]
    assert base["method"] == "base" and uce["method"] == "uce"
    assert uce["object_UA"] >= base["object_UA"] + 0.5, results["table"]  # the arrow is gone
    assert uce["object_CRA"] >= 0.5 and uce["FID"] is not None and uce["storage_bytes"] > 0
    assert results["fid_features"].startswith("toy-classifier")
    assert "| uce |" in printed and "Style UA %" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "Object Unlearning" in html and "grid_uce.png" in html
    for plot in ("ua_vs_retain.png", "heatmap_UA.png", "grid_uce.png"):
        assert (out / "plots" / plot).stat().st_size > 1000

    manifest = (out / "manifest.jsonl").read_text()
    assert main(argv) == 0
    assert "erasing" not in capsys.readouterr().out, "the edit in DIR/edits is reused"
    assert (out / "manifest.jsonl").read_text() == manifest, "no image or score is recomputed"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "no-such-method", "--concepts", "arrow"], "unknown method 'no-such-method'"),
    (["--methods", "uce", "--concepts", "dragon"], "unknown concept 'dragon'"),
    (["--methods", "uce", "--concepts", "arrow", "--objects", "arrow,dragon"], "unknown ToyCanvas object 'dragon'"),
    (["--concepts", "arrow"], "nothing to benchmark"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = main(["bench", "toycanvas", *argv, "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("erasure: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


@pytest.mark.slow  # 2 minutes on 2 busy CPU cores
def test_bench_attacks_add_robustness_columns_with_na_where_an_attack_does_not_apply(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["bench", "toycanvas", "--methods", "negprompt", "--concepts", "arrow", "--objects", "arrow,star",
            "--styles", "Flat", "--no-fid", "--attacks", "quantize,p4d", "--attack-prompts", "1", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    results = json.loads((out / "results.json").read_text())
    rows = {row["set"]: row["cells"] for row in results["robustness"]["rows"]}
    assert set(rows) == {"base", "negprompt-arrow"}
    assert "n/a" in rows["negprompt-arrow"]["p4d"]  # P4D needs a changed denoiser; negprompt is training-free
    assert 0 <= rows["negprompt-arrow"]["quantize"]["rate"] <= 1 and "rate" in rows["base"]["p4d"]
    assert (out / "attacks" / "negprompt-arrow" / "quantize" / "attack.json").is_file()
    assert "## Robustness" in (out / "report.md").read_text() and "quantize:" in capsys.readouterr().out

    manifest = (out / "manifest.jsonl").read_text()
    assert main(argv) == 0
    assert (out / "manifest.jsonl").read_text() == manifest, "no attack runs again"
