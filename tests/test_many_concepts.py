"""Several concepts in one erase: every method says how it combines them (the registry's multi_concept, shown by
`erasure methods` and erasers/README's method table), and --concepts-file gives the same request as repeated
--concept."""

from __future__ import annotations

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
