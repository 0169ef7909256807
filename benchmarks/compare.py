"""`erasure compare`: an edit's before/after grid and its UA/IRA/CRA table on the ToyCanvas answer set."""

from __future__ import annotations

import json
from pathlib import Path

from erasers.chains import chain_name
from erasers.edits import apply_edits, read_edit
from erasers.errors import UsageError
from erasers.files import write_atomically
from erasers.images import check_drawn, save_image_atomically
from erasers.models import is_toy_model, load_pipeline
from erasers.outputs import claim_output_dir

from .card_results import record_compare
from .figures import labelled_grid
from .toycanvas import CLASSIFIER_DIR
from .toycanvas.classifier import ToyClassifier
from .unlearncanvas import AnswerSet, classify_answer_set, score

METRICS = "metrics.json"


def compare(model: str, edits: list[str], out: str | Path, seeds: tuple[int, ...] = (188,),
            device: str | None = None, progress: bool = True, allow_other_base: bool = False) -> dict:
    """Before/after grid and UA/IRA/CRA table of `edits` (stacked) against `model`, same prompts and seeds
    (`allow_other_base`: load edits made for another base model). The table needs a classifier, which exists for
    the toy model."""
    if not is_toy_model(model):
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
                         "directory, or a previous compare's to refresh it")
    claim_output_dir(out, METRICS, create=False)  # a folder compare did not make is refused before any work
    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    answers = AnswerSet(seeds=tuple(seeds))
    edited = load_pipeline(model, device=device)
    # First: an edit that cannot load, one made for another base, or a diverged one fails before any image is drawn.
    apply_edits(edited, edits, allow_other_base)
    base = load_pipeline(model, device=device)
    base_records, base_images = classify_answer_set(base, classifier, answers, progress)
    check_drawn(base_images, f"the base model {model}", edited=False)
    edited_records, edited_images = classify_answer_set(edited, classifier, answers, progress)
    check_drawn(edited_images, f"the edited model ({', '.join(map(str, edits))})")  # a failed edit: exit 2, no table
    claim_output_dir(out, METRICS)
    table = {"base": score(base_records, erased, kind), "edited": score(edited_records, erased, kind),
             "erased": erased, "kind": kind, "edits": [str(e) for e in edits], "seeds": list(seeds),
             # An edit made in sequence (erase --base-edit) by its methods in order: "esd-x then uce".
             "chains": {str(e): chain_name(m) for e, m in zip(edits, metadata) if m.get("parents")},
             "images_per_model": len(base_records)}

    # The grid: the erased concepts' prompts, then as many unrelated ones; base above, edit below.
    items = answers.items()
    shown = answers.shown(erased, kind)
    labels = [f"{items[i][0]}/{items[i][1]}" for i in shown]
    grid = labelled_grid([base_images[i] for i in shown] + [edited_images[i] for i in shown], len(shown),
                         ["base", "edited"], labels, scale=3)
    save_image_atomically(grid, out / "compare.png")
    write_atomically(out / "metrics.md", metrics_markdown(table))
    write_atomically(out / METRICS, json.dumps(table, indent=2))  # last: it marks a finished compare
    record_compare(table, out, edited)  # on each edit's model card (erasers.cards)
    return table


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def metrics_markdown(table: dict) -> str:
    lines = [f"Erased {table['kind']}: {', '.join(table['erased'])} ({table['images_per_model']} images per model, "
             f"seeds {table['seeds']})", "",
             *[f"{Path(edit).name} is a chain: {methods}\n" for edit, methods in table.get("chains", {}).items()],
             "| model | UA | IRA | CRA | object acc | style acc |",
             "|---|---|---|---|---|---|"]
    for name in ("base", "edited"):
        row = table[name]
        lines.append(f"| {name} | {_pct(row['UA'])} | {_pct(row['IRA'])} | {_pct(row['CRA'])} | "
                     f"{_pct(row['accuracy']['object'])} | {_pct(row['accuracy']['style'])} |")
    return "\n".join(lines) + "\n"
