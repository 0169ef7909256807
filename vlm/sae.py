"""A small TopK sparse autoencoder over one layer's hidden states (Gao et al. 2024's recipe, hand-written).

    z = TopK(ReLU(W_enc (x - b_dec) + b_enc))      features: at most k are non-zero per token
    x_hat = W_dec z + b_dec                          decoder rows kept at unit norm, so a feature's activation is
                                                     its contribution's length
TopK fixes the sparsity directly, so no L1 weight needs tuning per model; a ReLU-only autoencoder is `k = 0`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from erasers.train import TrainingLoop


class SparseAutoencoder(nn.Module):
    def __init__(self, hidden: int, features: int, k: int):
        super().__init__()
        self.k = k
        self.encoder = nn.Linear(hidden, features)
        self.decoder = nn.Parameter(torch.empty(features, hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        nn.init.kaiming_uniform_(self.decoder)
        with torch.no_grad():
            self.normalise_decoder()
            self.encoder.weight.copy_(self.decoder)  # tied start: training begins near the identity
            self.encoder.bias.zero_()

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.decoder /= self.decoder.norm(dim=1, keepdim=True).clamp(min=1e-8)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.encoder(x.to(self.decoder.dtype) - self.bias))
        if 0 < self.k < pre.shape[-1]:
            top = pre.topk(self.k, dim=-1)
            pre = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        return pre

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.decoder + self.bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    def tensors(self, prefix: str = "sae.") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": v for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], k: int, prefix: str = "sae.") -> SparseAutoencoder:
        features, hidden = tensors[f"{prefix}decoder"].shape
        sae = cls(hidden, features, k)
        sae.load_state_dict({key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)})
        return sae


@dataclass
class SAETraining:
    expansion: int = 8
    k: int = 16
    steps: int = 1500
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0


def train_sae(activations: torch.Tensor, cfg: SAETraining, progress: bool = True,
              work_dir: Path | None = None) -> tuple[SparseAutoencoder, dict]:
    """Fit an autoencoder to rows of `activations` (tokens, hidden); returns it and its final fraction of variance
    unexplained (FVU) on all rows. With `work_dir`, checkpoints there and resumes from them."""
    activations = activations.float()
    torch.manual_seed(cfg.seed)
    sae = SparseAutoencoder(activations.shape[1], cfg.expansion * activations.shape[1], cfg.k)
    with torch.no_grad():
        sae.bias.copy_(activations.median(dim=0).values)  # the geometric-median-ish start the recipe uses
    optimiser = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    variance = activations.var(dim=0).sum()

    def step(_index: int, generator: torch.Generator) -> dict[str, float]:
        rows = activations[torch.randint(len(activations), (cfg.batch_size,), generator=generator)]
        reconstruction, _ = sae(rows)
        loss = (reconstruction - rows).pow(2).sum(-1).mean() / variance
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        sae.normalise_decoder()
        return {"fvu": loss.item()}

    TrainingLoop("sae", cfg.steps, {"sae": sae, "optimiser": optimiser}, cfg.seed, work_dir,
                 progress=progress).run(step)
    with torch.no_grad():
        reconstruction, z = sae(activations)
        fvu = ((reconstruction - activations).pow(2).sum(-1).mean() / variance).item()
        alive = int((z > 0).any(0).sum())
    return sae.eval(), {"fvu": round(fvu, 4), "alive_features": alive, "features": sae.decoder.shape[0]}
