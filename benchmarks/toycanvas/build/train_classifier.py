"""Stage `classifier`: the object/style classifier the metrics judge with, trained on augmented real images so that
it also reads VAE reconstructions and generations -> weights/classifier."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from erasers.files import writing_into
from erasers.train import TrainingLoop

from ..classifier import ToyClassifier
from .config import BuildConfig
from .data import augment, load_data


def stage_classifier(cfg: BuildConfig) -> None:
    images, objects, styles = load_data(cfg, "train")
    torch.manual_seed(cfg.seed)
    model = ToyClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=cfg.classifier_steps)
    loop = TrainingLoop("classifier", cfg.classifier_steps, {"model": model, "opt": optimizer, "sched": schedule},
                        cfg.seed, cfg.build_dir, cfg.checkpoint_every)
    model.train()

    def step(_, generator):
        idx = torch.randint(len(images), (cfg.classifier_batch,), generator=generator)
        object_logits, style_logits = model(augment(images[idx], generator))
        loss = F.cross_entropy(object_logits, objects[idx]) + F.cross_entropy(style_logits, styles[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        return {"loss": loss.item()}

    loop.run(step)
    final = Path(cfg.weights_dir) / "classifier"
    with writing_into(final, replace=True) as tmp:  # a rebuild replaces the shipped classifier
        model.eval().save_pretrained(tmp)
