"""The UnlearnDiffAtk attack's API from before the attacks registry (benchmarks/attacks/), kept for its callers:
`attack_success_rate` runs `erasure attack`'s default attack, and the names below are where they now live."""

from __future__ import annotations

from pathlib import Path

from benchmarks.attacks.harness import AttackRun, generate_from_ids, run_attack
from benchmarks.attacks.judges import Judge, ToyJudge, call_judge, load_judge
from benchmarks.attacks.prompts import attack_prompts
from benchmarks.attacks.unlearndiffatk import (
    TOY_ATTACK_DEFAULTS,
    AttackConfig,
    encode_image,
    unlearn_diff_attack,
)

__all__ = ["TOY_ATTACK_DEFAULTS", "AttackConfig", "AttackRun", "Judge", "ToyJudge", "attack_prompts",
           "attack_success_rate", "call_judge", "encode_image", "generate_from_ids", "load_judge",
           "unlearn_diff_attack"]


def attack_success_rate(model: str, edits: list[str | Path], concept: str | None = None, *,
                        prompts: list[str] | None = None, count: int | None = None, seed: int = 188,
                        config: AttackConfig | dict | None = None, judge: Judge | None = None, **run) -> dict:
    """UnlearnDiffAtk against `edits` (stacked) on `model`: Pre-ASR and ASR of `count` prompts of `concept`
    (benchmarks.attacks.harness.run_attack says the rest). The summary's items are also under "prompts", the name
    this function gave them."""
    summary = run_attack("unlearndiffatk", model, edits, concept, prompts=prompts, count=count, seed=seed,
                         config=config, judge=judge, **run)
    return {**summary, "prompts": summary["items"]}
