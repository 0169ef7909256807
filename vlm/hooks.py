"""Reading and editing the hidden states a VLM's decoder layers output, through forward hooks.

    with hook_layers(model, capture=[12]) as hooks:          # read
        model(**inputs)
    hooks.captured[12]                                       # one tensor per forward call (batch, seq, hidden)

    with hook_layers(model, edit={12: lambda h: h + shift}):  # edit: the layer's output becomes the function's
        model.generate(**inputs)                             # return value (None keeps it)

The output of layer i is `hidden_states[i + 1]` of a forward with `output_hidden_states=True` (the input of
block i + 1). Under generation with a cache, the first call of a hook sees the whole prompt (prefill) and each
later call one new position; an edit can tell them apart by the sequence length. Hooks are removed on leaving the
block, also after an exception. `watch_input_ids` is called with each forward's token ids before the layers run (a
forward pre-hook on the input embedding), for edits that depend on the prompt's text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from erasers.errors import UsageError

from .models import decoder_layers

Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass
class LayerHooks:
    """What `hook_layers` yields: captured[layer] lists the layer's outputs, one per forward call."""

    captured: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def last(self, layer: int) -> torch.Tensor:
        return self.captured[layer][-1]


def _index(layer: int, count: int) -> int:
    if not -count <= layer < count:
        raise UsageError(f"layer {layer} does not exist: this model has {count} decoder layers (0..{count - 1}, "
                         "or negative from the end)")
    return layer % count


@contextmanager
def hook_layers(model: nn.Module, edit: Mapping[int, Edit] | None = None, capture: Iterable[int] = (),
                detach: bool = True, to_cpu: bool = False,
                watch_input_ids: Callable[[torch.Tensor], None] | None = None):
    """Hook decoder layers of `model` (LLaVA or Qwen2.5-VL): `edit` maps a layer to a function of its output
    hidden states (batch, seq, hidden) returning the replacement (or None to keep them); `capture` lists layers
    whose outputs (after any edit) are recorded. Layers may be negative (-1 is the last)."""
    layers = decoder_layers(model)
    edits = {_index(layer, len(layers)): fn for layer, fn in (edit or {}).items()}
    captures = {_index(layer, len(layers)) for layer in capture}
    hooks = LayerHooks({layer: [] for layer in sorted(captures)})

    def make_hook(index: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            changed = False
            if index in edits:
                new = edits[index](hidden)
                if new is not None:
                    if new.shape != hidden.shape:
                        raise ValueError(f"the edit of layer {index} returned shape {tuple(new.shape)}, expected "
                                         f"{tuple(hidden.shape)}")
                    hidden, changed = new.to(hidden.dtype), True
            if index in captures:
                kept = hidden.detach() if detach else hidden
                hooks.captured[index].append(kept.cpu() if to_cpu else kept)
            if not changed:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    handles = [layers[index].register_forward_hook(make_hook(index)) for index in sorted(edits.keys() | captures)]
    if watch_input_ids is not None:
        handles.append(model.get_input_embeddings().register_forward_pre_hook(
            lambda _module, args: watch_input_ids(args[0])))
    try:
        yield hooks
    finally:
        for handle in handles:
            handle.remove()
