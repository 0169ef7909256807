"""MLLMEraser: training-free, input-aware unlearning by steering hidden states at prefill.

1. Erasure pairs, as published: a knowledge-recall side, the forget question with its image and its true answer, and
   a knowledge-erasure side, the same question with the image perturbed by a few PGD steps (sign gradient, L-inf
   ball of `pgd_epsilon` in the processor's normalised pixel units; towards `refusal` and away from the true
   answer: the visual discrepancy) followed by the refusal text instead of the answer (the textual discrepancy).
2. Per steered layer l: H_f, the recall side's states at the prompt's last position (what the hook sees at
   inference); target shifts D, the erasure side's states minus the recall side's, each averaged over its answer's
   tokens, so the refusal's activations enter the map; H_r, retain questions' last-position states.
3. P projects onto the null space of the retain states. Then, with columns as samples,
        W = D H_f^T P^T (P H_f H_f^T P^T + gamma P P^T)^+
   is the least-squares map from (projected) forget states to their shifts, ridge-regularised by gamma. As W = W P,
   a state the retain states' null space does not see is not moved: the input-aware gate.
   Which null space: `null_space="energy"` (the paper's, the default) takes the eigenvectors of H_r H_r^T beyond
   those holding `retain_energy` of its energy; a 7B model (4,096 dimensions) leaves many directions nearly empty.
   A small model has no such room: on the 128-wide toy VLM every direction carries retain energy, and forget states'
   share outside the top-99% retain span is no larger than held-out retain states' (measured: 0.15 vs 0.18).
   `null_space="contrast"` (the toy's default) instead takes the `null_dims` directions in which retain states are
   nearest to null relative to forget states: the top generalised eigenvectors of (H_f H_f^T, H_r H_r^T),
   orthonormalised.
4. Multiple choice (our extension, `mc_map`): a model may answer it by checking each option where it is written
   (the toy VLM was trained to, vlm/README "Why phase 3"), which the last position's shift does not reach (measured
   on the toy: 0.04 of the hidden state, as on other objects' prompts). A second map M per layer is fitted by the same
   closed form on every prompt position of the forget multiple-choice questions: inputs their states, targets the
   states the same prompt has with the picture swapped for a retain picture (resized to it); the null space is
   that of retain multiple-choice prompts' position states. It is applied at every prompt position.
5. At prefill (a forward over more than one position) a hook on each steered layer adds
   strength_l * task_strength * (h_last @ W_l^T) to every position, or, for a multiple-choice prompt with M,
   strength_l * mc_strength * (h_t @ M_l^T) at every position t. Decoding steps are not steered: the prefilled cache
   already carries the edit. The task is read from the prompt's text (`prompt_task`), as the authors' code sets one
   strength per task.
Questions without an image have no pixels and are left out of the fit, as published; with `text_pairs` their
erasure pairs perturb the prompt's input embeddings instead (our extension).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

import torch

from erasers.errors import UsageError

from ..edits import edit_layer, edit_tensor, text_config
from ..forward import Item, answer_batch, answer_nll, chunks, layer_states, nll_from_logits
from ..hooks import hook_layers
from ..registry import EditContent, VLMEraser, register_vlm

REFUSAL = "I cannot share that information."
TASKS = ("generation", "cloze", "multiple_choice")


@dataclass
class MLLMEraserConfig:
    layers: str = ""  # comma-separated decoder layers to steer; "": all but the first
    strength: float = 1.0
    layer_strengths: str = ""  # comma-separated per steered layer, overriding `strength`
    # Per task, multiplying the layers' strengths (the task is read from the prompt: prompt_task).
    generation_strength: float = field(default=1.0, metadata={"min": 0})
    cloze_strength: float = field(default=1.0, metadata={"min": 0})
    mc_strength: float = field(default=1.0, metadata={"min": 0})
    gamma: float = 1e-2  # ridge, relative to the mean squared norm of the projected forget states
    null_space: str = "energy"  # "energy" or "contrast" (see step 3)
    null_dims: int = 4  # contrast: directions kept
    retain_energy: float = 0.99  # energy: retain energy left out of the null space
    forget_samples: int = 64
    retain_samples: int = 256
    pgd_steps: int = field(default=5, metadata={"min": 0})  # 0: no adversarial perturbation
    pgd_epsilon: float = 0.25
    mc_map: bool = True  # step 4: a map for multiple choice at every prompt position
    mc_null_dims: int = 12  # contrast: directions the multiple-choice map keeps (its gate sees every position)
    mc_position_samples: int = 4096  # prompt positions (forget and retain each) the multiple-choice map is fitted on
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


_OPTION_LINE = re.compile(r"^\s*\(?[A-D][:.)]\s", re.MULTILINE)


def prompt_task(text: str) -> str:
    """The task a prompt asks, from its text: "multiple_choice" when at least two lines start with an option letter
    ("A: ...", "B. ...", "(C) ..."), "cloze" when it holds a blank ("__" or "[Blank]") or says "fill in the blank",
    else "generation"."""
    if len(_OPTION_LINE.findall(text)) >= 2:
        return "multiple_choice"
    lowered = text.lower()
    if "__" in text or "[blank]" in lowered or "fill in the blank" in lowered:
        return "cloze"
    return "generation"


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
def pair_states(loaded, items: list[Item], layers: list[int], answers: list[str] | None = None,
                pixel_values: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None):
    """Forward of the prompts followed by `answers` (default: the true ones), optionally with replaced pixels or
    prompt embeddings: per layer, (states at the prompt's last position, states averaged over the answer's
    tokens), on the CPU in float32."""
    batch, labels = answer_batch(loaded, items, answers)
    width = loaded.inputs([item.image for item in items], [item.prompt for item in items])["input_ids"].shape[1]
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    if prompt_embeds is not None:
        embeds = loaded.model.get_input_embeddings()(batch.pop("input_ids"))
        batch["inputs_embeds"] = torch.cat([prompt_embeds, embeds[:, width:]], dim=1)
    with hook_layers(loaded.model, capture=layers) as hooks:
        loaded.model(**batch)
    answer = (labels != -100).cpu().float()[..., None]
    result = {}
    for layer in layers:
        states = hooks.last(layer).float().cpu()
        result[layer] = (states[:, width - 1], (states * answer).sum(1) / answer.sum(1).clamp(min=1))
    return result


@torch.no_grad()
def position_states(loaded, items: list[Item], images: list, layers: list[int]) -> dict[int, list[torch.Tensor]]:
    """Per layer, one (positions, hidden) tensor per item: the states at every non-padding prompt position of the
    item's prompt asked about `images` (one per item), on the CPU in float32."""
    inputs = loaded.inputs(images, [item.prompt for item in items])
    with hook_layers(loaded.model, capture=layers) as hooks:
        loaded.model(**inputs)
    mask = inputs["attention_mask"].bool().cpu()
    return {layer: [row[keep] for row, keep in zip(hooks.last(layer).float().cpu(), mask)] for layer in layers}


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


