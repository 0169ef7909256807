"""The eraser interface and the registry of methods (name -> eraser class and its default config); the Registry
class serves the VLM erasers too (vlm.registry)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from .errors import UsageError
from .models import LoadedPipeline
from .prompts import EraseRequest
from .validation import validate_config


class Eraser:
    """A method: built from its config, it edits a loaded pipeline in place and returns the edited components
    by name ("unet", "text_encoder"), ready for `save_edit`."""

    config_class: ClassVar[type]
    # The pipeline families (erasers.models.FAMILIES) it edits, and why not the others: its erase refuses them with
    # this reason, and gpu_check and the families tests skip them.
    families: ClassVar[tuple[str, ...]] = ("sd", "sdxl", "flux")
    other_families_why: ClassVar[str] = ""

    def __init__(self, config):
        self.config = config

    def check(self, loaded: LoadedPipeline, request: EraseRequest) -> None:
        """A UsageError for what would fail later in `erase` (files it loads part way through): `erasers.run.erase`
        calls it before it writes anything."""

    def erase(self, loaded: LoadedPipeline, request: EraseRequest,
              work_dir: Path | None = None) -> dict[str, nn.Module]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    eraser: type
    defaults: dict[str, Any]
    # Overrides for the toy models, whose tiny sizes and short schedules need other step sizes than the real
    # models'; the README's tables are measured with them.
    toy_defaults: dict[str, Any]
    summary: str


class Registry:
    """Method name -> its eraser class and defaults, filled by the @register decorators of the modules that
    `load` imports (on first lookup). One for diffusion erasers (here), one for VLM erasers (vlm.registry)."""

    def __init__(self, kind: str, load: Callable[[], None]):
        self.kind = kind  # how errors name a method: "method", "VLM method"
        self.entries: dict[str, MethodEntry] = {}
        self._load = load

    def register(self, name: str, summary: str, toy_defaults: dict[str, Any] | None = None, **defaults):
        def wrap(cls: type) -> type:
            self.entries[name] = MethodEntry(cls, defaults, toy_defaults or {}, summary)
            return cls

        return wrap

    def available(self) -> dict[str, MethodEntry]:
        self._load()
        return self.entries

    def get(self, name: str) -> MethodEntry:
        self._load()
        if name not in self.entries:
            raise UsageError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self.entries))}")
        return self.entries[name]

    def build_config(self, name: str, toy: bool, overrides: dict[str, Any] | None = None):
        """The method's config: its dataclass defaults, the registry's defaults, the toy overrides on a toy
        model, then the user's overrides (checked against the dataclass's fields)."""
        entry = self.get(name)
        fields = {f.name: f for f in dataclasses.fields(entry.eraser.config_class)}
        values = {**entry.defaults, **(entry.toy_defaults if toy else {})}
        for key, value in (overrides or {}).items():
            if key not in fields:
                raise UsageError(f"{name} has no option {key!r}; its options: {', '.join(fields)}")
            values[key] = _coerce(value, fields[key], name)
        return validate_config(entry.eraser.config_class(**values), name)


# The modules whose import fills the registry (their @register decorators).
METHOD_MODULES = ("advunlearn", "coerasing", "doco", "esd", "hirm", "uce")


def _load_methods() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")


REGISTRY = Registry("method", _load_methods)
register = REGISTRY.register
available_methods = REGISTRY.available
get_method = REGISTRY.get
build_config = REGISTRY.build_config


def _coerce(value: Any, field: dataclasses.Field, method: str) -> Any:
    if not isinstance(value, str):
        return value
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
    except ValueError:
        raise UsageError(f"{method} option {field.name} wants a {kind}, got {value!r}") from None
    return value


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"option {pair!r} is not KEY=VALUE (for example --set iterations=100)")
        key, value = pair.split("=", 1)
        options[key.strip().replace("-", "_")] = value.strip()
    return options
