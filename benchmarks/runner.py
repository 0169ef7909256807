"""The benchmark runner's core, shared by `erasure bench toycanvas | unlearncanvas | i2p`.

Work is a list of jobs per *set* (the images of one model: "base", "esd-x-arrow", ...), done in *stages*
(generate, classify, ...). Every finished job of a stage is a line in `DIR/manifest.jsonl`:

    {"stage": "image", "set": "uce-arrow", "key": "Flat_arrow_seed188", "file": "images/uce-arrow/...png",
     "settings": {"prompt": "A arrow image in Flat style.", "seed": 188, "steps": 100, "guidance": 9.0, ...}, ...}
    {"stage": "score", "set": "uce-arrow", "key": "Flat_arrow_seed188", "predicted_object": "star", ...}

so a killed run resumes where it stopped and never recomputes a finished image or score; a rerun that asks for
other settings (steps, guidance, size, seeds) is refused, since its old images would be scored as new results.
Images are written under a temporary name and renamed, then their manifest lines are appended in one write: an
image without its line is simply made again, never read half-written.

Jobs are cut into fixed batches (from the whole job list, never from what is left), because a batch's composition
changes the floating-point result by a pixel level now and then: with fixed batches an image is bit-identical
whichever process made it and whether the run was resumed. Batch i goes to process i mod N, so a run launched with
accelerate over N processes (or GPUs) splits the work without talking, and the union of the outputs is the
single-process run's. Erases, whose costs differ tenfold between methods, are instead claimed first come, first
served (`Processes.claim`), so no process idles while another works through the slow ones. Cluster jobs, which
cannot meet at barriers, take the same shares stage by stage (benchmarks.cluster).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from erasers.errors import UsageError
from erasers.images import BLANK, save_image_atomically

MANIFEST = "manifest.jsonl"
# Barriers wait for the slowest process, which may be erasing with a slow method on a large model.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class ImageJob:
    """One image: its key (unique within its set, also its file stem), prompt, seed and sampling settings (None:
    the model's defaults), and labels (what the prompt asks for: object/style, or an I2P row's category)."""

    key: str
    prompt: str
    seed: int
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def sampling(self) -> tuple:
        return self.steps, self.guidance, self.height, self.width

    @property
    def settings(self) -> dict:
        """What its image is made from, recorded with it in the manifest: a rerun asking for other settings is
        refused rather than served the old image (None: the model's default)."""
        return {"prompt": self.prompt, "seed": self.seed, "steps": self.steps, "guidance": self.guidance,
                "height": self.height, "width": self.width}

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


class Processes:
    """This process's rank among the processes accelerate launched (or the only one)."""

    # A pass that only plans the run (benchmarks.cluster.Planner) calls note_work() where work is left, not the work.
    planning = False

    def __init__(self):
        self.state = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str | None:
        """The device this process should use: its own GPU when launched over several, else the default."""
        if self.state is not None and self.state.device.type != "cpu":
            return str(self.state.device)
        return None

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def erases_done(self) -> None:
        """The barrier after the erases: what follows may use every edit. Cluster jobs, which cannot wait for each
        other, end their stage here only while erases are left (benchmarks.cluster)."""
        self.wait()

    def mine(self, items: list) -> list:
        return items[self.rank::self.world]

    def claim(self, items: list, lock_path: Callable[[Any], Path], finished: Callable[[Any], bool]) -> Iterator:
        """Items handed out first come, first served: each process takes the next item no other process holds
        (a file lock, which the system releases if its holder dies) and that is not `finished`. Unlike `mine`,
        processes finish together however uneven the items' costs (erases differ tenfold between methods); an
        item's result must not depend on which process made it (erases are seeded per item)."""
        if self.world == 1:
            yield from (item for item in items if not finished(item))
            return
        yield from claim_locked(items, lock_path, finished)


def claim_locked(items: list, lock_path: Callable[[Any], Path], finished: Callable[[Any], bool]) -> Iterator:
    """`Processes.claim` among processes that do not talk: each item is held under its file lock while it is
    worked on, and skipped when another holds it or it is `finished`."""
    from filelock import FileLock, Timeout

    for item in items:
        path = lock_path(item)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # another process is on it
        try:
            # A process that arrives late must not redo what another finished and released.
            if not finished(item):
                yield item
        finally:
            lock.release()


def accelerate_command(processes: int, argv: list[str]) -> list[str]:
    """The command that runs `erasure ARGV` over `processes` processes (one per GPU when there are GPUs, CPU
    processes otherwise) with accelerate's launcher (torchrun underneath)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "apps.cli", *argv]


def relaunch(processes: int, argv: list[str]) -> int:
    return subprocess.call(accelerate_command(processes, argv))


class Manifest:
    """The append-only record of finished work in DIR/manifest.jsonl (one JSON object a line)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / MANIFEST

    def read(self) -> dict[tuple[str, str, str], dict]:
        """{(stage, set, key): record}; a line cut short by a crash is ignored (its work is redone)."""
        done = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[(record["stage"], record["set"], record["key"])] = record
        return done

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # One write per batch: concurrent processes' batches never interleave within a line.
            if os.fstat(descriptor).st_size and not self._ends_with_newline():
                data = b"\n" + data  # a line left cut short by a crash stays on its own line
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            return file.read(1) == b"\n"


def check_settings(out: str | Path, jobs: list[ImageJob]) -> None:
    """Before a benchmark resumes the run folder `out`: its recorded images were made with the settings `jobs` ask
    for (steps, guidance, size, seed, prompt), else one line; a bench checks this before any model loads."""
    refuse_other_settings(Path(out), Manifest(out).read(), jobs)


def refuse_other_settings(out: Path, done: dict, jobs: list[ImageJob]) -> None:
    wanted = {job.key: job.settings for job in jobs}
    for (stage, set_name, key), record in done.items():
        recorded = record.get("settings") if stage == "image" else None
        if recorded is not None and key in wanted and recorded != wanted[key]:  # images from before: unrecorded
            name = next(k for k in wanted[key] if recorded.get(k) != wanted[key][k])
            raise UsageError(f"--out {out} holds images made with other settings ({set_name}/{key}: {name} "
                             f"{recorded.get(name)!r} there, {wanted[key][name]!r} now); rerun with the settings it "
                             "was made with, or choose a new --out")


def fixed_batches(jobs: list[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """Consecutive jobs with the same sampling settings, cut every `batch_size`: a function of the whole job
    list only, so every run and every process agrees on them."""
    batches: list[list[ImageJob]] = []
    for job in jobs:
        if batches and len(batches[-1]) < batch_size and batches[-1][-1].sampling == job.sampling:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


@dataclass
class Runner:
    """Runs stages over sets of jobs in `out`, resumably and split across processes. `on_batch(stage, set,
    records)` is called after each recorded batch (progress hooks; tests interrupt runs with it)."""

    out: Path
    processes: Processes = field(default_factory=Processes)
    progress: bool = True
    on_batch: Callable[[str, str, list[dict]], None] | None = None

    def __post_init__(self):
        self.out = Path(self.out)
        self.manifest = Manifest(self.out)
        self.done: dict = {}

    def records(self, stage: str, set_name: str, jobs: list[ImageJob]) -> list[dict | None]:
        done = self.manifest.read()
        return [done.get((stage, set_name, job.key)) for job in jobs]

    def run_stage(self, stage: str, set_name: str, jobs: list[ImageJob], batch_size: int,
                  work: Callable[[list[ImageJob]], list[dict]], unit: str = "img") -> int:
        """Do `work` on this process's share of the batches not yet recorded; returns the images processed here.
        `work` returns one record per job (JSON-serialisable)."""
        done = self.done = self.manifest.read()
        if stage == "image":  # images record their settings, and a rerun asking for others is refused
            refuse_other_settings(self.out, done, jobs)
        batches = self.processes.mine(fixed_batches(jobs, batch_size))
        pending = [b for b in batches if any((stage, set_name, job.key) not in done for job in b)]
        total = sum(len(b) for b in pending)
        if not total:
            return 0
        if self.processes.planning:
            self.processes.note_work()
            return 0
        started = time.perf_counter()
        label = f"{stage} {set_name}" + (f" [{self.processes.rank}/{self.processes.world}]"
                                         if self.processes.world > 1 else "")
        with tqdm(total=total, desc=label, unit=unit, disable=not self.progress, leave=False) as bar:
            for batch in pending:
                records = [{"stage": stage, "set": set_name, "key": job.key, **record,
                            **({"settings": job.settings} if stage == "image" else {}),
                            "process": self.processes.rank} for job, record in zip(batch, work(batch))]
                self.manifest.append(records)
                bar.update(len(batch))
                if self.on_batch is not None:
                    self.on_batch(stage, set_name, records)
        seconds = time.perf_counter() - started
        if self.progress:
            print(f"{label}: {total} {unit} in {seconds:.1f} s ({total / seconds:.2f} {unit}/s)", flush=True)
        return total

    def generate(self, set_name: str, jobs: list[ImageJob], loaded_factory: Callable[[], object],
                 batch_size: int = 16, suffix: str = ".png") -> int:
        """The generate stage: images in `out`/images/`set_name`/KEY`suffix`, a blank one's mark in its record
        (benchmarks.failures). The pipeline is loaded only when some batch is left (a finished set costs nothing on
        resume)."""
        loaded = None

        def work(batch: list[ImageJob]) -> list[dict]:
            nonlocal loaded
            if loaded is None:
                loaded = loaded_factory()
            first = batch[0]
            images = loaded.generate([job.prompt for job in batch], seeds=[job.seed for job in batch],
                                     steps=first.steps, guidance=first.guidance, height=first.height,
                                     width=first.width, batch_size=len(batch), progress=False)
            records = []
            for job, image in zip(batch, images):
                relative = Path("images") / set_name / f"{job.key}{suffix}"
                save_image_atomically(image, self.out / relative)
                # A blank image's mark, which the saved file cannot keep: the set is then reported failed.
                records.append({"file": str(relative), **({"blank": image.info[BLANK]} if BLANK in image.info else {})})
            return records

        return self.run_stage("image", set_name, jobs, batch_size, work)

    def classify(self, set_name: str, jobs: list[ImageJob], classify: Callable[[list], list[dict]],
                 batch_size: int = 64, stage: str = "score", paths: bool = False) -> int:
        """A scoring stage: `classify` takes a batch of the set's images read from disk (or their paths, for
        detectors that read files themselves) and returns one record each."""
        def work(batch: list[ImageJob]) -> list[dict]:
            if paths:
                return classify([str(self.image_path(self.done, set_name, job)) for job in batch])
            return classify([self.open_image(self.done, set_name, job) for job in batch])

        return self.run_stage(stage, set_name, jobs, batch_size, work)

    def image_path(self, done: dict, set_name: str, job: ImageJob) -> Path:
        record = done.get(("image", set_name, job.key))
        if record is None:
            raise FileNotFoundError(f"{set_name}/{job.key} has not been generated")
        return self.out / record["file"]

    def open_image(self, done: dict, set_name: str, job: ImageJob) -> Image.Image:
        with Image.open(self.image_path(done, set_name, job)) as image:
            return image.convert("RGB")

    def once(self, stage: str, set_name: str, compute: Callable[[], dict]) -> dict:
        """A per-set result (FID, ...) computed by one process and recorded like any other."""
        key = (stage, set_name, "-")
        done = self.manifest.read()
        if key not in done and self.processes.planning:
            self.processes.note_work()
            return {}
        if key not in done:
            self.manifest.append([{"stage": stage, "set": set_name, "key": "-", **compute()}])
            done = self.manifest.read()
        return done[key]
