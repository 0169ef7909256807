"""Quality bars of the toy models: the classifier on held-out real images and on VAE reconstructions, and the
toy pipeline's own generations for every object x style, read by the classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import CLASSIFIER_DIR, PIPELINE_DIR
from .classifier import ToyClassifier
from .world import OBJECTS, STYLES

BARS = {"real": 0.98, "reconstruction_gap": 0.02, "generation": 0.90}
# Six consecutive seeds and the two the benchmarks use (188, 288): three seeds alone swung the object figure by
# several points.
QUALITY_SEEDS = (0, 1, 2, 3, 4, 5, 188, 288)


def accuracy(classifier: ToyClassifier, images, objects: list[str], styles: list[str]) -> dict[str, float]:
    return _share_right(*classifier.predict(images), objects, styles)


def _share_right(predicted_objects, predicted_styles, objects, styles) -> dict[str, float]:
    return {"object": float(np.mean([p == t for p, t in zip(predicted_objects, objects)])),
            "style": float(np.mean([p == t for p, t in zip(predicted_styles, styles)]))}


def _share_right_by(predicted: list[str], truth: list[str], groups: list[str], keys=None) -> dict[str, float]:
    """The share of right predictions within each group; keyed by `keys` in their order (default: sorted groups)."""
    return {g: float(np.mean([p == t for p, t, k in zip(predicted, truth, groups) if k == g]))
            for g in (keys if keys is not None else sorted(set(groups)))}


def real_and_reconstruction_accuracy(images: torch.Tensor, objects: torch.Tensor, styles: torch.Tensor,
                                     classifier: ToyClassifier, vae) -> dict[str, dict[str, float]]:
    object_names = [OBJECTS[i] for i in objects.tolist()]
    style_names = [STYLES[i] for i in styles.tolist()]
    with torch.no_grad():
        vae = vae.float().eval()
        recon = torch.cat([((vae.decode(vae.encode(chunk * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
                           for chunk in images.split(250)])
    return {"real": accuracy(classifier, images, object_names, style_names),
            "reconstruction": accuracy(classifier, recon, object_names, style_names)}


def generation_accuracy(loaded, classifier: ToyClassifier, pairs: list[tuple[str, str]], seeds: list[int],
                        steps: int | None = None, guidance: float | None = None, progress: bool = True) -> dict:
    from benchmarks.unlearncanvas import AnswerSet

    answers = AnswerSet(seeds=tuple(seeds), pairs=list(pairs))
    items = answers.items()
    objects, styles = [o for o, _, _ in items], [s for _, s, _ in items]
    images = loaded.generate([answers.prompt(o, s) for o, s, _ in items], seeds=[seed for _, _, seed in items],
                             steps=steps, guidance=guidance, batch_size=50, progress=progress)
    predicted_objects, predicted_styles = classifier.predict(images)
    result = _share_right(predicted_objects, predicted_styles, objects, styles)
    result["per_object"] = _share_right_by(predicted_objects, objects, objects)
    result["per_style"] = _share_right_by(predicted_styles, styles, styles)
    # Every prompt of one seed starts from the same noise, so a seed's images tend to succeed or fail together.
    result["per_seed_object"] = _share_right_by(predicted_objects, objects, [str(seed) for _, _, seed in items],
                                                keys=[str(seed) for seed in seeds])
    result["images"] = len(images)
    return result


def measure(heldout: tuple[torch.Tensor, torch.Tensor, torch.Tensor], pipeline_dir: Path = PIPELINE_DIR,
            classifier_dir: Path = CLASSIFIER_DIR, seeds: tuple[int, ...] = QUALITY_SEEDS) -> dict:
    from erasers.models import load_pipeline

    classifier = ToyClassifier.from_pretrained(classifier_dir)
    loaded = load_pipeline(str(pipeline_dir), device="cpu")
    figures = real_and_reconstruction_accuracy(*heldout, classifier, loaded.pipeline.vae)
    pairs = [(o, s) for s in STYLES for o in OBJECTS]
    figures["generation"] = generation_accuracy(loaded, classifier, pairs, list(seeds))
    figures["sampling"] = {"num_inference_steps": loaded.default_steps, "guidance_scale": loaded.default_guidance,
                           "seeds": list(seeds)}
    figures["bars"] = BARS
    figures["met"] = {
        "real": min(figures["real"].values()) >= BARS["real"],
        "reconstruction": all(figures["real"][k] - figures["reconstruction"][k] <= BARS["reconstruction_gap"]
                              for k in ("object", "style")),
        "generation": min(figures["generation"]["object"], figures["generation"]["style"]) >= BARS["generation"],
    }
    return figures


def report(figures: dict) -> str:
    rows = [("held-out real images", figures["real"]), ("VAE reconstructions", figures["reconstruction"]),
            ("toy pipeline generations", figures["generation"])]
    lines = ["| images | object accuracy | style accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {r['object']:.1%} | {r['style']:.1%} |" for name, r in rows]
    return "\n".join(lines)


def write(figures: dict, path: Path) -> None:
    path.write_text(json.dumps(figures, indent=2))
