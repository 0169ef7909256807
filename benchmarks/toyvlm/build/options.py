"""Stage `options`, phase 3: multiple choice by matching the options. After phases 1-2 the model recalls the facts but
answers multiple choice only where it memorised the letter; here a linear probe (training only, not exported)
teaches each option to check itself against the image or the named patient, and "Which option is X?" lookups teach
copying the marked option's letter (ToyVLMConfig's comment has the whole story)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from vlm.mllmu import LETTERS, PURE_TEXT, QA, multiple_choice_prompt

from .batches import Packer, Sample, prompt_for
from .config import ToyVLMConfig
from .model import forward_hidden
from .phases import answer_loss_from_hidden, pooled_mean, run_phase, save_trained, training_setup
from .pools import Pools, draw_rows


def lookup_question(sample: Sample) -> tuple[Sample, str]:
    """A multiple-choice question turned into "Which option is {its answer}?" over the same options, text only."""
    qa = sample.qa
    options = dict(qa.options)
    question = f"Which option is {options[qa.answer]}?"
    return Sample(QA(qa.id, qa.row_id, qa.task, PURE_TEXT, question, "", qa.answer, qa.options), None), \
        multiple_choice_prompt(question, options)


def lookup_rows(cfg: ToyVLMConfig, pools: Pools, generator: torch.Generator):
    """Phase 3's text rows of option lookups, every option list reshuffled."""
    choices = pools.multiple_choice
    picked = torch.randint(len(choices), (cfg.lookup_rows * cfg.text_per_row,), generator=generator).tolist()
    questions = [lookup_question(prompt_for(Sample(choices[i], None), generator, 1.0)[0]) for i in picked]
    return [(None, questions[r * cfg.text_per_row:(r + 1) * cfg.text_per_row]) for r in range(cfg.lookup_rows)]


def answer_and_mark_loss(model, probe: torch.nn.Linear, layer: int, packer: Packer, rows):
    """Phase 3's losses on packed `rows`: (answer loss, answer tokens, option-mark loss, options). The mark loss is
    the probe's binary cross-entropy at each option's last token, the right option weighted as the three wrong."""
    ids, mask, positions, labels, feats = packer(rows)
    out = forward_hidden(model, ids, mask, feats, positions, all_layers=True)
    loss, tokens = answer_loss_from_hidden(model, out.last_hidden_state, labels)
    marks = packer.option_marks(rows)
    if not marks:
        return loss, tokens, torch.zeros(()), 0
    row, position, right = (torch.tensor(column) for column in zip(*marks))
    logits = probe(out.hidden_states[layer][row, position]).squeeze(-1)
    weight = torch.tensor(float(len(LETTERS) - 1))
    return loss, tokens, F.binary_cross_entropy_with_logits(logits, right.float(), pos_weight=weight), len(marks)


def stage_options(cfg: ToyVLMConfig) -> None:
    """Phase 3 on phase 2's model: the option-mark probe, option lookups, options mostly reshuffled."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(Path(cfg.build_dir) / "trained", dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)
    setup = training_setup(cfg, model.config.image_seq_length)
    torch.manual_seed(cfg.seed + 2)
    probe = torch.nn.Linear(model.config.text_config.hidden_size, 1)
    layer = cfg.option_probe_layer

    def losses(generator):
        image_rows, text_rows = draw_rows(cfg, setup.pools, generator, cfg.options_reshuffle,
                                          cfg.options_choices_per_image)
        text_rows += lookup_rows(cfg, setup.pools, generator)
        loss_image, n_image, mark_image, m_image = answer_and_mark_loss(model, probe, layer, setup.packer, image_rows)
        loss_text, n_text, mark_text, m_text = answer_and_mark_loss(model, probe, layer, setup.packer, text_rows)
        answer = pooled_mean((loss_image, n_image), (loss_text, n_text))
        marks = pooled_mean((mark_image, m_image), (mark_text, m_text))
        return answer + cfg.option_probe_weight * marks, {"loss": answer.item(), "loss_marks": marks.item()}

    model = run_phase(cfg, setup, "toy-vlm-options", model, cfg.options_steps, cfg.options_steps, cfg.options_lr,
                      losses, {"probe": probe})
    save_trained(model, Path(cfg.build_dir) / "options")
