"""Mixed precision and memory options for the training-based erasers (real SD 1.5, SDXL and Flux on a GPU).

    --precision fp32|fp16|bf16   frozen weights are stored and run in this dtype (default: bf16 on a CUDA GPU that
                                 supports it, fp16 on an older one, fp32 on CPU)
    --gradient-checkpointing     recompute the trained components' activations in the backward pass
    --optimizer adam|adam8bit    8-bit Adam from bitsandbytes (optional extra: pip install erasure-suite[gpu])

How: the trained parameters are cast to float32 in place (they are their own master weights), everything frozen
stays in half precision, and every forward pass of an erase runs under `torch.autocast` in the half dtype, which
casts float32 weights and activations to half for matmuls and convolutions and back to float32 for norms and
reductions. Gradients reach the float32 parameters in float32 and the optimiser steps on them: no optimiser ever
updates a half-precision tensor (Adam's small steps vanish in fp16/bf16 rounding). The edited component is saved
in float32 (its frozen half-precision weights upcast exactly), so it loads into a pipeline of any dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import UsageError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIMIZERS = ("adam", "adam8bit")


@dataclass
class TrainingOptions:
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    optimizer: str = "adam"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"


def default_precision(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_precision(precision: str, device: str | torch.device) -> None:
    device = torch.device(device)
    if device.type == "cpu" and precision == "fp16":
        raise UsageError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU does not support bf16; use --precision fp16 or fp32")


def autocast(loaded):
    """The context every forward pass of an erase on `loaded` (a LoadedPipeline) runs in: autocast to the half dtype
    of its training options, or nothing in fp32."""
    options = loaded.training
    if not options.mixed:
        return contextlib.nullcontext()
    # An erase runs its whole loop in this one context, and autocast's cache keeps the first half-precision cast of
    # each float32 parameter that requires grad until the context exits: with it, every forward pass would read the
    # trained parameters as they were before the first optimiser step.
    return torch.autocast(loaded.device.type, dtype=options.dtype, cache_enabled=False)


def train_only(loaded, parameters: list[torch.nn.Parameter], *modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze the whole pipeline, then make `parameters` trainable (make_trainable): nothing else gets a gradient."""
    loaded.freeze()
    return make_trainable(loaded, parameters, *modules)


def make_trainable(loaded, parameters: list[torch.nn.Parameter], *modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Mark `parameters` trainable, in float32 (master weights under mixed precision); with the loaded pipeline's
    gradient checkpointing, enable it on `modules` (the components the backward pass runs through)."""
    options = loaded.training
    for parameter in parameters:
        if parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    if options.gradient_checkpointing:
        for module in modules:
            if hasattr(module, "enable_gradient_checkpointing"):   # diffusers models
                module.enable_gradient_checkpointing()
            elif hasattr(module, "gradient_checkpointing_enable"):  # transformers models
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return parameters


def build_optimizer(loaded, parameters: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0):
    """Adam (or bitsandbytes' 8-bit Adam, --optimizer adam8bit) on float32 parameters; AdamW when `weight_decay`
    is set (Concept Ablation, Forget-Me-Not and SalUn train with AdamW, decay 1e-2)."""
    options = loaded.training
    half = [p for p in parameters if p.dtype != torch.float32]
    if half:
        raise UsageError(f"{len(half)} trained parameters are not float32; call make_trainable on them first")
    if options.optimizer == "adam8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UsageError("--optimizer adam8bit needs bitsandbytes, which is not installed: "
                             "pip install 'erasure-suite[gpu]' (or bitsandbytes), or use --optimizer adam") from None
        if weight_decay:
            return bitsandbytes.optim.AdamW8bit(parameters, lr=lr, weight_decay=weight_decay)
        return bitsandbytes.optim.Adam8bit(parameters, lr=lr)
    if weight_decay:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(parameters, lr=lr)


def finish(loaded, module: torch.nn.Module) -> torch.nn.Module:
    """An edited component ready to save: gradients off, checkpointing off, one dtype (float32 after mixed
    precision, so nothing the training learned is rounded away). Its gradients are let go: on SDXL's UNet they
    are gigabytes that the evaluation or the next erase in the same process would otherwise carry."""
    options = loaded.training
    module.zero_grad(set_to_none=True)
    module.requires_grad_(False)
    if options.gradient_checkpointing:
        if hasattr(module, "disable_gradient_checkpointing"):
            module.disable_gradient_checkpointing()
        elif hasattr(module, "gradient_checkpointing_disable"):
            module.gradient_checkpointing_disable()
    if options.mixed:
        module.to(torch.float32)
    return module
