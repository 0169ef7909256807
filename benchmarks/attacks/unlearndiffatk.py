"""UnlearnDiffAtk (Zhang et al., 2024): the diffusion model is its own classifier. For each prompt of the erased
concept, the ORIGINAL model draws a target image; a few adversarial tokens prepended to the prompt are optimised
so that the ERASED model denoises that image well again (noise added at random timesteps, MSE to the noise).
The tokens are distributions over the vocabulary, sampled as one-hot vectors with straight-through gradients
(Adam lr 0.01, projected back onto the simplex); every `check_every` iterations the most likely tokens are
decoded into a prompt, the erased model generates it and a judge (an image classifier, NudeNet, ...) says whether
the concept is back. A prompt counts as a pre-attack success when its plain form already regenerates the
concept, and the attack stops at its first success:
    Pre-ASR = pre-successes / N        ASR = (pre-successes + attack successes) / N

The tokens and their optimisation live in erasers/adversarial.py (shared with AdvUnlearn's inner attack). On SDXL
one set of vocabulary tokens goes into both CLIP encoders (they share a vocabulary); on Flux the CLIP encoder
(pooled) and T5 (token states) each get their own, and the prompt reported is T5's. The denoising loss is the
family's: noise prediction on SD/SDXL, flow-matching velocity on Flux (erasers/families/). Against a training-free
edit the search sees the weights alone (the base model's), while every image it is judged on is drawn through the
edit's guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from erasers.adversarial import TokenSearch, check_token_room, new_adversary, optimise_tokens, prompt_ids, slot_start
from erasers.losses import predict_noise
from erasers.models import LoadedPipeline

from . import AttackStep, register
from .harness import Attack, AttackContext, Found, draw_targets, generate_from_ids, item_generator
from .prompts import Item


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


# The toy pipeline's tiny models: fewer tokens suffice, and the checks are cheap.
TOY_ATTACK_DEFAULTS = {"iterations": 20, "check_every": 5}


@register("unlearndiffatk", "UnlearnDiffAtk: adversarial prefix tokens that make the erased model denoise the "
          "original model's image of the prompt (needs the denoiser)", toy_defaults=TOY_ATTACK_DEFAULTS,
          quick={"tokens": 2, "iterations": 2, "check_every": 1},
          step=AttackStep("one Adam step on the prefix tokens: the text encoder and the edited denoiser forward and "
                          "backward at batch 1", lambda count: {"iterations": count, "check_every": count}))
class UnlearnDiffAtk(Attack):
    config_class = AttackConfig

    def check(self, loaded: LoadedPipeline, items: list[Item]) -> None:
        check_token_room(loaded, sorted({item.prompt for item in items}), self.config.tokens, "--tokens")

    def prepare(self, context: AttackContext, items: list[Item]) -> None:
        draw_targets(context, items)  # the original model's image of each prompt: the attack's target

    def search(self, context: AttackContext, item: Item) -> Found:
        readings = []

        def succeeds(image) -> bool:
            success, reading = context.verdict(image)
            readings.append(reading)
            return success

        self.history = []
        found = unlearn_diff_attack(context.loaded, item.prompt, item.seed,
                                    context.prepared[item.index]["target"], succeeds, self.config, item.guidance,
                                    self.history)
        image = found.pop("image")
        success, prompt = found.pop("attack_success"), found["final_prompt"]
        return Found(success, image, prompt, readings[-1], found)


def encode_image(loaded: LoadedPipeline, image) -> torch.Tensor:
    """The latent x_0 of an image, as the denoiser reads it (Flux: packed)."""
    return loaded.adapter.encode_image(image)


def unlearn_diff_attack(loaded: LoadedPipeline, prompt: str, seed: int, target_latents: torch.Tensor,
                        succeeds: Callable[[object], bool], config: AttackConfig,
                        guidance: float | None = None, history: list[dict] | None = None) -> dict:
    """Attack one prompt: optimise `config.tokens` prefix tokens so the loaded (erased) model denoises the
    target latents well; every `check_every` steps, generate the decoded prompt at `seed` (and `guidance`) and
    stop at the first image `succeeds` accepts. `history`, when a list, gets each step's time and loss."""
    generator = item_generator(config.seed, seed)
    unet = loaded.denoiser
    input_ids = prompt_ids(loaded, prompt, config.tokens)
    adversary = new_adversary("discrete", config.tokens, loaded, generator)
    optimizer = torch.optim.Adam(adversary.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def loss_fn(states, gen):
        noisy, t, target = loaded.adapter.noised(target_latents, gen)
        return F.mse_loss(predict_noise(unet, noisy, t, states).float(), target.float())

    outcome = {"attack_success": False, "iterations": 0, "image": None}

    def chosen_ids() -> dict[str, torch.Tensor]:
        ids = {name: tensor.clone() for name, tensor in input_ids.items()}
        for name in ids:
            start = slot_start(_tokenizer(loaded, name))
            ids[name][0, start:start + config.tokens] = torch.tensor(adversary[name].token_ids(), device=loaded.device)
        return ids

    def check(step: int) -> bool:
        if (step + 1) % config.check_every and step + 1 != config.iterations:
            return False
        ids = chosen_ids()
        image = generate_from_ids(loaded, ids, seed, guidance)
        outcome.update(iterations=step + 1, image=image, ids=ids, attack_success=bool(succeeds(image)))
        return outcome["attack_success"]

    loaded.freeze()
    search = TokenSearch(optimizer, config.iterations, check=check, history=history)
    losses = optimise_tokens(adversary, loaded, input_ids, loss_fn, search, generator)
    decoded = {name: _decode(loaded, name, ids[0].tolist(), config.tokens) for name, ids in outcome["ids"].items()}
    # The prompt reported is the one the token states are read from (CLIP on SD/SDXL, T5 on Flux).
    tokens, final_prompt = decoded[loaded.adapter.token_states_encoder]
    result = {"attack_success": outcome["attack_success"], "iterations": outcome["iterations"],
              "adversarial_tokens": tokens, "final_prompt": final_prompt, "loss_first": losses[0],
              "loss_last": losses[-1], "image": outcome["image"]}
    if len({id(part) for part in adversary.values()}) > 1:
        result["adversarial_tokens_by_encoder"] = {name: found[0] for name, found in decoded.items()}
    return result


def _tokenizer(loaded: LoadedPipeline, encoder_name: str):
    return loaded.tokenizers[encoder_name.replace("text_encoder", "tokenizer")]


def _decode(loaded: LoadedPipeline, encoder_name: str, ids: list[int], tokens: int) -> tuple[list[str], str]:
    """(the adversarial tokens, the whole prompt) of one encoder's ids."""
    tokenizer = _tokenizer(loaded, encoder_name)
    start = slot_start(tokenizer)
    end = ids.index(tokenizer.eos_token_id, start + tokens)
    return ([tokenizer.decode([i]).strip() for i in ids[start:start + tokens]],
            tokenizer.decode(ids[start:end]).strip())