def _sample_rows(states: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return states[torch.randperm(len(states), generator=generator)[:count]] if len(states) > count else states


# Toy defaults (benchmarks/results/NOTES.md, "The VLM methods' toy defaults", has the runs): the 128-wide toy has no
# retain-free directions for `energy`; the multiple-choice map's gate keeps 16 directions, at strength 1.2, so that
# the star's multiple choice falls in wordings no eraser saw too, not only in the ones the map was fitted on.
@register_vlm("mllmeraser", "MLLMEraser: closed-form, retain-gated activation steering at prefill (training-free)",
              toy_defaults={"forget_samples": 48, "retain_samples": 384, "null_space": "contrast", "null_dims": 2,
                            "generation_strength": 0.3, "cloze_strength": 0.3, "mc_null_dims": 16,
                            "mc_strength": 1.2})
class MLLMEraser(VLMEraser):
    config_class = MLLMEraserConfig

    def erase(self, loaded, target, work_dir=None) -> EditContent:
        cfg = self.config
        layers = parse_layers(cfg.layers, len(loaded.layers))
        strengths = parse_strengths(cfg, layers)
        pictured = [item for item in target.forget if item.image is not None]
        multiple_choice = [item for item in pictured if item.qa.task == "classification"] if cfg.mc_map else []
        open_answers = [item for item in pictured if not (cfg.mc_map and item.qa.task == "classification")]
        forget = open_answers[:cfg.forget_samples]
        text_forget = [item for item in target.forget if item.image is None][:cfg.forget_samples] \
            if cfg.text_pairs else []
        if not forget + text_forget + multiple_choice:
            raise UsageError(f"{target.concept} has no forget questions to steer on")
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(target.retain_fit), generator=generator)[:cfg.retain_samples].tolist()
        retain = [target.retain_fit[i] for i in order]

        inputs, shifts = {layer: [] for layer in layers}, {layer: [] for layer in layers}

        def add_pairs(recall, erasure):
            for layer in layers:
                inputs[layer].append(recall[layer][0])
                shifts[layer].append(erasure[layer][1] - recall[layer][1])

        for chunk in map(list, chunks(forget, cfg.batch_size)):
            refusals = [cfg.refusal] * len(chunk)
            add_pairs(pair_states(loaded, chunk, layers),
                      pair_states(loaded, chunk, layers, refusals, pixel_values=perturb_images(loaded, chunk, cfg)))
        for chunk in map(list, chunks(text_forget, cfg.batch_size)):
            refusals = [cfg.refusal] * len(chunk)
            add_pairs(pair_states(loaded, chunk, layers),
                      pair_states(loaded, chunk, layers, refusals, prompt_embeds=perturb_text(loaded, chunk, cfg)))
        retain_states = layer_states(loaded, retain, layers, "last", cfg.batch_size)

        tensors, kept = {}, {}
        for layer in layers:
            if not inputs[layer]:
                break
            h_f, d = torch.cat(inputs[layer]), torch.cat(shifts[layer])
            basis = null_space_basis(retain_states[layer], h_f, cfg)
            tensors[f"W.{layer}"] = steering_map(h_f, d, basis, cfg.gamma).T.contiguous()
            kept[layer] = basis.shape[1]
        hidden = text_config(loaded).hidden_size
        for layer in layers:  # no open-answer pairs (only multiple choice asked): the open map is zero
            tensors.setdefault(f"W.{layer}", torch.zeros(hidden, hidden))
        mc_kept = fit_multiple_choice(loaded, target, multiple_choice[:cfg.forget_samples], retain, layers, cfg,
                                      generator, tensors)
        info = {"layers": layers, "strengths": strengths,
                "task_strengths": {"generation": cfg.generation_strength, "cloze": cfg.cloze_strength,
                                   "multiple_choice": cfg.mc_strength},
                "null_space_dims": kept, "mc_map": bool(mc_kept), "mc_null_space_dims": mc_kept,
                "forget_pairs": len(forget), "text_forget_pairs": len(text_forget),
                "mc_pairs": min(len(multiple_choice), cfg.forget_samples) if mc_kept else 0,
                "retain_states": len(retain)}
        return EditContent(tensors=tensors, info=info)

    @staticmethod
    def check_edit(loaded, tensors, config, info):
        layers, strengths = info.get("layers"), info.get("strengths")
        if not isinstance(layers, list) or not isinstance(strengths, list) or len(layers) != len(strengths):
            raise UsageError("its info's layers and strengths are not two lists of the same length")
        task_strengths = info.get("task_strengths", {})
        if not isinstance(task_strengths, dict):
            raise UsageError("its info's task_strengths is not an object")
        hidden = text_config(loaded).hidden_size
        for strength in [*strengths, *task_strengths.values()]:
            if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
                raise UsageError(f"its info's strength {json.dumps(strength)[:40]} is not a finite number")
        for layer in layers:
            edit_layer(loaded, layer, "layers")
            edit_tensor(tensors, f"W.{layer}", (hidden, hidden))
            if info.get("mc_map"):
                edit_tensor(tensors, f"M.{layer}", (hidden, hidden))

    @staticmethod
    def layer_edits(loaded, tensors, config, info):
        task_strengths = {task: float(info.get("task_strengths", {}).get(task, 1.0)) for task in TASKS}
        tokenizer = loaded.tokenizer
        asked: dict[str, list[str]] = {"tasks": []}

        def read_tasks(input_ids: torch.Tensor) -> None:
            if input_ids.shape[1] > 1:  # a prefill; decoding steps keep the prompt's tasks
                asked["tasks"] = [prompt_task(text) for text in
                                  tokenizer.batch_decode(input_ids, skip_special_tokens=True)]

        edits = {"input_ids": read_tasks}
        for layer, strength in zip(info["layers"], info["strengths"]):
            steer = tensors[f"W.{layer}"].to(loaded.device)
            choice = tensors[f"M.{layer}"].to(loaded.device) if info.get("mc_map") else None

            def add_shift(hidden: torch.Tensor, steer=steer, choice=choice, strength=strength) -> torch.Tensor | None:
                if hidden.shape[1] == 1:  # a decoding step: the prefill was steered already
                    return None
                # A forward from embeddings (no token ids read) is steered as a generation question.
                tasks = asked["tasks"] if len(asked["tasks"]) == len(hidden) else ["generation"] * len(hidden)
                scale = torch.tensor([strength * task_strengths[task] for task in tasks], device=hidden.device)
                shift = (scale[:, None] * (hidden[:, -1].to(steer.dtype) @ steer))[:, None].expand_as(hidden)
                is_choice = torch.tensor([task == "multiple_choice" for task in tasks], device=hidden.device)
                if choice is not None and bool(is_choice.any()):
                    per_position = scale[:, None, None] * (hidden.to(choice.dtype) @ choice)
                    shift = torch.where(is_choice[:, None, None], per_position, shift)
                return hidden + shift.to(hidden.dtype)

            edits[int(layer)] = add_shift
        return edits


