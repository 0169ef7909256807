"""The toy VLM on question wordings it was never trained on: the shipped model names the object in held-out open
wordings (a list kept here, read by no training code), the benchmark's held-out list is disjoint from every
training wording, and phase 4 (build stage `wordings`) resumes from its checkpoint."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from benchmarks.toyvlm import world as toyworld
from benchmarks.toyvlm.world import WorldConfig
from vlm.models import TOY_VLM_DIR

# Held out: no training code reads this file (checked below for the build's sources).
OBJECT_WORDINGS = (
    "What is drawn in this sketch?", "Which shape do you see here?", "Tell me the object shown in this illustration.",
    "What figure is depicted in this picture?", "Identify the object in this artwork.",
    "What shape has been drawn in this image?",
)
OBJECT_CLOZE = ("This sketch shows a __.", "The shape you see here is a __.", "The artwork depicts a __.",
                "What is drawn in this illustration is a __.")
BUILD_DIR = Path(__file__).parents[1] / "benchmarks" / "toyvlm" / "build"

shipped = pytest.mark.skipif(not (TOY_VLM_DIR / "config.json").exists(), reason="toy VLM not built")


def _names_the_object(answer: str, expected: str) -> bool:
    """The answer names the expected object and no other one."""
    from benchmarks.toycanvas.world import OBJECTS

    words = set(re.findall(r"[a-z]+", answer.lower()))
    named = {o for o in OBJECTS if o in words or {"crosses": "cross"}.get(o) in words or f"{o}s" in words}
    return named == {expected}


@shipped
def test_toy_vlm_names_the_object_in_held_out_wordings():
    from benchmarks.toycanvas.render import render
    from vlm.mllmu import cloze_prompt
    from vlm.models import ask_many, load_vlm

    config = WorldConfig(**json.loads((TOY_VLM_DIR / "toyvlm.json").read_text())["build_config"]["world"])
    loaded = load_vlm("toy-vlm", device="cpu")
    # One trained picture of each object; every held-out wording asked about each.
    rng = np.random.default_rng(5)
    scenes = [toyworld.canvas_scene(config.seed + 10, int(k)) for k in rng.permutation(config.canvas_train)[:40]]
    chosen = {s.object: s for s in scenes}
    assert len(chosen) == 10
    prompts = list(OBJECT_WORDINGS) + [cloze_prompt(q) for q in OBJECT_CLOZE]
    asked = [(scene, prompt) for scene in chosen.values() for prompt in prompts]
    answers = ask_many(loaded, [render(scene) for scene, _ in asked], [p for _, p in asked], max_new_tokens=12)
    right = [_names_the_object(answer, scene.object) for (scene, _), answer in zip(asked, answers)]
    assert np.mean(right) >= 0.8, [(p, s.object, a) for (s, p), a, ok in zip(asked, answers, right) if not ok]


def test_held_out_wordings_are_not_trained_on():
    from benchmarks.toyvlm.build.wordings import training_wordings
    from benchmarks.toyvlm.heldout import HELDOUT_WORDINGS

    trained = {w.lower() for wordings in training_wordings().values() for w in wordings}
    trained |= {w.lower() for table in (toyworld.CANVAS_QUESTIONS, toyworld.CANVAS_CLOZE, toyworld.IMAGE_QUESTIONS,
                                        toyworld.IMAGE_CLOZE, toyworld.TEXT_QUESTIONS, toyworld.TEXT_CLOZE)
                for w in table.values()}
    held = [w for wordings in HELDOUT_WORDINGS.values() for w in wordings] + list(OBJECT_WORDINGS + OBJECT_CLOZE)
    assert held and not [w for w in held if w.lower() in trained]
    # Nor are the test set's paraphrases (the MLLMU-Med and ToyCanvas test sets ask in them).
    from benchmarks.toyvlm.build.wordings import test_set_wordings

    assert not test_set_wordings() & {w.lower() for wordings in training_wordings().values() for w in wordings}
    # Every question type of the world has held-out wordings, open and cloze.
    assert {(scope, fact) for scope, fact, _ in HELDOUT_WORDINGS} == {(scope, fact) for scope, fact, _ in
                                                                      training_wordings()}
    # The build never imports the held-out lists, directly or through what it imports.
    for source in BUILD_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any("heldout" in name or "test_" in name for name in names), source
    loaded = subprocess.run([sys.executable, "-c", "import sys, benchmarks.toyvlm.build.__main__; "
                             "print(sorted(m for m in sys.modules if m.startswith(('benchmarks', 'tests'))))"],
                            capture_output=True, text=True, check=True, cwd=BUILD_DIR.parents[2]).stdout
    assert "benchmarks.toyvlm.build.wordings" in loaded and "heldout" not in loaded and "tests" not in loaded


def test_heldout_target_asks_the_same_facts_in_other_words(tmp_path):
    from benchmarks.toyvlm.heldout import heldout_target
    from vlm.targets import object_target, split_target

    root = toyworld.build_world(tmp_path, WorldConfig(patients=20, canvas_train=40, canvas_test=20))
    for target in (object_target("star", root, forget_rows=3, retain_rows=3, fit_rows=3),
                   split_target("forget_10", root / "MLLMU-Med", retain_rows=2, fit_rows=2)):
        held = heldout_target(target)
        for name in ("forget", "retain", "test"):
            before, after = getattr(target, name), getattr(held, name)
            assert len(after) == len(before) > 0
            for old, new in zip(before, after):
                assert new.qa.answer == old.qa.answer and new.qa.task == old.qa.task and new.image is old.image
                assert new.qa.question != old.qa.question and "{" not in new.prompt
        assert held.retain_fit == target.retain_fit


def test_wordings_stage_resumes(tmp_path, monkeypatch):
    """Phase 4 interrupted after its step-2 checkpoint continues from it and ends where an uninterrupted run ends."""
    import torch
    from safetensors.torch import load_file, save_file

    from benchmarks.toyvlm.build import wordings
    from benchmarks.toyvlm.build.config import ToyVLMConfig
    from benchmarks.toyvlm.build.data import FEATURES, load_rows, load_tokenizer, stage_tokenizer
    from benchmarks.toyvlm.build.model import new_model

    world = WorldConfig(patients=6, canvas_train=20, canvas_test=4, test_views=1)
    base = tmp_path / "base"
    toyworld.build_world(base / "world", world)
    cfg = ToyVLMConfig(build_dir=str(base), world=asdict(world), hidden=32, layers=2, heads=2, intermediate=64,
                       vocab_size=700, patient_views=2, wording_steps=4, eval_every=4, eval_items=4,
                       checkpoint_every=2, wording_old_rows=1, wording_canvas_rows=1, wording_patient_rows=1,
                       wording_text_rows=1, lookup_rows=1)
    stage_tokenizer(cfg)
    rows = load_rows(cfg)
    torch.manual_seed(0)
    save_file({"canvas": torch.randn(len(rows["canvas"]), 65, 128),
               "patients": torch.randn(world.patients * cfg.patient_views, 65, 128)}, base / FEATURES)
    new_model(cfg, load_tokenizer(cfg)).save_pretrained(base / "options")
    original, steps_run = wordings.wording_rows, []

    def counting(*args, crash_at=None):
        steps_run.append(1)
        if len(steps_run) == crash_at:
            raise RuntimeError("interrupted")
        return original(*args)

    def run(name: str, crash_at: int | None = None) -> dict:
        build = tmp_path / name
        build.mkdir(exist_ok=True)
        for part in ("world", "tokenizer", "options", FEATURES):
            if not (build / part).exists():
                (build / part).symlink_to(base / part)
        steps_run.clear()
        monkeypatch.setattr(wordings, "wording_rows", lambda *args: counting(*args, crash_at=crash_at))
        wordings.stage_wordings(dataclasses.replace(cfg, build_dir=str(build)))
        return load_file(build / "wordings" / "model.safetensors")

    # wording_rows is called once for the fixed evaluation set, then once a step.
    straight = run("straight")
    assert len(steps_run) == 1 + 4
    with pytest.raises(RuntimeError, match="interrupted"):
        run("resumed", crash_at=1 + 3)
    resumed = run("resumed")
    assert len(steps_run) == 1 + 2, "the run resumed from its step-2 checkpoint"
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "logs" / "toy-vlm-eval.jsonl").read_text()
              .splitlines()]
    assert [r["phase"] for r in logged] == ["toy-vlm-wordings"] and logged[0]["loss_wordings"] > 0
