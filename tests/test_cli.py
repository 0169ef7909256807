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
