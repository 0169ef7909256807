"""A diverged erase (NaN or infinite weights) is a failure, never an erasure: its images are black or noise, which
a classifier scores as the concept gone (UA 100%). It is refused when saved and wherever an edit is loaded."""

import json

import pytest
import torch

from apps.cli import main
from erasers.edits import apply_edits, save_edit
from erasers.errors import UsageError
from erasers.models import load_pipeline


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
