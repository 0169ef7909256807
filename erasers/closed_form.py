"""The regularised least-squares edit of a linear layer that UCE and MACE solve in closed form:

    W = argmin_W  lamb ||W - W0||^2 + sum_k s_k ||W X_k - Y_k||^2
      = (lamb W0 + sum_k s_k Y_k X_k^T) (lamb I + sum_k s_k X_k X_k^T)^-1

X_k are input columns (d, n_k) the layer reads, Y_k what it should give for them (out, n_k): UCE's concept
embeddings and W0 times their guide's, its preserved prompts and W0 times themselves; MACE's co-occurring words and W0
times their mapped versions (refinement), or each concept's embeddings and (W0 + dW_i) times them (fusion of its
LoRAs). The right-hand matrix depends only on the inputs, so it is inverted once for every linear that reads them
(a cross-attention's keys and values, every layer reading the same text states). In float64: the sums of outer
products of text states span several orders of magnitude.

Also the columns themselves: `token_columns`, the text states of prompts' tokens after the start token.
"""

from __future__ import annotations

import torch

from .models import LoadedPipeline


class LeastSquaresEdit:
    """The closed form for fixed inputs [(s_k, X_k)]: `solve(W0, [Y_k])` gives the edited weight. With lamb 0 (MACE's
    art and celebrity presets) nothing pins the directions no column spans, and the pseudo-inverse gives the
    minimum-norm solution there."""

    def __init__(self, lamb: float, inputs: list[tuple[float, torch.Tensor]], width: int):
        self.lamb = lamb
        self.inputs = inputs
        right = lamb * torch.eye(width, dtype=torch.float64)
        for scale, columns in inputs:
            right = right + scale * columns @ columns.T
        self.inverse = torch.linalg.inv(right) if lamb > 0 else torch.linalg.pinv(right, hermitian=True)

    def solve(self, w0: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """The edited weight (float64) of a linear whose weight is `w0`, one target (out, n_k) per input."""
        left = self.lamb * w0
        for (scale, columns), target in zip(self.inputs, targets, strict=True):
            left = left + scale * target @ columns.T
        return left @ self.inverse


def _states_tokenizer(loaded: LoadedPipeline):
    """The tokenizer whose tokens the token states follow (CLIP on SD/SDXL, T5 on Flux), its padded length, and
    the first position after its start token (T5 has none)."""
    name = loaded.adapter.token_states_encoder
    tokenizer = loaded.tokenizers[name.replace("text_encoder", "tokenizer")]
    start = 1 if tokenizer.bos_token_id is not None else 0
    return tokenizer, loaded.adapter.text_length(name), start


def token_counts(loaded: LoadedPipeline, prompts: list[str], include_padding: bool = False) -> list[int]:
    tokenizer, length, _ = _states_tokenizer(loaded)
    if include_padding:
        return [length] * len(prompts)
    return [min(len(ids), length) for ids in tokenizer(prompts, truncation=True, max_length=length).input_ids]


def token_columns(loaded: LoadedPipeline, prompts: list[str], lengths: list[int] | None = None,
                  inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Text embeddings of each prompt's tokens after the start token, through its end token (or the first
    `lengths[i]` positions), stacked as columns: (d, n). `inputs`: what a projection reads, (levels, batch, tokens,
    width) (default: the text states themselves, one level)."""
    if inputs is None:
        with torch.no_grad():
            inputs = loaded.encode_text(prompts).states[None]
    inputs = inputs.double().cpu()
    lengths = lengths or token_counts(loaded, prompts)
    start = _states_tokenizer(loaded)[2]
    return torch.cat([level[i, start:lengths[i]] for level in inputs for i in range(len(prompts))]).T
