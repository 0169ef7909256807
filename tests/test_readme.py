"""Every `erasure ...` command in the README (and in the pages beside the code it links to) names a subcommand and
flags the CLI has, and every `python -m MODULE` names a module that exists. Parsed with the CLI's own parser,
`apps.cli.make_parser()`, so nothing runs."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from apps.cli import make_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "erasers/README.md", "vlm/README.md", "apps/README.md", "tests/README.md", "benchmarks/README.md",
        "benchmarks/toycanvas/README.md", "benchmarks/results/NOTES.md")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def commands(text: str) -> list[list[str]]:
    """The shell commands of a page's code blocks, as argument lists: continuation lines joined, comments dropped,
    `a && b` split."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # not shell (a Python block's quotes)
                continue
            command: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", "||", ";", "|"):
                    if command:
                        found.append(command)
                    command = []
                else:
                    command.append(word)
    return found


def erasure_arguments(command: list[str]) -> list[str] | None:
    """The arguments after `erasure` (or `.venv/bin/erasure`), or None for any other command."""
    if command and Path(command[0]).name == "erasure":
        return command[1:]
    return None


def leaf_parser(parser: argparse.ArgumentParser, arguments: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that reads the flags of `arguments`: follows subcommand names down the tree."""
    for word in arguments:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if choices is None:
            break
        if word in choices:
            parser = choices[word]
    return parser


def without_path_checks(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser with every option that checks an existing path (erasers.inputs) taking any text instead: the
    documents' example paths (runs/no-arrow) exist only on a reader's machine."""
    for action in parser._actions:
        if getattr(action.type, "reads_path", False):
            action.type = str
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                without_path_checks(sub)
    return parser


def check_erasure_command(arguments: list[str]) -> None:
    """Raise AssertionError unless `erasure ARGUMENTS` parses and names only flags its subcommand defines (exactly:
    argparse would also accept an abbreviation, which a README should not rely on)."""
    parser = without_path_checks(make_parser())
    try:
        parser.parse_args(arguments)
    except SystemExit as exit_:
        raise AssertionError(f"`erasure {shlex.join(arguments)}` does not parse (exit {exit_.code})") from None
    known = leaf_parser(parser, arguments)._option_string_actions
    flags = [word.split("=", 1)[0] for word in arguments if word.startswith("--")]
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"`erasure {shlex.join(arguments)}`: no such flag {unknown}"


def documented(kind: str) -> list[tuple[str, list[str]]]:
    found = []
    for page in DOCS:
        for command in commands((ROOT / page).read_text(encoding="utf-8")):
            if kind == "erasure" and (arguments := erasure_arguments(command)) is not None:
                found.append((page, arguments))
            if kind == "module" and "-m" in command[:-1] and Path(command[0]).name.startswith("python"):
                found.append((page, [command[command.index("-m") + 1]]))
    return found


def test_documented_links_and_images_exist():
    """Relative links and images of every page point at files that exist (the pages moved; their pictures did not)."""
    missing = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", (ROOT / page).read_text(encoding="utf-8")):
            if "://" not in target and not (ROOT / page).parent.joinpath(target).exists():
                missing.append(f"{page}: {target}")
    assert not missing


def test_the_readme_shows_erasure_commands():
    pages = {page for page, _ in documented("erasure")}
    assert "README.md" in pages and len(documented("erasure")) >= 10


@pytest.mark.parametrize("page, arguments", documented("erasure"), ids=lambda v: v if isinstance(v, str) else
                         " ".join(v))
def test_documented_erasure_command_parses(page, arguments, capsys):
    check_erasure_command(arguments)


@pytest.mark.parametrize("page, module", documented("module"), ids=lambda v: v if isinstance(v, str) else v[0])
def test_documented_python_module_exists(page, module):
    assert importlib.util.find_spec(module[0]) is not None, f"{page}: no module {module[0]}"


@pytest.mark.parametrize("line", [
    "erasure erase --model toy --method esd-x --concept arrow --no-such-flag 1 --out runs/x",
    "erasure compare --model toy --edit runs/x --seed 188",      # compare has --seeds, not --seed
    "erasure erase --model toy --method esd-x --concept arrow --ou runs/x",  # an abbreviation
    "erasure bench nosuch --model toy",
    "erasure vlm erase --model toy-vlm --method sauce --out runs/x",  # --concept is required
])
def test_a_wrong_command_fails_the_check(line, capsys):
    [command] = commands(f"```bash\n{line}\n```\n")
    with pytest.raises(AssertionError):
        check_erasure_command(erasure_arguments(command))


def test_commands_are_read_as_a_shell_reads_them():
    page = ("```bash\npython3 -m venv .venv && .venv/bin/erasure erase --model toy --method uce \\\n"
            "  --concept arrow --out runs/x   # a comment --not-a-flag\n```\n```python\nx = 'a\n```\n")
    assert commands(page) == [["python3", "-m", "venv", ".venv"],
                              [".venv/bin/erasure", "erase", "--model", "toy", "--method", "uce", "--concept",
                               "arrow", "--out", "runs/x"]]


def first_column(text: str, heading: str) -> list[str]:
    """The first cell of each row of the first table after `heading` (backticks dropped)."""
    rows, started = [], False
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            started = True
            cell = line.strip("|").split("|")[0].strip().strip("`")
            if cell and not set(cell) <= set("-: "):
                rows.append(cell)
        elif started:
            break
    return rows[1:]  # the header


def test_the_method_tables_list_the_registered_methods():
    """The README's eraser table and erasers/README's families table read the registry: one row per method."""
    from erasers.registry import families_matrix

    registered = set(families_matrix())
    assert set(first_column((ROOT / "README.md").read_text(), "## What it does")) == registered
    assert set(first_column((ROOT / "erasers/README.md").read_text(), "What each method trains:")) - {"attack"} \
        == registered
