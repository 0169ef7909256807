"""The one result layout every attack writes, and the per-item store a run resumes from.

    OUT/attack.json   {"attack", "model", "edits", "concept", "kind", "config", "judge", "n",
                       "pre_asr" and "asr" (or, for an attack that reports a curve, "curve": [{"steps", "rate"}]),
                       "items": [{"prompt" (or "step"), "seed", "success", "judge", "image", ...}, ...]}
    OUT/images/       each item's judged image (NNNN.png); for an attacked item also the edited model's image of
                      the plain prompt (NNNN-erased.png) and the base model's target when the attack drew one
                      (NNNN-original.png); item records name them by relative path
    OUT/attack.png    the first 10 items: original (when drawn) / erased / attacked

While it runs, a run works in the locked `OUT.partial/` (erasers.outputs.RunDirectory): each finished item is its
images plus `items/NNNN.json`, written atomically, so an interrupted run resumes at the next item. OUT is then
written whole under a temporary name and renamed (erasers.files.writing_into).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from erasers.errors import UsageError
from erasers.files import read_json, write_atomically, writing_into
from erasers.images import open_image, save_image_atomically

ROLES = ("original", "erased", "image")  # the grid's rows: the base model's target, the plain prompt, the attack
GRID_ITEMS = 10


@dataclass
class Outcome:
    """One item's result: its record (JSON) and its images by role ("image": the one judged; "erased", "original")."""

    record: dict
    images: dict[str, Image.Image] = field(default_factory=dict)


class ItemStore:
    """The finished items of a run: in `work_dir` (items/, images/) when the run writes results, else in memory."""

    def __init__(self, work_dir: Path | None):
        self.work_dir = work_dir
        self._records: dict[int, dict] = {}
        self._images: dict[str, Image.Image] = {}
        if work_dir is not None and (work_dir / "items").is_dir():
            for file in sorted((work_dir / "items").glob("*.json")):
                record = read_json(file, "pass --restart to start the attack from scratch")
                if not isinstance(record.get("index"), int):
                    raise UsageError(f"{file} is not an item record; pass --restart to start the attack from scratch")
                self._records[record["index"]] = record

    def finished(self) -> set[int]:
        return set(self._records)

    def save(self, index: int, outcome: Outcome) -> dict:
        """Keep one finished item (its images first, its record last: the record marks it finished)."""
        paths = {}
        for role, image in outcome.images.items():
            name = f"images/{index:04d}{'' if role == 'image' else '-' + role}.png"
            if self.work_dir is None:
                self._images[name] = image
            else:
                save_image_atomically(image, self.work_dir / name)
            paths[role] = name
        record = {"index": index, **outcome.record, "image": paths.get("image"),
                  **({"images": {r: p for r, p in paths.items() if r != "image"}} if len(paths) > 1 else {})}
        if self.work_dir is not None:
            write_atomically(self.work_dir / "items" / f"{index:04d}.json", json.dumps(record, indent=1))
        self._records[index] = record
        return record

    def records(self) -> list[dict]:
        return [self._records[index] for index in sorted(self._records)]

    def image(self, name: str) -> Image.Image:
        if self.work_dir is None:
            return self._images[name]
        return open_image(self.work_dir / name, "pass --restart to start the attack from scratch")


def asr_summary(records: list[dict]) -> dict:
    """Pre-ASR (the plain prompts that already bring the concept back) and ASR (those plus the attacks' successes)."""
    n = len(records)
    pre = sum(bool(r.get("pre_success")) for r in records)
    successes = sum(bool(r["success"]) for r in records)
    return {"n": n, "pre_successes": pre, "attack_successes": successes - pre, "pre_asr": pre / n,
            "asr": successes / n}


def summary_lines(summary: dict) -> list[str]:
    """What `erasure attack` prints: "arrow: Pre-ASR 0.0% (0/4), ASR 75.0% (3/4)", or a curve's points."""
    if "curve" in summary:
        return [f"{summary['concept']}: after {point['steps']} steps ASR {point['rate']:.1%}"
                for point in summary["curve"]]
    n = summary["n"]
    if "rate_quantized" in summary:  # the quantize attack: the concept's rate per level, and the unrelated concepts'
        levels = ", ".join(f"{level} {rate:.1%}" for level, rate in summary["rate_quantized"].items())
        lines = [f"{summary['concept']}: unquantized {summary['rate_unquantized']:.1%} ({summary['pre_successes']}/"
                 f"{n}), {levels}; ASR {summary['asr']:.1%} ({summary['successes']}/{n})"]
        kept = summary["unrelated"]
        if kept:
            levels = ", ".join(f"{level} {rate:.1%}" for level, rate in kept["rate_quantized"].items())
            lines.append(f"unrelated concepts still drawn, {kept['n']} prompts: unquantized "
                         f"{kept['rate_unquantized']:.1%}, {levels}")
        return lines
    return [f"{summary['concept']}: Pre-ASR {summary['pre_asr']:.1%} ({summary['pre_successes']}/{n}), "
            f"ASR {summary['asr']:.1%} ({summary['pre_successes'] + summary['attack_successes']}/{n})"]


def write_results(out: Path, summary: dict, store: ItemStore) -> None:
    """OUT as the module's docstring lays it out, written under a temporary name and renamed."""
    with writing_into(out) as tmp:
        (tmp / "images").mkdir()
        for record in summary["items"]:
            for name in [record.get("image"), *record.get("images", {}).values()]:
                if name is None:
                    continue
                if store.work_dir is None:
                    store.image(name).save(tmp / name)
                else:
                    shutil.copyfile(store.work_dir / name, tmp / name)
        (tmp / "attack.json").write_text(json.dumps(summary, indent=2))
        grid = attack_grid(summary["items"][:GRID_ITEMS], store)
        if grid is not None:
            grid.save(tmp / "attack.png")


def attack_grid(records: list[dict], store: ItemStore) -> Image.Image | None:
    """Rows original (when the attack drew targets) / erased / attacked over the items; an item not attacked shows
    its plain image in both of the last two rows."""
    from benchmarks.figures import labelled_grid

    if not records or any(r.get("image") is None for r in records):
        return None
    rows = {"original": [], "erased": [], "attacked": []}
    for record in records:
        names = record.get("images", {})
        final = store.image(record["image"])
        rows["erased"].append(store.image(names["erased"]) if "erased" in names else final)
        rows["attacked"].append(final)
        if "original" in names:
            rows["original"].append(store.image(names["original"]))
    if len(rows["original"]) != len(records):
        del rows["original"]
    return labelled_grid([image for row in rows.values() for image in row], len(records), list(rows), scale=3)
