"""LoRA adapters on the denoiser, in diffusers' LoRA format (peft), and scaling each adapter per prompt at
generation time. SPM trains one (erasers/methods/spm.py); the pieces here are what any adapter-based eraser needs:

    targets = transformer_block_modules(loaded)            # every Linear/Conv2d inside the transformer blocks
    parameters = add_lora(loaded, "spm_arrow", targets, rank=1)
    with adapters_disabled(loaded.denoiser): ...           # the frozen base model, for teacher predictions
    edit = LoraEdit(loaded, "spm_arrow", info)              # the edit's "adapter" component (save_pretrained)
    remove_lora(loaded)                                     # the denoiser as it was loaded

An adapter directory holds diffusers' `pytorch_lora_weights.safetensors` (plain diffusers loads it with
`pipe.load_lora_weights(dir, adapter_name=...)`) and `adapter.json`: what the method's own loader needs (its
concepts and the target modules; the base model it was made for is recorded in the edit's erasure.json, as every
edit's is: erasers/fingerprint.py).

Per-prompt scaling (`PromptScaling`): an adapter's output (its lora_B) is multiplied, sample by sample, by a factor the
method computes from each prompt's token ids and pooled text embedding. The pipeline encodes prompts and then calls
the denoiser with their states, in a classifier-free-guidance batch [unconditional..., conditional...]; so a forward
hook on the CLIP text encoder computes each encoded prompt's factors and remembers them with the states it returned,
and a pre-hook on the denoiser matches each sample's states (SD: the token states; SDXL: their first CLIP's columns;
Flux: CLIP's pooled projection) to the remembered ones. A sample that matches none (the unconditional half: SDXL's
zeros, or the empty prompt, which is never remembered) takes the factor of the sample it is paired with, the same
index in the other half of the batch; with no pair known, 1 (the adapter in full).
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections import deque
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import UsageError, first_line

ADAPTER_INFO = "adapter.json"
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
# A sample's states match a remembered prompt's when they are this close, relative to the prompt's norm: a dtype
# cast (fp16: 5e-4 per value) stays far below it, two different prompts' states far above.
MATCH_TOLERANCE = 1e-2
# Encoded prompts remembered at a time: more than a generation batch (the benchmarks draw 50 prompts at once).
REMEMBERED_PROMPTS = 256


def transformer_block_modules(loaded) -> list[str]:
    """Names of every Linear and Conv2d inside the denoiser's transformer blocks: a UNet's Transformer2DModel
    (proj_in, self- and cross-attention, feed-forward, proj_out: SPM's targets), Flux's joint and single blocks
    (attention, feed-forward and the blocks' modulation linears)."""
    denoiser = loaded.denoiser
    if loaded.family.name == "flux":
        containers = [f"{name}.{i}" for name in ("transformer_blocks", "single_transformer_blocks")
                      for i in range(len(getattr(denoiser, name)))]
    else:
        containers = [name for name, module in denoiser.named_modules()
                      if type(module).__name__ == "Transformer2DModel"]
    return [f"{container}.{name}" for container in containers
            for name, module in denoiser.get_submodule(container).named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))]


def has_adapters(denoiser: nn.Module) -> bool:
    return bool(getattr(denoiser, "peft_config", None))


def add_lora(loaded, name: str, targets: list[str], rank: int = 1, alpha: float = 1.0) -> list[nn.Parameter]:
    """A new LoRA adapter `name` (down/up, alpha `alpha`; up initialised to zero, so the model starts unchanged) on
    `targets` of the denoiser, made the active one; returns its parameters."""
    from peft import LoraConfig

    denoiser = loaded.denoiser
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), adapter_name=name)
    return [p for key, p in denoiser.named_parameters() if ".lora_" in key and key.endswith(f".{name}.weight")]


@contextlib.contextmanager
def adapters_disabled(denoiser: nn.Module):
    """The denoiser without its adapters (the frozen base model) inside the block."""
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


def remove_lora(loaded) -> None:
    """Take every adapter out of the denoiser (its layers become the plain ones again) and leave it frozen, without
    gradient checkpointing: as it was loaded, for the evaluations or erases that follow in the same process."""
    denoiser = loaded.denoiser
    denoiser.unload_lora()
    denoiser.requires_grad_(False)
    if loaded.training.gradient_checkpointing and hasattr(denoiser, "disable_gradient_checkpointing"):
        denoiser.disable_gradient_checkpointing()


