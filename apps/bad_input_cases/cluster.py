"""Bad-input rows about cluster runs and merged reports (benchmarks.bench_commands, benchmarks.cluster,
benchmarks.merge): a launcher's options without the launcher, a cluster launcher this machine cannot use (no
submitit, no sbatch), and `--report` given folders that are not finished runs, runs of another protocol or the same
set with other results. Nothing is written or submitted."""

from __future__ import annotations

import importlib.util
import json
import shutil

from apps.bad_input_fixtures import FIXTURES, fixture
from apps.bad_inputs import Case

SETTINGS = {"prompt": "An arrow image in Flat style.", "seed": 188, "steps": None, "guidance": None, "height": None,
            "width": None}


def finished_run(root, name: str, benchmark: str = "toycanvas", seed: int = 188, classifier: str = "0123",
                 predicted: str = "arrow", protocol: bool = True, results: bool = True, stray: bool = False) -> str:
    """A finished toycanvas run of one image, as `erasure bench toycanvas` leaves it: the manifest's image and
    score lines and results.json."""
    run = root / name
    (run / "images" / "base").mkdir(parents=True)
    key = f"Flat_arrow_seed{seed}"
    records = [{"stage": "image", "set": "base", "key": key, "file": f"images/base/{key}.png",
                "settings": {**SETTINGS, "seed": seed}, "process": 0},
               {"stage": "score", "set": "base", "key": key, "predicted_object": predicted,
                "predicted_style": "Flat", "process": 0}]
    if stray:  # a set that the run is still making, which its results.json (of an earlier finish) lacks
        records.append({**records[0], "set": "uce-arrow", "file": f"images/uce-arrow/{key}.png"})
    (run / "manifest.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    row = {"set": "base", "method": "base", "accuracy": {"object": 1.0, "style": 1.0}, "fid": None,
           "fid_features": None, "per_concept": {}}
    content = {"benchmark": benchmark, "model": "toy", "objects": ["arrow"], "styles": ["Flat"], "seeds": [seed],
               "images_per_model": 1, "sampling": {"steps": None, "guidance": None, "size": None,
                                                   "scheduler": "the model's"},
               "fid_features": None, **({"protocol": {"classifier": classifier}} if protocol else {}),
               "created": "2026-12-07T00:00:00Z", "rows": [row], "table": []}
    if results:
        (run / "results.json").write_text(json.dumps(content))
    return str(run)


@fixture
def run_a(root):
    return finished_run(root, "a")


# The second run of a merge, each beside run_a.
_SECOND = {"run_b": {}, "run_b_unfinished": {"results": False}, "run_b_going_on": {"stray": True},
           "run_b_other_seed": {"seed": 288}, "run_b_other_classifier": {"classifier": "4567"},
           "run_b_other_base": {"predicted": "star"}, "run_b_i2p": {"benchmark": "i2p"},
           "run_b_old": {"protocol": False}}
for _name, _options in _SECOND.items():
    FIXTURES[_name] = lambda root, options=_options: finished_run(root, "b", **options)


@fixture
def merged_report(root):
    merged = root / "merged-before"
    merged.mkdir()
    (merged / "results.json").write_text(json.dumps({"benchmark": "toycanvas", "merged_from": ["x", "y"]}))
    return str(merged)


@fixture
def plain_folder(root):
    (root / "photos").mkdir()
    return str(root / "photos")


def _with_sbatch() -> str | None:
    return "this machine has slurm's sbatch and srun" if shutil.which("sbatch") and shutil.which("srun") else None


def _with_submitit() -> str | None:
    return "submitit is installed (tests/test_cluster.py hides it instead)" \
        if importlib.util.find_spec("submitit") else None


TOY = "bench toycanvas --methods uce --concepts arrow --out {root}/r"
REPORT = "bench toycanvas --out {root}/merged --report {run_a}"

CASES = [
    # a launcher's options
    Case("cluster: --partition without --launcher slurm", f"{TOY} --partition gpu", "--partition is for cluster jobs"),
    Case("cluster: --jobs without a launcher", f"{TOY} --jobs 4", "--jobs is for cluster jobs"),
    Case("cluster: --mem-gb without a launcher", f"{TOY} --mem-gb 32", "--mem-gb is for cluster jobs"),
    Case("cluster: --gpus-per-job with --launcher local-jobs", f"{TOY} --launcher local-jobs --gpus-per-job 2",
         "--gpus-per-job is slurm's"),
    Case("cluster: --processes with --launcher local-jobs", f"{TOY} --launcher local-jobs --processes 2",
         "--jobs N"),
    Case("cluster: --launcher slurm without sbatch", f"{TOY} --launcher slurm --jobs 2", "sbatch", _with_sbatch),
    Case("cluster: --launcher slurm without submitit", f"{TOY} --launcher slurm", "erasure-suite[cluster]",
         _with_submitit),
    Case("cluster: --launcher pbs", f"{TOY} --launcher pbs", "invalid choice"),
    Case("cluster: --jobs 0", f"{TOY} --launcher local-jobs --jobs 0", "at least 1"),
    Case("cluster: --mem-gb 0", f"{TOY} --launcher slurm --mem-gb 0", "--mem-gb"),
    Case("cluster: --timeout-min 2.5", f"{TOY} --launcher local-jobs --timeout-min 2.5", "not an integer"),
    # --report
    Case("report: a run without results.json", f"{REPORT} {{run_b_unfinished}}", "not a finished run"),
    Case("report: a run whose manifest holds more sets", f"{REPORT} {{run_b_going_on}}", "not finished"),
    Case("report: a folder that is not a run", f"{REPORT} {{plain_folder}}", "not a bench run"),
    Case("report: a missing folder", f"{REPORT} {{root}}/nowhere", "does not exist"),
    Case("report: a merged report", f"{REPORT} {{merged_report}}", "a merged report, not a run"),
    Case("report: runs of other seeds", f"{REPORT} {{run_b_other_seed}}", "another protocol"),
    Case("report: runs of other classifiers", f"{REPORT} {{run_b_other_classifier}}", "protocol.classifier"),
    Case("report: base sets that differ", f"{REPORT} {{run_b_other_base}}", "different images or scores"),
    Case("report: an i2p run as toycanvas", f"{REPORT} {{run_b_i2p}}", "erasure bench i2p --report"),
    Case("report: a run from before protocols were recorded", f"{REPORT} {{run_b_old}}",
         "recorded their classifier"),
    Case("report: one run twice", f"{REPORT} {{run_b}} {{root}}/a", "names a run twice"),
    Case("report: --out is one of the runs", "bench toycanvas --out {root}/a --report {run_a} {run_b}",
         "not made by this command"),
    Case("report: with --methods", f"{REPORT} {{run_b}} --methods uce", "leave out --methods"),
    Case("report: with --launcher", f"{REPORT} {{run_b}} --launcher local-jobs", "leave out --launcher"),
    # what a run needs and a merge does not
    Case("bench unlearncanvas without --data", "bench unlearncanvas --model toy --out {root}/r", "--data is required"),
    Case("bench i2p without --prompts", "bench i2p --out {root}/r", "--prompts is required"),
]
