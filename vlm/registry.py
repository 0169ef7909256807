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

from erasers.registry import Registry

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

    def check_target(self, target: Target) -> None:
        """A UsageError when the target lacks data this method trains on, before a model loads or a file is
        written."""

    @staticmethod
    def check_edit(loaded: LoadedVLM, tensors: dict[str, torch.Tensor], config: dict, info: dict) -> None:
        """A UsageError when a saved edit's tensors or info do not fit `loaded` (a layer past the model, a shape of
        another hidden size, an index past its tensors), before any hook runs; vlm.edits.edit_layer and
        edit_tensor say it in one line. Adapter methods have nothing to check here (peft loads the adapter)."""

    @staticmethod
    def layer_edits(loaded: LoadedVLM, tensors: dict[str, torch.Tensor], config: dict,
                    info: dict) -> dict[int | str, Edit]:
        """Hook functions (decoder layer -> edit of its output) that apply a saved edit; adapter methods have
        none. The key "input_ids" may map to a function called with each forward's token ids before the layers run
        (vlm.hooks' watch_input_ids), for edits that depend on the prompt (MLLMEraser's per-task strengths)."""
        return {}


VLM_REGISTRY = Registry("VLM method", "vlm.methods")
register_vlm = VLM_REGISTRY.register
available_vlm_methods = VLM_REGISTRY.available
get_vlm_method = VLM_REGISTRY.get
build_vlm_config = VLM_REGISTRY.build_config
