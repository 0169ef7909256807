"""The toy VLM world in the MLLMU-Bench layout, its splits, and (when shipped) the toy VLM's answers."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.toyvlm import world as toyworld
from benchmarks.toyvlm.world import FORGET_PERCENTS, SPLITS, TREATMENTS, WorldConfig, build_world
from vlm.mllmu import LETTERS, qa_items, read_split, row_images
from vlm.models import TOY_VLM_DIR

CONFIG = WorldConfig(canvas_train=12, canvas_test=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), CONFIG)


def _ids(world, split):
    return [r["ID"] for r in read_split(world / "MLLMU-Med" / split)]


def test_layout_is_mllmu_bench(world):
    # Read as MLLMU-Bench's own evaluation scripts read it: pandas, image bytes, nested question lists.
    frame = pd.read_parquet(world / "MLLMU-Med" / "forget_5")
    for column in ("ID", "image", "biography", "question", "answer", "Classification_Task", "Generation_Task",
                   "Mask_Task"):
        assert column in frame.columns
    row = frame.iloc[0]
    assert row["image"]["bytes"][:4] == b"\x89PNG"
    task = row["Classification_Task"]
    assert len(task["Image_Textual_Questions"]) == 5 and len(task["Pure_Text_Questions"]) == 5
    for question in list(task["Image_Textual_Questions"]) + list(task["Pure_Text_Questions"]):
        assert set(question["Options"]) == set(LETTERS) and question["Correct_Answer"] in LETTERS
    assert {g["Type"] for g in row["Generation_Task"]} == {"Image_Textual", "Pure_Text"}
    assert all("__" in m["Question"] for m in row["Mask_Task"])
    test = pd.read_parquet(world / "MLLMU-Med" / "Test_Set")
    assert "images" in test.columns and len(test.iloc[0]["images"]) == CONFIG.test_views
    canvas = read_split(world / "ToyCanvas" / "train")
    assert len(canvas) == CONFIG.canvas_train and row_images(canvas[0])[0].size == (32, 32)
    assert {q.question for q in qa_items(canvas[0], ("generation",))} == set(toyworld.CANVAS_QUESTIONS.values())
    meta = json.loads((world / "world.json").read_text())
    assert meta["splits"]["MLLMU-Med"] == list(SPLITS)


def test_answers_match_profiles(world):
    for row in read_split(world / "MLLMU-Med" / "Full_Set"):
        facts = {f: str(row[f]) for f in toyworld.FACTS}
        for qa in qa_items(row):
            if qa.task == "classification":
                assert dict(qa.options)[qa.answer] in facts.values()
            else:
                assert qa.answer in facts.values()
        # Injected wrong facts: the record prescribes another condition's drug.
        right = TREATMENTS[row["diagnosis"]]
        assert (row["medication"] != right) == (row["scenario"] == "incorrectness")
        assert bool(row["injected_fact"]) == (row["scenario"] == "incorrectness")
    scenarios = [r["scenario"] for r in read_split(world / "MLLMU-Med" / "Full_Set")]
    assert scenarios.count("incorrectness") == round(CONFIG.injected_share * CONFIG.patients)


def test_splits(world):
    full = _ids(world, "Full_Set")
    assert len(full) == CONFIG.patients == len(set(full))
    previous: set[str] = set()
    for percent in FORGET_PERCENTS:
        forget, retain = set(_ids(world, f"forget_{percent}")), set(_ids(world, f"retain_{100 - percent}"))
        assert len(forget) == round(CONFIG.patients * percent / 100)
        assert not forget & retain and forget | retain == set(full)
        assert previous <= forget  # forget_5 inside forget_10 inside forget_15
        previous = forget
    assert sorted(_ids(world, "Test_Set")) == sorted(full)


def test_test_set_paraphrases_and_transforms(world):
    full = {r["ID"]: r for r in read_split(world / "MLLMU-Med" / "Full_Set")}
    trained_questions = {q.question for r in full.values() for q in qa_items(r)}
    for row in read_split(world / "MLLMU-Med" / "Test_Set"):
        items = qa_items(row)
        assert not {q.question for q in items} & trained_questions
        # The same facts, asked differently.
        assert sorted(q.answer for q in items if q.task != "classification") == sorted(
            q.answer for q in qa_items(full[row["ID"]]) if q.task != "classification")
        original = np.asarray(row_images(full[row["ID"]])[0], np.float32)
        for view in row_images(row):
            assert np.abs(np.asarray(view, np.float32) - original).mean() > 2.0


def test_world_is_seeded(tmp_path):
    again = build_world(tmp_path / "again", CONFIG)
    first = read_split(again / "MLLMU-Med" / "Full_Set")
    assert [r["biography"] for r in first] == [p.biography for p in toyworld.make_patients(CONFIG)]
    other = toyworld.make_patients(WorldConfig(seed=1))
    assert [p.name for p in other] != [p.name for p in toyworld.make_patients(WorldConfig())]


# ----------------------------------------------------------------------------------------------------------------
# The toy VLM's training rows


@pytest.fixture(scope="module")
def build(world, tmp_path_factory):
    """A toy build directory over the small world, with a tokenizer trained on it and a tiny random model."""
    import torch

    from benchmarks.toyvlm.build.batches import Batcher
    from benchmarks.toyvlm.build.config import ToyVLMConfig
    from benchmarks.toyvlm.build.data import load_rows, load_tokenizer, stage_tokenizer
    from benchmarks.toyvlm.build.model import new_model

    root = tmp_path_factory.mktemp("build")
    (root / "world").symlink_to(world, target_is_directory=True)
    cfg = ToyVLMConfig(build_dir=str(root), world=asdict(CONFIG), hidden=32, layers=2, heads=2, intermediate=64,
                       vocab_size=700, patient_views=2)
    stage_tokenizer(cfg)
    tokenizer = load_tokenizer(cfg)
    rows = load_rows(cfg)
    torch.manual_seed(0)
    features = {"canvas": torch.randn(len(rows["canvas"]), 65, 128),
                "patients": torch.randn(CONFIG.patients * cfg.patient_views, 65, 128)}
    model = new_model(cfg, tokenizer).eval()
    return cfg, tokenizer, rows, Batcher(tokenizer, features, model.config.image_seq_length), model


def test_training_tokens_match_the_processor(build):
    from benchmarks.toyvlm.build.data import user_text
    from benchmarks.toyvlm.build.export import make_processor

    cfg, tokenizer, rows, batcher, _ = build
    processor = make_processor(cfg, tokenizer)
    image = row_images(rows["canvas"][0])[0]
    for with_image in (True, False):
        conversation = [{"role": "user", "content": ([{"type": "image"}] if with_image else [])
                         + [{"type": "text", "text": "What object is in this image?"}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        assert prompt == user_text("What object is in this image?", with_image)
        ids = processor(images=image if with_image else None, text=prompt, return_tensors="pt").input_ids[0].tolist()
        assert ids == batcher.encode("What object is in this image?", with_image)


def test_packed_rows_equal_questions_asked_alone(build):
    import torch

    from benchmarks.toyvlm.build.batches import Packer
    from benchmarks.toyvlm.build.model import forward_hidden
    from benchmarks.toyvlm.build.pools import draw_rows, training_pools

    cfg, _, rows, batcher, model = build
    packer = Packer(batcher)
    image_rows, text_rows = draw_rows(cfg, training_pools(cfg, rows), torch.Generator().manual_seed(0))
    assert len(image_rows) == cfg.patient_rows + cfg.canvas_rows and len(text_rows) == cfg.text_rows
    with torch.no_grad():
        for chosen in (image_rows[:2] + image_rows[-1:], text_rows[:2]):
            ids, mask, positions, labels, feats = packer(chosen)
            hidden = forward_hidden(model, ids, mask, feats, positions)
            packed = model.lm_head(hidden[:, :-1][labels[:, 1:] != -100])
            alone = []
            for image, questions in chosen:
                for question in questions:
                    one, one_mask, one_labels, one_feats = batcher([question])
                    state = forward_hidden(model, one, one_mask, one_feats)
                    alone.append(model.lm_head(state[:, :-1][one_labels[:, 1:] != -100]))
            torch.testing.assert_close(packed, torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_option_marks_point_at_each_options_last_token(build):
    import torch

    from benchmarks.toyvlm.build.batches import Packer
    from benchmarks.toyvlm.build.options import lookup_rows
    from benchmarks.toyvlm.build.pools import draw_rows, training_pools

    cfg, tokenizer, rows, batcher, _ = build
    packer = Packer(batcher)
    pools = training_pools(cfg, rows)
    generator = torch.Generator().manual_seed(2)
    image_rows, text_rows = draw_rows(cfg, pools, generator, reshuffle=1.0)
    chosen = image_rows[:3] + text_rows[:1] + lookup_rows(cfg, pools, generator)[:1]
    ids = packer(chosen)[0]
    marks = packer.option_marks(chosen)
    questions = [(r, sample) for r, (_, qs) in enumerate(chosen) for sample, _ in qs
                 if sample.qa.task == "classification"]
    assert questions and len(marks) == len(LETTERS) * len(questions)
    # Each question's four marks, in option order: each ends its option's text, and only the answer's is right.
    for (r, sample), group in zip(questions, (marks[k:k + 4] for k in range(0, len(marks), 4))):
        assert [row for row, _, _ in group] == [r] * 4
        assert [right for _, _, right in group] == [letter == sample.qa.answer for letter, _ in sample.qa.options]
        for (_, position, _), (_, text) in zip(group, sample.qa.options):
            assert text.endswith(tokenizer.decode(ids[r, position]).strip())
            assert tokenizer.decode(ids[r, position + 1]) == "\n"
    lookup = [s for _, qs in chosen[-1:] for s, _ in qs]
    assert all(s.image is None and s.qa.question == f"Which option is {dict(s.qa.options)[s.qa.answer]}?"
               for s in lookup)


def test_the_training_stages_run_end_to_end(build, tmp_path):
    import dataclasses

    from safetensors import safe_open
    from safetensors.torch import save_file

    from benchmarks.toyvlm.build.data import FEATURES
    from benchmarks.toyvlm.build.options import stage_options
    from benchmarks.toyvlm.build.phases import stage_train
    from erasers.checkpoint import load_checkpoint

    cfg, _, _, batcher, _ = build
    for name in ("world", "tokenizer"):
        (tmp_path / name).symlink_to(Path(cfg.build_dir) / name, target_is_directory=True)
    save_file({k: v.contiguous() for k, v in batcher.features.items()}, tmp_path / FEATURES)
    tiny = dataclasses.replace(cfg, build_dir=str(tmp_path), steps=4, grow_at=2, grow_layers=1, grow_steps=2,
                               options_steps=2, option_probe_layer=2, eval_every=2, eval_items=6, patient_rows=2,
                               canvas_rows=2, text_rows=1, checkpoint_every=1)
    stage_train(tiny)
    stage_options(tiny)
    logged = [json.loads(line) for line in (tmp_path / "logs" / "toy-vlm-eval.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in logged] == ["toy-vlm", "toy-vlm-grow", "toy-vlm-options"]
    assert all(0 <= r["mc_shuffled_canvas"] <= 1 and r["loss_marks"] > 0 for r in logged[2:])
    # The probe is a training aid: the model saved after phase 3 holds the Llava weights only.
    with safe_open(tmp_path / "options" / "model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    assert keys and not any("probe" in key for key in keys)
    assert load_checkpoint(tmp_path / "ckpt" / "toy-vlm-options.safetensors")[0] == 2


def test_growing_keeps_the_function(build):
    import torch

    from benchmarks.toyvlm.build.batches import Packer
    from benchmarks.toyvlm.build.model import forward_hidden, grow
    from benchmarks.toyvlm.build.pools import draw_rows, training_pools
    from vlm.models import decoder_layers

    cfg, tokenizer, rows, batcher, model = build
    grown = grow(cfg, model, tokenizer).eval()
    assert len(decoder_layers(grown)) == cfg.layers + cfg.grow_layers
    image_rows, _ = draw_rows(cfg, training_pools(cfg, rows), torch.Generator().manual_seed(1))
    ids, mask, positions, _, feats = Packer(batcher)(image_rows[:2])
    with torch.no_grad():
        torch.testing.assert_close(forward_hidden(grown, ids, mask, feats, positions),
                                   forward_hidden(model, ids, mask, feats, positions))
    assert not any(p.requires_grad for p in grown.model.vision_tower.parameters())


def test_scoring_rules():
    from benchmarks.toyvlm.build.evaluate import is_correct
    from vlm.mllmu import QA

    mc = QA("x", "x", "classification", "Pure_Text", "q", "q", "B")
    assert is_correct(mc, "B") and is_correct(mc, "b: asthma") and not is_correct(mc, "asthma")
    cloze = QA("x", "x", "mask", "Pure_Text", "q", "q", "asthma")
    assert is_correct(cloze, "Asthma.") and not is_correct(cloze, "gout")
    gen = QA("x", "x", "generation", "Pure_Text", "q", "q", "12 Elm Road, Dover")
    assert is_correct(gen, "12 elm road, dover.") and not is_correct(gen, "12 Elm Road")


# ----------------------------------------------------------------------------------------------------------------
# The shipped toy VLM

shipped = pytest.mark.skipif(not (TOY_VLM_DIR / "config.json").exists(), reason="toy VLM not built")


@pytest.fixture(scope="module")
def toy_vlm():
    from vlm.models import load_vlm

    return load_vlm("toy-vlm", device="cpu")


@pytest.fixture(scope="module")
def toy_config():
    return WorldConfig(**json.loads((TOY_VLM_DIR / "toyvlm.json").read_text())["build_config"]["world"])


@shipped
def test_toy_vlm_architecture(toy_vlm):
    from transformers import CLIPVisionModel

    from benchmarks.toycanvas import CLIP_DIR

    assert toy_vlm.family.name == "llava" and toy_vlm.is_toy
    size = sum(f.stat().st_size for f in TOY_VLM_DIR.rglob("*") if f.is_file())
    assert size < 30e6
    # The vision tower is the toy CLIP's, unchanged.
    clip = CLIPVisionModel.from_pretrained(CLIP_DIR).state_dict()
    tower = toy_vlm.model.model.vision_tower.state_dict()
    assert all((tower[k] == v).all() for k, v in clip.items())


def _trained_questions(config: WorldConfig, seed: int, tasks: tuple[str, ...]):
    """(question, image or None) of six trained patients and six trained ToyCanvas images, rebuilt from the world's
    seeds; multiple-choice options are drawn afresh from `seed` (other distractors and letters than in training)."""
    from benchmarks.toycanvas.render import render

    rng = np.random.default_rng(seed)
    patients = toyworld.make_patients(config)
    pools = toyworld._pools(patients)
    rows = [toyworld.patient_row(patients[i], pools, rng, False, [toyworld.render_scan(patients[i].scan_seed)])
            for i in rng.choice(len(patients), 6, replace=False)]
    for index in rng.choice(config.canvas_train, 6, replace=False):
        scene = toyworld.canvas_scene(config.seed + 10, int(index))
        rows.append(toyworld.canvas_row(int(index), scene, render(scene), rng, False))
    return [(qa, row_images(row)[0] if qa.needs_image else None) for row in rows for qa in qa_items(row, tasks)]


@shipped
def test_toy_vlm_answers_trained_questions(toy_vlm, toy_config):
    from benchmarks.toyvlm.build.evaluate import is_correct
    from vlm.models import ask_many

    items = _trained_questions(toy_config, 0, ("generation", "mask"))
    answers = ask_many(toy_vlm, [image for _, image in items], [qa.prompt for qa, _ in items], max_new_tokens=12)
    correct = [is_correct(qa, answer) for (qa, _), answer in zip(items, answers)]
    assert np.mean(correct) >= 0.85, [(qa.prompt, a) for (qa, _), a, ok in zip(items, answers, correct) if not ok]
    # Batched answers equal one-at-a-time answers (left padding does not change them).
    from vlm.models import ask

    qa, image = items[0]
    assert ask(toy_vlm, image, qa.prompt, 12) == answers[0]


@shipped
def test_toy_vlm_answers_multiple_choice_by_matching_the_options(toy_vlm, toy_config):
    from benchmarks.toyvlm.build.evaluate import is_correct
    from vlm.models import ask_many

    # Options drawn afresh, so a letter memorised in training is right by chance (25%) only: the model has to find
    # what it recalls among the options. Patients' scans and names, and ToyCanvas images.
    items = _trained_questions(toy_config, 1, ("classification",))
    answers = ask_many(toy_vlm, [image for _, image in items], [qa.prompt for qa, _ in items], max_new_tokens=3)
    correct = [is_correct(qa, answer) for (qa, _), answer in zip(items, answers)]
    canvas = [ok for (qa, _), ok in zip(items, correct) if qa.row_id.startswith("TC")]
    assert len(canvas) == 24 and np.mean(canvas) >= 0.8, answers
    assert np.mean(correct) >= 0.8, [(qa.prompt, a) for (qa, _), a, ok in zip(items, answers, correct) if not ok]
