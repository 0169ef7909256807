"""The quantization backends the quantize attack loads models through, in both of its forms (quantize.py: a
diffusers pipeline; vlm_quantize.py: a transformers VLM): their levels, what each needs of the machine, and one
backend's config object for a library (diffusers' and transformers' QuantoConfig and BitsAndBytesConfig).

    backend=quanto         optimum-quanto, on the CPU or a GPU: levels int8, int4, int2 (weights only)
    backend=bitsandbytes   bitsandbytes, on a CUDA GPU only: levels int8 (LLM.int8), int4 (FP4), nf4 (NF4)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from erasers.errors import UsageError

# backend -> (the module it imports, the package that installs it, the extra that does, its levels)
BACKENDS = {"quanto": ("optimum.quanto", "optimum-quanto", "quantize", ("int8", "int4", "int2")),
            "bitsandbytes": ("bitsandbytes", "bitsandbytes", "gpu", ("int8", "int4", "nf4"))}


@dataclass
class QuantizationLevels:
    """The quantize attack's backend and levels (its options, in both forms)."""

    backend: str = "quanto"
    levels: str = "int8,int4"  # comma-separated, in the order drawn

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UsageError(f"quantize option backend={self.backend!r} is not a backend here; choose one of "
                             f"{', '.join(BACKENDS)}")
        known = BACKENDS[self.backend][3]
        levels = self.level_list()
        wrong = [level for level in levels if level not in known]
        if not levels or wrong or len(set(levels)) != len(levels):
            raise UsageError(f"quantize option levels={self.levels!r}: the {self.backend} backend's levels are "
                             f"{', '.join(known)}; pass some of them once each, comma-separated")

    def level_list(self) -> list[str]:
        return [level.strip() for level in self.levels.split(",") if level.strip()]


def check_backend(backend: str, device: str | None) -> None:
    """A UsageError, before any model loads, when this machine cannot run `backend`: bitsandbytes without a CUDA GPU
    (or with another --device), a backend's package not installed."""
    module, package, extra, _ = BACKENDS[backend]
    if backend == "bitsandbytes":
        if device is not None and not device.startswith("cuda"):
            raise UsageError(f"quantize backend=bitsandbytes runs on a CUDA GPU only, not --device {device}; drop "
                             "--device, or pass --set backend=quanto")
        if not torch.cuda.is_available():
            raise UsageError("quantize backend=bitsandbytes needs a CUDA GPU and this machine has none; pass --set "
                             "backend=quanto (optimum-quanto runs on the CPU)")
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"quantize backend={backend} needs {package}, which is not installed here; pip install "
                         f"'erasure-suite[{extra}]' (or {package})") from None


def library_config(library, backend: str, level: str, compute_dtype: torch.dtype):
    """`library`'s (diffusers' or transformers') config object quantizing weights with `backend` at `level`."""
    import diffusers

    if backend == "quanto":
        # diffusers names the weights' type weights_dtype, transformers weights.
        return library.QuantoConfig(**{"weights_dtype" if library is diffusers else "weights": level})
    if level == "int8":
        return library.BitsAndBytesConfig(load_in_8bit=True)
    return library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4" if level == "nf4" else "fp4",
                                      bnb_4bit_compute_dtype=compute_dtype)
