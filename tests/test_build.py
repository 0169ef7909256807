"""`erasure toy build` runs its stages from scratch and resumes from checkpoints (tiny settings)."""

import pytest
import torch

from benchmarks.toycanvas import build
from erasers.train import TrainingLoop


def _train(cfg, interrupt_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    loop = TrainingLoop("toy", 6, {"model": model, "opt": optimizer}, work_dir=cfg.build_dir, checkpoint_every=1)
    started_at = loop.start

    def step(index, generator):
        if index == interrupt_at:
            raise KeyboardInterrupt
        x = torch.randn(8, 4, generator=generator)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    loop.run(step)
    return model, started_at


def test_an_interrupted_run_resumes_to_the_same_model(tmp_path):
    straight, _ = _train(build.BuildConfig(build_dir=str(tmp_path / "a"), checkpoint_every=1))
    cfg = build.BuildConfig(build_dir=str(tmp_path / "b"), checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, interrupt_at=3)
    resumed, started_at = _train(cfg)
    assert started_at == 3
    assert torch.equal(straight.weight, resumed.weight), "per-step seeding makes a resumed run identical"


def test_classifier_stage_exports_atomically(tmp_path):
    cfg = build.BuildConfig(build_dir=str(tmp_path / "b"), weights_dir=str(tmp_path / "w"), train_images=200,
                            heldout_images=100, classifier_steps=2, classifier_batch=8)
    build.stage_data(cfg)
    build.stage_classifier(cfg)
    assert (tmp_path / "w" / "classifier" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["classifier"]


def test_unknown_stage_is_a_usage_error(capsys):
    from apps.cli import main

    assert main(["toy", "build", "paint"]) == 2
    assert "unknown stage 'paint'" in capsys.readouterr().err


def test_ip_adapter_image_encoder_is_tuned_once_and_kept(tmp_path):
    # The ip-adapter stage's first step: the vision tower's copy trained against the frozen text tower, written to
    # the build directory whole, and read back (not trained again) when the stage resumes.
    from transformers import CLIPVisionModelWithProjection

    from benchmarks.toycanvas import CLIP_DIR
    from benchmarks.toycanvas.build.train_ip_adapter import _tuned_image_encoder

    cfg = build.BuildConfig(build_dir=str(tmp_path), ip_adapter_encoder_images=200, ip_adapter_encoder_steps=3)
    original = CLIPVisionModelWithProjection.from_pretrained(CLIP_DIR).state_dict()
    tuned = _tuned_image_encoder(cfg).state_dict()
    assert any(not torch.equal(tuned[k], original[k]) for k in original), "the fine-tune must move the encoder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ip_adapter_image_encoder", "logs"]
    again = _tuned_image_encoder(cfg).state_dict()
    assert all(torch.equal(again[k], tuned[k]) for k in tuned)
