"""A diverged erase (NaN or infinite weights) is a failure, never an erasure: its images are black or noise, which
a classifier scores as the concept gone (UA 100%). It is refused when saved and wherever an edit is loaded. Images
drawn blank (non-finite, or one flat colour) are marked where they are drawn, and every scorer reports them as a
failed edit: compare and the attack with one line (exit 2), the benchmarks with a failed row, the app with a
caption in place of the classifier's reading."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.cli import main
from erasers.edits import apply_edits, save_edit
from erasers.errors import UsageError
from erasers.models import load_pipeline
from erasers.run import erase


def nan_unet(loaded):
    unet = loaded.denoiser
    with torch.no_grad():
        next(p for name, p in unet.named_parameters() if "attn2.to_v" in name).fill_(float("nan"))
    return unet


def test_a_diverged_erase_is_not_saved(tmp_path):
    loaded = load_pipeline("toy", device="cpu")
    with pytest.raises(UsageError, match="non-finite weights .*attn2.to_v.*nothing was saved"):
        save_edit(tmp_path / "edit", {"unet": nan_unet(loaded)}, {"method": "uce", "concepts": ["star"]})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def nan_edit(tmp_path):
    """A toy edit whose UNet holds a NaN, as a diverged erase saved by an earlier version would be."""
    edit = tmp_path / "nan-edit"
    nan_unet(load_pipeline("toy", device="cpu")).save_pretrained(edit / "unet")
    (edit / "erasure.json").write_text(json.dumps({"method": "esd-x", "concepts": ["star"], "kind": "object",
                                                   "components": ["unet"], "config": {}}))
    return edit


def test_a_diverged_edit_is_refused_where_it_loads(nan_edit, tmp_path, capsys):
    with pytest.raises(UsageError, match="non-finite weights"):
        apply_edits(load_pipeline("toy", device="cpu"), [nan_edit])
    out = tmp_path / "compare"
    assert main(["compare", "--edit", str(nan_edit), "--device", "cpu", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("erasure: error:")]
    assert len(errors) == 1 and "failed erase, not an erasure" in errors[0]
    assert not out.exists()


def test_blank_images_are_marked_where_they_are_drawn():
    from erasers.images import BLANK, drawn_images

    noise = np.random.default_rng(0).random((8, 8, 3))
    nan, flat = noise.copy(), np.full((8, 8, 3), 0.25)
    nan[3, 4, 1] = np.nan
    images = drawn_images(np.stack([noise, nan, flat]))
    assert [image.info.get(BLANK) for image in images] == [None, "non-finite values (NaN or inf)", "one flat colour"]
    assert np.array_equal(np.asarray(images[0]), (noise * 255).round().astype(np.uint8)), "converted as diffusers does"


@pytest.fixture(scope="module")
def uce_edit(tmp_path_factory):
    return erase("toy", "uce", ["star"], tmp_path_factory.mktemp("uce") / "uce", device="cpu")


def flat_decoder(loaded) -> None:
    """Every image the pipeline draws becomes one flat colour: its VAE decodes any latent to its last bias."""
    with torch.no_grad():
        loaded.pipeline.vae.decoder.conv_out.weight.zero_()


def test_compare_reports_an_edit_drawing_one_flat_colour_as_failed(uce_edit, tmp_path, capsys, monkeypatch):
    import benchmarks.compare
    from benchmarks.unlearncanvas import AnswerSet

    def flat_edit(loaded, edits, allow_other_base=False):
        apply_edits(loaded, edits, allow_other_base)
        flat_decoder(loaded)

    monkeypatch.setattr(benchmarks.compare, "apply_edits", flat_edit)
    monkeypatch.setattr(benchmarks.compare, "AnswerSet", lambda seeds: AnswerSet(("star", "arrow"), ("Flat",), seeds))
    out = tmp_path / "compare"
    assert main(["compare", "--edit", str(uce_edit), "--device", "cpu", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("erasure: error:")]
    assert len(errors) == 1 and "2 of 2 images blank (one flat colour): a failed edit" in errors[0], errors
    assert not out.exists()


def test_the_toycanvas_bench_reports_nan_and_flat_edits_as_failed_rows(nan_edit, uce_edit, tmp_path, capsys,
                                                                       monkeypatch):
    """A NaN edit is a failed row found before any image is drawn (no image of it is made), an edit whose images
    are one flat colour a failed row from its images; the other edit and the base model are scored as ever."""
    import benchmarks.erasure_bench

    flat = tmp_path / "flat-edit"
    shutil.copytree(uce_edit, flat)

    def flat_when_named(loaded, paths, allow_other_base=False):
        apply_edits(loaded, paths, allow_other_base)
        if Path(paths[0]).name == flat.name:
            flat_decoder(loaded)

    monkeypatch.setattr(benchmarks.erasure_bench, "apply_edits", flat_when_named)
    out = tmp_path / "bench"
    argv = ["bench", "toycanvas", "--edit", str(nan_edit), "--edit", str(flat), "--edit", str(uce_edit),
            "--objects", "star,arrow", "--styles", "Flat", "--no-fid", "--quiet", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    rows = {row["set"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert "non-finite weights" in rows["nan-edit"]["failed"] and not (out / "images" / "nan-edit").exists()
    assert rows["flat-edit"]["failed"] == "2 of 2 images blank (one flat colour)"
    for name in ("nan-edit", "flat-edit"):
        assert rows[name]["per_concept"] == {"star": {"UA": None, "IRA": None, "CRA": None}}, "never UA 100%"
    assert "failed" not in rows["uce"] and rows["uce"]["per_concept"]["star"]["UA"] is not None
    assert "failed" not in rows["base"]
    report = (out / "report.md").read_text()
    assert "nan-edit (failed: non-finite weights" in report and "flat-edit (failed: 2 of 2 images blank" in report


def test_an_attack_on_a_nan_edit_fails_before_drawing_its_targets(nan_edit, tmp_path, capsys):
    out = tmp_path / "attack"
    assert main(["attack", "--edit", str(nan_edit), "--prompts", "1", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "failed erase, not an erasure" in err and "targets" not in err and not out.exists(), err


def test_the_app_captions_a_blank_image_as_a_failed_edit_not_with_a_classifier_reading():
    from PIL import Image

    from apps.app import AppState, _readout
    from erasers.images import BLANK

    image = Image.new("RGB", (8, 8))
    image.info[BLANK] = "non-finite values (NaN or inf)"
    state = AppState("toy", None, classifier=object())  # would fail if it were asked
    assert _readout(state, image) == " | failed: a blank image (non-finite values (NaN or inf)), not an erasure; " \
        "no classifier reading"


def test_the_app_leaves_out_an_edit_that_cannot_load_instead_of_failing_to_start(nan_edit, tmp_path, capsys,
                                                                                  monkeypatch):
    from apps.app import build_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # build_app points it under its output
    build_app("toy", nan_edit.parent, tmp_path / "app-output", generate_on_load=False)
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipping the edit nan-edit" in line]
    assert len(skipped) == 1 and "non-finite weights" in skipped[0], skipped
