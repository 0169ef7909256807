"""Quantization, the VLM form (the `quantize` attack on edits of `erasure vlm erase`): the edited VLM loaded as users
deploy it, through transformers' quantization support (`quantization_config`: optimum-quanto's QuantoConfig on the
CPU or a GPU, bitsandbytes' BitsAndBytesConfig on a CUDA GPU; the backends and levels are quantization.py's), and
the forget and retain sets scored again against the unquantized edit. Rounding can undo an erasure made of small
weight updates (arXiv 2410.16454: 4-bit quantization restores much of what LLM unlearning removed).

What is quantized: every linear layer transformers quantizes by default (the language model and the vision tower;
not the output head). A LoRA edit is merged into the weights first (what a user who quantizes the released model
quantizes; kept in OUT.partial/merged/ while the run lasts, or in a temporary folder removed at its end when the run
writes nothing), so its update is rounded with them; a hook edit (SAUCE, MLLMEraser) acts through its hooks on the
quantized model, its tensors in full precision.

Items: the unquantized edit, then each level; each scores the forget and retain sets (`"rate"`: the forget score).
    rate_unquantized, retain_unquantized   the edit as saved
    rate_quantized, retain_quantized       per level
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import AttackEntry
from .quantization import QuantizationLevels, check_backend, library_config
from .vlm_harness import VLMAttack, VLMAttackContext

UNQUANTIZED = "unquantized"


@dataclass
class VLMQuantizeConfig(QuantizationLevels):
    pass


class VLMQuantize(VLMAttack):
    config_class = VLMQuantizeConfig

    def check_environment(self, device: str | None) -> None:
        check_backend(self.config.backend, device)

    def items(self) -> list[str]:
        return [UNQUANTIZED, *self.config.level_list()]

    def run(self, context: VLMAttackContext, pending: set[int]):
        from vlm.edits import applied

        with contextlib.ExitStack() as cleanup:
            @functools.cache
            def scratch() -> Path:
                """OUT.partial/, or (a run that writes nothing) a temporary folder removed when the run ends."""
                work = context.work_dir()
                return work if work is not None else \
                    Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="vlm-quantize-")))

            for index, level in enumerate(self.items()):
                if index not in pending:
                    continue
                if level == UNQUANTIZED:
                    with applied(context.loaded, context.edit):
                        scores = context.score()
                else:
                    with quantized_edit(context, self.config.backend, level, scratch) as loaded:
                        scores = context.score(loaded)
                yield index, {"level": level, "label": level, **scores}

    def summarise(self, records: list[dict]) -> dict:
        by_level = {r["level"]: r for r in records}
        levels = self.config.level_list()
        plain = by_level[UNQUANTIZED]
        return {"backend": self.config.backend, "rate_unquantized": plain["forget"]["score"],
                "retain_unquantized": plain["retain"]["score"],
                "rate_quantized": {level: by_level[level]["forget"]["score"] for level in levels},
                "retain_quantized": {level: by_level[level]["retain"]["score"] for level in levels}}


@contextlib.contextmanager
def quantized_edit(context: VLMAttackContext, backend: str, level: str, scratch: Callable[[], Path]):
    """A LoadedVLM of the edited model quantized at `level` (its processor shared), the edit in it: merged into the
    weights (a LoRA edit; kept in the folder `scratch()` gives) or hooked on (a hook edit, checked against the
    unquantized model already)."""
    import transformers

    from vlm.edits import ADAPTER, applied
    from vlm.models import resolve_vlm_source

    loaded = context.loaded
    merged = context.metadata is not None and ADAPTER in context.metadata["files"]
    source = merged_weights(context, scratch()) if merged else resolve_vlm_source(loaded.source)[0]
    dtype = next(loaded.model.parameters()).dtype
    placement = {"device_map": {"": str(loaded.device)}} if loaded.device.type == "cuda" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*[Qq]uanto.*", FutureWarning)
        model = type(loaded.model).from_pretrained(
            source, dtype=dtype, quantization_config=library_config(transformers, backend, level, dtype), **placement)
    quantized = dataclasses.replace(loaded, model=model.eval(), allow_other_base=True)
    try:
        with applied(quantized, None if merged else context.edit):
            yield quantized
    finally:
        del quantized, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def merged_weights(context: VLMAttackContext, work: Path) -> Path:
    """The edited model with its LoRA adapter merged, saved once in `work`/merged/ (OUT.partial/, where a resumed
    run finds it); the loaded model is left as it was."""
    from erasers.files import writing_into
    from vlm.edits import load_adapter

    out = work / "merged"
    if (out / "config.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    from peft.tuners.lora import LoraLayer

    wrapped = load_adapter(context.loaded, context.edit)
    try:  # each adapted layer's update W' = W + scale B A, computed beside the weights: they stay bit for bit
        with torch.no_grad():
            updates = {f"{name.removeprefix('base_model.model.')}.weight": module.get_delta_weight("default")
                       for name, module in wrapped.named_modules() if isinstance(module, LoraLayer)}
    finally:
        wrapped.unload()
    state = context.loaded.model.state_dict()
    state = {key: value + updates[key].to(value.dtype) if key in updates else value for key, value in state.items()}
    with writing_into(out) as tmp:
        context.loaded.model.save_pretrained(tmp, state_dict=state)
    return out


VLM_QUANTIZE = AttackEntry("quantize", VLMQuantize, "quantization: the edited VLM loaded quantized through "
                           "transformers (optimum-quanto int8/int4 on the CPU, bitsandbytes on a GPU); forget and "
                           "retain scores against the unquantized edit's", quick={"levels": "int8"})
