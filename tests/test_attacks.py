"""The attacks registry (benchmarks/attacks/): every attack writes the one result layout, resumes an interrupted
run, reads the published prompt sets' CSV layouts, and refuses edits it does not apply to; Ring-A-Bell's concept
vector carries the concept on the base toy model; Ring-A-Bell and P4D run on every family and Ring-A-Bell through a
training-free edit's guidance."""

import json

import pytest
import torch
from tiny_pipelines import RESOLUTION

from apps.cli import main
from benchmarks.attacks import available_attacks, get_attack
from benchmarks.attacks.harness import run_attack
from benchmarks.attacks.prompts import plan_items, read_prompts_csv
from erasers.errors import UsageError
from erasers.run import erase

ATTACKS = sorted(available_attacks())
LAYOUT = {"attack", "config", "concept", "edits", "items"}
ITEM_KEYS = {"prompt", "seed", "success", "judge", "image"}


@pytest.fixture(scope="module")
def uce_arrow(tmp_path_factory):
    return erase("toy", "uce", ["arrow"], tmp_path_factory.mktemp("edits") / "uce-arrow", device="cpu")


@pytest.fixture(scope="module")
def negprompt_arrow(tmp_path_factory):
    return erase("toy", "negprompt", ["arrow"], tmp_path_factory.mktemp("edits") / "neg-arrow", device="cpu")


def scripted(*verdicts):
    """A judge answering `verdicts` in turn (then False), recording each call's concept."""
    answers = iter(verdicts)

    def judge(images, concept):
        judge.calls.append(concept)
        return [next(answers, False) for _ in images]

    judge.calls = []
    return judge


def test_the_registry_holds_each_attack_with_what_it_applies_to():
    assert {"unlearndiffatk", "ringabell", "p4d"} <= set(ATTACKS)
    assert get_attack("p4d").edits == ("weights",) and "training-free" in get_attack("ringabell").edits
    assert all(entry.quick for entry in available_attacks().values()), "each attack says how to run it briefly"
    with pytest.raises(UsageError, match="unknown attack 'nope'; available: .*ringabell"):
        get_attack("nope")


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_writes_the_one_result_layout(name, uce_arrow, tmp_path):
    """The plain prompt fails (Pre-ASR 0), the attack's image is accepted: the same keys, images and grid for every
    attack, its name in the results and on the edit's model card."""
    out = tmp_path / name
    judge = scripted(False, True)
    summary = run_attack(name, "toy", [uce_arrow], prompts=["A arrow image in Flat style."], count=1,
                         config=get_attack(name).quick, judge=judge, device="cpu", out=out, progress=False)
    saved = json.loads((out / "attack.json").read_text())
    assert LAYOUT <= saved.keys() and saved["attack"] == name and saved == json.loads(json.dumps(summary))
    assert ("pre_asr" in saved and "asr" in saved) or "curve" in saved
    (item,) = saved["items"]
    assert ITEM_KEYS <= item.keys() and item["success"] is True and item["judge"] is True
    if "curve" in saved:  # a rate per step count: before any step the concept is gone, after the last it is back
        assert [point["rate"] for point in saved["curve"]] == [0.0, 1.0] and judge.calls[0] == "arrow"
    else:
        assert (saved["pre_asr"], saved["asr"]) == (0.0, 1.0) and judge.calls[0] == "arrow"
    for path in [item["image"], *item.get("images", {}).values()]:
        assert (out / path).is_file()
    assert (out / "attack.png").is_file() and not out.with_name(f"{name}.partial").exists()
    assert f"erasure attack {name} (arrow)" in (uce_arrow / "README.md").read_text()


def test_an_interrupted_attack_resumes_at_the_next_item_and_ends_as_an_uninterrupted_one(uce_arrow, tmp_path):
    prompts, options = ["A arrow image in Flat style.", "A arrow image in Dots style."], {"iterations": 1}
    whole = run_attack("unlearndiffatk", "toy", [uce_arrow], prompts=prompts, config=options, judge=scripted(),
                       device="cpu", out=tmp_path / "whole", progress=False)

    calls, stop_at = [], [3]

    def judge(images, concept):  # the same judge both times: a run with another judge starts afresh
        calls.append(concept)
        if len(calls) == stop_at[0]:  # the second item's plain image: after the first item (plain, one check)
            raise KeyboardInterrupt
        return [False]

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_attack("unlearndiffatk", "toy", [uce_arrow], prompts=prompts, config=options, judge=judge,
                   device="cpu", out=out, progress=False)
    assert sorted(p.name for p in (tmp_path / "resumed.partial" / "items").iterdir()) == ["0000.json"]
    calls.clear()
    stop_at[0] = 0
    resumed = run_attack("unlearndiffatk", "toy", [uce_arrow], prompts=prompts, config=options, judge=judge,
                         device="cpu", out=out, progress=False)
    assert len(calls) == 2, "only the second item ran again (its plain prompt and its one check)"
    assert resumed["items"] == whole["items"] and not (tmp_path / "resumed.partial").exists()
    assert (out / "images" / "0000-original.png").read_bytes() == \
        (tmp_path / "whole" / "images" / "0000-original.png").read_bytes()


