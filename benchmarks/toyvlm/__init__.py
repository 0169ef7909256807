"""The toy VLM's world (benchmarks/toyvlm/world.py: ToyCanvas QA and MLLMU-Med in the MLLMU-Bench layout) and its
build (benchmarks/toyvlm/build/). Importing this registers the world with vlm.targets, which knows it only as a
directory."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from vlm.models import TOY_VLM_DIR
from vlm.targets import TOY_WORLD

from ..toycanvas.world import OBJECTS


def toy_world_config() -> dict:
    info = TOY_VLM_DIR / "toyvlm.json"
    if info.exists():
        return json.loads(info.read_text())["build_config"]["world"]
    from .world import WorldConfig

    return asdict(WorldConfig())


def toy_world_dir() -> Path:
    """The toy VLM's world: the build's copy when it matches the shipped model's, else built once (seconds) into
    the user's cache directory."""
    from .world import WorldConfig, build_world

    config = toy_world_config()
    build_copy = Path(".toybuild/vlm/world")
    if (build_copy / "world.json").exists() and \
            json.loads((build_copy / "world.json").read_text())["world_config"] == config:
        return build_copy
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "erasure-suite"
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    root = cache / f"toy-vlm-world-{digest}"
    if not (root / "world.json").exists():
        from erasers.files import writing_into

        with writing_into(root, replace=True) as tmp:  # a cache: a broken one is rebuilt
            build_world(tmp, WorldConfig(**config))
    return root


def object_names() -> tuple[str, ...]:
    from benchmarks.toycanvas.world import OBJECTS

    return tuple(OBJECTS)


TOY_WORLD.setdefault("directory", toy_world_dir)
TOY_WORLD.setdefault("objects", tuple(OBJECTS))
