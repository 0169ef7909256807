"""Bad and hostile inputs (the table in apps/bad_inputs.py): exit code 2, one `erasure: error:` line, no
traceback, nothing written. Plus what the table cannot say: --restart recovers, checkpoints resume exactly without
pickle, a failing judge is reported, --overwrite, an interrupted generate writes nothing."""

import json
from pathlib import Path

import pytest
import torch

from apps import bad_inputs
from apps.bad_input_fixtures import Planted
from apps.cli import main
from erasers.checkpoint import load_checkpoint
from erasers.errors import UsageError
from erasers.train import TrainingLoop

CASES = bad_inputs.all_cases()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, tmp_path):
    reason = case.skip()
    if reason:
        pytest.skip(reason)
    outcome = bad_inputs.run_case(case, tmp_path)
    assert outcome.problems(case) == [], outcome.stderr
    assert not (tmp_path / "PLANTED").exists(), "a planted pickle was loaded"


def test_every_method_and_field_kind_is_covered():
    names = {case.name for case in CASES}
    for method in ("esd-x", "esd-u", "esd-te", "uce", "hirm", "advunlearn"):
        assert any(name.startswith(f"erase {method}:") for name in names), method
    for method in ("sauce", "mllmeraser", "ga", "npo"):
        assert any(name.startswith(f"vlm erase {method}:") for name in names), method
    for field in ("lr=nan", "lr=0", "iterations=0", "batch_size=0", "seed=-1", "steps=0"):
        assert any(name.endswith(f"--set {field}") for name in names), field


def test_restart_discards_a_corrupt_checkpoint_and_finishes(tmp_path, capsys):
    out = bad_inputs.FIXTURES["hirm_partial_truncated"](tmp_path)
    argv = ["erase", "--method", "hirm", "--concept", "star", "--set", "iterations=2", "--device", "cpu", "--out", out]
    assert main(argv) == 2 and "--restart" in capsys.readouterr().err
    assert main([*argv, "--restart"]) == 0
    assert json.loads((Path(out) / "erasure.json").read_text())["config"]["iterations"] == 2
    assert not Path(out + ".partial").exists()


def _train(work_dir, interrupt_at=None, steps=6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.8, 0.99))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps)
    loop = TrainingLoop("net", steps, {"model": model, "opt": optimizer, "sched": schedule}, work_dir=work_dir,
                        checkpoint_every=1, progress=False)

    def step(index, generator):
        if index == interrupt_at:
            raise KeyboardInterrupt
        x = torch.randn(8, 4, generator=generator)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()  # dropout draws from the global RNG
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        return {"loss": loss.item()}

    loop.run(step)
    return model, optimizer, schedule


def test_checkpoints_are_safetensors_and_resume_exactly(tmp_path):
    straight, straight_opt, _ = _train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", interrupt_at=3)
    step, states, _ = load_checkpoint(tmp_path / "b" / "ckpt" / "net.safetensors")
    assert step == 3 and isinstance(states["opt"]["param_groups"][0]["betas"], tuple)
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir()) == ["net.safetensors"]
    resumed, resumed_opt, resumed_schedule = _train(tmp_path / "b")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b), "weights, Adam moments, schedule and RNG state all came back"
    assert resumed_schedule.last_epoch == 6
    moments = [opt.state_dict()["state"][0]["exp_avg"] for opt in (straight_opt, resumed_opt)]
    assert torch.equal(*moments)


def test_a_planted_pickle_is_refused_by_the_training_loop(tmp_path):
    import pickle

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "net.pt").write_bytes(pickle.dumps(Planted(str(tmp_path / "PLANTED"))))
    with pytest.raises(UsageError, match="pickle"):
        _train(tmp_path)
    assert not (tmp_path / "PLANTED").exists()


def test_a_judge_is_checked_before_the_run_and_its_failures_reported():
    from benchmarks.attack import call_judge, load_judge

    assert load_judge(f"{__name__}:judge_that_fails") is judge_that_fails
    with pytest.raises(UsageError, match="ZeroDivisionError"):
        call_judge(judge_that_fails, "image", "star")
    with pytest.raises(UsageError, match="one bool per image"):
        call_judge(lambda images, concept: [], "image", "star")
    assert call_judge(lambda images, concept: [1], "image", "star") is True


def judge_that_fails(images, concept):
    return [1 / 0 for _ in images]


def test_generate_refuses_to_overwrite_unless_asked(tiny_pipeline_dirs, tmp_path, capsys):
    out = tmp_path / "a.png"
    argv = ["generate", "--model", str(tiny_pipeline_dirs["sd"]), "--prompt", "a star", "--steps", "1",
            "--out", str(out)]
    assert main(argv) == 0
    first = out.read_bytes()
    assert main([*argv, "--seed", "5"]) == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert main([*argv, "--seed", "5", "--overwrite"]) == 0 and out.read_bytes() != first


def test_an_interrupted_generate_writes_nothing(tiny_pipeline_dirs, tmp_path, capsys, monkeypatch):
    from erasers.models import LoadedPipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LoadedPipeline, "generate", interrupted)
    code = main(["generate", "--model", str(tiny_pipeline_dirs["sd"]), "--prompt", "a", "--out",
                 str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
