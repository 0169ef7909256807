"""Reading the denoiser's cross-attention maps at a concept's tokens: what Forget-Me-Not re-steers and MACE's LoRAs
suppress. While a `ConceptAttention` is active every text-reading attention runs an explicit-softmax processor that
keeps, per call (one per attention layer), the sum of squared probabilities at the chosen key positions (the
concept's tokens, one boolean row per example), optionally only over the query pixels of a mask:

    FMN   L = || concat_layers A_l[:, :, positions] ||_2                 attention.norm()
    MACE  L = sum_layers || A_l[:, mask pixels, positions] ||_F          attention.layer_norms()

Also where a concept's tokens sit in tokenized prompts (`concept_positions`, `end_positions`, `key_positions`), and how
much of them a causal text encoder copies into its end token and padding (`copied_attention`, FMN's text stage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .prompts import EraseRequest

# Which key positions count as the concept's: "concept", its tokens; "concept+end", and the end token (the one CLIP
# pools); "concept+after", and every later position (a causal text encoder carries the concept into each of them).
POSITIONS = ("concept", "concept+end", "concept+after")


def spellings(request: EraseRequest) -> list[str]:
    """The concepts' spellings, shortest first: captions write a name's underscores as spaces (UnlearnCanvas'
    "Van_Gogh")."""
    return sorted({s for concept in request.concepts for s in (concept, concept.replace("_", " "))}, key=len)


def concept_positions(tokenizer, ids: torch.Tensor, phrases: list[str]) -> torch.Tensor:
    """(prompts, tokens) booleans: where each row of `ids` holds the tokens of one of `phrases` (every occurrence).
    A prompt without the concept is a UsageError (nothing to act on)."""
    found = torch.zeros(ids.shape, dtype=torch.bool)
    wanted = [tokenizer(phrase, add_special_tokens=False).input_ids for phrase in phrases]
    for row, prompt in enumerate(ids.tolist()):
        for phrase in wanted:
            for start in range(len(prompt) - len(phrase) + 1):
                if phrase and prompt[start:start + len(phrase)] == phrase:
                    found[row, start:start + len(phrase)] = True
        if not found[row].any():
            text = tokenizer.decode(prompt, skip_special_tokens=True)
            raise UsageError(f"the prompt {text!r} does not contain the concept's tokens ({', '.join(phrases)})")
    return found.to(ids.device)


def end_positions(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """(prompts, tokens) booleans: each row's first end token (the one CLIP pools)."""
    ends = ids == tokenizer.eos_token_id
    return ends & (ends.cumsum(dim=1) == 1)


def key_positions(positions: torch.Tensor, mode: str, tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """The concept's `positions` widened as `mode` (one of POSITIONS) says."""
    if mode == "concept+end":
        return positions | end_positions(tokenizer, ids)
    if mode == "concept+after":
        return positions.cumsum(dim=1) > 0
    return positions


class ConceptAttention:
    """While active (a context), every text-reading attention of the denoiser runs an explicit-softmax processor
    that adds the squared probabilities at `positions` (one boolean row of key positions per example; with `pixels`,
    only at the queries its mask covers) to a running list, one entry per layer call; `norm()` or `layer_norms()`
    gives the loss and starts a new list. The original processors come back on exit, so the edited UNet saves and
    runs as any other."""

    def __init__(self, denoiser: nn.Module, names: list[str]):
        self.modules = [denoiser.get_submodule(name) for name in names]
        self.positions: torch.Tensor | None = None
        # (batch, 1, height, width) in [0, 1] at the latent's resolution, or None for every pixel.
        self.pixels: torch.Tensor | None = None
        self.squares: list[torch.Tensor] = []

    def __enter__(self):
        self.originals = [module.processor for module in self.modules]
        for module in self.modules:
            module.set_processor(ConceptAttentionProcessor(self))
        return self

    def __exit__(self, *exc):
        for module, original in zip(self.modules, self.originals):
            module.set_processor(original)

    def keep(self, probabilities: torch.Tensor) -> None:
        """probabilities: (batch x heads, queries, keys), batch-major as Attention.head_to_batch_dim lays it out."""
        heads = probabilities.shape[0] // len(self.positions)
        mask = self.positions.repeat_interleave(heads, dim=0)[:, None, :]
        selected = probabilities.float() * mask
        if self.pixels is not None:
            selected = selected * self.query_mask(probabilities.shape[1]).repeat_interleave(heads, dim=0)[:, :, None]
        self.squares.append(selected.pow(2).sum())

    def query_mask(self, queries: int) -> torch.Tensor:
        """(batch, queries): the pixel mask at a layer's resolution, a query counted where any pixel it covers is
        masked (so a small object still has queries at the coarsest layers)."""
        height, width = self.pixels.shape[-2:]
        factor = (height * width / queries) ** 0.5
        size = (round(height / factor), round(width / factor))
        return F.adaptive_max_pool2d(self.pixels.float(), size).flatten(1).to(self.positions.device)

    def norm(self) -> torch.Tensor:
        """The norm over every layer's probabilities together (Forget-Me-Not's loss)."""
        total, self.squares = torch.stack(self.squares).sum(), []
        return total.sqrt()

    def layer_norms(self) -> torch.Tensor:
        """The sum of each layer's Frobenius norm (MACE's loss)."""
        norms, self.squares = torch.stack(self.squares).sqrt(), []
        return norms.sum()


class ConceptAttentionProcessor:
    """diffusers' attention (AttnProcessor's computation) with the softmax explicit, so its probabilities can be
    read; only the cross-attention case (3-d hidden states reading the text states) arises here."""

    def __init__(self, recorder: ConceptAttention):
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        batch, keys = hidden_states.shape[0], (encoder_hidden_states if encoder_hidden_states is not None
                                               else hidden_states).shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probabilities = attn.get_attention_scores(query, key, attention_mask)
        self.recorder.keep(probabilities)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def end_and_padding_positions(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """(prompts, tokens) booleans: each row's end token and every position after it (the padding), where a causal
    text encoder sums up the whole prompt and a denoiser reads most of it."""
    return end_positions(tokenizer, ids).cumsum(dim=1) > 0


def copied_attention(encoder: nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                     queries: torch.Tensor) -> torch.Tensor:
    """The sum of squared self-attention probabilities that a text encoder's `queries` (one boolean row of query
    positions per prompt) put on the concept's tokens (`positions`), over every layer and head: how much of the
    concept the encoder copies into those positions. The encoder runs its eager attention for this call, the one
    that returns its probabilities."""
    previous = encoder.config._attn_implementation
    encoder.set_attn_implementation("eager")
    try:
        if encoder.config._attn_implementation != "eager":
            raise UsageError(f"{type(encoder).__name__} cannot run its eager attention, the one that returns its "
                             "probabilities; FMN's text stage needs it (--set text_steps=0 to go without)")
        attentions = encoder(ids, output_attentions=True).attentions
    finally:
        encoder.set_attn_implementation(previous)
    mask = (queries[:, None, :, None] & positions[:, None, None, :]).float()
    return sum((probabilities.float() * mask).pow(2).sum() for probabilities in attentions)
