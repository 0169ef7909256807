"""A new method is one file and one decorator: registered from a throwaway module (nothing else touched), it appears
in `erasure methods`, the families matrix, the method table's, step_cost's and gpu_check's plans, `bench --methods
all`, and erases and shows in the app like any other."""

import importlib
import sys

import pytest

from erasers.registry import REGISTRY

THROWAWAY = '''
"""A throwaway eraser for the registry test: scales the text-reading value projections."""
from dataclasses import dataclass

from erasers.registry import Eraser, register


@dataclass
class ScaleValuesConfig:
    scale: float = 0.5


@register("scale-values", "scales the denoiser's text-reading value projections (a test method)",
          families=("sd", "sdxl"), quick={"scale": 0.9}, variants={"gentle": {"scale": 0.95}},
          step_cost_models=("toy", "sd15"))
class ScaleValues(Eraser):
    config_class = ScaleValuesConfig

    def erase(self, loaded, request, work_dir=None):
        for _, _, value in loaded.adapter.cross_attention_kv():
            value.weight.data *= self.config.scale
        return {loaded.family.denoiser: loaded.denoiser}
'''


@pytest.fixture
def throwaway_method(tmp_path, monkeypatch):
    REGISTRY.available()  # the shipped methods first, as any lookup loads them
    (tmp_path / "throwaway_eraser.py").write_text(THROWAWAY)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("throwaway_eraser")
    yield "scale-values"
    REGISTRY.entries.pop("scale-values", None)
    sys.modules.pop("throwaway_eraser", None)


def test_one_registered_file_reaches_every_list(throwaway_method, capsys):
    from apps.cli import main
    from benchmarks import gpu_check, method_table, step_cost
    from benchmarks.erasure_bench import parse_methods
    from erasers.registry import families_matrix

    assert main(["methods"]) == 0
    assert "scale-values" in capsys.readouterr().out
    assert families_matrix()["scale-values"] == {"sd": True, "sdxl": True, "flux": False}
    assert {"scale-values", "scale-values-gentle"} <= set(method_table.plan())
    assert method_table.variants()["scale-values-gentle"] == ("scale-values", {"scale": 0.95})
    assert {("toy", "scale-values"), ("sd15", "scale-values")} <= set(step_cost.plan(["toy", "sd15", "sdxl"]))
    assert ("sdxl", "scale-values") not in step_cost.plan(["sdxl"])
    planned = gpu_check.plan(["sd15", "sdxl", "flux"])
    assert ("sd15", "scale-values") in planned and ("flux", "scale-values") not in planned
    assert "scale-values" in parse_methods("all")


def test_a_registered_file_erases_and_shows_in_the_app(throwaway_method, tiny_pipeline_dirs, tmp_path):
    from apps.app import AppState
    from apps.cli import main
    from erasers.edits import read_edit

    runs = tmp_path / "runs"
    code = main(["erase", "--model", str(tiny_pipeline_dirs["sd"]), "--method", "scale-values", "--concept", "a star",
                 "--device", "cpu", "--out", str(runs / "scaled")])
    assert code == 0
    assert read_edit(runs / "scaled")["config"] == {"scale": 0.5}
    state = AppState(str(tiny_pipeline_dirs["sd"]), runs)
    assert list(state.edits()) == ["scaled"]
    assert "scales the denoiser's text-reading value projections" in state.describe("scaled")
    # The entry's families are enforced: Flux is refused before anything is written.
    assert main(["erase", "--model", str(tiny_pipeline_dirs["flux"]), "--method", "scale-values", "--concept",
                 "a star", "--device", "cpu", "--out", str(runs / "flux")]) == 2
    assert not (runs / "flux").exists()
