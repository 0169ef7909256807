"""Fine-tuning baselines of MLLMU-Bench, each a LoRA adapter on the language model trained on one loss:

    ga         L = -NLL_f                                    gradient ascent on the forget answers
    graddiff   L = -NLL_f + NLL_r                            ... while still fitting the retain answers
    kl         L = -NLL_f + NLL_r + KL(p_ref || p_theta)_r  ... and staying close to the base model on retain
    npo        L = -(2 / beta) log sigmoid(beta (NLL_theta_f - NLL_ref_f))    negative preference optimisation
NLL is the per-answer negative log-likelihood (mean over answer tokens, summed for NPO as in its paper); "ref" is
the base model, which is the LoRA model with its adapter disabled, so no second copy is held: the model before
unlearning, which is what MLLMU-Bench's NPO compares against (its "oracle", the vanilla fine-tuned model). With
MLLMU-Bench data they train on its fine-tuning QA (ft_Data/) of the forget and retain profiles, as the benchmark's
baselines do, and are scored on its evaluation questions (`Target.finetune_data`). The four share one
loop (one file), a method being only its loss. Defaults follow MLLMU-Bench (LoRA r 16, alpha 16, dropout 0.05,
lr 5e-4); the toy model, 1,000x smaller, takes a few dozen steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from erasers.train import TrainingLoop

from ..forward import answer_batch, answer_nll
from ..registry import EditContent, VLMEraser, register_vlm

# Only the language model's projections: the vision tower's attention layers share these names.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class FineTuneConfig:
    steps: int = 100
    # Steps on a split of profiles (forget_N) instead of `steps`; None: `steps`. The toy VLM's patients are
    # memorised to a near-zero loss and share most answer values with the retain patients, so they take several
    # times the steps that erase a ToyCanvas object (vlm/README, "What the VLM table shows").
    profile_steps: int | None = None
    batch_size: int = 8
    lr: float = 5e-4
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    beta: float = 0.1  # NPO's inverse temperature
    retain_weight: float = 1.0
    kl_weight: float = 1.0
    checkpoint_every: int = 25  # LoRA weights and optimiser state only: small
    seed: int = 0


class AdapterState:
    """Checkpoints hold the LoRA weights only, not the base model around them."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)


def sample(items: list, count: int, generator: torch.Generator) -> list:
    return [items[i] for i in torch.randint(len(items), (count,), generator=generator).tolist()]


def retain_kl(loaded, model, items) -> torch.Tensor:
    """KL(p_ref || p_theta) over the retain answers' tokens."""
    batch, labels = answer_batch(loaded, items)
    keep = labels[:, 1:] != -100
    with torch.no_grad(), model.disable_adapter():
        reference = model(**batch).logits[:, :-1][keep].float().log_softmax(-1)
    current = model(**batch).logits[:, :-1][keep].float().log_softmax(-1)
    return F.kl_div(current, reference, log_target=True, reduction="batchmean")


class FineTuneBaseline(VLMEraser):
    config_class = FineTuneConfig
    uses_retain = False

    def loss(self, loaded, model, forget, retain) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def check_target(self, target) -> None:
        target.finetune_data()

    def erase(self, loaded, target, work_dir=None) -> EditContent:
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        # MLLMU-Bench's fine-tuning QA when the data has it: the baselines never train on the questions scored.
        forget_data, retain_data = target.finetune_data()
        torch.manual_seed(cfg.seed)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=LORA_TARGETS)
        model = get_peft_model(loaded.model, lora)
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        model.train()

        def step(_index: int, generator: torch.Generator) -> dict[str, float]:
            forget = sample(forget_data, cfg.batch_size, generator)
            retain = sample(retain_data, cfg.batch_size, generator) if self.uses_retain else []
            loss, metrics = self.loss(loaded, model, forget, retain)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            return {"loss": loss.item(), **metrics}

        state = {"adapter": AdapterState(model), "optimiser": optimiser}
        steps = cfg.profile_steps if target.kind == "profiles" and cfg.profile_steps else cfg.steps
        loop = TrainingLoop(type(self).__name__.lower(), steps, state, cfg.seed, work_dir,
                            checkpoint_every=cfg.checkpoint_every)
        try:
            history = loop.run(step)
        except BaseException:
            model.unload()  # an interrupted run must not leave LoRA layers in the caller's model
            raise
        model.eval()
        return EditContent(adapter=model, info={"history": history[-3:]})


@register_vlm("ga", "gradient ascent on the forget answers (LoRA)", toy_defaults={"steps": 30, "lr": 1e-3})
class GradientAscent(FineTuneBaseline):
    def loss(self, loaded, model, forget, retain):
        nll_f = answer_nll(loaded, forget, model=model).mean()
        return -nll_f, {"nll_f": nll_f.item()}


@register_vlm("graddiff", "gradient difference: ascent on forget, descent on retain (LoRA)",
              toy_defaults={"steps": 40, "lr": 1e-3})
class GradDiff(FineTuneBaseline):
    uses_retain = True

    def loss(self, loaded, model, forget, retain):
        nll_f = answer_nll(loaded, forget, model=model).mean()
        nll_r = answer_nll(loaded, retain, model=model).mean()
        return -nll_f + self.config.retain_weight * nll_r, {"nll_f": nll_f.item(), "nll_r": nll_r.item()}


# Toy: the KL term weighted 5 keeps the star's retain (weighted 1, ascent takes it with the star); the memorised
# patients take 200 steps, and retain weighted 1.25 lets them go while the other patients hold
# (benchmarks/results/NOTES.md, "Why no method forgot the toy's patients", has the runs).
@register_vlm("kl", "ascent on forget, descent and KL to the base model on retain (LoRA)",
              toy_defaults={"steps": 40, "lr": 1e-3, "kl_weight": 5.0, "retain_weight": 1.25, "profile_steps": 200})
class KLMinimisation(FineTuneBaseline):
    uses_retain = True

    def loss(self, loaded, model, forget, retain):
        nll_f = answer_nll(loaded, forget, model=model).mean()
        nll_r = answer_nll(loaded, retain, model=model).mean()
        kl = retain_kl(loaded, model, retain)
        loss = -nll_f + self.config.retain_weight * nll_r + self.config.kl_weight * kl
        return loss, {"nll_f": nll_f.item(), "nll_r": nll_r.item(), "kl": kl.item()}


@register_vlm("npo", "negative preference optimisation against the base model (LoRA)",
              toy_defaults={"steps": 40, "lr": 1e-3})
class NPO(FineTuneBaseline):
    def loss(self, loaded, model, forget, retain):
        beta = self.config.beta
        with torch.no_grad(), model.disable_adapter():
            reference = answer_nll(loaded, forget, model=model, mean=False)
        current = answer_nll(loaded, forget, model=model, mean=False)
        loss = -(2 / beta) * F.logsigmoid(beta * (current - reference)).mean()
        return loss, {"nll_f": current.mean().item()}
