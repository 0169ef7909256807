"""Writing outputs under a temporary name and renaming them, so a crash never leaves a half-written model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def atomic_dir(final: Path) -> Path:
    """A fresh temporary directory beside `final`; pass it to `publish` once everything is written into it."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Move a completed temporary directory into place, replacing what was there."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
