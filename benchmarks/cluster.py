"""`erasure bench toycanvas | unlearncanvas | i2p --launcher slurm`: the run as cluster jobs, submitted with submitit.

Jobs on a cluster cannot wait for each other at the runner's barriers (they may not even run at the same time), so
the launching process orders the stages itself. It passes over the run without computing anything (`Planner`: the
runner notes where work is left), stops at the first barrier with work before it (the barrier after the erases only
while erases are left), and submits that stage's jobs:
one job per erase left, and `--jobs N` evaluation jobs (`Shard`) that each do their fixed share of the batches (batch
i to job i mod N, as the runner's processes do) up to that barrier and end. It waits for them, then passes again;
when nothing is left the pass writes results.json and the report. Every job records its work in the run's manifest
on the shared filesystem, so nothing is computed twice: a job that submitit requeues after a preemption or a timeout
(`BenchJob` is Checkpointable) resumes from the manifest, and after a job died, the same command passes again and
submits only what is left. `--launcher local-jobs` runs the same jobs as processes on this machine (submitit's local
executor), for tests and for trying a cluster run.

For tests, ERASURE_JOB_SIGNAL=SIGNAL:N makes each job process send itself SIGNAL after it has recorded N images
(KILL: a job killed half way; USR2: a preemption, as slurm signals it).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

from benchmarks.runner import Processes, Runner, claim_locked
from erasers.errors import UsageError

JOBS_DIR = "jobs"  # under the run's folder: submitit's pickles and each job's logs
# Time a job asks for unless --timeout-min says: submitit requeues a checkpointable job that runs out of it.
DEFAULT_TIMEOUT_MIN = 240
TEST_SIGNAL = "ERASURE_JOB_SIGNAL"


class StageDone(Exception):
    """A job's part of the run ends here: at its stage's barrier, or after its erase."""


@dataclass(frozen=True)
class Pending:
    """Work a planning pass found before `barrier` (the runner's barriers counted from 1): erases (their lock
    files) and whether image or scoring batches are left."""

    barrier: int
    erases: tuple[str, ...]
    batches: bool


class WorkLeft(Exception):
    def __init__(self, pending: Pending):
        super().__init__(pending)
        self.pending = pending


class Planner(Processes):
    """The launching process's pass over the run: it computes nothing, and raises WorkLeft at the first barrier
    with work left before it. With nothing left, the pass goes on to write results.json and the report."""

    planning = True

    def __init__(self):  # no accelerate: the only process of its pass
        self.state, self.rank, self.world = None, 0, 1
        self.barrier, self.erases, self.batches = 0, [], False

    def note_work(self) -> None:
        self.batches = True

    def claim(self, items: list, lock_path: Callable, finished: Callable):
        self.erases += [str(lock_path(item)) for item in items if not finished(item)]
        return iter(())

    def wait(self) -> None:
        self.barrier += 1
        if self.erases or self.batches:
            raise WorkLeft(Pending(self.barrier, tuple(self.erases), self.batches))

    def erases_done(self) -> None:
        """With no erase left, this barrier orders nothing: the jobs go on past it."""
        if self.erases:
            self.wait()
        else:
            self.barrier += 1


class Shard(Processes):
    """Evaluation job `rank` of `world`: its fixed share of the batches, up to barrier `stop` (None: to the end;
    a lone job needs no barrier once the erases are done). Erases are their own jobs, and the launching process
    writes the report."""

    def __init__(self, rank: int, world: int, stop: int | None):
        self.state, self.rank, self.world, self.stop, self.barrier = None, rank, world, stop, 0

    @property
    def is_main(self) -> bool:
        return False

    def wait(self) -> None:
        self.barrier += 1
        if self.barrier == self.stop:
            raise StageDone

    def claim(self, items: list, lock_path: Callable, finished: Callable):
        return iter(())


class EraseJob(Processes):
    """A job of one erase: the item whose lock file is `lock` (held while it works, so a second job on it skips)."""

    def __init__(self, lock: str):
        self.state, self.rank, self.world, self.lock = None, 0, 1, os.path.abspath(lock)

    @property
    def is_main(self) -> bool:
        return False

    def claim(self, items: list, lock_path: Callable, finished: Callable):
        mine = [item for item in items if os.path.abspath(lock_path(item)) == self.lock]
        yield from claim_locked(mine, lock_path, finished)
        raise StageDone

    def wait(self) -> None:
        raise StageDone


@dataclass(frozen=True)
class Role:
    """What one job does: an erase (`lock`: the erase's lock file) or evaluation shard `rank` of `world` up to
    barrier `stop`."""

    lock: str | None = None
    rank: int = 0
    world: int = 1
    stop: int | None = None

    def processes(self) -> Processes:
        return EraseJob(self.lock) if self.lock else Shard(self.rank, self.world, self.stop)

    def __str__(self) -> str:
        if self.lock:
            return f"erase {Path(self.lock).stem}"
        return f"shard {self.rank + 1} of {self.world}" + (f" to barrier {self.stop}" if self.stop else "")

    @property
    def job_name(self) -> str:
        """Its name in the cluster's queue (no spaces: slurm reads them as more options)."""
        if self.lock:
            return f"erasure-erase-{Path(self.lock).stem}"
        return f"erasure-shard-{self.rank + 1}-of-{self.world}" + (f"-to-{self.stop}" if self.stop else "")


class BenchJob(submitit.helpers.Checkpointable):
    """One job: `erasure ARGV` (the bench command line without the launcher's options) as `role`. Preempted or out
    of time, submitit requeues it with the same arguments (Checkpointable's checkpoint), and it goes on from the
    manifest."""

    def __call__(self, argv: list[str], role: Role) -> str:
        from benchmarks.bench_commands import parse_bench

        args = parse_bench(argv)
        args.job = role
        args.run(args)
        return str(role)


def run_part(role: Role, out: Path, run_with: Callable[[Runner], object], progress: bool) -> None:
    """A job's part of the run (in the job's process)."""
    try:
        run_with(Runner(out, role.processes(), progress=progress, on_batch=_test_signal()))
    except StageDone:
        pass


def _test_signal():
    spec = os.environ.get(TEST_SIGNAL)
    if not spec:
        return None
    name, count = spec.split(":")
    made = []

    def on_batch(stage, set_name, records):
        made.extend(r for r in records if stage == "image")
        if len(made) >= int(count):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))

    return on_batch


