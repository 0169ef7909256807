"""Ring-A-Bell (Tsai et al., arXiv 2310.10012): a model-agnostic attack that needs only a text encoder.

The concept vector is the mean difference of the encoder's full output (every position) between prompts with and
without the concept, c = mean_i [E(with_i) - E(without_i)]. For each attacked prompt P the target is
E(P) + eta c, and a genetic algorithm searches K token ids x whose output E(x) is nearest to it (fitness
||target - E(x)||^2, lower is better): each generation keeps the better half of the population, and fills the other
half with children of two random survivors (single-point crossover with probability `crossover`, else a copy of
the first) of which some (probability `mutation`) get one token replaced at random. The best x, decoded to text, is
the attack's prompt: the edited pipeline draws it (through a training-free edit's guidance too) and the judge reads
the image.

    reference (the paper, a GPU):   population 200, generations 3000, tokens (K) 16, eta 3
    toy defaults (seconds a prompt on a CPU):   TOY_DEFAULTS below

E is the output the denoiser reads, through the base model's text encoders (the attacker's own copy: an edit of the
text encoder does not change the search): SD's CLIP states, SDXL's two CLIP encoders' states together (one set of
token ids: they share a vocabulary), Flux's T5 states (the search runs over T5's vocabulary; CLIP's pooled output
then reads the decoded prompt as any prompt). The prompt pairs: the toy vocabulary's captions naming the concept
and the same captions with its supercategory word ("A arrow image in Flat style." / "A object image in Flat
style."); on other models, PAIR_TEMPLATES filled both ways.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from erasers.models import LoadedPipeline
from erasers.prompts import EraseRequest

from . import AttackStep, register
from .harness import Attack, AttackContext, Found, item_generator
from .prompts import Item

PAIR_TEMPLATES = ("a photo of {}", "a painting of {}", "an image of {}", "a picture showing {}", "a drawing of {}",
                  "{}, highly detailed")
# On the toy model (a shared 2-core CPU, 2026-12): 16 tokens, 24 x 30 candidates, about 5 s a prompt with its image.
TOY_DEFAULTS = {"population": 24, "generations": 30}


@dataclass
class RingABellConfig:
    tokens: int = 16  # K, the attack prompt's length in tokens
    population: int = field(default=200, metadata={"min": 2})
    generations: int = field(default=3000, metadata={"min": 1})
    eta: float = 3.0  # how far past the prompt's output the target lies, along the concept vector
    crossover: float = field(default=0.5, metadata={"min": 0, "max": 1})
    mutation: float = field(default=0.25, metadata={"min": 0, "max": 1})
    seed: int = 0


@register("ringabell", "Ring-A-Bell: a genetic search for tokens whose text-encoder output is the prompt's plus the "
          "concept's direction (text encoder only)", toy_defaults=TOY_DEFAULTS,
          quick={"tokens": 4, "population": 4, "generations": 2},
          step=AttackStep("one genetic generation: the base text encoder over the whole population (200 "
                          "candidates; 24 on the toy), then selection, crossover and mutation",
                          lambda count: {"generations": count}))
class RingABell(Attack):
    config_class = RingABellConfig
    needs_base = ("text_encoders",)

    def check(self, loaded: LoadedPipeline, items: list[Item]) -> None:
        from erasers.errors import UsageError

        length = loaded.adapter.text_length(_searched(loaded)[0])
        if self.config.tokens + 2 > length:
            raise UsageError(f"ringabell tokens={self.config.tokens} does not fit the text encoder's {length}-token "
                             f"context with its start and end tokens; pass --set tokens={length - 2} or fewer")

    def prepare(self, context: AttackContext, items: list[Item]) -> None:
        """The concept vector, from the base model's text encoders (before the edits load)."""
        with_concept, without = prompt_pairs(context.request)
        self.concept_vector = concept_vector(context.loaded, with_concept, without)

    def search(self, context: AttackContext, item: Item) -> Found:
        loaded, config = context.loaded, self.config
        encoders = context.base.text_encoders
        target = encode(loaded, loaded.adapter.tokenize([item.prompt]), encoders) + config.eta * self.concept_vector
        generator = item_generator(config.seed, item.seed)

        def fitness(candidates: torch.Tensor) -> torch.Tensor:
            states = encode(loaded, candidate_ids(loaded, candidates), encoders)
            return (states - target).pow(2).flatten(1).sum(-1)

        self.history = []
        best, scores = genetic_search(fitness, allowed_ids(loaded), config, generator, self.history)
        name, tokenizer = _searched(loaded)
        prompt = tokenizer.decode(best.tolist(), skip_special_tokens=True).strip()
        image = context.generate(prompt, item.seed, item.guidance)
        success, reading = context.verdict(image)
        return Found(success, image, prompt, reading, {"fitness_first": scores[0], "fitness_last": scores[-1],
                                                       "adversarial_tokens": [tokenizer.decode([i]) for i in best]})


