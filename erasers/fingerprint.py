"""What a diffusion edit records of the base model it was made from, and how a loaded pipeline is compared with it.

erasure.json's `base_weights` holds, per text encoder and denoiser, a hash of its layout (every parameter's name and
shape) and its parameters' norms (4 significant digits, in name order). Names and shapes must be equal; a norm
matches within NORM_TOLERANCE, which the same weights keep in any precision (fp32, fp16, bf16: rounding moves a
norm by far less) and another checkpoint of the same architecture (a fine-tune) does not. Parameters only: the
buffers and config keys a module has change between library versions, the weights of a checkpoint do not.

A pipeline's record is taken from the weights it was loaded with: the first time it is asked for, or just before an
edit replaces the component (LoadedPipeline.load_component calls `remember_base`), so that edits stacked one after
another are all compared with the base, never with an edit loaded before them.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable

import torch
from torch import nn

# Relative difference in a weight's norm that still counts as the same base weight: bf16 rounding (2**-9 per value)
# moves a small tensor's norm by up to a few 1e-3.
NORM_TOLERANCE = 1e-2

# pipeline -> ({component: weight_norms as loaded}, components replaced since): held weakly, as the pipeline is.
_BASES: "weakref.WeakKeyDictionary[object, tuple[dict, set]]" = weakref.WeakKeyDictionary()


def named_norms(items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """name -> [shape, norm] of (name, tensor) pairs, an adapter's own weights left out and peft's wrapped names
    read as the plain ones, so a denoiser holding LoRA adapters reads as its base."""
    norms = {}
    for name, tensor in items:
        if ".lora_" in name:
            continue
        norms[name.replace(".base_layer.", ".")] = [list(tensor.shape), float(tensor.detach().float().norm())]
    return norms


def weight_norms(module: nn.Module) -> dict[str, list]:
    """name -> [shape, norm] of every parameter of `module` (see named_norms)."""
    return named_norms(module.named_parameters())


def compact(norms: dict[str, list]) -> dict:
    """The record erasure.json keeps of one component: its layout's hash and its norms, in name order."""
    return {"layout": layout(norms), "norms": " ".join(f"{norms[name][1]:.4g}" for name in sorted(norms))}


def layout(norms: dict[str, list]) -> str:
    text = ";".join(f"{name}:{'x'.join(map(str, norms[name][0]))}" for name in sorted(norms))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _base(loaded) -> tuple[dict, set]:
    if loaded.pipeline not in _BASES:
        _BASES[loaded.pipeline] = ({}, set())
    return _BASES[loaded.pipeline]


def remember_base(loaded, name: str) -> None:
    """Keep component `name`'s record as the base's before something replaces it."""
    norms, replaced = _base(loaded)
    if name not in norms:
        norms[name] = weight_norms(getattr(loaded.pipeline, name))
    replaced.add(name)


def share_base(loaded, other) -> None:
    """Compare edits loaded onto `other`, the same base model as `loaded` loaded again another way (quantized: its
    weights hold the checkpoint's only to the quantization's precision), with `loaded`'s record of the base."""
    _BASES[other.pipeline] = (dict(base_norms(loaded)), set())


def base_norms(loaded) -> dict[str, dict[str, list]]:
    """{component: weight_norms} of each text encoder and the denoiser, as the pipeline was loaded."""
    norms, _ = _base(loaded)
    for name in (*loaded.family.text_encoders, loaded.family.denoiser):
        if name not in norms:
            norms[name] = weight_norms(getattr(loaded.pipeline, name))
    return {name: norms[name] for name in (*loaded.family.text_encoders, loaded.family.denoiser)}


def replaced_components(loaded) -> set[str]:
    """The components an edit (or --text-encoder/--unet) has replaced since the pipeline was loaded."""
    return set(_base(loaded)[1])


def base_weights(loaded) -> dict[str, dict]:
    """What an edit made from `loaded` records as `base_weights`: {component: compact record}."""
    return {name: compact(norms) for name, norms in base_norms(loaded).items()}


def record_mismatch(saved, current: dict[str, list], what: str = "this model") -> str | None:
    """How weights `current` (weight_norms) differ from a `saved` record, or None when they are the same weights (up
    to half-precision rounding). `saved` is a compact record, or a name -> [shape, norm] record as SPM adapters
    kept it before base_weights existed."""
    if not isinstance(saved, dict) or not saved:
        return "no record of its base weights"
    if "layout" in saved:
        if saved["layout"] != layout(current):
            return f"{what} has other layers (parameter names or shapes)"
        try:
            values = [float(value) for value in str(saved.get("norms", "")).split()]
        except ValueError:
            values = []
        if len(values) != len(current):
            return "its record of the base weights is damaged"
        saved = {name: [current[name][0], value] for name, value in zip(sorted(current), values)}
    for key, entry in saved.items():
        if key not in current:
            return f"{what} has no {key}"
        (shape, norm), (here_shape, here_norm) = entry, current[key]
        if list(shape) != here_shape:
            return f"{key} is {'x'.join(map(str, here_shape))} here, {'x'.join(map(str, shape))} there"
        if abs(here_norm - norm) > NORM_TOLERANCE * max(abs(norm), 1e-12):
            return f"{what}'s weights differ (first {key})"
    return None


def weights_mismatch(saved, loaded) -> str | None:
    """How `loaded` differs from an edit's `base_weights`, or None: every component it records, by layout and
    norms."""
    if not isinstance(saved, dict) or not saved:
        return "its record of the base weights is damaged"
    current = base_norms(loaded)
    for name, record in saved.items():
        if name not in current:
            return f"this pipeline has no {name}"
        why = record_mismatch(record, current[name], f"the {name}")
        if why is not None:
            return why
    return None


def legacy_fingerprint(loaded, dtype: torch.dtype) -> str:
    """The `base_fingerprint` edits recorded before `base_weights`: the text encoder's and denoiser's tensors summed
    to 7 digits in the precision the edit was made in (`dtype`), here recomputed from this pipeline's weights."""
    digest = hashlib.sha256()
    for module in (loaded.text_encoder, loaded.denoiser):
        for name, tensor in sorted(module.state_dict().items()):
            value = tensor.to(dtype) if tensor.is_floating_point() else tensor
            digest.update(f"{name}{tuple(tensor.shape)}{float(value.double().sum()):.6e}".encode())
    return digest.hexdigest()[:16]