def test_ring_a_bells_concept_vector_brings_the_concept_to_a_neutral_prompt_on_the_base_toy_model():
    """E(neutral caption) + 3 c drawn by the BASE toy model: the classifier names the concept far more often than
    for E(neutral caption) alone (measured: 1 of 5 arrows without, 4 of 5 with)."""
    import benchmarks  # noqa: F401  (registers the toy model)
    from benchmarks.attacks.judges import ToyJudge
    from benchmarks.attacks.ringabell import concept_vector, encode, prompt_pairs
    from erasers.conditioning import Conditioning
    from erasers.images import drawn_images
    from erasers.models import load_pipeline
    from erasers.prompts import make_request

    loaded = load_pipeline("toy", device="cpu")
    request = make_request(["arrow"], loaded.tokenizer, loaded.vocabulary)
    with_concept, without = prompt_pairs(request)
    assert with_concept[0] == "A arrow image in Flat style." and without[0] == "A object image in Flat style."
    vector = concept_vector(loaded, with_concept, without)
    neutral = without[:5]
    rates = []
    for eta in (0.0, 3.0):
        states = encode(loaded, loaded.adapter.tokenize(neutral)) + eta * vector
        inputs = loaded.adapter.pipeline_inputs(Conditioning(states, None, loaded.adapter),
                                                loaded.adapter.unconditional())
        drawn = loaded.pipeline(**inputs, generator=[torch.Generator().manual_seed(s) for s in range(len(neutral))],
                                output_type="np", num_inference_steps=loaded.default_steps,
                                guidance_scale=loaded.default_guidance)
        rates.append(sum(ToyJudge("object")(drawn_images(drawn.images), "arrow")) / len(neutral))
    assert rates[1] >= rates[0] + 0.4, rates


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
@pytest.mark.parametrize("name, options", [("ringabell", {}), ("p4d", {}), ("p4d", {"variant": "k"})])
def test_ring_a_bell_and_p4d_run_on_each_family(name, options, family, tiny_pipeline_dirs, tmp_path):
    model = str(tiny_pipeline_dirs[family])
    edit = erase(model, "uce", ["a star"], tmp_path / "edit", device="cpu", resolution=RESOLUTION[family])
    summary = run_attack(name, model, [edit], prompts=["a star in a photo"], count=1, judge=scripted(False, True),
                         config={**get_attack(name).quick, **options}, device="cpu", progress=False,
                         resolution=RESOLUTION[family])
    (item,) = summary["items"]
    assert item["pre_success"] is False and item["attack_success"] is True and summary["asr"] == 1.0
    assert item["final_prompt"] and item["final_prompt"] != item["prompt"]
    # P4D-K: one token after the first 3 of the prompt's 5 ("a star in a photo", in CLIP's and the tiny T5's words)
    assert len(item["adversarial_tokens"]) == (1 if options.get("variant") == "k" else 4)


def test_ring_a_bell_draws_its_prompts_through_a_training_free_edits_guidance(negprompt_arrow, monkeypatch):
    from erasers.methods.negprompt import NegativePrompt

    negatives = []
    rewrite = NegativePrompt.rewrite

    def recorded(self, pipeline, arguments):
        rewritten = rewrite(self, pipeline, arguments)
        negatives.append(rewritten["negative_prompt"])
        return rewritten

    monkeypatch.setattr(NegativePrompt, "rewrite", recorded)
    summary = run_attack("ringabell", "toy", [negprompt_arrow], count=1, config=get_attack("ringabell").quick,
                         judge=scripted(False, False), device="cpu", progress=False)
    assert summary["items"][0]["attack_success"] is False
    assert negatives == [["arrow"], ["arrow"]], "the plain prompt and the found one, both with the edit's guidance"


