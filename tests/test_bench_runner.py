"""The benchmark runner: a killed run resumes without recomputing finished work and ends where an uninterrupted run
ends, image for image; two accelerate processes make what one process makes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.runner import ImageJob, Manifest, Runner, fixed_batches
from erasers.models import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    pass


def jobs() -> list[ImageJob]:
    prompts = ["a star", "a circle", "a square", "a star in dots", "a moon", "a heart", "an arrow"]
    return [ImageJob(f"job{i}", p, 100 + i, steps=2, labels=(("object", p),)) for i, p in enumerate(prompts)]


def classify(images):
    # A deterministic stand-in for a classifier: the mean red level of each image.
    return [{"red": int(sum(im.split()[0].tobytes()) / (im.width * im.height))} for im in images]


def run_all(out: Path, pipeline: Path, on_batch=None) -> Runner:
    runner = Runner(out, progress=False, on_batch=on_batch)
    runner.generate("base", jobs(), lambda: load_pipeline(str(pipeline), device="cpu"), batch_size=2)
    runner.classify("base", jobs(), classify, batch_size=3)
    return runner


def stop_after(stage: str, count: int, seen: list):
    def hook(hook_stage, set_name, records):
        seen.extend(r["key"] for r in records if r["stage"] == hook_stage)
        if hook_stage == stage and len([k for k in seen]) >= count:
            raise Interrupted

    return hook


def test_fixed_batches_depend_on_the_job_list_only():
    batches = fixed_batches(jobs(), 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    mixed = [ImageJob("a", "x", 0, guidance=1.0), ImageJob("b", "x", 0, guidance=2.0), ImageJob("c", "x", 0,
                                                                                                 guidance=2.0)]
    assert [[j.key for j in b] for b in fixed_batches(mixed, 4)] == [["a"], ["b", "c"]]


def test_interrupted_run_resumes_without_recomputing_and_matches_an_uninterrupted_run(tmp_path, tiny_pipeline_dirs):
    pipeline = tiny_pipeline_dirs["sd"]
    reference = run_all(tmp_path / "whole", pipeline)

    out = tmp_path / "killed"
    first = []
    with pytest.raises(Interrupted):
        run_all(out, pipeline, stop_after("image", 4, first))  # killed after two of four image batches
    assert first == ["job0", "job1", "job2", "job3"]
    # A crash in the middle of a manifest write leaves a cut line; it is ignored and its work redone.
    with open(out / "manifest.jsonl", "a") as manifest:
        manifest.write('{"stage": "image", "set": "base", "ke')
    second = []
    with pytest.raises(Interrupted):
        run_all(out, pipeline, stop_after("score", 3, second))  # then killed after one scoring batch
    assert second == ["job4", "job5", "job6", "job0", "job1", "job2"], "finished images are not made again"
    third = []
    run_all(out, pipeline, lambda stage, name, records: third.extend(r["key"] for r in records))
    assert third == ["job3", "job4", "job5", "job6"], "only the scores left are computed"

    whole, resumed = Manifest(tmp_path / "whole").read(), Manifest(out).read()
    assert whole.keys() == resumed.keys() and len(whole) == 14
    for job in jobs():
        assert (out / resumed[("image", "base", job.key)]["file"]).read_bytes() == \
            (tmp_path / "whole" / whole[("image", "base", job.key)]["file"]).read_bytes(), job.key
        assert resumed[("score", "base", job.key)]["red"] == whole[("score", "base", job.key)]["red"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "no half-written file is left"
    assert reference.manifest.path.exists()


def _bench(out: Path, processes: int | None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "apps.cli", "bench", "toycanvas", "--methods", "uce", "--concepts", "arrow",
            "--objects", "arrow,star,circle", "--styles", "Flat,Stripes", "--batch-size", "2", "--no-fid", "--quiet",
            "--out", str(out)]
    if processes:
        argv += ["--processes", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow  # two accelerate launches and a reference run: about 2 minutes on a busy 2-core machine
def test_two_accelerate_processes_make_what_one_process_makes(tmp_path):
    two = _bench(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _bench(tmp_path / "one", None)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = Manifest(tmp_path / "one").read(), Manifest(tmp_path / "two").read()
    assert {r["process"] for r in b.values()} == {0, 1}, "both processes did part of the work"
    assert a.keys() == b.keys() and len([k for k in a if k[0] == "image"]) == 12
    for key, record in a.items():
        if key[0] == "image":
            assert (tmp_path / "one" / record["file"]).read_bytes() == (tmp_path / "two" / record["file"]).read_bytes()
        else:
            assert {k: v for k, v in record.items() if k != "process"} == \
                {k: v for k, v in b[key].items() if k != "process"}
    tables = [json.loads((tmp_path / d / "results.json").read_text())["table"] for d in ("one", "two")]
    scores = [[{k: v for k, v in line.items() if "_" in k and k.split("_")[1] in ("UA", "IRA", "CRA")}
               for line in table] for table in tables]
    assert scores[0] == scores[1] and scores[0][1]["object_UA"] is not None


@pytest.mark.slow  # three CLI runs of the toy benchmark
def test_a_killed_cli_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    import signal
    import time

    argv = [sys.executable, "-m", "apps.cli", "bench", "toycanvas", "--methods", "uce", "--concepts", "arrow",
            "--objects", "arrow,star,circle", "--styles", "Flat,Stripes", "--batch-size", "2", "--no-fid", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen([*argv, "--out", str(killed)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    manifest = killed / "manifest.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 4:
            process.send_signal(signal.SIGKILL)  # mid-run: base done, the edit's images under way
            break
        time.sleep(0.2)
    process.wait()
    before = Manifest(killed).read()
    assert 4 <= len(before) < 24, "killed part-way"
    for out in (killed, tmp_path / "whole"):
        assert subprocess.run([*argv, "--out", str(out)], env=env, cwd=ROOT, capture_output=True).returncode == 0
    after, whole = Manifest(killed).read(), Manifest(tmp_path / "whole").read()
    assert after.keys() == whole.keys()
    assert all(after[key] == record for key, record in before.items()), "finished work was not redone"
    for key, record in whole.items():
        if key[0] == "image":
            assert (killed / record["file"]).read_bytes() == (tmp_path / "whole" / record["file"]).read_bytes()
    assert not [p for p in killed.rglob("*") if ".tmp" in p.name]


def test_processes_claim_items_first_come_first_served(tmp_path):
    """Process 1 of 2 skips what another process holds and what is finished, and holds what it works on."""
    import fcntl

    from benchmarks.runner import Processes

    processes = Processes()
    processes.rank, processes.world = 1, 2
    finished = {"c"}
    (tmp_path / "locks").mkdir()

    def lock(item):
        return tmp_path / "locks" / f"{item}.lock"

    taken = []
    with open(lock("b"), "w") as held_elsewhere:
        fcntl.flock(held_elsewhere, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for item in processes.claim(["a", "b", "c", "d"], lock, lambda i: i in finished):
            with open(lock(item), "w") as other:
                with pytest.raises(BlockingIOError):  # nobody else can take it meanwhile
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            taken.append(item)
            finished.add(item)
    assert taken == ["a", "d"]
    processes.world = 1
    assert list(processes.claim(["a", "b", "e"], lock, lambda i: i in finished)) == ["b", "e"]


class _Drawn:
    """A stand-in pipeline: one grey image per prompt, counting what it draws."""

    def __init__(self):
        self.drawn = 0

    def generate(self, prompts, **settings):
        from PIL import Image

        self.drawn += len(prompts)
        return [Image.new("RGB", (4, 4), "grey") for _ in prompts]


def test_a_rerun_with_other_sampling_settings_is_refused_not_served_old_images(tmp_path):
    from benchmarks.runner import check_settings
    from erasers.errors import UsageError

    first, again = _Drawn(), _Drawn()
    Runner(tmp_path, progress=False).generate("base", jobs(), lambda: first)
    assert first.drawn == len(jobs())
    assert Runner(tmp_path, progress=False).generate("base", jobs(), lambda: again) == 0 and again.drawn == 0
    check_settings(tmp_path, jobs())  # the same settings resume
    changed = [ImageJob(j.key, j.prompt, j.seed, steps=50, labels=j.labels) for j in jobs()]
    reseeded = [ImageJob(j.key, j.prompt, j.seed + 1, steps=2, labels=j.labels) for j in jobs()]
    for other, differs in ((changed, "steps 2 there, 50 now"), (reseeded, "seed 100 there, 101 now")):
        with pytest.raises(UsageError, match=f"holds images made with other settings \\(base/job0: {differs}\\)"):
            check_settings(tmp_path, other)
        with pytest.raises(UsageError, match="other settings"):
            Runner(tmp_path, progress=False).generate("base", other, lambda: again)
    assert again.drawn == 0
    # A manifest from before settings were recorded cannot be compared: its images are taken as they are.
    legacy = tmp_path / "legacy"
    Manifest(legacy).append([{"stage": "image", "set": "base", "key": "job0", "file": "x.png"}])
    check_settings(legacy, changed)
