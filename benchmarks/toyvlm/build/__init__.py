"""The toy VLM's build: train it from scratch on CPU, resumably, and export it to vlm/weights/toy-vlm
(`erasure toy build-vlm`, or `python -m benchmarks.toyvlm.build`). Training only: nothing a user erases with
imports this.

The toy VLM is a `LlavaForConditionalGeneration`: the ToyCanvas toy CLIP's vision tower (frozen, as LLaVA keeps its
CLIP frozen), a two-layer MLP projector and a small Llama, with a byte-level BPE tokenizer trained here on the toy
world's text. Like MLLMU-Bench's "vanilla" model it is fine-tuned on everything: the ToyCanvas questions and every
MLLMU-Med patient (forget sets included), in generation, multiple-choice and cloze form.

Stages, each skipped when its output exists, each in its own file:
  world      the toy world in the MLLMU-Bench layout        -> BUILD/world                       data.py
  tokenizer  byte-level BPE on the world's prompts           -> BUILD/tokenizer                   data.py
  features   the frozen vision tower's features of every image (training views and test images)
                                                             -> BUILD/features.safetensors        data.py
  train      phases 1-2: projector + Llama, grown from 3 to 6 layers -> BUILD/trained              phases.py
  options    phase 3: multiple choice by matching the options -> BUILD/options                    options.py
  wordings   phase 4: open questions in many wordings, with phase 3's rows -> BUILD/wordings      wordings.py
  export     LlavaForConditionalGeneration + LlavaProcessor, fp16 safetensors -> vlm/weights/toy-vlm (atomic)
                                                                                                  export.py
  evaluate   accuracy of the exported model on trained and test questions -> vlm/weights/toy-vlm/quality.json
                                                                                                  evaluate.py
Shared by the training phases: config.py (ToyVLMConfig), model.py (the Llava, growing, the forward pass on cached
features), batches.py (questions into token batches), pools.py (what each step draws).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ToyVLMConfig
from .data import FEATURES, stage_features, stage_tokenizer, stage_world
from .evaluate import stage_evaluate
from .export import stage_export
from .options import stage_options
from .phases import stage_train
from .wordings import stage_wordings

STAGE_RUNNERS = {"world": stage_world, "tokenizer": stage_tokenizer, "features": stage_features, "train": stage_train,
                 "options": stage_options, "wordings": stage_wordings, "export": stage_export,
                 "evaluate": stage_evaluate}
STAGES = tuple(STAGE_RUNNERS)


def stage_outputs(cfg: ToyVLMConfig) -> dict[str, Path]:
    build, out = Path(cfg.build_dir), Path(cfg.out_dir)
    return {"world": build / "world" / "world.json", "tokenizer": build / "tokenizer" / "tokenizer.json",
            "features": build / FEATURES, "train": build / "trained" / "config.json",
            "options": build / "options" / "config.json", "wordings": build / "wordings" / "config.json",
            "export": out / "config.json", "evaluate": out / "quality.json"}


def seed_from_shipped(cfg: ToyVLMConfig) -> None:
    """Start a build directory from the shipped model instead of phases 1-3 (about 90 minutes on 2 cores): its
    tokenizer as BUILD/tokenizer and its weights, in fp32, as phase 3's output, so that `wordings` continues it."""
    import shutil

    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from erasers.files import writing_into
    from vlm.models import TOY_VLM_DIR

    build = Path(cfg.build_dir)
    if not (build / "tokenizer" / "tokenizer.json").exists():
        with writing_into(build / "tokenizer", replace=True) as tmp:  # a build stage: rebuilt in place
            AutoTokenizer.from_pretrained(TOY_VLM_DIR).save_pretrained(tmp)
    if not (build / "options" / "config.json").exists():
        model = LlavaForConditionalGeneration.from_pretrained(TOY_VLM_DIR, dtype=torch.float32)
        with writing_into(build / "options", replace=True) as tmp:
            model.save_pretrained(tmp)
        logs = build / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (TOY_VLM_DIR / "logs").glob("toy-vlm*.jsonl"):  # the earlier phases' curves travel on
            if not (logs / log.name).exists():
                shutil.copyfile(log, logs / log.name)


def run(cfg: ToyVLMConfig, stages: tuple[str, ...] = STAGES) -> None:
    """Run `stages` in order, skipping each whose output exists and is newer than the previous stage's (delete an
    output to redo its stage)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    outputs = stage_outputs(cfg)
    for name in stages:
        before = STAGES[STAGES.index(name) - 1] if name != STAGES[0] else None
        output = outputs[name]
        stale = before is not None and outputs[before].exists() and output.exists() and \
            outputs[before].stat().st_mtime > output.stat().st_mtime
        if output.exists() and not stale:
            print(f"{name}: done ({output})")
            continue
        STAGE_RUNNERS[name](cfg)


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.toyvlm.build [STAGE ...]`."""
    import argparse

    from erasers import inputs

    parser = argparse.ArgumentParser(description="Train the toy VLM from scratch on CPU, resumably, and export it to "
                                     "vlm/weights/toy-vlm.")
    parser.add_argument("stages", nargs="*", default=list(STAGES), help=f"stages to run (default: {' '.join(STAGES)})")
    parser.add_argument("--build-dir", default=ToyVLMConfig.build_dir)
    parser.add_argument("--out-dir", default=ToyVLMConfig.out_dir)
    parser.add_argument("--steps", type=inputs.POSITIVE, default=ToyVLMConfig.steps)
    parser.add_argument("--threads", type=inputs.POSITIVE)
    parser.add_argument("--from-shipped", action="store_true",
                        help="start from the shipped model (its tokenizer and weights as phase 3's output) to run the "
                        "later stages only, e.g. `wordings export evaluate`")
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    cfg = ToyVLMConfig(build_dir=args.build_dir, out_dir=args.out_dir, steps=args.steps, threads=args.threads)
    if args.from_shipped:
        seed_from_shipped(cfg)
    run(cfg, tuple(args.stages))
