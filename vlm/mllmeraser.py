"""MLLMEraser: training-free, input-aware unlearning by steering hidden states at prefill.

1. Knowledge-recall pairs: forget image questions as they are. Knowledge-erasure pairs: the same questions with
   the image perturbed by a few PGD steps (sign gradient, L-inf ball of `pgd_epsilon` in the processor's
   normalised pixel units) towards a refusal-style answer and away from the true one.
2. Per steered layer l, the prompt's last-position states: H_f (recall), H_e (erasure), H_r (retain questions).
   Target shifts D = H_e - H_f.
3. P projects onto the null space of the retain states: the eigenvectors of H_r H_r^T beyond the top ones that
   carry `retain_energy` of its energy. Then, with columns as samples,
        W = D H_f^T P^T (P H_f H_f^T P^T + gamma P P^T)^+
   is the least-squares map from (projected) forget states to their shifts, ridge-regularised by gamma. As W = W P,
   a state in the retain span is hardly moved: the input-aware gate.
4. At prefill (a forward over more than one position) a hook on each steered layer adds
   strength_l * (h_last @ W_l^T), h_last the layer's output at the prompt's last position, to every position.
   Decoding steps are not steered: the prefilled cache already carries the edit.
Questions without an image have no pixels to perturb and are not used for the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasers.errors import UsageError

from .forward import Item, answer_nll, chunks, layer_states
from .hooks import hook_layers
from .registry import EditContent, VLMEraser, register_vlm

REFUSAL = "I cannot share that information."


@dataclass
class MLLMEraserConfig:
    layers: str = ""  # comma-separated decoder layers to steer; "": all but the first
    strength: float = 1.0
    layer_strengths: str = ""  # comma-separated per steered layer, overriding `strength`
    gamma: float = 1e-2  # ridge, relative to the mean squared norm of the projected forget states
    retain_energy: float = 0.99
    forget_samples: int = 64
    retain_samples: int = 256
    pgd_steps: int = 5
    pgd_epsilon: float = 0.25
    refusal: str = REFUSAL
    batch_size: int = 16
    seed: int = 0


def parse_layers(text: str, count: int) -> list[int]:
    if not text.strip():
        return list(range(1, count)) or [0]
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"mllmeraser option layers wants comma-separated integers, got {text!r}") from None
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        raise UsageError(f"mllmeraser layer {bad[0]} does not exist: this model has layers 0..{count - 1}")
    return layers


def parse_strengths(cfg: MLLMEraserConfig, layers: list[int]) -> list[float]:
    if not cfg.layer_strengths.strip():
        return [cfg.strength] * len(layers)
    values = [float(v) for v in cfg.layer_strengths.split(",") if v.strip()]
    if len(values) != len(layers):
        raise UsageError(f"mllmeraser layer_strengths gives {len(values)} values for {len(layers)} layers")
    return values


def perturb_images(loaded, items: list[Item], cfg: MLLMEraserConfig) -> torch.Tensor:
    """PGD on the processed pixels: minimise NLL(refusal) - NLL(true answer) within the epsilon ball."""
    inputs = loaded.inputs([item.image for item in items], [item.prompt for item in items])
    original = inputs["pixel_values"].detach()
    delta = torch.zeros_like(original, requires_grad=True)
    step = 2.5 * cfg.pgd_epsilon / max(cfg.pgd_steps, 1)
    for _ in range(cfg.pgd_steps):
        pixels = original + delta
        refuse = answer_nll(loaded, items, [cfg.refusal] * len(items), pixel_values=pixels)
        recall = answer_nll(loaded, items, pixel_values=pixels)
        loss = (refuse - recall).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= step * grad.sign()
            delta.clamp_(-cfg.pgd_epsilon, cfg.pgd_epsilon)
    return (original + delta).detach()


@torch.no_grad()
def last_states(loaded, items: list[Item], layers: list[int], pixel_values: torch.Tensor | None = None):
    """Like forward.layer_states(..., "last"), optionally with replaced pixels."""
    inputs = loaded.inputs([item.image for item in items], [item.prompt for item in items])
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
    with hook_layers(loaded.model, capture=layers) as hooks:
        loaded.model(**inputs)
    return {layer: hooks.last(layer)[:, -1].float().cpu() for layer in layers}


def null_space_projector(retain: torch.Tensor, energy: float) -> torch.Tensor:
    """Projector onto the directions retain states (rows) hardly use: eigenvectors of their second moment
    beyond those that hold `energy` of it."""
    moment = retain.T.double() @ retain.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)  # ascending
    share = eigenvalues.flip(0).cumsum(0) / eigenvalues.sum()
    kept = int((share < energy).sum()) + 1  # top directions that reach `energy`
    null = eigenvectors[:, : len(eigenvalues) - kept]
    return (null @ null.T).float()


def steering_map(forget: torch.Tensor, shifts: torch.Tensor, projector: torch.Tensor, gamma: float) -> torch.Tensor:
    """W = D H_f^T P^T (P H_f H_f^T P^T + gamma P P^T)^+ with columns as samples (H_f, D: hidden x n)."""
    h, d, p = forget.T.double(), shifts.T.double(), projector.double()
    projected = p @ h
    scale = projected.pow(2).sum(0).mean().clamp(min=1e-12)  # gamma is relative to the states' size
    gram = projected @ projected.T + gamma * scale * (p @ p.T)
    return (d @ h.T @ p.T @ torch.linalg.pinv(gram, hermitian=True)).float()


@register_vlm("mllmeraser", "MLLMEraser: closed-form, retain-gated activation steering at prefill (training-free)",
              toy_defaults={"forget_samples": 48, "retain_samples": 192})
class MLLMEraser(VLMEraser):
    config_class = MLLMEraserConfig

    def erase(self, loaded, target, work_dir=None) -> EditContent:
        cfg = self.config
        layers = parse_layers(cfg.layers, len(loaded.layers))
        strengths = parse_strengths(cfg, layers)
        forget = [item for item in target.forget if item.image is not None][:cfg.forget_samples]
        if not forget:
            raise UsageError(f"{target.concept} has no image questions to steer on; MLLMEraser needs some")
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(target.retain_fit), generator=generator)[:cfg.retain_samples].tolist()
        retain = [target.retain_fit[i] for i in order]

        recall, erasure = {layer: [] for layer in layers}, {layer: [] for layer in layers}
        for chunk in chunks(forget, cfg.batch_size):
            chunk = list(chunk)
            for layer, states in last_states(loaded, chunk, layers).items():
                recall[layer].append(states)
            perturbed = perturb_images(loaded, chunk, cfg)
            for layer, states in last_states(loaded, chunk, layers, perturbed).items():
                erasure[layer].append(states)
        retain_states = layer_states(loaded, retain, layers, "last", cfg.batch_size)

        tensors, kept = {}, {}
        for layer in layers:
            h_f, h_e = torch.cat(recall[layer]), torch.cat(erasure[layer])
            projector = null_space_projector(retain_states[layer], cfg.retain_energy)
            tensors[f"W.{layer}"] = steering_map(h_f, h_e - h_f, projector, cfg.gamma).T.contiguous()
            kept[layer] = int(round(float(projector.trace())))
        info = {"layers": layers, "strengths": strengths, "null_space_dims": kept, "forget_pairs": len(forget),
                "retain_states": len(retain)}
        return EditContent(tensors=tensors, info=info)

    @staticmethod
    def layer_edits(loaded, tensors, config, info):
        edits = {}
        for layer, strength in zip(info["layers"], info["strengths"]):
            steer = tensors[f"W.{layer}"].to(loaded.device)

            def add_shift(hidden: torch.Tensor, steer=steer, strength=strength) -> torch.Tensor | None:
                if hidden.shape[1] == 1:  # a decoding step: the prefill was steered already
                    return None
                shift = strength * (hidden[:, -1].to(steer.dtype) @ steer)
                return hidden + shift[:, None].to(hidden.dtype)

            edits[int(layer)] = add_shift
        return edits
