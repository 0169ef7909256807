import pytest
from PIL import Image

from apps.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


def test_generate_one_image_and_a_grid(tiny_pipeline_dirs, tmp_path, capsys):
    out = tmp_path / "star.png"
    code, _ = run(capsys, "generate", "--model", str(tiny_pipeline_dirs["sd"]), "--prompt", "a star", "--seed", "0",
                  "--steps", "2", "--out", str(out))
    assert code == 0 and Image.open(out).size == (16, 16)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\n\na circle\na square\n")
    grid = tmp_path / "grid.png"
    code, _ = run(capsys, "generate", "--model", str(tiny_pipeline_dirs["sd"]), "--prompts", str(prompts),
                  "--columns", "2", "--steps", "2", "--out", str(grid))
    assert code == 0 and Image.open(grid).size == (32, 32)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary file is left"


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model", "--prompt", "a"], "unknown model 'no-such-model'"),
    (["--prompt", "   "], "prompt 1 is empty"),
    (["--prompts", "{empty}"], "has no prompts"),
    (["--prompts", "{missing}"], "does not exist"),
    (["--model", "{sd}", "--family", "sdxl", "--prompt", "a"], "is a sd pipeline, not sdxl"),
    (["--model", "{sd}/unet", "--prompt", "a"], "holds a single model"),
    (["--model", "{sd}", "--text-encoder", "{sd}/vae", "--prompt", "a"], "holds a AutoencoderKL"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_pipeline_dirs, tmp_path, capsys, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    values = {"empty": str(empty), "missing": str(tmp_path / "missing.txt"), "sd": str(tiny_pipeline_dirs["sd"])}
    out = tmp_path / "out.png"
    code, captured = run(capsys, "generate", *[a.format(**values) for a in argv], "--steps", "1", "--out", str(out))
    assert code == 2
    error_lines = [line for line in captured.err.splitlines() if line.startswith("erasure: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], captured.err
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_version_prints_the_installed_package_version(capsys):
    from importlib.metadata import version

    code, captured = run(capsys, "--version")
    assert code == 0
    assert captured.out.strip() == f"erasure {version('erasure-suite')}"


def test_generate_ends_with_its_wall_time_and_peak_memory(tiny_pipeline_dirs, tmp_path, capsys):
    import re

    from erasers.files import peak_resident_bytes

    code, captured = run(capsys, "generate", "--model", str(tiny_pipeline_dirs["sd"]), "--prompt", "a star",
                         "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "star.png"))
    assert code == 0, captured.err
    last = captured.out.strip().splitlines()[-1]
    found = re.fullmatch(r"took (\d+\.\d) s, peak memory (\d+\.\d\d) GiB RAM", last)
    assert found, last
    # The process's own peak resident memory, not a made-up or zero figure.
    assert float(found[2]) == pytest.approx(peak_resident_bytes() / 2 ** 30, abs=0.011) and float(found[2]) > 0


def test_commands_that_only_list_print_no_cost_line(capsys):
    code, captured = run(capsys, "methods")
    assert code == 0 and "peak memory" not in captured.out
