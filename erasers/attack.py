"""Adversarial prompts against erased models.

UnlearnDiffAtk (Zhang et al., 2024): the diffusion model is its own classifier. For each prompt of the erased
concept, the ORIGINAL model draws a target image; a few adversarial tokens prepended to the prompt are optimised
so that the ERASED model denoises that image well again (noise added at random timesteps, MSE to the noise).
The tokens are distributions over the vocabulary, sampled as one-hot vectors with straight-through gradients
(Adam lr 0.01, projected back onto the simplex); every `check_every` iterations the most likely tokens are
decoded into a prompt, the erased model generates it and a judge (an image classifier, NudeNet, ...) says whether
the concept is back. A prompt counts as a pre-attack success when its plain form already regenerates the
concept, and the attack stops at its first success:
    Pre-ASR = pre-successes / N        ASR = (pre-successes + attack successes) / N

The same token optimisation in word-embedding space (free soft tokens, no vocabulary) is AdvUnlearn's inner
maximisation: `soft_prompt_attack` finds the token(s) that make the edited model predict what the frozen model
predicts for the concept, MSE(eps_theta(x_t, c_adv), eps*(x_t, c)).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn

from .edits import apply_edits, read_edit
from .errors import UsageError
from .files import atomic_dir, check_output_path, publish
from .losses import predict_noise, sample_trajectory
from .models import LoadedPipeline, encode_token_embeddings, load_pipeline, resolve_source
from .prompts import make_request
from .validation import MAX_SEED, validate_config

# A judge reads generated images and says, per image, whether the concept is in it.
Judge = Callable[[list, str], list[bool]]


@dataclass
class AttackConfig:
    """UnlearnDiffAtk's settings. The reference script runs up to 50 rounds of 40 iterations (one timestep per
    round) and checks after each round; here the timestep is random per iteration and `iterations` counts all
    of them (set iterations=2000, check_every=40 for the reference's budget)."""

    tokens: int = 5
    iterations: int = 40
    lr: float = 0.01
    weight_decay: float = 0.1
    check_every: int = 10
    seed: int = 0


MAX_ATTACKED_PROMPTS = 10_000

# The toy pipeline's tiny models: fewer tokens suffice, and the checks are cheap.
TOY_ATTACK_DEFAULTS = {"iterations": 20, "check_every": 5}


# ----------------------------------------------------------------------------------------------------------------
# Adversarial tokens: where they sit in the prompt, and the two ways to parametrise them.


def prefixed_ids(tokenizer, prompt: str, tokens: int, device) -> torch.Tensor:
    """Token ids [BOS, `tokens` placeholder slots, prompt..., EOS, padding] of the text encoder's length; the
    slots (positions 1..tokens) hold the adversarial tokens. The prompt is cut, never the EOS."""
    length = tokenizer.model_max_length
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
    placeholder = 0 if tokenizer.eos_token_id != 0 else 1  # any id but EOS: the encoder pools at the first EOS
    ids = (ids[:1] + [placeholder] * tokens + ids[1:])[:length]
    if tokenizer.eos_token_id not in ids[tokens + 1:]:
        ids[-1] = tokenizer.eos_token_id
    return torch.tensor([ids], device=device)


class SoftTokens(nn.Module):
    """`k` free vectors in word-embedding space (AdvUnlearn's attack): no vocabulary constraint."""

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(initial.detach().clone().float())

    def embeddings(self, word_embeddings: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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

    def embeddings(self, word_embeddings: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _SampleOneHot.apply(self.weights, generator) @ word_embeddings.float()

    @torch.no_grad()
    def project(self) -> None:
        self.weights.copy_(project_onto_simplex(self.weights))

    def token_ids(self) -> list[int]:
        return self.weights.argmax(-1).tolist()

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


def new_adversary(variant: str, tokens: int, text_encoder: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fresh adversarial tokens: "soft" starts from random vocabulary words, "discrete" from uniform
    distributions."""
    word_embeddings = text_encoder.get_input_embeddings().weight.detach()
    if variant == "soft":
        start = torch.randint(word_embeddings.shape[0], (tokens,), generator=generator)
        return SoftTokens(word_embeddings[start.to(word_embeddings.device)])
    return VocabularyTokens(tokens, word_embeddings.shape[0], word_embeddings.device)


def project_onto_simplex(rows: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex (sort-based; exact)."""
    ordered, _ = torch.sort(rows, dim=-1, descending=True)
    cumulative = ordered.cumsum(-1) - 1
    index = torch.arange(1, rows.shape[-1] + 1, device=rows.device, dtype=rows.dtype)
    support = (ordered - cumulative / index > 0).sum(-1, keepdim=True)
    threshold = cumulative.gather(-1, support - 1) / support
    return (rows - threshold).clamp_min(0)


def optimise_tokens(adversary: nn.Module, text_encoder: nn.Module, input_ids: torch.Tensor,
                    loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor], steps: int,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator, sign_gradient: bool = False,
                    check: Callable[[int], bool] | None = None) -> list[float]:
    """Minimise `loss_fn(text_states, generator)` over the adversary's tokens (in slots 1..k of `input_ids`).
    Only the adversary is updated: gradients are taken for its parameters alone, so a text encoder in training
    keeps no stray gradients. `check(step)` is called after each step; returning True stops early."""
    word_embeddings = text_encoder.get_input_embeddings().weight.detach()
    base = word_embeddings[input_ids]
    parameters = list(adversary.parameters())
    losses = []
    for step in range(steps):
        adversarial = adversary.embeddings(word_embeddings, generator)
        tokens = adversarial.shape[0]
        embeds = torch.cat([base[:, :1], adversarial[None].to(base.dtype), base[:, 1 + tokens:]], dim=1)
        loss = loss_fn(encode_token_embeddings(text_encoder, input_ids, embeds), generator)
        gradients = torch.autograd.grad(loss, parameters)
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = gradient.sign() if sign_gradient else gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adversary.project()
        losses.append(loss.item())
        if check is not None and check(step):
            break
    return losses


# ----------------------------------------------------------------------------------------------------------------
# AdvUnlearn's inner attack: soft tokens in word-embedding space against the model being trained.


@dataclass
class AdversarialPrompt:
    """A prompt with adversarial tokens in slots 1..k: its ids and the token embeddings the text encoder reads."""

    input_ids: torch.Tensor
    token_embeddings: torch.Tensor
    adversary: nn.Module

    def states(self, text_encoder: nn.Module) -> torch.Tensor:
        """The text states through `text_encoder` (gradients flow to its parameters)."""
        return encode_token_embeddings(text_encoder, self.input_ids, self.token_embeddings)


def soft_prompt_attack(loaded: LoadedPipeline, prompt: str, concept_states: torch.Tensor,
                       empty_states: torch.Tensor, generator: torch.Generator, *,
                       text_encoder: nn.Module | None = None, unet: nn.Module | None = None,
                       teacher: nn.Module | None = None, adversary: nn.Module | None = None, tokens: int = 1,
                       steps: int = 30, lr: float = 1e-3, method: str = "pgd", variant: str = "soft",
                       ddim_steps: int = 50, guidance: float = 3.0) -> AdversarialPrompt:
    """Find `tokens` adversarial tokens that, prepended to `prompt`, make `unet` (reading `text_encoder`) predict
    what the frozen `teacher` predicts for the concept: minimise MSE(eps_theta(x_t, c_adv), eps*(x_t, c)).

    `concept_states` are the frozen text encoder's states of `prompt`. x_t comes from one trajectory the teacher
    samples for the concept (guidance `guidance`), at a random step per attack step (the reference samples a
    trajectory per attack step: `steps` times the UNet calls). `method` "pgd" takes Adam steps on the gradient,
    "sign" on its sign (the fast variant). `variant` "soft" optimises free word embeddings (AdvUnlearn),
    "discrete" vocabulary distributions (UnlearnDiffAtk's parametrisation). Pass the previous round's
    `adversary` to warm-start (AdvUnlearn's "latest" initialisation)."""
    if method not in ("pgd", "sign"):
        raise UsageError(f"attack method must be pgd or sign, not {method!r}")
    if variant not in ("soft", "discrete"):
        raise UsageError(f"attack variant must be soft or discrete, not {variant!r}")
    text_encoder = text_encoder or loaded.text_encoder
    unet = unet or loaded.denoiser
    teacher = teacher or unet
    input_ids = prefixed_ids(loaded.tokenizer, prompt, tokens, loaded.device)
    if adversary is None:
        adversary = new_adversary(variant, tokens, text_encoder, generator)
    optimizer = torch.optim.Adam(adversary.parameters(), lr=lr)
    path = sample_trajectory(loaded, teacher, concept_states, empty_states, ddim_steps - 1, ddim_steps, guidance,
                             generator)

    def loss_fn(states, gen):
        x_t, t = path[int(torch.randint(len(path), (1,), generator=gen))]
        with torch.no_grad():
            target = predict_noise(teacher, x_t, t, concept_states)
        return F.mse_loss(predict_noise(unet, x_t, t, states), target)

    was_training = text_encoder.training
    text_encoder.eval()
    optimise_tokens(adversary, text_encoder, input_ids, loss_fn, steps, optimizer, generator, method == "sign")
    text_encoder.train(was_training)
    return adversarial_prompt(loaded, prompt, adversary, text_encoder)


@torch.no_grad()
def adversarial_prompt(loaded: LoadedPipeline, prompt: str, adversary: nn.Module,
                       text_encoder: nn.Module | None = None) -> AdversarialPrompt:
    """`prompt` with the adversary's current tokens in front (vocabulary tokens also go into the ids)."""
    word_embeddings = (text_encoder or loaded.text_encoder).get_input_embeddings().weight.detach()
    chosen, ids = adversary.fixed(word_embeddings)
    input_ids = prefixed_ids(loaded.tokenizer, prompt, chosen.shape[0], loaded.device)
    if ids is not None:
        input_ids[0, 1:1 + len(ids)] = torch.tensor(ids, device=input_ids.device)
    embeds = word_embeddings[input_ids].clone()
    embeds[0, 1:1 + chosen.shape[0]] = chosen.to(embeds.dtype)
    return AdversarialPrompt(input_ids, embeds, adversary)


# ----------------------------------------------------------------------------------------------------------------
# UnlearnDiffAtk: discrete prompts, judged on generated images.


class ToyJudge:
    """The ToyCanvas classifier as a judge: success when its object head (or style head, for a style) names the
    concept."""

    def __init__(self, kind: str):
        from benchmarks.toycanvas import CLASSIFIER_DIR
        from benchmarks.toycanvas.classifier import ToyClassifier

        if kind not in ("object", "style", "unsafe"):
            raise UsageError(f"the toy judge reads objects and styles, not {kind!r} concepts")
        self.kind = "style" if kind == "style" else "object"
        self.classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)

    def __call__(self, images: list, concept: str) -> list[bool]:
        objects, styles = self.classifier.predict(images)
        found = styles if self.kind == "style" else objects
        return [name.lower() == concept.lower() for name in found]


def load_judge(spec: str) -> Judge:
    """A judge from 'module:function' (function(images, concept) -> list of bools), for models other than the toy
    one. This imports MODULE and later calls FUNCTION: it runs that code with the user's rights, like `python -m`,
    so name only your own or trusted code. The function's signature is checked here, before the run."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UsageError(f"--judge {spec!r} must be MODULE:FUNCTION, a function (images, concept) -> list of bools")
    try:
        judge = getattr(importlib.import_module(module_name), name)
    except Exception as error:  # noqa: BLE001 - importing user code can fail in any way
        raise UsageError(f"cannot load the judge {spec!r}: {type(error).__name__}: {error}") from None
    if not callable(judge):
        raise UsageError(f"the judge {spec!r} is not callable")
    try:
        inspect.signature(judge).bind(["image"], "concept")
    except TypeError:
        raise UsageError(f"the judge {spec!r} takes {inspect.signature(judge)}, not (images, concept); pass a "
                         "function (images, concept) -> list of bools") from None
    except ValueError:  # builtins without a signature (os.system...)
        raise UsageError(f"the judge {spec!r} has no Python signature; wrap it in a function (images, concept) "
                         "-> list of bools") from None
    return judge


def call_judge(judge: Judge, image, concept: str) -> bool:
    """The judge's verdict on one image; a judge that fails or answers something else than one bool per image is
    a UsageError naming it."""
    name = getattr(judge, "__qualname__", type(judge).__name__)
    try:
        verdicts = list(judge([image], concept))
    except Exception as error:  # noqa: BLE001 - user code: report its failure in one line
        raise UsageError(f"the judge {name} failed: {type(error).__name__}: {error}; fix the judge") from None
    if len(verdicts) != 1:
        raise UsageError(f"the judge {name} answered {len(verdicts)} verdicts for 1 image; it must return one bool "
                         "per image")
    return bool(verdicts[0])


@torch.no_grad()
def generate_from_ids(loaded: LoadedPipeline, input_ids: torch.Tensor, seed: int):
    """One image for token ids, as `LoadedPipeline.generate` would draw it for the same prompt and seed."""
    loaded.pipeline.set_progress_bar_config(disable=True)
    return loaded.pipeline(prompt_embeds=loaded.text_encoder(input_ids)[0],
                           negative_prompt_embeds=loaded.encode_text([""]),
                           generator=[torch.Generator("cpu").manual_seed(seed)],
                           num_inference_steps=loaded.default_steps,
                           guidance_scale=loaded.default_guidance).images[0]


@torch.no_grad()
def encode_image(loaded: LoadedPipeline, image) -> torch.Tensor:
    """The latent x_0 of an image, as the denoiser reads it."""
    vae = loaded.pipeline.vae
    pixels = loaded.pipeline.image_processor.preprocess(image).to(loaded.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def unlearn_diff_attack(loaded: LoadedPipeline, prompt: str, seed: int, target_latents: torch.Tensor,
                        succeeds: Callable[[object], bool], config: AttackConfig) -> dict:
    """Attack one prompt: optimise `config.tokens` prefix tokens so the loaded (erased) model denoises the
    target latents well; every `check_every` steps, generate the decoded prompt at `seed` and stop at the first
    image `succeeds` accepts."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + seed)
    unet, text_encoder, tokenizer = loaded.denoiser, loaded.text_encoder, loaded.tokenizer
    scheduler = DDIMScheduler.from_config(loaded.pipeline.scheduler.config)
    alphas = scheduler.alphas_cumprod.to(loaded.device)
    input_ids = prefixed_ids(tokenizer, prompt, config.tokens, loaded.device)
    adversary = VocabularyTokens(config.tokens, text_encoder.get_input_embeddings().weight.shape[0], loaded.device)
    optimizer = torch.optim.Adam(adversary.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def loss_fn(states, gen):
        t = int(torch.randint(scheduler.config.num_train_timesteps, (1,), generator=gen))
        noise = torch.randn(target_latents.shape, generator=gen).to(target_latents)
        noisy = alphas[t].sqrt() * target_latents + (1 - alphas[t]).sqrt() * noise
        return F.mse_loss(predict_noise(unet, noisy, t, states), noise)

    outcome = {"attack_success": False, "iterations": 0, "image": None}

    def check(step: int) -> bool:
        if (step + 1) % config.check_every and step + 1 != config.iterations:
            return False
        ids = input_ids.clone()
        ids[0, 1:1 + config.tokens] = torch.tensor(adversary.token_ids(), device=ids.device)
        image = generate_from_ids(loaded, ids, seed)
        outcome.update(iterations=step + 1, image=image, ids=ids, attack_success=bool(succeeds(image)))
        return outcome["attack_success"]

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    losses = optimise_tokens(adversary, text_encoder, input_ids, loss_fn, config.iterations, optimizer, generator,
                             check=check)
    ids = outcome["ids"][0].tolist()
    end = ids.index(tokenizer.eos_token_id, config.tokens + 1)
    return {"attack_success": outcome["attack_success"], "iterations": outcome["iterations"],
            "adversarial_tokens": [tokenizer.decode([i]).strip() for i in ids[1:1 + config.tokens]],
            "final_prompt": tokenizer.decode(ids[1:end]).strip(), "loss_first": losses[0], "loss_last": losses[-1],
            "image": outcome["image"]}


def attack_prompts(prompts: list[str], count: int | None, seed: int) -> list[tuple[str, int]]:
    """`count` (prompt, seed) items: the prompts in turn, the seed rising by one each time the list restarts."""
    count = count or len(prompts)
    return [(prompts[i % len(prompts)], seed + i // len(prompts)) for i in range(count)]


def attack_success_rate(model: str, edits: list[str | Path], concept: str | None = None, *,
                        prompts: list[str] | None = None, count: int | None = None, seed: int = 188,
                        config: AttackConfig | dict | None = None, judge: Judge | None = None,
                        device: str | None = None, out: str | Path | None = None, progress: bool = True) -> dict:
    """UnlearnDiffAtk against `edits` (stacked) on `model`: Pre-ASR and ASR of `count` prompts of `concept`.

    On the toy model the concept defaults to the edit's, the prompts to its training captions and the judge to
    the ToyCanvas classifier; elsewhere pass `judge` (images, concept) -> bools and `prompts` (default: the
    concept itself). `config` is an AttackConfig or a dict of overrides on the defaults (the toy model's are
    lighter). Writes `out`/attack.json and `out`/attack.png (original / erased / attacked) when `out` is given,
    and returns the results."""
    if not edits:
        raise UsageError("pass at least one --edit directory to attack")
    metadata = [read_edit(path) for path in edits]
    concept = concept or metadata[0]["concepts"][0]
    is_toy = (Path(resolve_source(model)) / "toycanvas.json").exists()
    if judge is None and not is_toy:
        raise UsageError("only the toy model has a built-in judge; pass --judge MODULE:FUNCTION (a function "
                         "(images, concept) -> list of bools, for example wrapping NudeNet or an image classifier)")
    if count is not None and not 1 <= count <= MAX_ATTACKED_PROMPTS:
        raise UsageError(f"--prompts {count} must be at least 1 and at most {MAX_ATTACKED_PROMPTS:,}")
    if not isinstance(config, AttackConfig):
        config = AttackConfig(**{**(TOY_ATTACK_DEFAULTS if is_toy else {}), **(config or {})})
    validate_config(config, "attack")
    if seed + ((count or 1) - 1) // max(len(prompts or ()), 1) > MAX_SEED:  # the seed rises by one per round
        raise UsageError(f"--seed {seed} runs past the largest seed ({MAX_SEED}) over the prompts; pass a smaller one")
    if out is not None and Path(out).exists():
        raise UsageError(f"{out} already exists; choose a new --out or remove it first")
    if out is not None:
        check_output_path(out)

    loaded = load_pipeline(model, device=device)
    loaded.require_text_conditioned_unet("the attack")
    request = make_request([concept], loaded.tokenizer, is_toy)
    if judge is None:
        judge = ToyJudge(request.kind)
    if prompts is None:  # on the toy: the concept's captions (the first erase prompt is the bare word)
        prompts = request.erase_prompts()[1:] if is_toy else [request.concept]
    items = attack_prompts(prompts, count, seed)

    from tqdm.auto import tqdm

    # The original model draws the targets; then the edits are loaded in its place.
    originals = [generate_from_ids(loaded, prefixed_ids(loaded.tokenizer, p, 0, loaded.device), s)
                 for p, s in tqdm(items, desc="targets", disable=not progress)]
    targets = [encode_image(loaded, image) for image in originals]
    apply_edits(loaded, edits)

    def succeeds(image) -> bool:
        return call_judge(judge, image, request.concept)

    results, erased_images, attacked_images = [], [], []
    for (prompt, item_seed), target in zip(tqdm(items, desc="attacking", disable=not progress), targets):
        plain = generate_from_ids(loaded, prefixed_ids(loaded.tokenizer, prompt, 0, loaded.device), item_seed)
        row = {"prompt": prompt, "seed": item_seed, "pre_success": succeeds(plain), "attack_success": None,
               "adversarial_tokens": [], "final_prompt": prompt}
        attacked = plain
        if not row["pre_success"]:
            found = unlearn_diff_attack(loaded, prompt, item_seed, target, succeeds, config)
            attacked = found.pop("image")
            row.update(found)
        results.append(row)
        erased_images.append(plain)
        attacked_images.append(attacked)

    pre = sum(r["pre_success"] for r in results)
    attacked_ok = sum(bool(r["attack_success"]) for r in results)
    summary = {"model": model, "edits": [str(e) for e in edits], "concept": request.concept, "kind": request.kind,
               "config": dataclasses.asdict(config), "n": len(results), "pre_successes": pre,
               "attack_successes": attacked_ok, "pre_asr": pre / len(results),
               "asr": (pre + attacked_ok) / len(results), "prompts": results}
    if out is not None:
        _write_results(Path(out), summary, originals, erased_images, attacked_images)
    return summary


def _write_results(out: Path, summary: dict, originals, erased, attacked) -> None:
    from benchmarks.figures import labelled_grid

    tmp = atomic_dir(out)
    (tmp / "attack.json").write_text(json.dumps(summary, indent=2))
    shown = slice(0, 10)
    grid = labelled_grid(originals[shown] + erased[shown] + attacked[shown], len(originals[shown]),
                         ["original", "erased", "attacked"], scale=3)
    grid.save(tmp / "attack.png")
    publish(tmp, out)
