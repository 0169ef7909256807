"""MLLMEraser: training-free, input-aware unlearning by steering hidden states at prefill.

1. Knowledge-recall pairs: forget image questions as they are. Knowledge-erasure pairs: the same questions with
   the image perturbed by a few PGD steps (sign gradient, L-inf ball of `pgd_epsilon` in the processor's
   normalised pixel units) towards a refusal-style answer and away from the true one.
2. Per steered layer l, the prompt's last-position states: H_f (recall), H_e (erasure), H_r (retain questions).
   Target shifts D = H_e - H_f.
3. P projects onto the null space of the retain states. Then, with columns as samples,
        W = D H_f^T P^T (P H_f H_f^T P^T + gamma P P^T)^+
   is the least-squares map from (projected) forget states to their shifts, ridge-regularised by gamma. As W = W P,
   a state the retain states' null space does not see is not moved: the input-aware gate.
   Which null space: in a 7B model (4,096 dimensions) retain states leave many directions nearly empty, and
   `null_space="energy"` takes the eigenvectors of H_r H_r^T beyond those holding `retain_energy` of its energy.
   In a small model there is no such room: on the 128-wide toy VLM every direction carries retain energy, and the
   forget states' share outside the top-99% retain span is no larger than held-out retain states' (measured: 0.15
   vs 0.18), so that gate lets retain inputs through. `null_space="contrast"` (the default) instead takes the
   `null_dims` directions in which retain states are nearest to null relative to forget states: the top
   generalised eigenvectors of (H_f H_f^T, H_r H_r^T) (on the toy: forget states' share there 5x held-out retain
   states'), orthonormalised.
4. At prefill (a forward over more than one position) a hook on each steered layer adds
   strength_l * (h_last @ W_l^T), h_last the layer's output at the prompt's last position, to every position.
   Decoding steps are not steered: the prefilled cache already carries the edit.
Questions without an image have no pixels and are left out of the fit, as published; with `text_pairs` their
erasure pairs perturb the prompt's input embeddings instead (our extension).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from erasers.errors import UsageError

from ..edits import edit_layer, edit_tensor, text_config
from ..forward import Item, answer_batch, answer_nll, chunks, layer_states, nll_from_logits
from ..hooks import hook_layers
from ..registry import EditContent, VLMEraser, register_vlm

REFUSAL = "I cannot share that information."


@dataclass
class MLLMEraserConfig:
    layers: str = ""  # comma-separated decoder layers to steer; "": all but the first
    strength: float = 1.0
    layer_strengths: str = ""  # comma-separated per steered layer, overriding `strength`
    gamma: float = 1e-2  # ridge, relative to the mean squared norm of the projected forget states
    null_space: str = "contrast"  # "contrast" or "energy" (see step 3)
    null_dims: int = 4  # contrast: directions kept
    retain_energy: float = 0.99  # energy: retain energy left out of the null space
    forget_samples: int = 64
    retain_samples: int = 256
    pgd_steps: int = field(default=5, metadata={"min": 0})  # 0: no adversarial pairs
    pgd_epsilon: float = 0.25
    # Our extension, off by default: text-only forget questions (MLLMU-Bench asks half its questions by name) get
    # erasure pairs too, with the PGD on their prompt embeddings instead of pixels. On the toy MLLMU-Med
    # (forget_10) it lowered forget scores only together with retain ones: ten patients' identities share the
    # few gated directions with the ninety kept.
    text_pairs: bool = False
    pgd_text_epsilon: float = 0.5
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


def perturb_text(loaded, items: list[Item], cfg: MLLMEraserConfig) -> torch.Tensor:
    """The same PGD for text-only questions, on the prompt's input embeddings (epsilon in units of the embedding
    matrix's standard deviation); returns the perturbed prompt embeddings."""
    embedding = loaded.model.get_input_embeddings()
    prompt = loaded.inputs([None] * len(items), [item.prompt for item in items])
    width = prompt["input_ids"].shape[1]
    with torch.no_grad():
        original = embedding(prompt["input_ids"])
    epsilon = cfg.pgd_text_epsilon * float(embedding.weight.detach().std())
    delta = torch.zeros_like(original, requires_grad=True)

    def nll(answers):
        batch, labels = answer_batch(loaded, items, answers)
        embeds = embedding(batch.pop("input_ids"))
        embeds = torch.cat([embeds[:, :width] + delta, embeds[:, width:]], dim=1)
        total, count = nll_from_logits(loaded.model(inputs_embeds=embeds, **batch).logits, labels)
        return total / count.clamp(min=1)

    for _ in range(cfg.pgd_steps):
        loss = (nll([cfg.refusal] * len(items)) - nll(None)).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= 2.5 * epsilon / max(cfg.pgd_steps, 1) * grad.sign()
            delta.clamp_(-epsilon, epsilon)
    return (original + delta).detach()


@torch.no_grad()
def last_states(loaded, items: list[Item], layers: list[int], pixel_values: torch.Tensor | None = None,
                prompt_embeds: torch.Tensor | None = None):
    """Like forward.layer_states(..., "last"), optionally with replaced pixels or prompt embeddings."""
    inputs = loaded.inputs([item.image for item in items], [item.prompt for item in items])
    if pixel_values is not None:
        inputs["pixel_values"] = pixel_values
    if prompt_embeds is not None:
        inputs.pop("input_ids")
        inputs["inputs_embeds"] = prompt_embeds
    with hook_layers(loaded.model, capture=layers) as hooks:
        loaded.model(**inputs)
    return {layer: hooks.last(layer)[:, -1].float().cpu() for layer in layers}


