"""ToyCanvas as an UnlearnCanvas-protocol benchmark: the toy pipeline with its own sampling, the toy classifier as
the style and object classifier, and for FID its backbone's features on real ToyCanvas renders."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from benchmarks.erasure_bench import Benchmark, FeatureExtractor
from benchmarks.merge import file_digest
from erasers.errors import UsageError

from . import CLASSIFIER_DIR, world
from .classifier import ToyClassifier, pil_to_tensor

# Real renders per object x style for FID's reference (UnlearnCanvas has 20 photos per pair).
REFERENCE_PER_PAIR = 3
FEATURES_NAME = "toy-classifier (ToyCanvas classifier backbone, 128-d pooled features)"


def toy_features(classifier: ToyClassifier) -> FeatureExtractor:
    @torch.no_grad()
    def extract(images: list[Image.Image]) -> torch.Tensor:
        pixels = pil_to_tensor([im.resize((32, 32), Image.BICUBIC) for im in images])
        return classifier.backbone(pixels * 2 - 1).double()

    return FeatureExtractor(FEATURES_NAME, extract)


def toy_reference(objects: tuple[str, ...], styles: tuple[str, ...]):
    """Real ToyCanvas images of every object x style (seeded renders), the miniature of UnlearnCanvas' photos."""
    from .render import render, sample_scene

    def items(excluded: set[str]) -> list:
        out = []
        for style in styles:
            for obj in objects:
                if obj in excluded or style in excluded:
                    continue
                for i in range(REFERENCE_PER_PAIR):
                    seed = (world.STYLES.index(style) * 100 + world.OBJECTS.index(obj)) * 10 + i
                    out.append((f"{style}/{obj}/{i}", lambda obj=obj, style=style, seed=seed: render(
                        sample_scene(np.random.default_rng(seed), obj, style))))
        return out

    return items


def _subset(names: list[str] | None, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not names:
        return known
    lowered = {k.lower(): k for k in known}
    unknown = [n for n in names if n.lower() not in lowered]
    if unknown:
        raise UsageError(f"unknown ToyCanvas {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return tuple(lowered[n.lower()] for n in names)


def toycanvas_benchmark(objects: list[str] | None = None, styles: list[str] | None = None,
                        seeds: tuple[int, ...] = (188,), fid: bool = True, device: str | None = None) -> Benchmark:
    """The toy answer set: the chosen objects x styles (default all 10 x 10) at `seeds`, with the toy pipeline's
    recommended sampling (its sampling.json)."""
    objects_, styles_ = _subset(objects, world.OBJECTS, "object"), _subset(styles, world.STYLES, "style")
    classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    return Benchmark(name="toycanvas", model="toy", objects=objects_, styles=styles_, seeds=tuple(seeds),
                     template=world.CAPTION_TEMPLATE, classify=classifier.predict,
                     features=toy_features(classifier) if fid else None,
                     reference=toy_reference(objects_, styles_) if fid else None, device=device,
                     fingerprint=lambda: {"classifier": file_digest(sorted(CLASSIFIER_DIR.iterdir()))})
