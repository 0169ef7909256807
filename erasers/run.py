"""The main job as library calls: erase a concept and save the edit; compare an edit with its base model."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .edits import apply_edits, base_fingerprint, check_new_output, read_edit, save_edit
from .errors import UsageError
from .files import check_output_path, peak_memory_bytes, reset_peak_memory, resumable_work_dir
from .models import load_pipeline, resolve_device, resolve_source
from .precision import TrainingOptions, check_precision, default_precision
from .prompts import make_request
from .registry import build_config, get_method


def erase(model: str, method: str, concepts: list[str], out: str | Path, anchors: list[str] | None = None,
          preserve: list[str] | None = None, options: dict | None = None, device: str | None = None,
          precision: str | None = None, gradient_checkpointing: bool = False, optimizer: str = "adam",
          resolution: int | None = None, restart: bool = False) -> Path:
    """Erase `concepts` from `model` with `method` and save the edit to `out` (resuming an interrupted run of the
    same command from `out`.partial, unless `restart`). `precision` (fp32, fp16, bf16; default bf16 on a CUDA GPU
    that supports it, fp32 on CPU), `gradient_checkpointing` and `optimizer` (adam, adam8bit) are
    erasers.precision's options; `resolution` is the training resolution in pixels (default: the model's native
    one)."""
    out = Path(out)
    build_config(method, False, options)  # fail on a bad method or option before a slow model load
    check_new_output(out)
    check_output_path(out)
    device = resolve_device(device)
    training = TrainingOptions(precision or default_precision(device), gradient_checkpointing, optimizer)
    check_precision(training.precision, device)
    if resolution is not None and (resolution < 16 or resolution % 16):
        raise UsageError(f"--resolution {resolution} must be a multiple of 16 (pixels), at least 16")
    loaded = load_pipeline(model, device=device, dtype=training.dtype)
    loaded.training, loaded.resolution = training, resolution
    config = build_config(method, loaded.is_toy, options)
    request = make_request(concepts, loaded.tokenizer, loaded.is_toy, anchors, preserve)
    eraser = get_method(method).eraser(config)
    eraser.check(loaded, request)
    fingerprint = base_fingerprint(loaded)
    work_dir = resumable_work_dir(out, run_signature(method, config, request, fingerprint, training, resolution),
                                  restart)
    reset_peak_memory(loaded.device)
    started = time.time()
    with loaded.autocast():
        components = eraser.erase(loaded, request, work_dir)
    seconds = time.time() - started
    saved = save_edit(out, components, loaded, method, config, request, fingerprint, seconds,
                      peak_memory_bytes(loaded.device))
    shutil.rmtree(work_dir, ignore_errors=True)
    return saved


def run_signature(method: str, config, request, fingerprint: str, training: TrainingOptions | None = None,
                  resolution: int | None = None) -> dict:
    """What makes two erase runs the same run: an interrupted one resumes only from its own checkpoints."""
    return {"method": method, "config": asdict(config), "request": asdict(request), "base": fingerprint,
            "training": asdict(training or TrainingOptions()), "resolution": resolution}


def compare(model: str, edits: list[str], out: str | Path, seeds: tuple[int, ...] = (188,),
            device: str | None = None, progress: bool = True) -> dict:
    """Before/after grid and UA/IRA/CRA table of `edits` (stacked) against `model`, same prompts and seeds.
    The table needs a classifier, which exists for the toy model."""
    from benchmarks.figures import labelled_grid
    from benchmarks.toycanvas import CLASSIFIER_DIR
    from benchmarks.toycanvas.classifier import ToyClassifier
    from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score

    if not (Path(resolve_source(model)) / "toycanvas.json").exists():
        raise UsageError("compare scores edits with the ToyCanvas classifier, so it runs on --model toy; for other "
                         "models use `erasure generate` with and without --text-encoder/--unet")
    if not edits:
        raise UsageError("pass at least one --edit directory")
    metadata = [read_edit(path) for path in edits]
    kinds = {m["kind"] for m in metadata}
    kind = "object" if kinds <= {"object", "unsafe"} else "style" if kinds == {"style"} else None
    if kind is None:
        raise UsageError("stacked edits must erase concepts of one kind (objects or styles) to be scored together")
    erased = [c for m in metadata for c in m["concepts"]]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; compare writes a directory (compare.png, metrics.*): pass a new "
                         "or existing directory")
    check_output_path(out)
    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    answers = AnswerSet(seeds=tuple(seeds))
    base = load_pipeline(model, device=device)
    base_records, base_images = classify_answer_set(base, classifier, answers, progress)
    edited = load_pipeline(model, device=device)
    apply_edits(edited, edits)
    edited_records, edited_images = classify_answer_set(edited, classifier, answers, progress)
    out.mkdir(parents=True, exist_ok=True)
    table = {"base": score(base_records, erased, kind), "edited": score(edited_records, erased, kind),
             "erased": erased, "kind": kind, "edits": [str(e) for e in edits], "seeds": list(seeds),
             "images_per_model": len(base_records)}

    # The grid: the erased concepts' prompts, then as many unrelated ones; base above, edit below.
    items = answers.items()
    shown = answers.shown(erased, kind)
    labels = [f"{items[i][0]}/{items[i][1]}" for i in shown]
    grid = labelled_grid([base_images[i] for i in shown] + [edited_images[i] for i in shown], len(shown),
                         ["base", "edited"], labels, scale=3)
    grid.save(out / "compare.png")
    (out / "metrics.json").write_text(json.dumps(table, indent=2))
    (out / "metrics.md").write_text(metrics_markdown(table))
    return table


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def metrics_markdown(table: dict) -> str:
    lines = [f"Erased {table['kind']}: {', '.join(table['erased'])} ({table['images_per_model']} images per model, "
             f"seeds {table['seeds']})", "", "| model | UA | IRA | CRA | object acc | style acc |",
             "|---|---|---|---|---|---|"]
    for name in ("base", "edited"):
        row = table[name]
        lines.append(f"| {name} | {_pct(row['UA'])} | {_pct(row['IRA'])} | {_pct(row['CRA'])} | "
                     f"{_pct(row['accuracy']['object'])} | {_pct(row['accuracy']['style'])} |")
    return "\n".join(lines) + "\n"