def test_p4d_refuses_a_training_free_edit_in_one_line_and_writes_nothing(negprompt_arrow, tmp_path, capsys):
    code = main(["attack", "--attack", "p4d", "--edit", str(negprompt_arrow), "--out", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("erasure: error:")]
    assert code == 2 and len(errors) == 1 and "training-free edit (negprompt)" in errors[0], errors
    applying = sorted(name for name, entry in available_attacks().items() if "training-free" in entry.edits)
    assert {"ringabell", "unlearndiffatk"} <= set(applying) and "p4d" not in applying
    assert f"attacks that do: {', '.join(applying)}" in errors[0] and list(tmp_path.iterdir()) == []


# Small CSVs in each published prompt set's own layout (their real column names; a row or two each).
LAYOUTS = {
    "p4d": (",prompt,categories,hard,nudity_percentage,evaluation_seed,evaluation_guidance,sd_image_width,"
            "sd_image_height,case_number\n0,A arrow image in Flat style.,sexual,1,40.0,1664501552,17,512,512,20\n",
            ("A arrow image in Flat style.", 1664501552, 17.0, "sexual")),
    "ringabell": ("prompt,case_number,evaluation_seed\nhands arrow depicting,0,41\n",
                  ("hands arrow depicting", 41, None, None)),
    "mma": ("target_prompt,adv_prompt,sanitized_adv_prompt,clean_prompt\nan arrow,arrow tic <|> fog,fog,an arrow\n",
            ("arrow tic <|> fog", None, None, None)),
    "unlearndiffatk": ("Unnamed: 0,case_number,prompt,evaluation_seed,artist\n0,0,Arrows by Vincent van Gogh,2219,"
                       "Vincent van Gogh\n", ("Arrows by Vincent van Gogh", 2219, None, None)),
    "i2p": ("prompt,categories,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\nan arrow,violence,7,9,512,"
            "512\n", ("an arrow", 7, 9.0, "violence")),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompts_csv_reads_each_published_layout_with_its_seeds_and_guidance(layout, tmp_path):
    text, (prompt, seed, guidance, categories) = LAYOUTS[layout]
    (tmp_path / "set.csv").write_text(text)
    (row,) = read_prompts_csv(tmp_path / "set.csv")
    assert (row.prompt, row.seed, row.guidance, row.categories) == (prompt, seed, guidance, categories)
    first, second = plan_items([row], 2, 188)
    assert (first.seed, second.seed) == ((188 if seed is None else seed), (188 if seed is None else seed) + 1)


def test_an_attack_from_a_prompts_csv_uses_each_rows_seed_and_guidance(uce_arrow, tmp_path, capsys):
    csv = tmp_path / "set.csv"
    csv.write_text(LAYOUTS["p4d"][0].replace(",17,", ",5,"))
    out = tmp_path / "attack"
    code = main(["attack", "--edit", str(uce_arrow), "--prompts-csv", str(csv), "--iterations", "1", "--device",
                 "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    (item,) = json.loads((out / "attack.json").read_text())["items"]
    assert (item["prompt"], item["seed"], item["guidance"]) == ("A arrow image in Flat style.", 1664501552, 5.0)
    assert "Pre-ASR" in capsys.readouterr().out


def test_p4d_k_puts_one_learnable_token_after_every_three_of_the_prompts():
    from erasers.adversarial import interleaved_ids, new_adversary
    from erasers.models import load_pipeline

    loaded = load_pipeline("toy", device="cpu")
    tokenizer = loaded.tokenizer
    ids, positions = interleaved_ids(tokenizer, "A arrow image in Flat style.", 3, "cpu")
    words = tokenizer("A arrow image in Flat style.").input_ids[1:-1]  # a arrow image in flat style .
    kept = [i for p, i in enumerate(ids[0].tolist()) if p not in positions]
    assert positions == [4, 8] and kept[:len(words) + 2] == [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]

    # P4D's tokens are read as their nearest vocabulary embeddings, the gradient reaching the free vectors.
    adversary = new_adversary("projected", 2, loaded, torch.Generator().manual_seed(0))
    words_table = loaded.text_encoder.get_input_embeddings().weight.detach()
    part = adversary["text_encoder"]
    read = part.embed(None, words_table)
    assert torch.equal(read.detach(), words_table[part.token_ids()])
    read.sum().backward()
    assert part.vectors.grad is not None and part.vectors.grad.abs().sum() > 0


STEPPED = sorted(name for name, entry in available_attacks().items() if entry.step is not None)


def test_step_cost_plans_every_attack_with_a_step_on_the_models_its_step_names():
    from benchmarks import step_cost

    assert set(STEPPED) == set(ATTACKS), "every diffusion attack says what its step is"
    rows = step_cost.plan(["toy", "sd15"], methods=[])
    for name in STEPPED:
        for model in ("toy", "sd15"):
            assert ((model, f"attack:{name}") in rows) == (model in get_attack(name).step.models)
    assert step_cost.plan(["toy"], methods=[], attacks=[]) == [("toy", "plain")]


@pytest.mark.parametrize("name", STEPPED)
def test_each_attacks_step_cost_row_runs_on_the_tiny_pipeline(name, tiny_pipeline_dirs, monkeypatch):
    """step_cost's attack rows, the tiny SD pipeline standing in for SD 1.5: the steps timed are the attack's own
    (its logged history spans the asked steps); quantize's row times the int8 pipeline's sampling step against the
    unquantized one's, both measured."""
    import benchmarks.architectures
    from benchmarks import step_cost
    from erasers.models import load_pipeline

    monkeypatch.setattr(benchmarks.architectures, "build_architecture",
                        lambda family: load_pipeline(str(tiny_pipeline_dirs["sd"]), device="cpu").pipeline)
    monkeypatch.setitem(step_cost.SETTINGS, "sd15", (RESOLUTION["sd"], False))
    row = step_cost.measure("sd15", f"attack:{name}", 2)
    assert row["method"] == f"attack:{name}" and row["peak_rss_bytes"] > 0
    assert 0 < row["seconds_per_step"] < 60, row
    if get_attack(name).step.sampling:
        assert set(row["by_pipeline"]) == {"int8"} and row["baseline_seconds"] > 0, row
    else:
        assert row["timed_steps"] == 2, row
