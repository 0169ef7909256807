"""Several concepts in one erase: every method says how it combines them (the registry's multi_concept, shown by
`erasure methods` and erasers/README's method table), and --concepts-file gives the same request as repeated
--concept."""

from __future__ import annotations

import json
from pathlib import Path

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
