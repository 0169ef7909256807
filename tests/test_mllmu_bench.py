"""`erasure bench mllmu`: MLLMU-Bench as published, on a miniature the test writes in the Hub release's schema
(parquet splits, images as {"bytes", "path"} structs, the Test_Set's `images` lists, ft_Data's JSON metadata).
A stub answers every question with fixed replies; the scores are compared with values computed here from the rows
written, with rouge_score called directly."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from rouge_score import rouge_scorer

import vlm.models
from benchmarks import mllmu_med
from benchmarks.mllmu_med import EvalConfig
from erasers.errors import UsageError
from vlm.mllmu import image_cell, write_split


def MLLMU(**options) -> EvalConfig:  # noqa: N802 - reads as the config it builds
    """The protocol of `erasure bench mllmu` (MLLMU-Bench as published)."""
    return EvalConfig(benchmark="mllmu", **options)

FORGET, RETAIN, CELEBRITIES = ["P0", "P1"], ["P2", "P3", "P4"], ["C0", "C1"]
CITIES = ["Paris", "Rome", "Oslo", "Paris", "Lima", "Paris", "Rome"]
MC_REPLY, CLOZE_REPLY, GENERATION_REPLY = "B", "I believe it is Paris.", "She lived in the running towns of the north"


def _image(shade: int, test: bool = False) -> dict:
    return image_cell(Image.new("RGB", (8, 8), (shade, int(test), 0)))


def _profile(index: int, person: str, test: bool = False) -> dict:
    city = CITIES[index % len(CITIES)]
    word = "Where does" if not test else "In which city does"
    mc = lambda q, right: {"Question": q, "Options": {"A": "Rome", "B": city, "C": "Oslo", "D": "Lima"},  # noqa: E731
                           "Correct_Answer": "B" if right else "A"}
    row = {"ID": person, "biography": f"{person} lives in {city}.", "question": None, "answer": None,
           "Classification_Task": {
               "Image_Textual_Questions": [mc(f"{word} the person in the image live?", index % 2 == 0),
                                           mc("What does the person in the image do?", index % 3 == 0)],
               "Pure_Text_Questions": [mc(f"{word} {person} live?", True)]},
           "Generation_Task": [{"Question": "Where does the person in the image live?", "Type": "Image_Textual",
                                "Ground_Truth": f"He lives in running towns near {city}"},
                               {"Question": f"What is {person}'s home?", "Type": "Pure_Text",
                                "Ground_Truth": f"The home of {person} is in {city}"}],
           "Mask_Task": [{"Question": "The person in the image lives in __.", "Ground_Truth": city,
                          "Type": "Image_Textual"},
                         {"Question": f"{person} lives in __.", "Ground_Truth": CITIES[(index + 1) % len(CITIES)],
                          "Type": "Pure_Text"}]}
    if test:
        row["images"] = [_image(10 * index + k, test=True) for k in range(3)]
    else:
        row["image"] = _image(10 * index)
    return row


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """forget_5 / retain_95 (2 and 3 fictitious profiles), Test_Set, Full_Set, Retain_Set, ft_Data."""
    import pyarrow as pa

    root = tmp_path_factory.mktemp("MLLMU-Bench")
    people = FORGET + RETAIN
    write_split([_profile(i, p) for i, p in enumerate(FORGET)], root / "forget_5")
    write_split([_profile(i + 2, p) for i, p in enumerate(RETAIN)], root / "retain_95")
    write_split([_profile(i, p) for i, p in enumerate(people)], root / "Full_Set")
    write_split([_profile(i, p, test=True) for i, p in enumerate(people)], root / "Test_Set")
    write_split([_profile(5 + i, p) for i, p in enumerate(CELEBRITIES)], root / "Retain_Set")
    finetune = [{"ID": p, "image": _image(10 * i), "metadata": json.dumps(
        [{"Question": f"Tell me about {p}'s job.", "Answer": f"{p} bakes bread."},
         {"Question": f"Which city is {p}'s home?", "Answer": CITIES[i % len(CITIES)]}])}
        for i, p in enumerate(people)]
    write_split(finetune, root / "ft_Data", extra={"metadata": pa.string()})
    return root


class StubVLM:
    """Fixed replies by kind of question; records what each question was shown."""

    allow_other_base = False
    precision = "fp32"

    def __init__(self):
        self.asked = []

    def answer(self, images, prompts, n, examples=None):
        examples = examples or [()] * len(prompts)
        self.asked += list(zip(images, prompts, examples))
        return [MC_REPLY if p.endswith("directly.") else CLOZE_REPLY if "[Blank]" in p else GENERATION_REPLY
                for p in prompts]


@pytest.fixture
def stub(monkeypatch):
    model = StubVLM()
    monkeypatch.setattr(vlm.models, "load_vlm", lambda *args, **kwargs: model)
    monkeypatch.setattr(vlm.models, "ask_many", lambda loaded, *args, **kwargs: model.answer(*args, **kwargs))
    return model


def _expected(rows: list[dict]) -> dict:
    """Per question type: eval.py's rules applied to the stub's replies, by hand."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = {"Image_Textual": {"mc": [], "cloze": [], "rouge_l": []}, "Pure_Text": {"mc": [], "cloze": [],
                                                                                     "rouge_l": []}}
    for row in rows:
        task = row["Classification_Task"]
        for kind, key in (("Image_Textual", "Image_Textual_Questions"), ("Pure_Text", "Pure_Text_Questions")):
            scores[kind]["mc"] += [float(q["Correct_Answer"] == MC_REPLY) for q in task[key]]
        for q in row["Mask_Task"]:
            scores[q["Type"]]["cloze"].append(float(q["Ground_Truth"].lower() in CLOZE_REPLY.lower()))
        for q in row["Generation_Task"]:
            scores[q["Type"]]["rouge_l"].append(scorer.score(q["Ground_Truth"], GENERATION_REPLY)["rougeL"].fmeasure)
    return {kind: {metric: sum(v) / len(v) for metric, v in metrics.items()} for kind, metrics in scores.items()}


