"""Real loading of SD, SDXL and Flux pipelines, on tiny random-weight pipelines built from configs."""

import shutil

import numpy as np
import pytest

from erasers import UsageError, load_pipeline
from erasers.text_encoders import text_encoder_layers

SIZES = {"sd": None, "sdxl": None, "flux": 16}


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_each_family_loads_and_generates(tiny_pipeline_dirs, family):
    loaded = load_pipeline(str(tiny_pipeline_dirs[family]), device="cpu")
    assert loaded.family.name == family
    assert set(loaded.text_encoders) == set(loaded.family.text_encoders)
    assert set(loaded.tokenizers) == set(loaded.family.tokenizers)
    assert loaded.denoiser is getattr(loaded.pipeline, "transformer" if family == "flux" else "unet")
    assert loaded.adapter.cross_attention_kv(), "every family has linears that read the text"
    images = loaded.generate(["A star image in Flat style."], seeds=0, steps=2, progress=False,
                             height=SIZES[family], width=SIZES[family])
    again = loaded.generate(["A star image in Flat style."], seeds=0, steps=2, progress=False,
                            height=SIZES[family], width=SIZES[family])
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0])), "a seed reproduces its image"
    assert np.asarray(images[0]).std() > 0


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_edited_text_encoder_loads_into_each_family(tiny_pipeline_dirs, tmp_path, family):
    """A CLIP text encoder saved on its own replaces the pipeline's and changes what it generates."""
    import torch

    loaded = load_pipeline(str(tiny_pipeline_dirs[family]), device="cpu")
    before = loaded.generate(["a star"], seeds=0, steps=2, progress=False, height=SIZES[family], width=SIZES[family])
    edited = type(loaded.text_encoder).from_pretrained(tiny_pipeline_dirs[family] / "text_encoder")
    with torch.no_grad():
        for p in text_encoder_layers(edited)[0].parameters():
            p.add_(torch.randn_like(p))
    edited.save_pretrained(tmp_path / "edit" / "text_encoder")
    replacement = loaded.load_component("text_encoder", tmp_path / "edit", subfolder="text_encoder")
    assert loaded.text_encoder is replacement
    after = loaded.generate(["a star"], seeds=0, steps=2, progress=False, height=SIZES[family], width=SIZES[family])
    assert not np.array_equal(np.asarray(before[0]), np.asarray(after[0]))


def test_family_mismatch_and_foreign_components_are_refused(tiny_pipeline_dirs):
    with pytest.raises(UsageError, match="is a sd pipeline, not flux"):
        load_pipeline(str(tiny_pipeline_dirs["sd"]), family="flux")
    with pytest.raises(UsageError, match="unknown model family"):
        load_pipeline(str(tiny_pipeline_dirs["sd"]), family="dalle")
    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    with pytest.raises(UsageError, match="holds a UNet2DConditionModel"):
        loaded.load_component("text_encoder", tiny_pipeline_dirs["sdxl"] / "unet")
    with pytest.raises(UsageError, match="expects cross_attention_dim"):
        loaded.load_component("unet", tiny_pipeline_dirs["sdxl"] / "unet")
    with pytest.raises(UsageError, match="no component"):
        loaded.load_component("transformer", tiny_pipeline_dirs["flux"] / "transformer")


def test_bad_sources_give_one_clear_error(tiny_pipeline_dirs, tmp_path):
    with pytest.raises(UsageError, match="unknown model 'nonsense'"):
        load_pipeline("nonsense")
    with pytest.raises(UsageError, match="not a diffusers pipeline directory"):
        load_pipeline(str(tmp_path))
    with pytest.raises(UsageError, match="holds a single model"):
        load_pipeline(str(tiny_pipeline_dirs["sd"] / "unet"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dirs["sd"], broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        load_pipeline(str(broken), device="cpu")


def test_empty_prompts_are_refused(tiny_pipeline_dirs):
    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    with pytest.raises(UsageError, match="prompt list is empty"):
        loaded.generate([])
    with pytest.raises(UsageError, match="prompt 2 is empty"):
        loaded.generate(["a star", "  "])


def test_progress_moves_per_image_within_a_batch(tiny_pipeline_dirs, monkeypatch):
    """A batch of 4 images over 4 denoising steps moves the bar one image per step, not 4 at the batch's end."""
    import tqdm.auto

    positions = []

    class Recorded(tqdm.auto.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.desc == "generating":  # not the loading bars
                positions.append(self.n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    loaded = load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu")
    loaded.generate(["a star"] * 4, seeds=0, steps=4, batch_size=4, progress=True)
    assert [p for i, p in enumerate(positions) if i == 0 or p != positions[i - 1]] == [1, 2, 3, 4]
