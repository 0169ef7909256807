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


def autocast(device: torch.device, options: TrainingOptions):
    """The context every forward pass of an erase runs in: autocast to the half dtype, or nothing in fp32."""
    if not options.mixed:
        return contextlib.nullcontext()
    # An erase runs its whole loop in this one context, and autocast's cache keeps the first half-precision cast of
    # each float32 parameter that requires grad until the context exits: with it, every forward pass would read the
    # trained parameters as they were before the first optimiser step.
    return torch.autocast(device.type, dtype=options.dtype, cache_enabled=False)


def make_trainable(parameters: list[torch.nn.Parameter], modules: list[torch.nn.Module],
                   options: TrainingOptions) -> list[torch.nn.Parameter]:
    """Mark `parameters` trainable, in float32; with gradient checkpointing, enable it on `modules` (the components
    the backward pass runs through)."""
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


def build_optimizer(parameters: list[torch.nn.Parameter], lr: float, options: TrainingOptions):
    half = [p for p in parameters if p.dtype != torch.float32]
    if half:
        raise UsageError(f"{len(half)} trained parameters are not float32; call make_trainable on them first")
    if options.optimizer == "adam8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UsageError("--optimizer adam8bit needs bitsandbytes, which is not installed: "
                             "pip install 'erasure-suite[gpu]' (or bitsandbytes), or use --optimizer adam") from None
        return bitsandbytes.optim.Adam8bit(parameters, lr=lr)
    return torch.optim.Adam(parameters, lr=lr)


def finish(module: torch.nn.Module, options: TrainingOptions) -> torch.nn.Module:
    """An edited component ready to save: gradients off, checkpointing off, one dtype (float32 after mixed
    precision, so nothing the training learned is rounded away). Its gradients are let go: on SDXL's UNet they
    are gigabytes that the evaluation or the next erase in the same process would otherwise carry."""
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