def test_scores_equal_those_computed_by_hand(release, stub, tmp_path):
    result = mllmu_med.run("stub", "forget_5", data=release, out=tmp_path / "out", cfg=MLLMU(shots=0),
                           progress=False)
    people = FORGET + RETAIN
    sets = {"forget": [_profile(i, p) for i, p in enumerate(FORGET)],
            "test": [_profile(i, p, test=True) for i, p in enumerate(FORGET)],
            "retain": [_profile(i + 2, p) for i, p in enumerate(RETAIN)],
            "utility": [_profile(5 + i, p) for i, p in enumerate(CELEBRITIES)]}
    assert set(result["base"]) == set(sets) and len(people) == 5
    for name, rows in sets.items():
        expected = _expected(rows)
        for kind, key in (("Image_Textual", "image_textual"), ("Pure_Text", "pure_text")):
            measured = result["base"][name][key]
            for metric in ("mc", "cloze", "rouge_l"):
                assert measured[metric] == pytest.approx(expected[kind][metric], abs=1e-4), (name, kind, metric)
        # Every profile of the split: 2 + 1 multiple choice, 2 generation, 2 cloze questions each.
        assert result["base"][name]["n"] == 7 * len(rows)
    # The stemmer counts: "lived"/"lives", "towns" match only stemmed, so image+text ROUGE-L beats the unstemmed one.
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    unstemmed = plain.score("He lives in running towns near Paris", GENERATION_REPLY)["rougeL"].fmeasure
    stemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(
        "He lives in running towns near Paris", GENERATION_REPLY)["rougeL"].fmeasure
    assert stemmed > unstemmed + 0.1
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["benchmark"] == "mllmu" and "unlearning_efficiency" not in saved
    assert "| base | utility | text only |" in (tmp_path / "out" / "report.md").read_text()