@dataclass(frozen=True)
class JobOptions:
    """--launcher and the jobs' resources (None: the cluster's default)."""

    launcher: str
    jobs: int = 1
    partition: str | None = None
    gpus_per_job: int | None = None
    timeout_min: int | None = None
    mem_gb: float | None = None

    def executor(self, folder: Path) -> submitit.AutoExecutor:
        slurm = self.launcher == "slurm"
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if slurm else "local")
        parameters = {"timeout_min": self.timeout_min or DEFAULT_TIMEOUT_MIN}
        if not slurm:  # the local executor hides every GPU from a job that asks for none
            import torch

            parameters["gpus_per_node"] = int(torch.cuda.is_available())
        else:
            parameters["gpus_per_node"] = 1 if self.gpus_per_job is None else self.gpus_per_job
            parameters.update({key: value for key, value in (("mem_gb", self.mem_gb),
                                                              ("slurm_partition", self.partition)) if value})
        executor.update_parameters(**parameters)
        return executor


def launch(options: JobOptions, argv: list[str], out: Path, run_with: Callable[[Runner], object]):
    """The run as jobs, stage by stage (module docstring); returns what `run_with` returns on the last pass."""
    from filelock import FileLock, Timeout

    folder = Path(out) / JOBS_DIR
    new_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".launcher.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(f"another launcher is running jobs for --out {out}; wait for it (or for its jobs) and "
                         "rerun") from None
    submitted: list = []
    try:
        executor, previous = options.executor(folder), None
        while True:
            try:
                return run_with(Runner(out, Planner(), progress=False))
            except WorkLeft as left:
                if left.pending == previous:
                    raise UsageError(f"the jobs before barrier {previous.barrier} ended without finishing their "
                                     f"work (is another run using --out {out}?); rerun the same command") from None
                previous = left.pending
            run_jobs(executor, argv, roles(previous, options.jobs), folder, submitted)
    finally:
        lock.release()
        if new_folder and not submitted:  # refused before any job (the cluster refused the first): nothing is left
            shutil.rmtree(folder, ignore_errors=True)


def roles(pending: Pending, jobs: int) -> list[Role]:
    found = [Role(lock=lock) for lock in pending.erases]
    if pending.batches:
        stop = None if jobs == 1 and not pending.erases else pending.barrier
        found += [Role(rank=rank, world=jobs, stop=stop) for rank in range(jobs)]
    return found


def run_jobs(executor: submitit.AutoExecutor, argv: list[str], stage: list[Role], folder: Path,
             submitted: list) -> None:
    """Submit one job per role (adding each to `submitted`) and wait for all of them; a failed one is one line
    naming its log. A refused submission or Ctrl-C cancels the stage's jobs, so that a rerun does not race them."""
    jobs = []
    try:
        for role in stage:
            executor.update_parameters(name=role.job_name)
            try:
                jobs.append((role, executor.submit(BenchJob(), argv, role)))
            except Exception as error:  # noqa: BLE001 - sbatch's refusals come as several kinds
                raise UsageError(f"could not submit the job {role} ({_last_line(error)}); check --partition, "
                                 "--gpus-per-job, --mem-gb and --timeout-min") from None
            submitted.append(jobs[-1][1])
        print(f"submitted {len(stage)} jobs ({', '.join(map(str, stage))}); logs in {folder}/", flush=True)
        failed = [(role, job, job.exception()) for role, job in jobs]
    except (KeyboardInterrupt, UsageError):
        for _, job in jobs:
            job.cancel(check=False)
        raise
    failed = [(role, job, error) for role, job, error in failed if error is not None]
    if failed:
        role, job, error = failed[0]
        raise UsageError(f"{len(failed)} of {len(jobs)} jobs failed; the first, {role} (job {job.job_id}): "
                         f"{_why(error)}; its log: {job.paths.stderr}. Rerun the same command: finished work is kept")


def _why(error: BaseException) -> str:
    """A failed job's error line (the last of its traceback, which submitit puts between lines of dashes)."""
    if isinstance(error, submitit.core.utils.FailedJobError):
        parts = str(error).split("-" * 22)
        trace = parts[1] if len(parts) > 2 else str(error)
        return _last_line(trace)
    return "it ended without a result (killed, or out of memory or time)"


def _last_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else type(text).__name__
