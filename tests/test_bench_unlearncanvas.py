"""`erasure bench unlearncanvas` on a small fixture in the published layout, with tiny random-weight ViTs saved in
the classifier checkpoints' format, and a tiny SD pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps.cli import main
from benchmarks.unlearncanvas_data import STYLE_CLASSES_50, STYLE_CLASSES_60, VitClassifier, read_dataset

STYLES, OBJECTS = ("Abstractionism", "Bricks"), ("Architectures", "Bears")


def tiny_vit(classes: int):
    import timm

    torch.manual_seed(classes)
    return timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=classes, embed_dim=32, depth=1,
                             num_heads=16, mlp_ratio=1.0, patch_size=32)


def build_miniature(root: Path) -> dict[str, Path]:
    """A miniature UnlearnCanvas under `root`: {"data", "classifiers", "wrong"} (a folder in the wrong layout)."""
    rng = np.random.default_rng(0)
    for style in (*STYLES, "Seed_Images"):
        for obj in OBJECTS:
            folder = root / "data" / style / obj
            folder.mkdir(parents=True)
            for index in range(1, 4):
                pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg")
    classifiers = root / "classifiers"
    classifiers.mkdir()
    torch.save({"model_state_dict": tiny_vit(51).state_dict()}, classifiers / "style_classifier.pth")
    torch.save({"model_state_dict": tiny_vit(20).state_dict()}, classifiers / "object_classifier.pth")
    torch.save({"model_state_dict": tiny_vit(7).state_dict()}, classifiers / "seven_classes.pth")
    wrong = root / "wrong_layout" / "Bricks"
    wrong.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(wrong / "1.jpg")  # no object folder
    return {"data": root / "data", "classifiers": classifiers, "wrong": root / "wrong_layout"}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> dict[str, Path]:
    return build_miniature(tmp_path_factory.mktemp("unlearncanvas"))


def test_class_orders_are_the_published_ones():
    assert len(STYLE_CLASSES_50) == 51 and STYLE_CLASSES_50[38] == "Seed_Images" and STYLE_CLASSES_50[-1] == "Winter"
    assert len(STYLE_CLASSES_60) == 61 and STYLE_CLASSES_60[29:32] == ("Liquid_Dreams", "Palette_Knife", "Magic_Cube")


def test_benchmark_on_a_fixture_in_the_published_layout(fixture, tiny_pipeline_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["bench", "unlearncanvas", "--data", str(fixture["data"]), "--classifier", str(fixture["classifiers"]),
                 "--model", str(tiny_pipeline_dirs["sd"]), "--methods", "uce", "--concepts", "Bricks", "--seeds",
                 "188", "288", "--steps", "2", "--size", "16", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    files = sorted(p.name for p in (out / "images" / "uce-Bricks").iterdir())
    assert files == sorted(f"{s}_{o}_seed{seed}.jpg" for s in STYLES for o in OBJECTS for seed in (188, 288))
    results = json.loads((out / "results.json").read_text())
    assert results["styles"] == list(STYLES) and results["objects"] == list(OBJECTS)
    assert results["fid_features"].startswith("style-classifier")
    assert results["sampling"] == {"steps": 2, "guidance": 9.0, "size": 16, "scheduler": "ddim"}
    edit_row = next(r for r in results["rows"] if r["set"] == "uce-Bricks")
    assert edit_row["kind"] == "style" and edit_row["fid"] is not None and edit_row["cost"]["storage_bytes"] > 0
    scores = edit_row["per_concept"]["Bricks"]
    # The recorded readouts are the checkpoints' own: recompute them from the saved images.
    style_model = VitClassifier(fixture["classifiers"] / "style_classifier.pth", STYLE_CLASSES_50, "style")
    keys = [f"Bricks_{o}_seed{seed}" for o in OBJECTS for seed in (188, 288)]
    predicted = style_model.predict([Image.open(out / "images" / "uce-Bricks" / f"{k}.jpg") for k in keys])
    assert scores["UA"] == sum(p != "Bricks" for p in predicted) / len(predicted)
    assert "| uce |" in captured.out and (out / "report.html").exists() and (out / "plots" / "grid_uce.png").exists()


@pytest.mark.parametrize("case, message", [
    ("wrong_layout", "holds no object folders"),
    ("not_a_style", "is not an UnlearnCanvas style folder"),
    ("style_shape", "has 7 output classes"),
    ("object_shape", "has 51 output classes but UnlearnCanvas' object classifier has 20"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(fixture, tiny_pipeline_dirs, tmp_path, capsys, case,
                                                            message):
    data, classifiers = fixture["data"], fixture["classifiers"]
    style, objects = classifiers / "style_classifier.pth", classifiers / "object_classifier.pth"
    if case == "wrong_layout":
        data = fixture["wrong"]
    elif case == "not_a_style":
        data = tmp_path / "photos"
        (data / "holiday" / "Bears").mkdir(parents=True)
    elif case == "style_shape":
        style = classifiers / "seven_classes.pth"
    else:
        objects = style
    out = tmp_path / "out"
    code = main(["bench", "unlearncanvas", "--data", str(data), "--style-classifier", str(style),
                 "--object-classifier", str(objects), "--model", str(tiny_pipeline_dirs["sd"]), "--methods", "uce",
                 "--concepts", "Bricks", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("erasure: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_read_dataset_lists_styles_and_objects(fixture):
    data = read_dataset(fixture["data"])
    assert set(data) == {*STYLES, "Seed_Images"} and set(data["Bricks"]) == set(OBJECTS)
    assert len(data["Bricks"]["Bears"]) == 3


def test_inception_features_from_a_local_weights_file(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from benchmarks.unlearncanvas_data import inception_features

    # torch-fidelity's Inception-v3 with random weights, saved as the real weights file is.
    with monkeypatch.context() as patched:
        patched.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
        patched.setattr(torch, "load", lambda *a, **k: {})
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    weights = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(model.state_dict(), weights)
    features = inception_features(weights)
    extracted = features.extract([Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (64, 64))])
    assert extracted.shape == (2, 2048) and features.name.startswith("inception-v3")


def test_a_sequence_of_the_datasets_styles(fixture, tiny_pipeline_dirs, tmp_path, capsys):
    """--sequence of the dataset's styles: a chain of two steps, scored as a style chain."""
    order = tmp_path / "sequence.txt"
    order.write_text("Bricks\nAbstractionism\n")
    out = tmp_path / "run"
    code = main(["bench", "unlearncanvas", "--data", str(fixture["data"]), "--classifier", str(fixture["classifiers"]),
                 "--model", str(tiny_pipeline_dirs["sd"]), "--methods", "uce", "--sequence", str(order), "--seeds",
                 "188", "--steps", "2", "--size", "16", "--no-fid", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    second = json.loads((out / "edits" / "uce-seq2-Abstractionism" / "erasure.json").read_text())
    assert second["concepts"] == ["Bricks", "Abstractionism"] and second["parents"][0]["concepts"] == ["Bricks"]
    rows = {r["set"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["uce-seq2-Abstractionism"]["step"] == 2 and rows["uce-seq2-Abstractionism"]["kind"] == "style"
    assert list(rows["uce-seq2-Abstractionism"]["UA_per_concept"]) == ["Bricks", "Abstractionism"]
    assert "| uce | 2 |" in (out / "report.md").read_text()
