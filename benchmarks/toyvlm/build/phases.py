"""Stage `train`, phases 1 and 2: every question, on a 3-layer Llama (phase 1), then grown to 6 layers (phase 2); and
what every phase shares: the answer loss, the setup, and `run_phase`, the seeded, checkpointed, resumable loop
that evaluates greedy answers on cached features as it goes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from erasers.files import writing_into
from erasers.train import TrainingLoop

from .batches import Batcher, Packer, Sample, prompt_for
from .config import ToyVLMConfig
from .data import load_features, load_rows, load_tokenizer
from .evaluate import is_correct
from .model import forward_hidden, grow, new_model
from .pools import Pools, draw_rows, eval_samples, training_pools


def answer_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over answer tokens of a Batcher batch (ids, mask, labels, feats) or a Packer batch
    (ids, 4D mask, positions, labels, feats)."""
    if len(batch) == 5:
        ids, mask, positions, labels, feats = batch
    else:
        (ids, mask, labels, feats), positions = batch, None
    return answer_loss_from_hidden(model, forward_hidden(model, ids, mask, feats, positions), labels)


def answer_loss_from_hidden(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())


def pooled_mean(*parts: tuple[torch.Tensor, int]) -> torch.Tensor:
    """The mean over all items of (mean, count) parts, as if their items had been averaged together."""
    return sum(mean * count for mean, count in parts) / max(sum(count for _, count in parts), 1)


@torch.no_grad()
def greedy(model, batcher: Batcher, samples: list[tuple[Sample, str]], max_new_tokens: int = 12) -> list[str]:
    """Greedy answers computed from cached features (no KV cache: answers are a few tokens)."""
    ids, mask, _, feats = batcher(samples, with_answers=False)
    eos = batcher.tokenizer.eos_token_id
    out = [[] for _ in samples]
    done = torch.zeros(len(samples), dtype=torch.bool)
    for _ in range(max_new_tokens):
        hidden = forward_hidden(model, ids, mask, feats)
        next_ids = model.lm_head(hidden[:, -1]).argmax(-1)
        for i, token in enumerate(next_ids.tolist()):
            if not done[i]:
                if token == eos:
                    done[i] = True
                else:
                    out[i].append(token)
        if done.all():
            break
        ids = torch.cat([ids, next_ids[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return [batcher.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def evaluate_cached(model, batcher: Batcher, sets: dict[str, list[Sample]]) -> dict[str, float]:
    """acc_{set}: accuracy on each set; mc_{set}: on its multiple-choice questions alone; mc_shuffled_{set}: on them
    with every option list reshuffled (fixed seed), where a memorised letter is right by chance only."""
    model.eval()
    scores = {}

    def correct(asked: list[tuple[Sample, str]]) -> list[bool]:
        results = []
        for start in range(0, len(asked), 100):
            chunk = asked[start:start + 100]
            results += [is_correct(s.qa, a) for (s, _), a in zip(chunk, greedy(model, batcher, chunk))]
        return results

    for name, samples in sets.items():
        results = correct([prompt_for(s, None, 0) for s in samples])
        scores[f"acc_{name}"] = round(sum(results) / len(results), 4)
        mc = [s for s in samples if s.qa.task == "classification"]
        mc_ok = [ok for s, ok in zip(samples, results) if s.qa.task == "classification"]
        scores[f"mc_{name}"] = round(sum(mc_ok) / max(len(mc_ok), 1), 4)
        generator = torch.Generator().manual_seed(17)
        shuffled = correct([prompt_for(s, generator, 1.0) for s in mc])
        scores[f"mc_shuffled_{name}"] = round(sum(shuffled) / max(len(shuffled), 1), 4)
    model.train()
    return scores


@dataclass
class Setup:
    """What every training phase reads: tokenizer, cached features (in the Batcher), the Packer, pools and
    evaluation sets."""

    tokenizer: object
    batcher: Batcher
    packer: Packer
    pools: Pools
    checks: dict[str, list[Sample]]


def training_setup(cfg: ToyVLMConfig, image_tokens: int) -> Setup:
    tokenizer = load_tokenizer(cfg)
    rows = load_rows(cfg)
    batcher = Batcher(tokenizer, load_features(cfg), image_tokens)
    return Setup(tokenizer, batcher, Packer(batcher), training_pools(cfg, rows),
                 eval_samples(cfg, rows, cfg.eval_items))


def run_phase(cfg: ToyVLMConfig, setup: Setup, name: str, model, stop: int, schedule_steps: int, lr: float,
              losses, extra_modules: dict | None = None):
    """Train `model` (and `extra_modules`, training-only) on `losses(generator) -> (loss, metrics)` for `stop` steps
    of a `schedule_steps`-step one-cycle schedule, seeded, checkpointed and resumable, evaluating every `eval_every`."""
    modules = {"model": model, **(extra_modules or {})}
    trainable = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=schedule_steps, pct_start=0.05)
    loop = TrainingLoop(name, stop, {**modules, "opt": optimizer, "sched": schedule}, cfg.seed, cfg.build_dir,
                        cfg.checkpoint_every)
    eval_log = Path(cfg.build_dir) / "logs" / "toy-vlm-eval.jsonl"
    for module in modules.values():
        module.train()
    started = time.time()

    def step(step_index, generator):
        loss, metrics = losses(generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        if (step_index + 1) % cfg.eval_every == 0 or step_index + 1 == stop:
            metrics.update(evaluate_cached(model, setup.batcher, setup.checks))
            record = {"phase": name, "step": step_index + 1, "seconds": round(time.time() - started, 1), **metrics}
            with eval_log.open("a") as log:
                log.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
        return metrics

    loop.run(step)
    return model


def save_trained(model, out: Path) -> None:
    with writing_into(out, replace=True) as tmp:  # a build stage: rebuilt in place
        model.eval().save_pretrained(tmp)


def stage_train(cfg: ToyVLMConfig) -> None:
    """Phases 1 and 2: every question, options in their stored order half the time."""
    model = new_model(cfg, load_tokenizer(cfg))
    setup = training_setup(cfg, model.config.image_seq_length)

    def losses(generator):
        image_rows, text_rows = draw_rows(cfg, setup.pools, generator)
        loss_image, n_image = answer_loss(model, setup.packer(image_rows))
        loss_text, n_text = answer_loss(model, setup.packer(text_rows))
        loss = pooled_mean((loss_image, n_image), (loss_text, n_text))
        return loss, {"loss": loss.item(), "loss_image": loss_image.item(), "loss_text": loss_text.item()}

    model = run_phase(cfg, setup, "toy-vlm", model, cfg.grow_at, cfg.steps, cfg.lr, losses)
    if cfg.grow_layers:
        model = grow(cfg, model, setup.tokenizer)
        model = run_phase(cfg, setup, "toy-vlm-grow", model, cfg.grow_steps, cfg.grow_steps, cfg.grow_lr, losses)
    save_trained(model, Path(cfg.build_dir) / "trained")