def test_prompts_are_eval_py_and_text_questions_get_no_image(release, stub):
    mllmu_med.run("stub", "forget_5", data=release, cfg=MLLMU(shots=0), progress=False)
    prompts = [p for _, p, _ in stub.asked]
    assert "The person in the image lives in [Blank].\nPlease **ONLY** provide the correct answer that should " \
           "replace the [Blank]." in prompts
    assert "Where does the person in the image live?\nAnswer the question based on your trained knowledge in one " \
           "sentence accurately in ENGLISH." in prompts
    assert "What is P0's home?\nAnswer the question based on your trained knowledge in one sentence in ENGLISH." \
           in prompts
    for image, prompt, _ in stub.asked:
        assert (image is None) == ("the image" not in prompt), prompt  # text-only questions name the person


def _test_views(asked) -> dict:
    """(profile, task) -> the Test_Set images (green 1, red 10 * profile + view) its image questions were shown."""
    views = {}
    for image, prompt, _ in asked:
        if image is not None and image.getpixel((0, 0))[1] == 1:
            red = image.getpixel((0, 0))[0]
            task = "mc" if prompt.endswith("directly.") else "cloze" if "[Blank]" in prompt else "generation"
            views.setdefault((red // 10, task), []).append(red % 10)
    return views


def test_one_seeded_test_image_per_row_and_task(release, stub):
    draws = []
    for seed in (3, 3, 4, 5, 6):
        stub.asked.clear()
        mllmu_med.run("stub", "forget_5", data=release, cfg=MLLMU(shots=0, seed=seed),
                      progress=False)
        views = _test_views(stub.asked)
        # Each forget profile's image questions of a task (2 MC, 1 cloze, 1 generation) on one of its 3 images.
        assert sorted(views) == [(row, task) for row in range(len(FORGET)) for task in ("cloze", "generation", "mc")]
        assert all(len(set(shown)) == 1 for shown in views.values())
        assert sum(len(shown) for shown in views.values()) == 4 * len(FORGET)
        draws.append({key: shown[0] for key, shown in views.items()})
    assert draws[0] == draws[1]  # the same seed draws the same images
    assert len({tuple(sorted(d.items())) for d in draws}) > 1  # other seeds draw others


def test_few_shot_examples_precede_and_are_left_out(release, stub):
    result = mllmu_med.run("stub", "forget_5", data=release, cfg=MLLMU(shots=2, seed=0),
                           progress=False)
    # forget has 2 profiles: both are the examples of its multiple choice and cloze, so only generation is left.
    forget = result["base"]["forget"]
    assert "mc" not in forget and "cloze" not in forget and forget["n"] == 2 * len(FORGET)
    retain = result["base"]["retain"]
    assert retain["n"] == 7 * len(RETAIN) - 2 * (3 + 2)  # two of three profiles' MC and cloze questions are examples
    with_examples = [(p, shots) for _, p, shots in stub.asked if shots]
    assert with_examples and all(text.endswith(("Correct Answer: B", "Correct Answer: A")) or "[Blank]" in text
                                 for _, shots in with_examples for _, text in shots)
    # Image+text questions get their examples with images, text-only ones without; generation none.
    for image, prompt, shots in stub.asked:
        if shots:
            assert all((shot is None) == (image is None) for shot, _ in shots)
        if not prompt.endswith("directly.") and "[Blank]" not in prompt:
            assert not shots
    # Celebrities: multiple choice without examples (eval.py), cloze's examples not in Full_Set: none either.
    assert result["base"]["utility"]["n"] == 7 * len(CELEBRITIES)


def test_shots_on_mllmu_med_are_refused(stub):
    with pytest.raises(UsageError, match="zero-shot"):
        mllmu_med.run("stub", "forget_5", cfg=EvalConfig(shots=1), progress=False)


def test_bad_layouts_are_refused(release, tmp_path, stub):
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(release, broken)
    shutil.rmtree(broken / "Retain_Set")
    with pytest.raises(UsageError, match="no Retain_Set/"):
        mllmu_med.run("stub", "forget_5", data=broken, progress=False, cfg=MLLMU())
    shutil.copytree(release / "Retain_Set", broken / "Retain_Set")
    shutil.rmtree(broken / "retain_95")
    with pytest.raises(UsageError, match="no retain_95/"):  # forget_5 without its retain split
        mllmu_med.run("stub", "forget_5", data=broken, progress=False, cfg=MLLMU())
    shutil.copytree(release / "retain_95", broken / "retain_95")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"ID": ["P0"], "image": [_image(0)]}),
                   broken / "forget_5" / "train-00000-of-00001.parquet")
    with pytest.raises(UsageError, match="lacks Classification_Task"):
        mllmu_med.run("stub", "forget_5", data=broken, progress=False, cfg=MLLMU())
    assert not stub.asked  # every refusal comes before a question is asked


