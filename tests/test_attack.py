"""UnlearnDiffAtk on the toy world: the attack's pieces, its ASR accounting, and that it brings an erased concept
back where the plain prompt does not."""

import json

import pytest
import torch

from apps.cli import main
from benchmarks.attack import AttackConfig, attack_success_rate
from erasers.adversarial import prefixed_ids, project_onto_simplex
from erasers.conditioning import replaced_token_embeddings
from erasers.models import load_pipeline
from erasers.run import erase


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy", device="cpu")


def test_simplex_projection_is_a_distribution_and_keeps_one():
    rows = torch.randn(3, 50)
    projected = project_onto_simplex(rows)
    assert torch.allclose(projected.sum(-1), torch.ones(3), atol=1e-5) and (projected >= 0).all()
    one_hot = torch.zeros(2, 50)
    one_hot[:, 7] = 1
    assert torch.allclose(project_onto_simplex(one_hot), one_hot)


def test_soft_tokens_run_the_text_encoder_as_its_own_tokens_do(toy):
    ids = prefixed_ids(toy.tokenizer, "A arrow image in Flat style.", 2, "cpu")
    assert ids.shape == (1, toy.tokenizer.model_max_length)
    assert toy.tokenizer.decode(ids[0, 3:10]).startswith("a arrow image")
    embeds = toy.text_encoder.get_input_embeddings().weight[ids].detach().clone().requires_grad_(True)
    with replaced_token_embeddings(toy.text_encoder, embeds):
        states = toy.text_encoder(ids)[0]
    assert torch.allclose(states, toy.text_encoder(ids)[0], atol=1e-6)
    states.sum().backward()
    assert embeds.grad is not None and embeds.grad[0, 1].abs().sum() > 0


def test_asr_counts_pre_and_attack_successes(tmp_path):
    edit = erase("toy", "uce", ["arrow"], tmp_path / "no-arrow", device="cpu")
    # Prompt 1 fails plain and succeeds at the first check; prompt 2 succeeds plain; prompt 3 never succeeds.
    verdicts = iter([False, True, True, False, False, False])
    calls = []

    def judge(images, concept):
        calls.append(concept)
        return [next(verdicts) for _ in images]

    result = attack_success_rate("toy", [edit], prompts=["A arrow image in Flat style."], count=3,
                                 config=AttackConfig(tokens=2, iterations=2, check_every=1), judge=judge,
                                 device="cpu", out=tmp_path / "attack", progress=False)
    assert calls == ["arrow"] * 6
    rows = result["prompts"]
    assert [r["pre_success"] for r in rows] == [False, True, False]
    assert [r["attack_success"] for r in rows] == [True, None, False]
    assert [r["seed"] for r in rows] == [188, 189, 190], "a repeated prompt takes the next seed"
    assert (result["pre_asr"], result["asr"]) == (1 / 3, 2 / 3)
    assert rows[0]["iterations"] == 1 and rows[2]["iterations"] == 2
    assert len(rows[0]["adversarial_tokens"]) == 2
    assert "arrow image in flat style" in rows[0]["final_prompt"]
    saved = json.loads((tmp_path / "attack" / "attack.json").read_text())
    assert saved["asr"] == result["asr"] and (tmp_path / "attack" / "attack.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--edit", "{missing}"], "does not exist"),
    (["--model", "{sd}", "--edit", "{fake}"], "pass --judge MODULE:FUNCTION"),
    (["--edit", "{fake}", "--judge", "no_such_module:judge"], "cannot load the judge"),
    (["--edit", "{fake}", "--prompts", "0"], "--prompts: 0 is out of range: it must be at least 1"),
])
def test_attack_cli_bad_input_exits_2_with_one_line(tiny_pipeline_dirs, tmp_path, capsys, argv, message):
    fake = tmp_path / "edit"
    fake.mkdir()
    (fake / "erasure.json").write_text(json.dumps({"components": [], "concepts": ["arrow"], "kind": "object"}))
    values = {"missing": str(tmp_path / "missing"), "sd": str(tiny_pipeline_dirs["sd"]), "fake": str(fake)}
    code = main(["attack", *[a.format(**values) for a in argv], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("erasure: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