def lora_deltas(denoiser: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """What adapter `name` adds to each weight it wraps, dW = scale B A, by the wrapped layer's name (float64, CPU):
    MACE fuses its LoRAs into plain weights from these."""
    return {key: module.get_delta_weight(name).detach().double().cpu() for key, module in denoiser.named_modules()
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and name in module.lora_A}


class LoraEdit(nn.Module):
    """An erase's "adapter" component: the adapter's weights (as parameters, which save_edit checks are finite) and
    `save_pretrained(dir)`, writing them with the pipeline class's own `save_lora_weights` plus `info` as
    adapter.json."""

    def __init__(self, loaded, name: str, info: dict):
        super().__init__()
        from peft.utils import get_peft_model_state_dict

        denoiser = loaded.denoiser
        weights = get_peft_model_state_dict(denoiser, adapter_name=name)
        self.keys = list(weights)
        self.weights = nn.ParameterList([nn.Parameter(w.detach().float().clone(), requires_grad=False)
                                         for w in weights.values()])
        self.pipeline_class = type(loaded.pipeline)
        self.denoiser_name = loaded.family.denoiser
        config = denoiser.peft_config[name]
        self.lora_config = {"r": config.r, "lora_alpha": config.lora_alpha,
                            "target_modules": sorted(config.target_modules)}
        self.info = info

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        layers = {key: weight.detach().cpu().contiguous() for key, weight in zip(self.keys, self.weights)}
        components = {f"{self.denoiser_name}_lora_layers": layers,
                      f"{self.denoiser_name}_lora_adapter_metadata": self.lora_config}
        self.pipeline_class.save_lora_weights(directory, weight_name=ADAPTER_WEIGHTS, **components)
        (directory / ADAPTER_INFO).write_text(json.dumps(self.info, indent=2))


def read_adapter_info(directory: Path, fields: dict[str, type]) -> dict:
    """adapter.json of an adapter directory, with `fields` of the given types, else a one-line UsageError."""
    path = Path(directory) / ADAPTER_INFO
    try:
        info = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is missing or unreadable ({first_line(error)}); re-run the erase that made the "
                         "edit") from None
    for name, kind in fields.items():
        if not isinstance(info, dict) or not isinstance(info.get(name), kind) or not info.get(name):
            raise UsageError(f"{path}: field {name!r} is missing or not a {kind.__name__}; the file is corrupt or was "
                             "edited by hand: re-run the erase that made it")
    return info


def load_lora(loaded, directory: Path, name: str) -> str:
    """Load the adapter in `directory` onto the denoiser under `name` (made unique among its adapters) and activate it
    beside the ones already active (apply_edits has checked its weights are finite); returns the name it got."""
    denoiser = loaded.denoiser
    taken = set(getattr(denoiser, "peft_config", None) or {})
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}_{n}", n + 1
    active = list(denoiser.active_adapters()) if taken else []
    try:
        denoiser.load_lora_adapter(str(directory), prefix=loaded.family.denoiser, adapter_name=unique,
                                   weight_name=ADAPTER_WEIGHTS)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign weight file: one line
        raise UsageError(f"could not load the adapter in {directory}: {first_line(error)}; re-run the erase that "
                         "made it") from None
    denoiser.set_adapters(active + [unique], [1.0] * (len(active) + 1))
    return unique


def lora_up_modules(denoiser: nn.Module, name: str) -> list[nn.Module]:
    """The up projections (lora_B) of adapter `name`: scaling their output scales the adapter's contribution."""
    return [module.lora_B[name] for module in denoiser.modules()
            if isinstance(getattr(module, "lora_B", None), nn.ModuleDict) and name in module.lora_B]


# A factor function: (token ids (batch, length), pooled text embeddings (batch, width)) -> factors (batch,).
Factor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_SCALINGS: "weakref.WeakKeyDictionary[nn.Module, PromptScaling]" = weakref.WeakKeyDictionary()


