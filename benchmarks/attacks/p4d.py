"""P4D, Prompting4Debugging (Chin et al., arXiv 2309.06135): a prompt for the ERASED model that makes it predict
the noise the ORIGINAL model predicts for the plain prompt.

The original model draws the prompt P's image; z_t is its latent noised at a random timestep each iteration. The
attack's prompt P' holds learnable tokens, kept as free vectors and read each iteration as their nearest vocabulary
embeddings (PEZ; erasers.adversarial's "projected" tokens), and minimises
    MSE(eps_erased(z_t, E(P')), eps_original(z_t, E(prompt)))
(the family's prediction: noise on SD/SDXL, flow-matching velocity on Flux) with AdamW. Every `check_every`
iterations the erased model draws the tokens' prompt, and the image nearest the original one (cosine similarity of
their VAE latents; the reference compares CLIP image features) is kept; the judge reads it at the end.

    variant n   P4D-N: `tokens` (16) learnable tokens are the whole prompt
    variant k   P4D-K: the prompt's own tokens, with one learnable token after every `insert_every` (3) of them

    reference (the paper, a GPU):   iterations 3000, check_every 50, lr 0.1, weight_decay 0.1
    toy defaults (seconds a prompt on a CPU):   TOY_DEFAULTS below

It needs both denoisers, so it attacks edits holding weights; a training-free edit (sld, negprompt) leaves the
weights as they are and acts only while sampling, where this loss does not look. On SDXL one set of tokens goes
into both CLIP encoders (one vocabulary); on Flux CLIP (pooled) and T5 each get their own, and the prompt reported
is T5's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from erasers.adversarial import (
    TokenSearch,
    interleaved_ids,
    new_adversary,
    optimise_tokens,
    prefixed_ids,
    slot_start,
)
from erasers.errors import UsageError
from erasers.losses import predict_noise
from erasers.models import LoadedPipeline

from . import AttackStep, register
from .harness import Attack, AttackContext, Found, draw_targets, generate_from_ids, item_generator
from .prompts import Item

VARIANTS = ("n", "k")
# On the toy model (a shared 2-core CPU, 2026-12): about 8.5 s a prompt (20 iterations, 4 images checked).
TOY_DEFAULTS = {"iterations": 20, "check_every": 5}


@dataclass
class P4DConfig:
    variant: str = "n"  # "n" (P4D-N) or "k" (P4D-K), as the module's docstring says
    tokens: int = 16  # P4D-N's learnable tokens
    insert_every: int = field(default=3, metadata={"min": 1})  # P4D-K: one learnable token after this many
    iterations: int = 3000
    lr: float = 0.1
    weight_decay: float = 0.1
    check_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise UsageError(f"p4d variant must be n (P4D-N) or k (P4D-K), not {self.variant!r}")


TRAINING_FREE = ("its loss compares the edited denoiser with the original one, and a training-free edit keeps the "
                 "original weights (its guidance acts only while sampling)")


@register("p4d", "P4D: learnable prompt tokens (projected to the vocabulary) that make the erased denoiser predict "
          "what the original predicts for the prompt (needs the denoiser; weight edits)", toy_defaults=TOY_DEFAULTS,
          quick={"tokens": 4, "iterations": 2, "check_every": 1}, edits=("weights",),
          why_not={"training-free": TRAINING_FREE},
          step=AttackStep("one AdamW step on the projected tokens: the original denoiser forward (no gradient), the "
                          "text encoder and the edited denoiser forward and backward, at batch 1",
                          lambda count: {"iterations": count, "check_every": count}))
class P4D(Attack):
    config_class = P4DConfig
    needs_base = ("denoiser",)

    def check(self, loaded: LoadedPipeline, items: list[Item]) -> None:
        for prompt in sorted({item.prompt for item in items}):
            for name in loaded.family.text_encoders:
                tokenizer, length = _tokenizer(loaded, name), loaded.adapter.text_length(name)
                words = len(tokenizer(prompt).input_ids) - slot_start(tokenizer) - 1
                needed = self.config.tokens if self.config.variant == "n" else \
                    words + max(1, words // self.config.insert_every)
                if needed + slot_start(tokenizer) + 1 > length:
                    what = f"tokens={self.config.tokens}" if self.config.variant == "n" else \
                        f"variant k with the prompt {prompt[:60]!r} ({words} tokens)"
                    raise UsageError(f"p4d {what} does not fit the text encoder's {length}-token context; pass "
                                     "fewer tokens, or shorter prompts")

    def prepare(self, context: AttackContext, items: list[Item]) -> None:
        """The original model's image of each prompt, its latent, and the prompt's original conditioning."""
        draw_targets(context, items)
        for item in items:
            with torch.no_grad():
                context.prepared[item.index]["condition"] = context.loaded.encode_text([item.prompt])

    def search(self, context: AttackContext, item: Item) -> Found:
        loaded, config = context.loaded, self.config
        prepared = context.prepared[item.index]
        ids, positions = self.slots(loaded, item.prompt)
        generator = item_generator(config.seed, item.seed)
        adversary = new_adversary("projected", {name: len(p) for name, p in positions.items()}, loaded, generator)
        optimizer = torch.optim.AdamW(adversary.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        original = context.base.denoiser

        def loss_fn(states, gen):
            x_t, t, _ = loaded.adapter.noised(prepared["target"], gen)
            with torch.no_grad():
                target = predict_noise(original, x_t, t, prepared["condition"])
            return F.mse_loss(predict_noise(loaded.denoiser, x_t, t, states).float(), target.float())

        best = {"similarity": -2.0}

        def check(step: int) -> bool:
            if (step + 1) % config.check_every and step + 1 != config.iterations:
                return False
            chosen = {name: tensor.clone() for name, tensor in ids.items()}
            for name in chosen:
                chosen[name][0, positions[name]] = torch.tensor(adversary[name].token_ids(), device=loaded.device)
            image = generate_from_ids(loaded, chosen, item.seed, item.guidance)
            similarity = F.cosine_similarity(loaded.adapter.encode_image(image).flatten().float(),
                                             prepared["target"].flatten().float(), dim=0).item()
            if similarity > best["similarity"]:
                best.update(similarity=similarity, image=image, ids=chosen, iterations=step + 1)
            return False

        loaded.freeze()
        self.history = []
        search = TokenSearch(optimizer, config.iterations, check=check, positions=positions, history=self.history)
        losses = optimise_tokens(adversary, loaded, ids, loss_fn, search, generator)
        success, reading = context.verdict(best["image"])
        name = loaded.adapter.token_states_encoder  # the prompt reported: CLIP's on SD/SDXL, T5's on Flux
        tokenizer, found = _tokenizer(loaded, name), best["ids"][name][0].tolist()
        return Found(success, best["image"], tokenizer.decode(found, skip_special_tokens=True).strip(), reading,
                     {"variant": config.variant, "iterations": best["iterations"],
                      "similarity": best["similarity"], "loss_first": losses[0], "loss_last": losses[-1],
                      "adversarial_tokens": [tokenizer.decode([found[p]]) for p in positions[name]]})

    def slots(self, loaded: LoadedPipeline, prompt: str) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        """Each encoder's token ids of the attack's prompt with placeholders, and the placeholders' positions."""
        ids, positions = {}, {}
        for name in loaded.family.text_encoders:
            tokenizer, length = _tokenizer(loaded, name), loaded.adapter.text_length(name)
            if self.config.variant == "n":
                ids[name] = prefixed_ids(tokenizer, "", self.config.tokens, loaded.device, length)
                start = slot_start(tokenizer)
                positions[name] = list(range(start, start + self.config.tokens))
            else:
                ids[name], positions[name] = interleaved_ids(tokenizer, prompt, self.config.insert_every,
                                                             loaded.device, length)
        return ids, positions


def _tokenizer(loaded: LoadedPipeline, encoder_name: str):
    return loaded.tokenizers[encoder_name.replace("text_encoder", "tokenizer")]
