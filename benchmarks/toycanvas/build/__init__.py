"""`erasure toy build`: train every ToyCanvas toy model from scratch, on CPU, resumably. Training only: nothing a user
erases with imports this.

Stages run in order, each skipped when its export exists, each in its own file:
  data        the seeded training and held-out image sets                                  data.py
  classifier  object/style classifier                      -> weights/classifier           train_classifier.py
  clip        CLIPModel trained contrastively on captions   -> weights/clip                 train_clip.py
  vae         AutoencoderKL                                 -> build dir (exported with the pipeline)
                                                                                            train_vae.py
  unet        UNet2DConditionModel on the frozen CLIP text  -> weights/pipeline (a Stable Diffusion directory)
                                                                                            train_unet.py, export.py
  quality     the quality bars (benchmarks/toycanvas/README.md) -> weights/quality.json     here
  ip-adapter  an IP-Adapter on the frozen pipeline and the toy CLIP's vision tower, its bar
                                                -> weights/ip_adapter (+ quality.json)     train_ip_adapter.py
Each training stage checkpoints to the build directory every few hundred steps and resumes from the last
checkpoint when run again; exports are written under a temporary name and renamed. Settings: config.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .config import BuildConfig
from .data import load_data, stage_data
from .export import declare_float32
from .train_classifier import stage_classifier
from .train_clip import normalize_for_clip, stage_clip
from .train_ip_adapter import stage_ip_adapter
from .train_unet import stage_unet
from .train_vae import stage_vae

__all__ = ["STAGES", "BuildConfig", "declare_float32", "load_data", "normalize_for_clip", "run", "stage_classifier",
           "stage_clip", "stage_data", "stage_ip_adapter", "stage_quality", "stage_unet", "stage_vae"]


def stage_quality(cfg: BuildConfig) -> None:
    from .. import quality

    weights = Path(cfg.weights_dir)
    figures = quality.measure(load_data(cfg, "heldout"), weights / "pipeline", weights / "classifier")
    quality.write(figures, weights / "quality.json")
    print(quality.report(figures))
    print("bars met:", figures["met"])


STAGE_RUNNERS = {"data": stage_data, "classifier": stage_classifier, "clip": stage_clip, "vae": stage_vae,
                 "unet": stage_unet, "quality": stage_quality, "ip-adapter": stage_ip_adapter}
STAGES = tuple(STAGE_RUNNERS)


def run(cfg: BuildConfig, stages: tuple[str, ...] = STAGES, threads: int | None = None) -> None:
    if threads:
        torch.set_num_threads(threads)
    Path(cfg.weights_dir).mkdir(parents=True, exist_ok=True)
    runners = {name: STAGE_RUNNERS[name] for name in stages}
    for name in stages:
        runners[name](cfg)
        copy_logs(cfg)


def copy_logs(cfg: BuildConfig) -> None:
    """Ship the training logs beside the weights they produced."""
    logs = Path(cfg.build_dir) / "logs"
    if logs.is_dir():
        target = Path(cfg.weights_dir) / "logs"
        target.mkdir(parents=True, exist_ok=True)
        for log in logs.glob("*.jsonl"):
            shutil.copyfile(log, target / log.name)
