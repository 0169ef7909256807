import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_pipelines import BUILDERS, RESOLUTION, build_tokenizer, text_sensitive  # noqa: E402

import benchmarks  # noqa: E402,F401  (registers "toy" and the toy VLM world, as the `erasure` command does)
from erasers import load_pipeline  # noqa: E402

# Tiny models run many small operations: on two cores one thread per process is several times faster than two
# (measured: the toy VLM tests 123 s -> 6 s). The cores are used by pytest-xdist instead, one worker per core
# (pyproject's addopts); the app tests' server runs in its worker's process and is idle while the client waits.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Deal the tests marked heavy out to the workers, each share first in its worker's queue. pytest-xdist's
    worksteal gives worker k the k-th contiguous slice of the collection and an idle worker steals from the end of
    another's queue: collected where they are, the heavy tests sat together in one slice, and one worker ran the
    last of them while the other idled. Heavy tests that share a module-scoped fixture stay on one worker, so it
    is built once (the toy erasure tests' base scoring, 40 s); groups go, largest first, to the worker with the
    fewest heavy tests. Every worker collects, and so orders, the same way."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    light = [item for item in items if not item.get_closest_marker("heavy")]
    groups: dict[tuple, list] = {}
    for item in items:
        if item.get_closest_marker("heavy"):
            groups.setdefault(_shared_fixtures(item) or (item.nodeid,), []).append(item)
    shares: list[list] = [[] for _ in range(workers)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(shares, key=len).extend(group)
    ordered, remaining = [], len(items)
    for worker in range(workers):
        size = remaining // (workers - worker)  # worksteal's first split
        remaining -= size
        fill = max(0, size - len(shares[worker]))
        ordered += shares[worker] + light[:fill]
        light = light[fill:]
    items[:] = ordered + light


def _shared_fixtures(item) -> tuple:
    """The module-scoped fixtures `item` uses, with its module: what it shares with the module's other tests."""
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    shared = sorted(name for name, defs in definitions.items() if defs and defs[-1].scope == "module")
    return (item.nodeid.split("::")[0], *shared) if shared else ()


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory, clip_tokenizer_dir) -> dict[str, Path]:
    """A tiny random-weight pipeline directory per family: {"sd": ..., "sdxl": ..., "flux": ...}."""
    root = tmp_path_factory.mktemp("pipelines")
    return {family: build(root / family, clip_tokenizer_dir) for family, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def bases(tiny_pipeline_dirs):
    """bases(family): a fresh copy of the family's tiny pipeline, loaded once per module, its text encoders made to
    tell prompts apart (tiny_pipelines.text_sensitive), Flux at 16 px."""
    cache = {}

    def get(family):
        if family not in cache:
            loaded = load_pipeline(str(tiny_pipeline_dirs[family]), device="cpu")
            loaded.resolution = RESOLUTION[family]
            cache[family] = text_sensitive(loaded)
        return copy.deepcopy(cache[family])

    return get
