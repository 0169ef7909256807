"""Relearning, the VLM form (the `relearn` attack on edits of `erasure vlm erase`): a few steps of LoRA fine-tuning
of the erased VLM on `questions` of the concept's forget questions with their answers bring back what it forgot,
also on the forget questions it was not fine-tuned on ("unlearning is not robust to relearning", arXiv 2406.13356;
the diffusion form is relearn.py). The adapter sits where the MLLMU-Bench baselines put theirs (vlm.methods.
baselines.LORA_TARGETS: the language model's projections), rank 4, trained with AdamW on the answers' negative
log-likelihood (vlm.forward.answer_nll), batch 4.

The erased model is the one fine-tuned: a LoRA edit's own adapter stays active beside the new one (and frozen); a
hook edit (SAUCE, MLLMEraser) keeps its hooks on while training and scoring. Training goes once through the step
counts of `steps`; after each, the scored forget set (other questions than those trained on) and retain set are
scored as MLLMU-Med scores them, so the result is a curve, `"curve": [{"steps": k, "rate": forget score,
"retain": retain score}]`, and `steps_to_relearn` the first k whose forget score reaches `threshold` (None: none
does). Training is checkpointed in OUT.partial/ per step count, so an interrupted run resumes it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from erasers.errors import UsageError
from erasers.train import ParameterState, TrainingLoop

from . import AttackEntry
from .vlm_harness import VLMAttack, VLMAttackContext

ADAPTER_NAME = "relearn"


@dataclass
class VLMRelearnConfig:
    steps: str = "0,10,50,100"     # the step counts the sets are scored after, rising
    questions: int = field(default=20, metadata={"min": 1})  # forget questions fine-tuned on (not scored)
    lr: float = 1e-4
    rank: int = field(default=4, metadata={"min": 1})
    batch_size: int = field(default=4, metadata={"min": 1})
    # steps_to_relearn: the first step count whose forget score reaches this.
    threshold: float = field(default=0.5, metadata={"min": 0, "max": 1, "min_exclusive": True})
    seed: int = 0

    def __post_init__(self):
        self.step_counts()

    def step_counts(self) -> list[int]:
        from .relearn import parse_step_counts  # relearn.py registers this form: imported once that module is

        return parse_step_counts(self.steps)


class VLMRelearn(VLMAttack):
    config_class = VLMRelearnConfig

    def items(self) -> list[int]:
        return self.config.step_counts()

    def run(self, context: VLMAttackContext, pending: set[int]):
        if not pending:
            return
        cfg = self.config
        training = training_questions(context, cfg.questions)
        with relearnable(context, cfg.rank) as (model, parameters):
            optimiser = torch.optim.AdamW(parameters, lr=cfg.lr)
            state = {"lora": ParameterState(parameters), "optimiser": optimiser}
            done = 0
            for index, count in enumerate(cfg.step_counts()):
                if count > done:
                    model.train()
                    loop = TrainingLoop(f"relearn-{count}", count, state, cfg.seed, context.work_dir(),
                                        checkpoint_every=50, progress=context.progress)
                    loop.start = max(loop.start, done)  # a step count without a checkpoint goes on from the last
                    loop.run(lambda _, generator: _step(context, model, optimiser, training, cfg.batch_size,
                                                        generator))
                    model.eval()
                    done = count
                if index in pending:
                    yield index, {"steps": count, "label": f"after {count} steps", **context.score()}

    def summarise(self, records: list[dict]) -> dict:
        curve = [{"steps": r["steps"], "rate": r["forget"]["score"], "retain": r["retain"]["score"]}
                 for r in records]
        reached = next((p["steps"] for p in curve if (p["rate"] or 0) >= self.config.threshold), None)
        return {"curve": curve, "threshold": self.config.threshold, "steps_to_relearn": reached,
                "trained_questions": self.config.questions}


def training_questions(context: VLMAttackContext, count: int) -> list:
    """`count` forget questions outside the scored forget set, so relearning is measured on questions it did not
    see."""
    scored = {id(item) for item in context.sets["forget"]}
    left = [item for item in context.target.forget if id(item) not in scored]
    if len(left) < count:
        raise UsageError(f"relearn option questions={count}: the concept has {len(left)} forget questions beside the "
                         f"{len(scored)} scored; pass fewer --questions or --set relearn.questions={max(len(left), 1)}")
    return left[:count]


@contextlib.contextmanager
def relearnable(context: VLMAttackContext, rank: int):
    """The edited model with a new trainable LoRA adapter: (peft model, the adapter's parameters). The edit's own
    adapter stays on and frozen, or its hooks stay on; afterwards the model is as it was."""
    from peft import LoraConfig, get_peft_model

    from vlm.edits import ADAPTER, applied, load_adapter
    from vlm.methods.baselines import LORA_TARGETS

    lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    torch.manual_seed(0)  # the adapter's down projections start random, the same on a resumed run
    with contextlib.ExitStack() as stack:
        if context.metadata is not None and ADAPTER in context.metadata["files"]:
            model = load_adapter(context.loaded, context.edit)
            model.add_adapter(ADAPTER_NAME, lora)
            model.base_model.set_adapter(["default", ADAPTER_NAME])
        else:
            stack.enter_context(applied(context.loaded, context.edit))  # hooks (or the base model: nothing)
            model = get_peft_model(context.loaded.model, lora, adapter_name=ADAPTER_NAME)
        parameters = []
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(f".{ADAPTER_NAME}." in name)
            if parameter.requires_grad:
                parameters.append(parameter)
        try:
            yield model, parameters
        finally:
            model.unload()  # the LoRA layers out again, without merging
            context.loaded.model.requires_grad_(False)


def _step(context: VLMAttackContext, model, optimiser, training: list, batch_size: int,
          generator: torch.Generator) -> dict[str, float]:
    from vlm.forward import answer_nll
    from vlm.methods.baselines import sample

    loss = answer_nll(context.loaded, sample(training, batch_size, generator), model=model).mean()
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return {"loss": loss.item()}


# On the toy VLM a GA edit of the star (toy default) scored 0% -> 17% -> 90% of its held-out forget questions after
# 0, 20 and 60 steps at lr 3e-3 (30 questions, 2 CPU cores, 40 s); at lr 1e-3, 30 steps brought nothing back.
VLM_TOY_DEFAULTS = {"steps": "0,10,30,60", "lr": 3e-3}

VLM_RELEARN = AttackEntry("relearn", VLMRelearn, "Relearning: a few LoRA fine-tuning steps on some forget questions; "
                          "the forget and retain scores after each step count (a curve)",
                          toy_defaults=VLM_TOY_DEFAULTS, quick={"steps": "0,2", "questions": 4})