def fit_multiple_choice(loaded, target, forget: list[Item], retain: list[Item], layers: list[int],
                        cfg: MLLMEraserConfig, generator: torch.Generator, tensors: dict) -> dict[int, int]:
    """Step 4: the multiple-choice maps M.{layer} into `tensors`; returns the null space's size per layer ({} when
    there is nothing to fit: no pictured multiple-choice question to forget or to retain)."""
    retain = [item for item in retain if item.qa.task == "classification" and item.image is not None]
    pictures = [item.image for item in target.neutral_images(max(len(forget), 1))]
    if not forget or not retain or not pictures:
        return {}
    clean, moved = {layer: [] for layer in layers}, {layer: [] for layer in layers}
    for start in range(0, len(forget), cfg.batch_size):
        chunk = forget[start:start + cfg.batch_size]
        swapped = [pictures[(start + k) % len(pictures)].resize(item.image.size) for k, item in enumerate(chunk)]
        before = position_states(loaded, chunk, [item.image for item in chunk], layers)
        after = position_states(loaded, chunk, swapped, layers)
        for layer in layers:
            for x, y in zip(before[layer], after[layer]):
                if x.shape == y.shape:  # the same prompt, so the same positions (a picture of the same size)
                    clean[layer].append(x)
                    moved[layer].append(y - x)
    kept_rows = None
    retain_states = {layer: [] for layer in layers}
    for chunk in chunks(retain, cfg.batch_size):
        states = position_states(loaded, list(chunk), [item.image for item in chunk], layers)
        for layer in layers:
            retain_states[layer] += states[layer]
    kept = {}
    for layer in layers:
        h_f, d, h_r = torch.cat(clean[layer]), torch.cat(moved[layer]), torch.cat(retain_states[layer])
        if kept_rows is None:  # the same rows at every layer
            kept_rows = torch.randperm(len(h_f), generator=generator)[:cfg.mc_position_samples]
        h_f, d = h_f[kept_rows], d[kept_rows]
        h_r = _sample_rows(h_r, cfg.mc_position_samples, generator)
        basis = null_space_basis(h_r, h_f, dataclasses.replace(cfg, null_dims=cfg.mc_null_dims))
        tensors[f"M.{layer}"] = steering_map(h_f, d, basis, cfg.gamma).T.contiguous()
        kept[layer] = basis.shape[1]
    return kept