def null_space_basis(retain: torch.Tensor, forget: torch.Tensor, cfg: MLLMEraserConfig) -> torch.Tensor:
    """Orthonormal basis (hidden, k) of the retain states' null space (rows are states), as chosen by
    `cfg.null_space` (module docstring, step 3)."""
    retain, forget = retain.double(), forget.double()
    moment_r = retain.T @ retain / len(retain)
    if cfg.null_space == "energy":
        eigenvalues, eigenvectors = torch.linalg.eigh(moment_r)  # ascending
        share = eigenvalues.flip(0).cumsum(0) / eigenvalues.sum()
        kept = int((share < cfg.retain_energy).sum()) + 1  # top directions that reach `retain_energy`
        return eigenvectors[:, : len(eigenvalues) - kept].float()
    if cfg.null_space != "contrast":
        raise UsageError(f"mllmeraser option null_space must be 'contrast' or 'energy', not {cfg.null_space!r}")
    moment_f = forget.T @ forget / len(forget)
    # Generalised eigenvectors through a Cholesky whitening of the (slightly ridged) retain moment.
    ridge = 1e-3 * torch.trace(moment_r) / len(moment_r) * torch.eye(len(moment_r), dtype=moment_r.dtype)
    inverse_root = torch.linalg.inv(torch.linalg.cholesky(moment_r + ridge))
    _, vectors = torch.linalg.eigh(inverse_root @ moment_f @ inverse_root.T)
    directions = inverse_root.T @ vectors[:, -cfg.null_dims:]
    return torch.linalg.qr(directions).Q.float()


def steering_map(forget: torch.Tensor, shifts: torch.Tensor, basis: torch.Tensor, gamma: float) -> torch.Tensor:
    """W = D H_f^T P^T (P H_f H_f^T P^T + gamma P P^T)^+ with columns as samples (H_f, D: hidden x n) and
    P = N N^T for the orthonormal null-space basis N, computed within the null space, where the pseudo-inverse
    is an ordinary inverse: W = D H_f^T N (N^T H_f H_f^T N + gamma I)^-1 N^T."""
    h, d, n = forget.T.double(), shifts.T.double(), basis.double()
    coordinates = n.T @ h  # (k, samples)
    scale = coordinates.pow(2).sum(0).mean().clamp(min=1e-12)  # gamma is relative to the states' size
    gram = coordinates @ coordinates.T + gamma * scale * torch.eye(len(coordinates), dtype=h.dtype)
    return (d @ coordinates.T @ torch.linalg.inv(gram) @ n.T).float()


@register_vlm("mllmeraser", "MLLMEraser: closed-form, retain-gated activation steering at prefill (training-free)",
              toy_defaults={"forget_samples": 48, "retain_samples": 384, "null_dims": 2})
class MLLMEraser(VLMEraser):
    config_class = MLLMEraserConfig

    def erase(self, loaded, target, work_dir=None) -> EditContent:
        cfg = self.config
        layers = parse_layers(cfg.layers, len(loaded.layers))
        strengths = parse_strengths(cfg, layers)
        forget = [item for item in target.forget if item.image is not None][:cfg.forget_samples]
        text_forget = [item for item in target.forget if item.image is None][:cfg.forget_samples] \
            if cfg.text_pairs else []
        if not forget + text_forget:
            raise UsageError(f"{target.concept} has no forget questions to steer on")
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
        for chunk in chunks(text_forget, cfg.batch_size):
            chunk = list(chunk)
            for layer, states in last_states(loaded, chunk, layers).items():
                recall[layer].append(states)
            perturbed = perturb_text(loaded, chunk, cfg)
            for layer, states in last_states(loaded, chunk, layers, prompt_embeds=perturbed).items():
                erasure[layer].append(states)
        retain_states = layer_states(loaded, retain, layers, "last", cfg.batch_size)

        tensors, kept = {}, {}
        for layer in layers:
            h_f, h_e = torch.cat(recall[layer]), torch.cat(erasure[layer])
            basis = null_space_basis(retain_states[layer], h_f, cfg)
            tensors[f"W.{layer}"] = steering_map(h_f, h_e - h_f, basis, cfg.gamma).T.contiguous()
            kept[layer] = basis.shape[1]
        info = {"layers": layers, "strengths": strengths, "null_space_dims": kept, "forget_pairs": len(forget),
                "text_forget_pairs": len(text_forget),
                "retain_states": len(retain)}
        return EditContent(tensors=tensors, info=info)

    @staticmethod
    def check_edit(loaded, tensors, config, info):
        layers, strengths = info.get("layers"), info.get("strengths")
        if not isinstance(layers, list) or not isinstance(strengths, list) or len(layers) != len(strengths):
            raise UsageError("its info's layers and strengths are not two lists of the same length")
        hidden = text_config(loaded).hidden_size
        for layer, strength in zip(layers, strengths):
            edit_layer(loaded, layer, "layers")
            if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
                raise UsageError(f"its info's strength {json.dumps(strength)[:40]} is not a finite number")
            edit_tensor(tensors, f"W.{layer}", (hidden, hidden))

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
