"""Cluster runs (benchmarks.cluster) through submitit's local executor (`--launcher local-jobs`): the jobs' outputs
together are a single process's run, image for image; a job killed half way fails its stage and the same command
resumes; a preempted job is requeued and goes on. And `--report` (benchmarks.merge): runs split by method merge into
the run with both."""

import json
import os
import sys
from pathlib import Path

import pytest

from apps.cli import main
from benchmarks.cluster import TEST_SIGNAL
from benchmarks.runner import Manifest

ROOT = Path(__file__).resolve().parents[1]
# The smallest toy answer set the runner tests use: 4 images per set, batches of 2 (so 2 jobs share each set).
SMALL = ["--objects", "arrow,star", "--styles", "Flat,Stripes", "--batch-size", "2", "--no-fid", "--quiet"]


def bench(*argv) -> int:
    return main(["bench", "toycanvas", *argv, *SMALL])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process's run of uce and negprompt on the arrow."""
    out = tmp_path_factory.mktemp("cluster") / "reference"
    assert bench("--methods", "uce,negprompt", "--concepts", "arrow", "--out", str(out)) == 0
    return out


@pytest.fixture
def jobs_env(monkeypatch):
    """The environment the local executor's jobs inherit: this checkout, one torch thread, no signal."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(TEST_SIGNAL, raising=False)


def assert_matches(run: Path, reference: Path) -> None:
    """`run` holds `reference`'s records (4 images and 4 scores a set) for the sets it has, each once (nothing
    computed twice): the same scores, and image for image the same bytes."""
    lines = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    keys = [(record["stage"], record["set"], record["key"]) for record in lines]
    assert len(keys) == len(set(keys)), "a record was computed twice"
    mine, theirs = Manifest(run).read(), Manifest(reference).read()
    sets = {key[1] for key in mine}
    assert mine.keys() == {key for key in theirs if key[1] in sets} and len(mine) == 8 * len(sets)
    for key, record in theirs.items():
        if key not in mine:
            continue
        if key[0] == "image":
            assert (run / mine[key]["file"]).read_bytes() == (reference / record["file"]).read_bytes(), key
        assert {k: v for k, v in mine[key].items() if k != "process"} == \
            {k: v for k, v in record.items() if k != "process"}, key


def rows(run: Path, sets: set[str]) -> list[dict]:
    """results.json's rows of `sets`, without the erase's measured cost."""
    found = json.loads((run / "results.json").read_text())["rows"]
    return [{k: v for k, v in row.items() if k != "cost"} for row in found if row["set"] in sets]


@pytest.mark.heavy
def test_two_jobs_make_what_one_process_makes(tmp_path, reference, jobs_env, capsys):
    out = tmp_path / "jobs"
    edit = reference / "edits" / "uce-arrow"
    assert bench("--edit", str(edit), "--launcher", "local-jobs", "--jobs", "2", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    # No erase is left, so the first barrier orders nothing: one stage generates, the next scores.
    assert printed.count("submitted 2 jobs (shard 1 of 2 to barrier") == 2, printed
    assert {record["process"] for record in Manifest(out).read().values()} == {0, 1}, "both jobs worked"
    assert_matches(out, reference)
    assert rows(out, {"base", "uce-arrow"}) == rows(reference, {"base", "uce-arrow"})
    assert (out / "report.html").exists() and len(list((out / "jobs").glob("*_log.out"))) == 4


@pytest.mark.heavy
def test_a_killed_job_fails_its_stage_and_the_same_command_resumes(tmp_path, reference, jobs_env, monkeypatch,
                                                                   capsys):
    out = tmp_path / "killed"
    argv = ["--methods", "uce", "--concepts", "arrow", "--launcher", "local-jobs", "--out", str(out)]
    monkeypatch.setenv(TEST_SIGNAL, "KILL:2")  # the evaluation job is killed after its first batch
    assert bench(*argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("erasure: error:")]
    assert len(errors) == 1 and "1 of 2 jobs failed" in errors[0] and "Rerun the same command" in errors[0], errors
    before = Manifest(out).read()
    assert [key[0] for key in before] == ["image", "image"], "killed half way through the base set"
    assert (out / "edits" / "uce-arrow" / "erasure.json").exists(), "the erase job finished"

    monkeypatch.delenv(TEST_SIGNAL)
    assert bench(*argv) == 0
    after = Manifest(out).read()
    assert all(after[key] == record for key, record in before.items()), "finished work is kept"
    assert_matches(out, reference)
    assert rows(out, {"base", "uce-arrow"}) == rows(reference, {"base", "uce-arrow"})


@pytest.mark.slow  # about 50 s; the killed-job test keeps resuming in the default suite
def test_a_preempted_job_is_requeued_and_goes_on(tmp_path, reference, jobs_env, monkeypatch):
    out = tmp_path / "preempted"
    monkeypatch.setenv(TEST_SIGNAL, "USR2:4")  # slurm's signal, after every 4 images a job process makes
    edit = reference / "edits" / "negprompt-arrow"
    assert bench("--edit", str(edit), "--launcher", "local-jobs", "--out", str(out)) == 0
    logs = "".join(path.read_text() for path in (out / "jobs").glob("*_log.out"))
    assert logs.count("Requeued job") == 2, "requeued after each set's 4 images"
    assert_matches(out, reference)


@pytest.mark.heavy
def test_runs_split_by_method_merge_into_the_run_with_both(tmp_path, reference, capsys):
    runs = [tmp_path / method for method in ("uce", "negprompt")]
    for run in runs:
        assert bench("--methods", run.name, "--concepts", "arrow", "--out", str(run)) == 0
    merged = tmp_path / "merged"
    argv = ["bench", "toycanvas", "--report", *map(str, runs), "--out", str(merged)]
    manifests = [(run / "manifest.jsonl").read_bytes() for run in runs]
    assert main(argv) == 0
    assert "| negprompt |" in capsys.readouterr().out
    results, whole = (json.loads((path / "results.json").read_text()) for path in (merged, reference))
    assert results["merged_from"] == list(map(str, runs))
    sets = {"base", "uce-arrow", "negprompt-arrow"}
    assert rows(merged, sets) == rows(reference, sets) and len(results["rows"]) == 3
    scores = [[{k: v for k, v in line.items() if k.split("_")[-1] in ("UA", "IRA", "CRA")} for line in r["table"]]
              for r in (results, whole)]
    assert scores[0] == scores[1] and [line["method"] for line in results["table"]] == ["base", "uce", "negprompt"]
    for name in ("report.md", "report.html", "plots/grid_uce.png", "plots/grid_negprompt.png"):
        assert (merged / name).stat().st_size > 100, name
    assert [(run / "manifest.jsonl").read_bytes() for run in runs] == manifests, "nothing is recomputed"
    assert not (merged / "manifest.jsonl").exists() and not (merged / "images").exists()
    assert main(argv) == 0, "a merged report is refreshed in its own folder"


def test_a_cluster_launcher_without_submitit_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    out = tmp_path / "run"
    assert bench("--methods", "uce", "--concepts", "arrow", "--launcher", "slurm", "--out", str(out)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("erasure: error:")]
    assert len(errors) == 1 and "pip install 'erasure-suite[cluster]'" in errors[0], errors
    assert not out.exists()


def test_slurm_options_reach_sbatch_and_a_refused_job_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A stand-in sbatch keeps the job script it is given and refuses it, as slurm refuses an unknown partition."""
    script = tmp_path / "job.sh"
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text(f'#!/bin/sh\ncp "$1" {script}\necho "sbatch: error: invalid partition specified: nope" >&2\n'
                      "exit 1\n")
    sbatch.chmod(0o755)
    (sbatch.parent / "srun").symlink_to("/bin/true")  # submitit looks for it
    monkeypatch.setenv("PATH", f"{sbatch.parent}:{os.environ['PATH']}")
    out = tmp_path / "run"
    assert bench("--methods", "uce", "--concepts", "arrow", "--launcher", "slurm", "--partition", "nope",
                 "--gpus-per-job", "2", "--mem-gb", "64", "--timeout-min", "30", "--out", str(out)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("erasure: error:")]
    assert len(errors) == 1 and "invalid partition specified: nope" in errors[0], errors
    assert not out.exists(), "a run refused before any job leaves nothing"
    submitted = script.read_text()
    for line in ("--partition=nope", "--gpus-per-node=2", "--mem=64GB", "--time=30", "--signal=USR2@",
                 "--job-name=erasure-erase-uce-arrow"):
        assert f"#SBATCH {line}" in submitted, line
