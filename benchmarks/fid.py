"""FID for the UnlearnCanvas-protocol benchmarks: an answer set's features against reference images without the
erased concepts, on the benchmark's feature extractor (torchmetrics computes the distance)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.runner import ImageJob, Runner
from erasers.files import save_atomically

if TYPE_CHECKING:
    from benchmarks.erasure_bench import Benchmark, Edit


def fid_record(bench: Benchmark, runner: Runner, set_name: str, edit: Edit | None, jobs: list[ImageJob]) -> dict:
    """FID of a set's answer set against the reference images without its erased concepts (torchmetrics, on the
    benchmark's features; the reference's features are computed once and cached in DIR/fid/)."""
    excluded = set(edit.concepts) if edit is not None else set()
    reference = reference_features(bench, runner.out, excluded)
    done = runner.manifest.read()
    generated = []
    for start in range(0, len(jobs), 64):
        generated.append(bench.features.extract([runner.open_image(done, set_name, j) for j in jobs[start:start + 64]]))
    generated = torch.cat(generated)
    return {"fid": frechet_distance(reference, generated), "fid_features": bench.features.name,
            "fid_reference_images": len(reference), "fid_generated_images": len(generated)}


def frechet_distance(reference: torch.Tensor, generated: torch.Tensor) -> float:
    """FID between two sets of features already extracted (torchmetrics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # One process computes each set's FID: torchmetrics would otherwise all-gather its states across the
    # accelerate process group, and the other processes are computing other sets (a 2-process run crashed).
    metric = FrechetInceptionDistance(feature=_Given(generated.shape[1]), normalize=True, sync_on_compute=False)
    metric.update(reference, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


class _Given(torch.nn.Module):
    """A 'feature extractor' that returns its input: FID is computed from features extracted (and cached) here."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def reference_features(bench: Benchmark, out: Path, excluded: set[str]) -> torch.Tensor:
    cache = out / "fid" / f"reference-{bench.features.name.split(' ')[0]}.pt"
    items = bench.reference(set())
    stored = torch.load(cache) if cache.exists() else {"keys": [], "features": None}
    if stored["keys"] != [key for key, _ in items]:
        features = []
        for start in range(0, len(items), 64):
            features.append(bench.features.extract([load() for _, load in items[start:start + 64]]))
        stored = {"keys": [key for key, _ in items], "features": torch.cat(features)}
        # Processes computing it at once each write their own unique temporary file.
        save_atomically(cache, lambda tmp: torch.save(stored, tmp))
    keep = {key for key, _ in bench.reference(excluded)}
    rows = [i for i, key in enumerate(stored["keys"]) if key in keep]
    return stored["features"][rows]
