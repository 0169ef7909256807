"""`erasure bench toycanvas | unlearncanvas | i2p --report DIR [DIR ...] --out MERGED`: the results of several finished
runs (other machines, other clusters) as one table and report, computing nothing.

A run is merged only when it is finished (its results.json lists every set its manifest holds, each scored on every
image) and of the same protocol as the first: results.json's answer set, seeds, sampling, FID features, classifier
and data fingerprints (`protocol`, recorded by the run), detector and threshold; and the base model's images made
with the same settings (prompt, seed, steps, guidance, size). The model's path is not compared (it differs between
machines); the base set, which every run holds, must be identical instead. A set held by two runs (the base model's
always) is taken once, and only if identical in both: every manifest record of it (images' settings, scores, FID)
alike, and its row alike apart from the erase's measured cost.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.runner import MANIFEST, Manifest
from erasers.errors import UsageError
from erasers.files import read_json, write_atomically
from erasers.outputs import claim_output_dir

MERGED_MARK = "merged-report"  # what a merged report's folder marker names (erasers.outputs)
NOT_PROTOCOL = ("rows", "table", "created", "model", "merged_from")


def file_digest(paths: list[str | Path]) -> str:
    """sha256 of the files' contents in order: what identifies a classifier checkpoint wherever it is stored."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def listing_digest(root: str | Path, files: list[Path]) -> str:
    """sha256 of the files' paths under `root` and sizes: what identifies a dataset without reading every image."""
    text = "\n".join(f"{Path(f).relative_to(root)}\t{Path(f).stat().st_size}" for f in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Run:
    path: Path
    results: dict
    done: dict   # its manifest: {(stage, set, key): record}

    def records(self, set_name: str) -> dict:
        """The set's manifest records, without which process made them."""
        return {(stage, key): {k: v for k, v in record.items() if k != "process"}
                for (stage, name, key), record in self.done.items() if name == set_name}


def read_run(directory: str, benchmark: str) -> Run:
    """A finished run of `benchmark` in `directory`, or one line saying why it is not one."""
    path = Path(directory)
    results_file = path / "results.json"
    if not (path / MANIFEST).is_file():
        if results_file.is_file() and "merged_from" in read_json(results_file, "pass a run's --out folder"):
            raise UsageError(f"--report {directory} is a merged report, not a run: merge the runs it was made from")
        raise UsageError(f"--report {directory} is not a bench run (no {MANIFEST}); pass a finished run's --out folder")
    if not results_file.is_file():
        raise UsageError(f"--report {directory} is not a finished run (no results.json yet): rerun its command to "
                         "finish it, then merge")
    results = read_json(results_file, "rerun the run's command to write it again")
    if results.get("benchmark") != benchmark:
        raise UsageError(f"--report {directory} is a run of bench {results.get('benchmark')}, not of bench "
                         f"{benchmark}: merge it with `erasure bench {results.get('benchmark')} --report`")
    run = Run(path, results, Manifest(path).read())
    listed = {row["set"] for row in results["rows"]}
    stray = sorted({name for _, name, _ in run.done} - listed)
    if stray:
        raise UsageError(f"--report {directory} is not finished: its manifest holds {stray[0]}, which its results.json "
                         "lacks (a run still going, or stopped); rerun its command, then merge")
    scored = "detect" if benchmark == "i2p" else "score"
    for row in results["rows"]:
        count = sum(1 for stage, name, _ in run.done if stage == scored and name == row["set"])
        if not row.get("failed") and count != results["images_per_model"]:
            raise UsageError(f"--report {directory} is not finished: {row['set']} has {count} of "
                             f"{results['images_per_model']} images scored; rerun its command, then merge")
    if benchmark != "i2p" and "protocol" not in results:
        raise UsageError(f"--report {directory} was made before runs recorded their classifier and data: rerun its "
                         "command (it recomputes nothing) and merge again")
    return run


def protocol(run: Run) -> dict:
    """What must agree between merged runs, flattened ("sampling.steps": 100, "base image K": settings)."""
    fields = {key: value for key, value in run.results.items() if key not in NOT_PROTOCOL}
    fields["q16"] = any("q16_rate" in row for row in run.results["rows"])
    flat = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            flat[key] = value
    for (stage, name, key), record in sorted(run.done.items()):
        if stage == "image" and name == "base":
            flat[f"base image {key}"] = record.get("settings")
    return flat


def check_protocols(runs: list[Run]) -> None:
    first = protocol(runs[0])
    for run in runs[1:]:
        other = protocol(run)
        for key in sorted(first.keys() | other.keys(), key=lambda k: (k.startswith("base image"), k)):
            if first.get(key) != other.get(key):
                raise UsageError(f"--report {run.path} has another protocol than {runs[0].path}: {key} "
                                 f"{_short(other.get(key))} there, {_short(first.get(key))} in {runs[0].path}; merge "
                                 "only runs of one protocol")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def merge_rows(runs: list[Run]) -> tuple[list[dict], dict[str, Run]]:
    """The sets of all runs, each once (module docstring), in the runs' order; and which run holds each."""
    rows: dict[str, dict] = {}
    origin: dict[str, Run] = {}
    for run in runs:
        for row in run.results["rows"]:
            name = row["set"]
            if name not in rows:
                rows[name], origin[name] = row, run
                continue
            if run.records(name) != origin[name].records(name):
                raise UsageError(f"{name} is in --report {origin[name].path} and {run.path} with different images or "
                                 "scores; a set is merged from two runs only if identical: leave it out of one run")
            if name == "base" and "per_concept" in row:  # each run scored the base model on its own concepts
                rows[name] = {**rows[name], "per_concept": dict(sorted({**rows[name]["per_concept"],
                                                                        **row["per_concept"]}.items()))}
            elif _without_cost(row) != _without_cost(rows[name]):
                raise UsageError(f"{name} is in --report {origin[name].path} and {run.path} with different rows; a set "
                                 "is merged from two runs only if identical: leave it out of one run")
    return list(rows.values()), origin


def _without_cost(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "cost"}


def merge_runs(benchmark: str, directories: list[str], out: str) -> dict:
    """Merge the runs into `out` (results.json, report.md, report.html, plots/); returns the merged results.
    Every check comes before anything is written."""
    if len({Path(d).resolve() for d in directories}) != len(directories):
        raise UsageError("--report names a run twice; name each once")
    runs = [read_run(directory, benchmark) for directory in directories]
    check_protocols(runs)
    rows, origin = merge_rows(runs)
    results = {**{key: value for key, value in runs[0].results.items() if key not in ("rows", "table")},
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "merged_from": [str(run.path) for run in runs], "rows": rows}
    out = claim_output_dir(out, MERGED_MARK)
    if benchmark == "i2p":
        from benchmarks.i2p import write_report

        write_atomically(out / "results.json", json.dumps(results, indent=2))
        write_report(results, out)
        return results
    from benchmarks.erasure_bench import method_table
    from benchmarks.report import write_report

    results["table"] = method_table(rows)
    write_atomically(out / "results.json", json.dumps(results, indent=2))

    def image_path(set_name: str, key: str) -> Path:
        run = origin[set_name]
        return run.path / run.done[("image", set_name, key)]["file"]

    write_report(results, out, image_path)
    return results