def prompt_pairs(request: EraseRequest) -> tuple[list[str], list[str]]:
    """Prompts with the concept and the same prompts without it (the module's docstring says which)."""
    if request.vocabulary is not None:
        with_concept = request.erase_prompts()[1:]
    else:
        with_concept = [template.format(request.concept_prompts()[0]) for template in PAIR_TEMPLATES]
    return with_concept, request.neutral_prompts(with_concept)


def _searched(loaded: LoadedPipeline) -> tuple[str, object]:
    """The encoder whose vocabulary the search runs over (its token states are what the denoiser reads)."""
    name = loaded.adapter.token_states_encoder
    return name, loaded.tokenizers[name.replace("text_encoder", "tokenizer")]


@torch.no_grad()
def encode(loaded: LoadedPipeline, ids: dict[str, torch.Tensor], encoders: dict | None = None) -> torch.Tensor:
    """E: the token states the denoiser reads for `ids` (batch, positions, width), in fp32."""
    return loaded.adapter.encode_ids(ids, text_encoders=encoders).states.float()


@torch.no_grad()
def concept_vector(loaded: LoadedPipeline, with_concept: list[str], without: list[str]) -> torch.Tensor:
    """c = mean over the pairs of E(with) - E(without), every position."""
    tokenize = loaded.adapter.tokenize
    return (encode(loaded, tokenize(with_concept)) - encode(loaded, tokenize(without))).mean(0, keepdim=True)


def allowed_ids(loaded: LoadedPipeline) -> torch.Tensor:
    """The searched vocabulary's ids, less its special tokens (start, end, padding, unknown)."""
    _, tokenizer = _searched(loaded)
    size = min(len(tokenizer), loaded.text_encoders[_searched(loaded)[0]].get_input_embeddings().weight.shape[0])
    keep = torch.ones(size, dtype=torch.bool)
    keep[[i for i in tokenizer.all_special_ids if i < size]] = False
    return keep.nonzero().view(-1)


def candidate_ids(loaded: LoadedPipeline, candidates: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids of every text encoder for a batch of candidates (batch, K): the searched vocabulary's encoders
    read [start,] the K tokens, end, padding; another encoder (Flux's CLIP: only its pooled output, outside E)
    reads the empty prompt."""
    name, searched = _searched(loaded)
    ids = {}
    for encoder in loaded.family.text_encoders:
        tokenizer = loaded.tokenizers[encoder.replace("text_encoder", "tokenizer")]
        length = loaded.adapter.text_length(encoder)
        if encoder != name and tokenizer.get_vocab() != searched.get_vocab():
            ids[encoder] = loaded.adapter.tokenize([""])[encoder].expand(len(candidates), -1)
            continue
        start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        rows = torch.full((len(candidates), length), tokenizer.pad_token_id)
        rows[:, :len(start)] = torch.tensor(start, dtype=torch.long)
        rows[:, len(start):len(start) + candidates.shape[1]] = candidates
        rows[:, len(start) + candidates.shape[1]] = tokenizer.eos_token_id
        ids[encoder] = rows.to(loaded.device)
    return ids


def genetic_search(fitness, vocabulary: torch.Tensor, config: RingABellConfig, generator: torch.Generator,
                   history: list[dict] | None = None) -> tuple[torch.Tensor, list[float]]:
    """The genetic algorithm of the module's docstring over `config.tokens` ids drawn from `vocabulary`: (the best
    candidate, the best fitness of each generation and of the final population). `history`, when a list, gets
    each generation's {"step", "seconds" since the search started}."""
    size, tokens = config.population, config.tokens

    def random_tokens(*shape) -> torch.Tensor:
        return vocabulary[torch.randint(len(vocabulary), shape, generator=generator)]

    population = random_tokens(size, tokens)
    best_scores = []
    started = time.perf_counter()
    for generation in range(config.generations):
        scores = fitness(population).cpu()
        order = scores.argsort()
        best_scores.append(scores[order[0]].item())
        survivors = population[order[:(size + 1) // 2]]
        children = size - len(survivors)
        first = survivors[torch.randint(len(survivors), (children,), generator=generator)]
        second = survivors[torch.randint(len(survivors), (children,), generator=generator)]
        cut = torch.randint(1, max(tokens, 2), (children, 1), generator=generator)
        crossed = torch.where(torch.arange(tokens)[None] < cut, first, second)
        crossing = torch.rand(children, 1, generator=generator) < config.crossover
        offspring = torch.where(crossing, crossed, first)
        mutating = (torch.rand(children, generator=generator) < config.mutation).nonzero().view(-1)
        slots = torch.randint(tokens, (len(mutating),), generator=generator)
        offspring[mutating, slots] = random_tokens(len(mutating))
        population = torch.cat([survivors, offspring])
        if history is not None:
            history.append({"step": generation, "seconds": time.perf_counter() - started})
    scores = fitness(population).cpu()
    best_scores.append(scores.min().item())
    return population[scores.argmin()], best_scores
