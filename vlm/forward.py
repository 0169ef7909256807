"""Forward passes every VLM eraser shares: question items, teacher-forced answer likelihoods, cached activations.

    items = [Item(qa, image), ...]                       # a question as asked (vlm.mllmu.QA) and its image or None
    nll = answer_nll(loaded, items)                      # mean negative log-likelihood of each expected answer
    states = layer_states(loaded, items, [3], "last")    # {3: (n, hidden)} at the prompt's last position
    tokens = layer_states(loaded, items, [3], "tokens")  # {3: (tokens, hidden)}, every non-padding prompt position

Prompts go through `LoadedVLM.inputs` (the model's own chat template and processor), so what an eraser trains or
measures on is exactly what `ask` sends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .hooks import hook_layers
from .mllmu import QA
from .models import LoadedVLM


@dataclass(frozen=True)
class Item:
    """One question as the model is asked it, with its image (None for a text-only question) and the few-shot
    examples asked before it ((image or None, text) turns; evaluation only)."""

    qa: QA
    image: Image.Image | None
    shots: tuple[tuple[Image.Image | None, str], ...] = ()

    @property
    def prompt(self) -> str:
        return self.qa.prompt

    @property
    def answer(self) -> str:
        return self.qa.answer


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def answer_ids(loaded: LoadedVLM, answer: str) -> list[int]:
    """Token ids of an answer as the model would generate it after its prompt, end-of-sequence included.
    The toy's and LLaVA's prompts end in "ASSISTANT:" (answers start with a space); Qwen's ends in a newline."""
    tokenizer = loaded.tokenizer
    ends_in_space = loaded.prompt("x", with_image=False)[-1:].isspace()
    ids = tokenizer(("" if ends_in_space else " ") + answer, add_special_tokens=False)["input_ids"]
    eos = loaded.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    return ids + [eos if eos is not None else tokenizer.eos_token_id]


def answer_batch(loaded: LoadedVLM, items: Sequence[Item], answers: Sequence[str] | None = None):
    """(model inputs, labels) for teacher forcing `answers` (default: each item's expected answer) after the
    items' prompts: the left-padded prompts of `LoadedVLM.inputs`, then the answers, right-padded; labels are
    -100 everywhere but on answer tokens."""
    answers = [item.answer for item in items] if answers is None else answers
    inputs = loaded.inputs([item.image for item in items], [item.prompt for item in items])
    prompt_ids = inputs["input_ids"]
    encoded = [answer_ids(loaded, answer) for answer in answers]
    width = max(len(ids) for ids in encoded)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    tail = torch.full((len(items), width), pad, dtype=prompt_ids.dtype)
    tail_mask = torch.zeros((len(items), width), dtype=inputs["attention_mask"].dtype)
    for i, ids in enumerate(encoded):
        tail[i, :len(ids)] = torch.tensor(ids)
        tail_mask[i, :len(ids)] = 1
    tail, tail_mask = tail.to(prompt_ids.device), tail_mask.to(prompt_ids.device)
    batch = dict(inputs)
    for key, value in inputs.items():
        # Per-token inputs (ids, mask, Qwen's token-type ids) grow by the answer; image inputs stay as they are.
        if torch.is_tensor(value) and value.shape == prompt_ids.shape:
            extra = tail if key == "input_ids" else tail_mask if key == "attention_mask" else torch.zeros_like(tail)
            batch[key] = torch.cat([value, extra.to(value.dtype)], dim=1)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, prompt_ids.shape[1]:] = torch.where(tail_mask.bool(), tail, -100)
    return batch, labels


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, answer token count) per sample from logits and labels of the same length."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    keep = targets != -100
    return (losses * keep).sum(1), keep.sum(1)


def answer_nll(loaded: LoadedVLM, items: Sequence[Item], answers: Sequence[str] | None = None,
               model: torch.nn.Module | None = None, mean: bool = True, **extra) -> torch.Tensor:
    """Negative log-likelihood of each answer given its prompt (per answer token when `mean`, else summed), with
    gradients; `model` defaults to the loaded one (pass a LoRA-wrapped one to train it); `extra` goes to the
    forward (e.g. perturbed pixel_values)."""
    batch, labels = answer_batch(loaded, items, answers)
    batch.update(extra)
    logits = (model if model is not None else loaded.model)(**batch).logits
    total, count = nll_from_logits(logits, labels)
    return total / count.clamp(min=1) if mean else total


@torch.no_grad()
def layer_states(loaded: LoadedVLM, items: Sequence[Item], layers: Sequence[int], where: str = "last",
                 batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Outputs of decoder `layers` for the items' prompts, on the CPU in float32: at the prompt's last position
    (`where="last"`, one row per item: the state the answer is generated from) or at every non-padding prompt
    position (`where="tokens"`, what a sparse autoencoder is trained on)."""
    if where not in ("last", "tokens"):
        raise ValueError(f"where must be 'last' or 'tokens', not {where!r}")
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for chunk in chunks(list(items), batch_size):
        inputs = loaded.inputs([item.image for item in chunk], [item.prompt for item in chunk])
        with hook_layers(loaded.model, capture=layers) as hooks:
            loaded.model(**inputs)
        mask = inputs["attention_mask"].bool().cpu()
        for layer in layers:
            states = hooks.last(layer).float().cpu()
            collected[layer].append(states[:, -1] if where == "last" else states[mask])
    return {layer: torch.cat(parts) for layer, parts in collected.items()}


@torch.no_grad()
def token_states_per_item(loaded: LoadedVLM, items: Sequence[Item], layer: int,
                          batch_size: int = 16) -> list[torch.Tensor]:
    """One (tokens, hidden) tensor per item: the output of decoder `layer` at the item's non-padding prompt
    positions, on the CPU in float32."""
    per_item: list[torch.Tensor] = []
    for chunk in chunks(list(items), batch_size):
        inputs = loaded.inputs([item.image for item in chunk], [item.prompt for item in chunk])
        with hook_layers(loaded.model, capture=[layer]) as hooks:
            loaded.model(**inputs)
        states, mask = hooks.last(layer).float().cpu(), inputs["attention_mask"].bool().cpu()
        per_item += [row[keep] for row, keep in zip(states, mask)]
    return per_item