class PromptScaling:
    """Per-prompt factors for the adapters of one loaded pipeline's denoiser (see the module docstring). One per
    denoiser: `PromptScaling.of(loaded)`."""

    def __init__(self, loaded):
        self.factors: dict[str, Factor] = {}
        self.current: dict[str, torch.Tensor] = {}
        self.remembered: deque = deque(maxlen=REMEMBERED_PROMPTS)
        self.paused = False
        self._keys: dict | None = None
        special = getattr(loaded.tokenizer, "all_special_ids", [])
        self.special = torch.tensor(sorted(set(special)), dtype=torch.long)
        self.denoiser = weakref.ref(loaded.denoiser)  # the registry's key: held weakly, or it would never go
        loaded.text_encoder.register_forward_hook(self._encoded, with_kwargs=True)
        loaded.denoiser.register_forward_pre_hook(self._denoising, with_kwargs=True)

    @classmethod
    def of(cls, loaded) -> "PromptScaling":
        if loaded.denoiser not in _SCALINGS:
            _SCALINGS[loaded.denoiser] = cls(loaded)
        return _SCALINGS[loaded.denoiser]

    def add(self, name: str, factor: Factor) -> None:
        """Scale adapter `name`'s output by `factor` of each sample's prompt."""
        self.factors[name] = factor
        for module in lora_up_modules(self.denoiser(), name):
            module.register_forward_hook(lambda _, __, output, name=name: self._scale(name, output))

    @contextlib.contextmanager
    def pause(self):
        """Encode without remembering (the concepts' own embeddings, when an adapter is added)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def _encoded(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input_ids")
        if self.paused or not self.factors or not torch.is_tensor(ids):
            return
        if isinstance(output, tuple):
            hidden, pooled, layers = output[0], output[1], output[2] if len(output) > 2 else None
        else:
            hidden, pooled, layers = output.last_hidden_state, output.pooler_output, output.hidden_states
        states = layers[-2] if layers is not None else hidden  # SDXL reads the penultimate layer
        with torch.no_grad():
            factors = {name: factor(ids, pooled).float().cpu() for name, factor in self.factors.items()}
        content = ~torch.isin(ids.cpu(), self.special)
        for row in range(len(ids)):
            if content[row].any():  # the empty prompt is the unconditional branch's: it takes its pair's factor
                self.remembered.append((states[row].detach(), pooled[row].detach(),
                                        {name: float(f[row]) for name, f in factors.items()}))
        self._keys = None

    def _denoising(self, module, args, kwargs):
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if not self.factors or not torch.is_tensor(states):
            self.current = {}
            return
        matched = self._match(states, kwargs.get("pooled_projections"))
        batch = len(states)
        for name in self.factors:
            values = [self.remembered[i][2][name] if i is not None else None for i in matched]
            for row, value in enumerate(values):
                pair = (row + batch // 2) % batch if batch % 2 == 0 else None
                if value is None:
                    values[row] = values[pair] if pair is not None and matched[pair] is not None else 1.0
            self.current[name] = torch.tensor(values, device=states.device)

    def _match(self, states: torch.Tensor, pooled: torch.Tensor | None) -> list[int | None]:
        """Each sample's remembered prompt (its index), or None: the nearest whose states (or pooled embedding)
        match the sample's within MATCH_TOLERANCE."""
        if self._keys is None:  # the remembered prompts' keys, stacked by kind and shape once per encoding
            groups: dict[tuple, list[int]] = {}
            for kind in (0, 1):
                for index, entry in enumerate(self.remembered):
                    groups.setdefault((kind, tuple(entry[kind].shape)), []).append(index)
            self._keys = {}
            for key, indices in groups.items():
                stacked = torch.stack([self.remembered[i][key[0]] for i in indices]).flatten(1).float()
                self._keys[key] = (indices, stacked, stacked.norm(dim=1).clamp_min(1e-12))
        best = torch.full((len(states),), MATCH_TOLERANCE)
        found: list[int | None] = [None] * len(states)
        for (kind, shape), (indices, keys, norms) in self._keys.items():
            query = states if kind == 0 else pooled
            if query is None or query.shape[1] != shape[0] or query.shape[-1] < shape[-1]:
                continue
            flat = query[..., :shape[-1]].flatten(1).float().to(keys.device)
            distance, nearest = (torch.cdist(flat, keys) / norms).min(dim=1)
            distance, nearest = distance.cpu(), nearest.cpu()
            for row in torch.nonzero(distance < best).flatten().tolist():
                best[row], found[row] = distance[row], indices[int(nearest[row])]
        return found

    def _scale(self, name: str, output: torch.Tensor) -> torch.Tensor | None:
        factors = self.current.get(name)
        if factors is None:
            return None
        if len(output) != len(factors):  # a batch folded with another axis: batch-major, as attention folds heads
            if len(output) % len(factors):
                return output * factors.max().to(output.dtype)
            factors = factors.repeat_interleave(len(output) // len(factors))
        return output * factors.to(output.dtype).view(-1, *[1] * (output.dim() - 1))
