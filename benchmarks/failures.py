"""Failed edits in the benchmarks (`bench toycanvas | unlearncanvas | i2p`): an edit that makes no usable images is a
row marked failed, with why, never a row of scores (a classifier reads a black image as the concept gone: UA 100%,
a detector as no nudity). Each failure is found as early as it can be:

    given_failures     a given --edit holding non-finite weights: before any image is drawn
    erase_or_record    a method that diverges inside the benchmark (save_edit refuses its NaN weights): recorded in
                       the manifest (stage "failed"), so a resumed run reports it without erasing again
    blank_failures     a set whose images are blank (non-finite or one flat colour): the runner records each
                       image's mark (erasers.images.drawn_images)

An edit made for another base model is not a failure but bad input: `check_bases` refuses it before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks.runner import ImageJob, Runner
from erasers.edits import check_base, nonfinite_weights, read_edit
from erasers.errors import FailedEdit
from erasers.images import blank_summary

FAILED = "failed"


def check_bases(loaded, paths: list[Path], allow_other_base: bool) -> None:
    """Each given edit is made for the base model `loaded` (erasers.edits.check_base), unless allowed."""
    for path in paths:
        check_base(loaded, read_edit(path), path, allow_other_base)


def given_failures(edits: list[tuple[str, Path]]) -> dict[str, str]:
    """{set name: why} for the given (name, edit directory) pairs whose weight files hold NaN or inf."""
    failed = {}
    for name, path in edits:
        found = nonfinite_weights(path, read_edit(path)["components"])
        if found is not None:
            failed[name] = f"non-finite weights (NaN or inf, first in {found[0]} {found[1]}): a failed erase"
    return failed


def erase_or_record(runner: Runner, name: str, erase: Callable[[], object]) -> bool:
    """Run `erase` and return True; a diverged erase (FailedEdit) is recorded as set `name`'s failure instead of
    ending the run, and False returned."""
    try:
        erase()
    except FailedEdit as error:
        reason = str(error)
        print(f"{name}: {reason}", flush=True)
        runner.once(FAILED, name, lambda: {"reason": reason})
        return False
    return True


def recorded_failures(runner: Runner) -> dict[str, str]:
    """{set name: why} of the erases recorded as failed in the manifest."""
    return {key[1]: record["reason"] for key, record in runner.manifest.read().items() if key[0] == FAILED}


def blank_failures(runner: Runner, names: list[str], jobs: list[ImageJob]) -> dict[str, str]:
    """{set name: "N of M images blank (...)"} for the sets among `names` whose drawn images include blank ones."""
    done = runner.manifest.read()
    failed = {}
    for name in names:
        summary = blank_summary([done.get(("image", name, job.key), {}).get("blank") for job in jobs])
        if summary is not None:
            failed[name] = summary
    return failed


def failed_row(name: str, edit, concepts: list[str], reason: str) -> dict:
    """results.json's row of a set that made no usable images (`edit` None: the base model's): every score None,
    `reason` in "failed", and the edit's cost and config when it was saved."""
    empty = {"UA": None, "IRA": None, "CRA": None}
    row = {"set": name, "method": edit.method if edit else "base", "failed": reason,
           "accuracy": {"object": None, "style": None}, "fid": None, "fid_features": None}
    if edit is None:
        return {**row, "per_concept": {concept: dict(empty) for concept in concepts}}
    meta = read_edit(edit.path) if (Path(edit.path) / "erasure.json").exists() else {}
    step = {"step": edit.step, "sequence": list(edit.sequence)} if edit.step else {}
    return {**row, "concepts": list(edit.concepts), "kind": edit.kind, "per_concept": {",".join(edit.concepts): empty},
            **{key: meta[key] for key in ("cost", "config") if key in meta}, **step}
