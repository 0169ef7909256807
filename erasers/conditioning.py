"""The text conditioning a denoiser reads, one object for every family (built by erasers/families/)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Conditioning:
    """The text conditioning of a batch of prompts, as the family's denoiser reads it.

    `states`: (batch, tokens, width): the token states cross-attention (SD, SDXL) or joint attention (Flux) reads.
    `pooled`: (batch, width) or None: SDXL's `text_embeds`, Flux's `pooled_projections`.
    Indexing, slicing, `detach`, `expand`, `torch.cat` and `torch.allclose` act on the batch of both parts, so method
    code written against SD's hidden-state tensors runs unchanged on every family."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None
    adapter: object = None  # the family adapter (erasers.families) that made it and predicts from it

    def _map(self, fn) -> "Conditioning":
        return Conditioning(fn(self.states), None if self.pooled is None else fn(self.pooled), self.adapter)

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        return self._map(lambda tensor: tensor[index])

    @property
    def shape(self) -> torch.Size:
        return self.states.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.states.dtype

    @property
    def device(self) -> torch.device:
        return self.states.device

    def detach(self) -> "Conditioning":
        return self._map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda tensor: tensor.to(*args, **kwargs))

    def double(self) -> "Conditioning":
        return self._map(torch.Tensor.double)

    def float(self) -> "Conditioning":
        return self._map(torch.Tensor.float)

    def cpu(self) -> "Conditioning":
        return self._map(torch.Tensor.cpu)

    def expand(self, batch: int, *_) -> "Conditioning":
        """The batch broadcast to `batch` rows (the remaining sizes, as SD code passes them, are ignored)."""
        return self._map(lambda tensor: tensor.expand(batch, *tensor.shape[1:]))

    def expand_as(self, other) -> "Conditioning":
        return self.expand(other.shape[0])

    def parts(self) -> tuple[torch.Tensor, ...]:
        return (self.states,) if self.pooled is None else (self.states, self.pooled)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat:
            items = list(args[0])
            if kwargs.get("dim", args[1] if len(args) > 1 else 0) != 0:
                return NotImplemented
            first = items[0]
            pooled = None if first.pooled is None else torch.cat([item.pooled for item in items])
            return Conditioning(torch.cat([item.states for item in items]), pooled, first.adapter)
        if func in (torch.allclose, torch.equal):
            a, b = args[:2]
            return all(func(x, y, *args[2:], **kwargs) for x, y in zip(a.parts(), b.parts()))
        return NotImplemented


@contextlib.contextmanager
def replaced_token_embeddings(text_encoder: nn.Module, token_embeddings: torch.Tensor | None):
    """Run `text_encoder` on `token_embeddings` (batch, length, width) in place of its token-embedding layer's
    output (soft tokens, as prompt attacks optimise them); gradients flow to them and to the encoder."""
    if token_embeddings is None:
        yield
        return
    # The layer the forward pass calls: T5's stack holds its own module tied to get_input_embeddings()'s weight.
    layer = getattr(getattr(text_encoder, "encoder", None), "embed_tokens", None) or text_encoder.get_input_embeddings()
    handle = layer.register_forward_hook(lambda module, args, output: token_embeddings.to(output.dtype))
    try:
        yield
    finally:
        handle.remove()
