"""Adversarial prompt tokens, shared by the attacks (benchmarks/attacks/: UnlearnDiffAtk, P4D) and AdvUnlearn's
inner maximisation.

A few adversarial tokens sit right after each text encoder's start token (T5 has none: at the front), or at the
positions a search names (P4D-K: one after every few prompt tokens, `interleaved_ids`). They are parametrised per
text encoder the denoiser reads (SD: CLIP; SDXL: both CLIP encoders; Flux: CLIP, read pooled, and T5), in one of
three ways:
  soft       free vectors in the encoder's word-embedding space (AdvUnlearn's attack): one set per encoder
  discrete   distributions over the vocabulary, sampled as one-hot vectors with straight-through gradients
             (UnlearnDiffAtk): encoders that share a vocabulary (SDXL's two CLIP tokenizers) share one set, so the
             adversarial prompt is one text; Flux's CLIP and T5 vocabularies differ, so each has its own.
  projected  free vectors read, at every step, as their nearest vocabulary embeddings (PEZ, P4D's search), the
             gradient reaching the free vectors straight through; shared by encoders of one vocabulary as
             `discrete` is (the first encoder's space chooses the tokens, the others read the same ids).
`soft_prompt_attack` is AdvUnlearn's inner step: the tokens that make the edited model predict what the frozen
model predicts for the concept, MSE(eps_theta(x_t, c_adv), eps*(x_t, c)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .losses import predict_noise, sample_trajectory
from .models import LoadedPipeline


def slot_start(tokenizer) -> int:
    """The first adversarial slot: after the start token (CLIP), or at the front (T5 has no start token)."""
    return 1 if tokenizer.bos_token_id is not None else 0


def prefixed_ids(tokenizer, prompt: str, tokens: int, device, length: int | None = None) -> torch.Tensor:
    """Token ids [BOS, `tokens` placeholder slots, prompt..., EOS, padding] of the text encoder's length (`length`,
    default the tokenizer's); the slots hold the adversarial tokens. The prompt is cut, never the EOS."""
    length = length or tokenizer.model_max_length
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
    # Any id but EOS (the encoder pools at the first EOS) and, for T5, padding.
    placeholder = next(i for i in range(4) if i != tokenizer.eos_token_id
                       and (i != tokenizer.pad_token_id or tokenizer.bos_token_id is not None))
    start = slot_start(tokenizer)
    ids = (ids[:start] + [placeholder] * tokens + ids[start:])[:length]
    if tokenizer.eos_token_id not in ids[tokens + start:]:
        ids[-1] = tokenizer.eos_token_id
    return torch.tensor([ids], device=device)