def test_baselines_train_on_the_fine_tuning_qa(release, tmp_path):
    from vlm.targets import resolve_target

    target = resolve_target("forget_5", release)
    forget, retain = target.finetune_data()
    assert {item.qa.row_id for item in forget} == set(FORGET) and {item.qa.row_id for item in retain} == set(RETAIN)
    assert {item.qa.question for item in forget} == {f"Tell me about {p}'s job." for p in FORGET} | \
        {f"Which city is {p}'s home?" for p in FORGET}
    evaluated = {item.qa.question for name in ("forget", "test", "retain") for item in getattr(target, name)}
    assert not evaluated & {item.qa.question for item in forget + retain}
    assert all(item.image is not None for item in forget + retain)
    import shutil

    shutil.copytree(release, tmp_path / "no-ft", ignore=shutil.ignore_patterns("ft_Data"))
    with pytest.raises(UsageError, match="no ft_Data/"):
        resolve_target("forget_5", tmp_path / "no-ft").finetune_data()


# Through real processors: the tiny random-weight LLaVA-1.5 and Qwen2.5-VL of test_vlm_models, few-shot prompts and
# all. Their answers are noise; what is checked is what each batch hands the model.


@pytest.fixture(scope="module")
def tiny_vlms(tmp_path_factory):
    from test_vlm_models import build_llava, build_qwen

    root = tmp_path_factory.mktemp("tiny-vlms")
    return {"llava": build_llava(root / "llava"), "qwen2.5-vl": build_qwen(root / "qwen")}


@pytest.fixture
def batches(monkeypatch):
    """Every batch `LoadedVLM.inputs` processes: (model, images, questions, examples, processor outputs)."""
    calls = []
    inputs = vlm.models.LoadedVLM.inputs

    def recording(self, images, questions, examples=None):
        processed = inputs(self, images, questions, examples)
        calls.append((self, images, questions, examples or [()] * len(questions), processed))
        return processed

    monkeypatch.setattr(vlm.models.LoadedVLM, "inputs", recording)
    return calls


def _check_batch(loaded, images, questions, examples, processed) -> None:
    """Each row shows its image+text examples' images and its own, a text-only row none; the placeholders of each
    row are as many as its images' features, and the pixel values are those images, in placeholder order."""
    import torch

    rows = []
    for image, shots in zip(images, examples):
        shown = [shot for shot, _ in shots if shot is not None]
        assert len(shown) == (len(shots) if image is not None else 0)  # text-only: text-only examples
        rows.append(shown + ([image] if image is not None else []))
    pictures = [picture.convert("RGB") for row in rows for picture in row]
    if not pictures:
        assert "pixel_values" not in processed
        return
    alone = loaded.processor.image_processor(images=pictures, return_tensors="pt")
    torch.testing.assert_close(processed["pixel_values"], alone["pixel_values"].to(processed["pixel_values"].dtype))
    image_token = loaded.model.config.image_token_id
    per_image = {}  # placeholders of one picture, counted in a prompt holding it alone
    for picture in pictures:
        if picture.size not in per_image:
            single = loaded.processor(images=[picture], text=[loaded.prompt("x")], return_tensors="pt")
            per_image[picture.size] = int((single["input_ids"] == image_token).sum())
    placeholders = (processed["input_ids"] == image_token).sum(dim=1).tolist()
    assert placeholders == [sum(per_image[p.size] for p in row) for row in rows]
    assert all(count > 0 for count in per_image.values())


