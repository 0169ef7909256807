"""The package layers (apps -> benchmarks -> vlm -> erasers, imports only downward) hold, as import-linter checks
them from pyproject.toml's contract; and the code stays in readable pieces (files, signatures)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("erasers", "vlm", "benchmarks", "apps")


def test_imports_only_go_down_the_layers():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def python_files():
    return [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]


def test_no_file_is_over_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in python_files()
            if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_no_function_takes_more_than_nine_parameters():
    """About eight at most: a ninth is allowed where an option would otherwise hide in **kwargs."""
    wide = {}
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args
                count = len(arguments.posonlyargs) + len(arguments.args) + len(arguments.kwonlyargs)
                count -= bool(arguments.args) and arguments.args[0].arg in ("self", "cls")
                if count > 9:
                    wide[f"{path.relative_to(ROOT)}:{node.name}"] = count
    assert not wide, wide
