"""Several concepts in one erase: every method says how it combines them (the registry's multi_concept, shown by
`erasure methods` and erasers/README's method table), and --concepts-file gives the same request as repeated
--concept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.cli import main
from erasers.registry import available_methods

ROOT = Path(__file__).resolve().parents[1]


def method_table_cells(text: str) -> dict[str, list[str]]:
    """method -> its cells, of the table whose header starts with "| method | several concepts"."""
    rows, started = {}, False
    for line in text.splitlines():
        if line.startswith("| method | several concepts"):
            started = True
        elif started and line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[1:]
        elif started and not line.startswith("|"):
            break
    return rows


def test_every_method_says_how_it_combines_concepts_in_the_table_and_the_listing(capsys):
    entries = available_methods()
    assert all(entry.multi_concept for entry in entries.values())
    table = method_table_cells((ROOT / "erasers/README.md").read_text())
    assert set(table) == set(entries)
    assert {name: cells[0] for name, cells in table.items()} == {n: e.multi_concept for n, e in entries.items()}
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert f"several concepts: {entries['uce'].multi_concept}" in listing
    assert f"several concepts: {entries['mace'].multi_concept}" in listing


def test_a_concepts_file_asks_what_repeated_concept_asks(tmp_path, capsys):
    """The file's lines after any --concept, '#' comments, blank lines and a byte-order mark left out: the same
    request (concepts and kind) as the flags; a concept both in the file and given with --concept is refused."""
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("\ufeff# the toy's objects\nstar\n\n  circle  \n", encoding="utf-8")
    flags = ["erase", "--method", "negprompt", "--device", "cpu"]
    assert main([*flags, "--concept", "arrow", "--concept", "star", "--concept", "circle",
                 "--out", str(tmp_path / "flags")]) == 0
    assert main([*flags, "--concept", "arrow", "--concepts-file", str(concepts), "--out", str(tmp_path / "file")]) == 0
    by_flags, by_file = (json.loads((tmp_path / name / "erasure.json").read_text()) for name in ("flags", "file"))
    assert by_file["concepts"] == by_flags["concepts"] == ["arrow", "star", "circle"]
    assert by_file["kind"] == by_flags["kind"] == "object"
    capsys.readouterr()
    assert main([*flags, "--concept", "Circle", "--concepts-file", str(concepts), "--out", str(tmp_path / "x")]) == 2
    assert "--concept circle is given twice" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.heavy  # about 30 s of one core: 60 toy images drawn and classified, before and after
def test_one_erase_of_two_toy_objects_lowers_both(tmp_path):
    """UCE (one closed form over every concept's prompts) erasing the arrow and the heart in one run (two objects
    the base model draws recognisably at seed 188; its star is read as an arrow 6 times in 10): the classifier
    stops seeing either on their captions, and still sees the other objects (measured: UA 0 -> 100% for both,
    IRA 100% -> 100%)."""
    from toy_scores import scores_before_and_after

    before, after = scores_before_and_after(tmp_path, "uce", ["arrow", "heart"], ["circle", "square"], {})
    for concept in ("arrow", "heart"):
        assert before[concept]["UA"] <= 0.2 and after[concept]["UA"] >= 0.8, (concept, before, after)
    assert after["all"]["IRA"] >= before["all"]["IRA"] - 0.2, (before, after)


def test_the_many_concept_benchmark_plans_chains_on_the_single_erase_and_scores_each_concept(tmp_path):
    """benchmarks.many_concepts: every count at once, every count above 1 in sequence, a chain's first step being
    the 1-concept edit made at once; UA per erased concept, IRA on the rest of its kind, from the predictions."""
    from benchmarks.many_concepts import COUNTS, ORDER, Cell, cell_scores, edit_path, plan

    cells = plan(["uce"], ["at once", "in sequence"])
    assert [(c.kind, c.count) for c in cells if c.mode == "at once"] == \
        [("style", n) for n in COUNTS["style"]] + [("object", n) for n in COUNTS["object"]]
    assert sorted((c.kind, c.count) for c in cells if c.mode == "in sequence") == \
        sorted([("style", n) for n in COUNTS["style"] if n > 1] + [("object", n) for n in COUNTS["object"] if n > 1])
    steps = [c.count for c in plan(["uce", "esd-x"], ["in sequence"])]
    assert steps == sorted(steps)  # every method's short chains before any long one
    assert edit_path(tmp_path, Cell("uce", "style", 1, "in sequence")) == edit_path(tmp_path, cells[0])
    assert edit_path(tmp_path, Cell("uce", "style", 3, "in sequence")) != edit_path(tmp_path, cells[1])

    first, second, kept = ORDER["object"][:3]
    cell = Cell("uce", "object", 2, "at once")

    def row(second_read_as: str) -> dict:
        # Two images per object, all in Flat: the first object gone in both, the second in one, the third kept.
        return {"records": [[first, "Flat", kept, "Flat"], [first, "Flat", "none", "Flat"],
                            [second, "Flat", second_read_as, "Flat"], [second, "Flat", second, "Flat"],
                            [kept, "Flat", kept, "Flat"], [kept, "Flat", kept, "Outline"]]}

    scores = cell_scores(row(kept), row(second), cell)
    assert scores["per_concept"] == {first: 1.0, second: 0.5}
    assert scores["UA"] == 0.75 and scores["UA_lowest"] == 0.5 and scores["UA_first"] == 1.0
    assert scores["IRA"] == 1.0 and scores["CRA"] == 0.5
    assert cell_scores(row(second), row(second), cell)["per_concept"][second] == 0.0