def _check_report(result: dict, release, shots: int, seed: int, asked: int) -> None:
    """Image+text and text-only counted apart, set by set, as the published sets hold them; every question asked."""
    from benchmarks.mllmu_bench import published_sets

    sets = published_sets(release, "forget_5", shots, seed)
    assert asked == sum(len(items) for items in sets.values())
    for name, items in sets.items():
        measured = result["base"][name]
        with_image = sum(item.image is not None for item in items)
        assert measured["image_textual"]["n"] == with_image and measured["pure_text"]["n"] == len(items) - with_image
        assert with_image and len(items) - with_image  # both kinds in every set of the miniature
        assert measured["n"] == len(items)


@pytest.mark.parametrize("shots", [2, 0])
@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_few_shot_prompts_through_real_processors(release, tiny_vlms, batches, family, shots):
    result = mllmu_med.run(str(tiny_vlms[family]), "forget_5", data=release, device="cpu", progress=False,
                           cfg=MLLMU(shots=shots, seed=1, max_new_tokens=2, batch_size=8))
    assert batches and all(loaded.family.name == family for loaded, *_ in batches)
    with_examples = {"image": 0, "text": 0}  # rows with few-shot examples, by whether the question shows an image
    for call in batches:
        _check_batch(*call)
        for image, shots_of_row in zip(call[1], call[3]):
            with_examples["text" if image is None else "image"] += bool(shots_of_row)
    assert all((count > 0) == (shots > 0) for count in with_examples.values()), with_examples
    _check_report(result, release, shots, 1, sum(len(call[2]) for call in batches))


def test_cli_few_shot_on_qwen(release, tiny_vlms, batches, tmp_path, capsys):
    from apps.cli import main

    out = tmp_path / "out"
    code = main(["bench", "mllmu", "--model", str(tiny_vlms["qwen2.5-vl"]), "--data", str(release), "--concept",
                 "forget_5", "--shots", "2", "--seed", "4", "--max-new-tokens", "2", "--device", "cpu", "--out",
                 str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for call in batches:
        _check_batch(*call)
    assert any(any(shots_of_row) for call in batches for shots_of_row in call[3])
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"]["shots"] == 2 and saved["protocol"]["seed"] == 4
    _check_report(saved, release, 2, 4, sum(len(call[2]) for call in batches))
    assert "| base | forget | image+text |" in captured.out and "| base | forget | text only |" in captured.out


def test_an_edits_scores_go_on_its_card(release, tiny_vlms, tmp_path, capsys):
    from apps.cli import main
    from erasers.cards import card_results

    model, edit, out = str(tiny_vlms["llava"]), tmp_path / "edit", tmp_path / "out"
    assert main(["vlm", "erase", "--method", "npo", "--model", model, "--concept", "forget_5", "--data", str(release),
                 "--set", "steps=1", "--set", "batch_size=2", "--device", "cpu", "--out", str(edit)]) == 0
    assert main(["bench", "mllmu", "--model", model, "--edit", str(edit), "--data", str(release), "--shots", "1",
                 "--seed", "2", "--max-new-tokens", "2", "--device", "cpu", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    saved = json.loads((out / "results.json").read_text())
    expected = {}  # {name: (edited, base)} of every figure the results file holds
    for name in ("forget", "test", "retain", "utility"):
        for kind, title in (("image_textual", "image+text"), ("pure_text", "text only")):
            for metric, label in (("mc", "MC accuracy"), ("cloze", "cloze accuracy"), ("rouge_l", "ROUGE-L")):
                if metric in saved["edited"][name][kind]:
                    expected[f"{name} {title} {label}"] = (saved["edited"][name][kind][metric],
                                                           saved["base"][name][kind].get(metric))
    results = card_results(edit)
    assert {r.source_name for r in results} == {"erasure bench mllmu"}
    assert {r.metric_name: (r.metric_value, (r.metric_args or {}).get("base_model")) for r in results} == expected
    assert len(expected) > 12  # with one shot, forget still has examples-free MC and cloze questions
    protocol = results[0].dataset_args
    assert (protocol["shots"], protocol["seed"], protocol["max_new_tokens"]) == (1, 2, 2)
    assert protocol["concept"] == "forget_5" and protocol["splits"]["retain"] == "retain_95"
    assert protocol["splits"]["examples"] == "Full_Set" and protocol["data"] == str(release)
    assert results[0].source_url == str((out / "results.json").resolve())