def interleaved_ids(tokenizer, prompt: str, every: int, device, length: int | None = None
                    ) -> tuple[torch.Tensor, list[int]]:
    """(token ids [BOS, prompt with a placeholder slot after every `every` of its tokens (one at its end if it has
    fewer), EOS, padding], the slots' positions): P4D-K's prompt. The prompt is cut, never the EOS."""
    length = length or tokenizer.model_max_length
    start = slot_start(tokenizer)
    words = tokenizer(prompt).input_ids[start:]
    words = words[:words.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in words else words
    placeholder = prefixed_ids(tokenizer, "", 1, device, length)[0, start].item()
    ids, positions = list(tokenizer(prompt).input_ids[:start]), []
    for i, word in enumerate(words, 1):
        ids.append(word)
        if i % every == 0 or (i == len(words) and len(words) < every):
            positions.append(len(ids))
            ids.append(placeholder)
    if not words:
        positions.append(len(ids))
        ids.append(placeholder)
    ids = ids[:length - 1] + [tokenizer.eos_token_id]
    positions = [p for p in positions if p < length - 1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return torch.tensor([ids + [pad] * (length - len(ids))], device=device), positions


def prompt_ids(loaded: LoadedPipeline, prompt: str, tokens: int) -> dict[str, torch.Tensor]:
    """`prefixed_ids` for every text encoder of the pipeline, each at its own length."""
    return {name: prefixed_ids(_tokenizer(loaded, name), prompt, tokens, loaded.device,
                               loaded.adapter.text_length(name)) for name in loaded.family.text_encoders}


def _tokenizer(loaded: LoadedPipeline, encoder_name: str):
    return loaded.tokenizers[encoder_name.replace("text_encoder", "tokenizer")]


def check_token_room(loaded: LoadedPipeline, prompts: list[str], tokens: int, option: str) -> None:
    """Refuse `tokens` adversarial tokens that do not fit, with the longest of `prompts`, in every text encoder's
    context (CLIP: 77): the slots would push the prompt and its end token out. Checked once the tokenizers are
    loaded, before any image is drawn."""
    for name in loaded.family.text_encoders:
        tokenizer, length = _tokenizer(loaded, name), loaded.adapter.text_length(name)
        longest = max(prompts, key=lambda p: len(tokenizer(p).input_ids))
        used = len(tokenizer(longest).input_ids)  # with its start and end tokens
        if tokens + used > length:
            raise UsageError(f"{option} {tokens} does not fit: with the prompt {longest[:60]!r} ({used} tokens) the "
                             f"text encoder's {length}-token context holds at most {max(length - used, 0)} adversarial "
                             "tokens; pass fewer, or shorter prompts")


class SoftTokens(nn.Module):
    """`k` free vectors in word-embedding space (AdvUnlearn's attack): no vocabulary constraint."""

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(initial.detach().clone().float())

    def draw(self, generator: torch.Generator):
        return None

    def embed(self, drawn, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.vectors

    def project(self) -> None:
        pass

    def fixed(self, word_embeddings: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        """The tokens as the prompt then holds them: (embeddings, vocabulary ids or None for free vectors)."""
        return self.vectors.detach(), None


class VocabularyTokens(nn.Module):
    """`k` distributions over the vocabulary (UnlearnDiffAtk): each step samples one token per slot as a one-hot
    vector, with straight-through gradients to the distribution, which is projected back onto the simplex after
    each optimiser step. The attack's tokens are the distributions' most likely ones."""

    def __init__(self, tokens: int, vocabulary_size: int, device):
        super().__init__()
        self.weights = nn.Parameter(torch.full((tokens, vocabulary_size), 1.0 / vocabulary_size, device=device))

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        return _SampleOneHot.apply(self.weights, generator)

    def embed(self, drawn: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return drawn @ word_embeddings.float()

    @torch.no_grad()
    def project(self) -> None:
        self.weights.copy_(project_onto_simplex(self.weights))

    def token_ids(self) -> list[int]:
        return self.weights.argmax(-1).tolist()

    def fixed(self, word_embeddings: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        ids = self.token_ids()
        return word_embeddings[ids].detach().float(), ids


class ProjectedTokens(nn.Module):
    """`k` free vectors in the word-embedding space of one encoder (`home`), each read as its nearest vocabulary
    embedding by cosine similarity (PEZ: Wen et al., 2023): the forward pass sees the projection, the gradient
    updates the free vectors (straight-through). An encoder of the same vocabulary but another embedding reads
    the same token ids, without a gradient."""

    def __init__(self, initial: torch.Tensor, home: torch.Tensor, vocabulary_size: int):
        super().__init__()
        self.vectors = nn.Parameter(initial.detach().clone().float())
        self.home = home  # the home encoder's word embeddings (not a parameter of the attack)
        self.vocabulary_size = vocabulary_size  # the tokenizer's: an embedding table may hold more rows

    def draw(self, generator: torch.Generator):
        return None

    def token_ids(self) -> list[int]:
        return self._nearest().tolist()

    def _nearest(self) -> torch.Tensor:
        if getattr(self, "_unit_words", None) is None:  # the vocabulary is frozen: normalised once
            self._unit_words = F.normalize(self.home[:self.vocabulary_size].float(), dim=-1)
        return (F.normalize(self.vectors.detach(), dim=-1) @ self._unit_words.T).argmax(-1)

    def embed(self, drawn, word_embeddings: torch.Tensor) -> torch.Tensor:
        projected = word_embeddings[self._nearest()].float()
        if word_embeddings.data_ptr() != self.home.data_ptr():
            return projected
        return self.vectors + (projected - self.vectors).detach()

    def project(self) -> None:
        pass  # the vectors stay free; each step reads their projections

    def fixed(self, word_embeddings: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
        ids = self.token_ids()
        return word_embeddings[ids].detach().float(), ids


class _SampleOneHot(torch.autograd.Function):
    """Sample a one-hot row from each distribution; the backward pass is the straight-through estimator with
    the gradient clipped to [-1, 1] (hardtanh), as in UnlearnDiffAtk."""

    @staticmethod
    def forward(ctx, weights, generator):
        chosen = torch.multinomial(weights.detach().float().clamp_min(0).cpu(), 1, generator=generator).view(-1)
        return F.one_hot(chosen, weights.shape[-1]).to(weights.device, weights.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return F.hardtanh(grad_output), None


def project_onto_simplex(rows: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex (sort-based; exact)."""
    ordered, _ = torch.sort(rows, dim=-1, descending=True)
    cumulative = ordered.cumsum(-1) - 1
    index = torch.arange(1, rows.shape[-1] + 1, device=rows.device, dtype=rows.dtype)
    support = (ordered - cumulative / index > 0).sum(-1, keepdim=True)
    threshold = cumulative.gather(-1, support - 1) / support
    return (rows - threshold).clamp_min(0)


def _same_vocabulary(first, second) -> bool:
    return type(first) is type(second) and len(first) == len(second) and first.get_vocab() == second.get_vocab()


def new_adversary(variant: str, tokens: int | dict[str, int], loaded: LoadedPipeline, generator: torch.Generator,
                  text_encoders: dict[str, nn.Module] | None = None) -> nn.ModuleDict:
    """Fresh adversarial tokens, one part per text encoder: "soft" starts from random vocabulary words,
    "discrete" from uniform distributions, "projected" from random vocabulary words of its tokenizer (the last two
    shared by encoders with the same vocabulary). `tokens` may differ per encoder (a dict by encoder name).
    """
    parts: dict[str, nn.Module] = {}
    for name in loaded.family.text_encoders:
        count = tokens[name] if isinstance(tokens, dict) else tokens
        encoder = (text_encoders or {}).get(name) or loaded.text_encoders[name]
        word_embeddings = encoder.get_input_embeddings().weight.detach()
        if variant == "soft":
            start = torch.randint(word_embeddings.shape[0], (count,), generator=generator)
            parts[name] = SoftTokens(word_embeddings[start.to(word_embeddings.device)])
            continue
        tokenizer = _tokenizer(loaded, name)
        shared = next((other for other in parts if _same_vocabulary(_tokenizer(loaded, other), tokenizer)), None)
        if shared:
            parts[name] = parts[shared]
        elif variant == "projected":
            size = min(len(tokenizer), word_embeddings.shape[0])  # T5's table is padded past its vocabulary
            start = torch.randint(size, (count,), generator=generator)
            parts[name] = ProjectedTokens(word_embeddings[start.to(word_embeddings.device)], word_embeddings, size)
        else:
            parts[name] = VocabularyTokens(count, word_embeddings.shape[0], word_embeddings.device)
    return nn.ModuleDict(parts)


def _encoders(loaded: LoadedPipeline, text_encoders: dict[str, nn.Module] | None) -> dict[str, nn.Module]:
    return {name: (text_encoders or {}).get(name) or loaded.text_encoders[name] for name in loaded.family.text_encoders}


@dataclass
class TokenSearch:
    """How `optimise_tokens` steps: `steps` of `optimizer` (on the gradient, or its sign), with `check(step)` called
    after each step (True stops early); the tokens go into `positions` of each encoder's ids (None: the slots right
    after the start token)."""

    optimizer: torch.optim.Optimizer
    steps: int
    sign_gradient: bool = False
    check: Callable[[int], bool] | None = None
    positions: dict[str, list[int]] | None = None
    # When a list: each step's {"step", "seconds" since the search started, "loss"}, logged before its check.
    history: list[dict] | None = None


def optimise_tokens(adversary: nn.ModuleDict, loaded: LoadedPipeline, input_ids: dict[str, torch.Tensor],
                    loss_fn: Callable, search: TokenSearch, generator: torch.Generator,
                    text_encoders: dict[str, nn.Module] | None = None) -> list[float]:
    """Minimise `loss_fn(conditioning, generator)` over the adversary's tokens (in each encoder's slots of
    `input_ids`). Only the adversary is updated: gradients are taken for its parameters alone, so a text encoder in
    training keeps no stray gradients."""
    optimizer, check = search.optimizer, search.check
    encoders = _encoders(loaded, text_encoders)
    words = {name: encoder.get_input_embeddings().weight.detach() for name, encoder in encoders.items()}
    base = {name: words[name][input_ids[name]] for name in encoders}
    parameters = list(adversary.parameters())
    losses = []
    started = time.perf_counter()
    for step in range(search.steps):
        drawn = {}
        embeds = {}
        for name in encoders:
            part = adversary[name]
            if id(part) not in drawn:  # encoders sharing a part read the same draw
                drawn[id(part)] = part.draw(generator)
            tokens = part.embed(drawn[id(part)], words[name])
            if search.positions is None:
                start = slot_start(_tokenizer(loaded, name))
                embeds[name] = torch.cat([base[name][:, :start], tokens[None].to(base[name].dtype),
                                          base[name][:, start + tokens.shape[0]:]], dim=1)
            else:
                embeds[name] = base[name].clone()
                embeds[name][:, search.positions[name]] = tokens[None].to(base[name].dtype)
        loss = loss_fn(loaded.adapter.encode_ids(input_ids, embeds, encoders), generator)
        gradients = torch.autograd.grad(loss, parameters)
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = gradient.sign() if search.sign_gradient else gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for part in {id(p): p for p in adversary.values()}.values():
            part.project()
        losses.append(loss.item())
        if search.history is not None:
            search.history.append({"step": step, "seconds": time.perf_counter() - started, "loss": losses[-1]})
        if check is not None and check(step):
            break
    return losses


@dataclass
class AdversarialPrompt:
    """A prompt with adversarial tokens in its slots: per text encoder, its ids and the token embeddings it reads."""

    input_ids: dict[str, torch.Tensor]
    token_embeddings: dict[str, torch.Tensor]
    adversary: nn.ModuleDict

    def conditioning(self, loaded: LoadedPipeline, text_encoders: dict[str, nn.Module] | None = None):
        """The conditioning through the text encoders (gradients flow to their parameters)."""
        return loaded.adapter.encode_ids(self.input_ids, self.token_embeddings, _encoders(loaded, text_encoders))


@torch.no_grad()
def adversarial_prompt(loaded: LoadedPipeline, prompt: str, adversary: nn.ModuleDict,
                       text_encoders: dict[str, nn.Module] | None = None) -> AdversarialPrompt:
    """`prompt` with the adversary's current tokens in front (vocabulary tokens also go into the ids)."""
    input_ids, embeds = {}, {}
    for name, encoder in _encoders(loaded, text_encoders).items():
        word_embeddings = encoder.get_input_embeddings().weight.detach()
        chosen, ids = adversary[name].fixed(word_embeddings)
        tokenizer = _tokenizer(loaded, name)
        start = slot_start(tokenizer)
        input_ids[name] = prefixed_ids(tokenizer, prompt, chosen.shape[0], loaded.device,
                                       loaded.adapter.text_length(name))
        if ids is not None:
            input_ids[name][0, start:start + len(ids)] = torch.tensor(ids, device=loaded.device)
        embeds[name] = word_embeddings[input_ids[name]].clone()
        embeds[name][0, start:start + chosen.shape[0]] = chosen.to(embeds[name].dtype)
    return AdversarialPrompt(input_ids, embeds, adversary)


@dataclass(frozen=True)
class SoftPromptAttack:
    """AdvUnlearn's inner attack: `tokens` adversarial tokens, `steps` steps at `lr` (`method` "pgd": Adam on the
    gradient, "sign": on its sign), `variant` "soft" (free word embeddings) or "discrete" (vocabulary
    distributions); x_t from a `ddim_steps` trajectory the teacher samples at `guidance`."""

    tokens: int = 1
    steps: int = 30
    lr: float = 1e-3
    method: str = "pgd"
    variant: str = "soft"
    ddim_steps: int = 50
    guidance: float = 3.0


def soft_prompt_attack(loaded: LoadedPipeline, prompt: str, states: tuple, generator: torch.Generator,
                       attack: SoftPromptAttack = SoftPromptAttack(), *,
                       text_encoders: dict[str, nn.Module] | None = None, unet: nn.Module | None = None,
                       teacher: nn.Module | None = None,
                       adversary: nn.ModuleDict | None = None) -> AdversarialPrompt:
    """Find adversarial tokens that, prepended to `prompt`, make `unet` (reading `text_encoders`) predict what the
    frozen `teacher` predicts for the concept: minimise MSE(eps_theta(x_t, c_adv), eps*(x_t, c)).

    `states` is (the frozen text encoders' conditioning of `prompt`, the empty prompt's). x_t comes from one
    trajectory the teacher samples for the concept (at the attack's guidance), at a random step per attack step (the
    reference samples a trajectory per attack step: `steps` times the denoiser calls). Pass the previous round's
    `adversary` to warm-start (AdvUnlearn's "latest" initialisation)."""
    if attack.method not in ("pgd", "sign"):
        raise UsageError(f"attack method must be pgd or sign, not {attack.method!r}")
    if attack.variant not in ("soft", "discrete"):
        raise UsageError(f"attack variant must be soft or discrete, not {attack.variant!r}")
    concept_states, empty_states = states
    encoders = _encoders(loaded, text_encoders)
    unet = unet or loaded.denoiser
    teacher = teacher or unet
    input_ids = prompt_ids(loaded, prompt, attack.tokens)
    if adversary is None:
        adversary = new_adversary(attack.variant, attack.tokens, loaded, generator, encoders)
    optimizer = torch.optim.Adam(adversary.parameters(), lr=attack.lr)
    path = sample_trajectory(loaded, teacher, concept_states, empty_states, attack.ddim_steps - 1, attack.ddim_steps,
                             attack.guidance, generator)

    def loss_fn(states, gen):
        x_t, t = path[int(torch.randint(len(path), (1,), generator=gen))]
        with torch.no_grad():
            target = predict_noise(teacher, x_t, t, concept_states)
        return F.mse_loss(predict_noise(unet, x_t, t, states).float(), target.float())

    was_training = {name: encoder.training for name, encoder in encoders.items()}
    for encoder in encoders.values():
        encoder.eval()
    search = TokenSearch(optimizer, attack.steps, attack.method == "sign")
    optimise_tokens(adversary, loaded, input_ids, loss_fn, search, generator, text_encoders=encoders)
    for name, encoder in encoders.items():
        encoder.train(was_training[name])
    return adversarial_prompt(loaded, prompt, adversary, encoders)
