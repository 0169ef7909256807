"""The VLM eraser interface and its registry (name -> eraser class, defaults), as erasers/registry.py is for diffusion.

An eraser fits an edit to a loaded VLM and a `Target` (forget/retain questions) and returns an `EditContent`:
tensors applied through forward hooks at inference (SAUCE, MLLMEraser: the base weights stay untouched), or a
trained LoRA adapter (the fine-tuning baselines). `vlm.edits` saves, loads and applies either kind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch

from erasers.errors import UsageError
from erasers.registry import _coerce
from erasers.validation import validate_config

from .hooks import Edit
from .models import LoadedVLM
from .targets import Target


@dataclasses.dataclass
class EditContent:
    """What an eraser produced: tensors for its inference hooks and/or a peft model whose adapter is the edit,
    plus `info` (what it chose: layers, features...) recorded in erasure.json."""

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    adapter: Any = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class VLMEraser:
    config_class: ClassVar[type]

    def __init__(self, config):
        self.config = config

    def erase(self, loaded: LoadedVLM, target: Target, work_dir: Path | None = None) -> EditContent:
        raise NotImplementedError

    @staticmethod
    def layer_edits(loaded: LoadedVLM, tensors: dict[str, torch.Tensor], config: dict,
                    info: dict) -> dict[int, Edit]:
        """Hook functions (decoder layer -> edit of its output) that apply a saved edit; adapter methods have
        none."""
        return {}


@dataclasses.dataclass(frozen=True)
class VLMMethodEntry:
    eraser: type[VLMEraser]
    defaults: dict[str, Any]
    toy_defaults: dict[str, Any]
    summary: str


VLM_METHODS: dict[str, VLMMethodEntry] = {}


def register_vlm(name: str, summary: str, toy_defaults: dict[str, Any] | None = None, **defaults):
    def wrap(cls: type[VLMEraser]) -> type[VLMEraser]:
        VLM_METHODS[name] = VLMMethodEntry(cls, defaults, toy_defaults or {}, summary)
        return cls

    return wrap


def _load_methods() -> None:
    from . import baselines, mllmeraser, sauce  # noqa: F401  (importing them fills the registry)


def available_vlm_methods() -> dict[str, VLMMethodEntry]:
    _load_methods()
    return VLM_METHODS


def get_vlm_method(name: str) -> VLMMethodEntry:
    _load_methods()
    if name not in VLM_METHODS:
        raise UsageError(f"unknown VLM method {name!r}; available: {', '.join(sorted(VLM_METHODS))}")
    return VLM_METHODS[name]


def build_vlm_config(name: str, toy: bool, overrides: dict[str, Any] | None = None):
    """Dataclass defaults, then the registry's, then the toy model's, then the user's (checked against the
    fields)."""
    entry = get_vlm_method(name)
    fields = {f.name: f for f in dataclasses.fields(entry.eraser.config_class)}
    values = {**entry.defaults, **(entry.toy_defaults if toy else {})}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise UsageError(f"{name} has no option {key!r}; its options: {', '.join(fields)}")
        values[key] = _coerce(value, fields[key], name)
    return validate_config(entry.eraser.config_class(**values), name)
