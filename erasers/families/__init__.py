"""Model families: one adapter per pipeline family behind one interface (base.py: SD 1.x/2.x, which SDXL's and Flux's
extend). Methods call `loaded.adapter`; none tests a pipeline's class."""

from __future__ import annotations

from ..conditioning import Conditioning
from .base import UNetAdapter, latent_dtype, on_device, predict
from .flux import FluxAdapter
from .sdxl import SDXLAdapter

ADAPTERS: dict[str, type[UNetAdapter]] = {"sd": UNetAdapter, "sdxl": SDXLAdapter, "flux": FluxAdapter}


def adapter_class(family: str) -> type[UNetAdapter]:
    """The adapter of a family name (erasers.models.FAMILIES)."""
    return ADAPTERS[family]


__all__ = ["ADAPTERS", "Conditioning", "FluxAdapter", "SDXLAdapter", "UNetAdapter", "adapter_class", "latent_dtype",
           "on_device", "predict"]
