"""The eraser interface and the registry of methods: the one list of methods. Each entry is a method's data (its
eraser class, defaults, toy defaults, families, and what the benchmarks and tests need to run it), filled by the
@register decorators of every module in `erasers/methods/` (found by scanning the package; nothing lists them).
The Registry class serves the VLM erasers too (vlm.registry, `vlm/methods/`)."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable, ClassVar

from torch import nn

from .errors import UsageError
from .models import LoadedPipeline
from .prompts import EraseRequest
from .validation import field_kind, validate_config


class Eraser:
    """A method: built from its config, it edits a loaded pipeline in place and returns the edited components
    by name ("unet", "text_encoder"), ready for `save_edit`."""

    config_class: ClassVar[type]

    def __init__(self, config):
        self.config = config

    def check(self, loaded: LoadedPipeline, request: EraseRequest) -> None:
        """A UsageError for what would fail later in `erase` (files it loads part way through): `erasers.run.erase`
        calls it before it writes anything."""

    def erase(self, loaded: LoadedPipeline, request: EraseRequest,
              work_dir: Path | None = None) -> dict[str, nn.Module]:
        raise NotImplementedError


ALL_FAMILIES = ("sd", "sdxl", "flux")


@dataclasses.dataclass(frozen=True)
class Entry:
    """What every registered plug-in declares (an eraser, here and in vlm.registry; an attack, benchmarks.attacks):
    its class (whose `config_class` holds its options), its defaults and where it applies. Registry builds configs
    from these and refuses the families it leaves out."""

    name: str
    plugin: type
    summary: str
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Overrides for the toy models, whose tiny sizes and short schedules need other step sizes than the real
    # models'; the README's tables are measured with them.
    toy_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The pipeline families (erasers.models.FAMILIES) it applies to; the others are refused.
    families: tuple[str, ...] = ALL_FAMILIES
    # Why it leaves out each family (or form of edit) it leaves out (name -> reason): the refusal and the families
    # matrix say it.
    why_not: dict[str, str] = dataclasses.field(default_factory=dict)
    # Options for a run of a few steps on tiny random pipelines or the toy (the families tests, tests/test_attacks;
    # gpu_check and step_cost add their own step counts).
    quick: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MethodEntry(Entry):
    """A registered method. Beyond the eraser and its defaults, what every harness reads instead of keeping its own
    list: the families matrix and tests, `benchmarks.method_table`, `step_cost`, `gpu_check`, `erasure bench
    --methods all` and the app."""

    # Resources beyond the pipeline that a harness must provide: "ip_adapter" (an IP-Adapter and a refinement CLIP).
    needs: tuple[str, ...] = ()
    # Whether a preservation term keeps prompts it is told to retain (the families test holds it to 3x selectivity).
    preserves: bool = False
    # Ablation rows of the method table: row suffix -> option overrides ("noadv": {"adversarial": False}).
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # The models `benchmarks.step_cost` times it on by default (toy, sd15, sdxl: what fits in 24 GiB).
    step_cost_models: tuple[str, ...] = ("toy",)
    # Whether it trains: a training-free method (SLD, negative prompts) refuses training options.
    trains: bool = True
    # Whether it reads --anchor texts (what the concept is mapped to) and --preserve prompts (what it keeps): an
    # erase refuses either option for a method that would ignore it.
    reads_anchors: bool = False
    reads_preserve: bool = False
    # How it combines several concepts of one request, in words ("one loss over all", "one closed form", "one
    # adapter each"): `erasure methods` and erasers/README's method table show it.
    multi_concept: str = ""
    # How an edit of it loads when it is not (only) weights in diffusers format: apply(loaded, edit_dir, metadata)
    # installs its "adapter" component (SPM's LoRA) or its guidance (SLD) on a loaded pipeline. None: the edit's
    # components load with `from_pretrained` in place of the pipeline's.
    apply: Callable | None = None

    @property
    def eraser(self) -> type:
        return self.plugin


class Registry:
    """Name -> its Entry (a MethodEntry unless `entry_class` says otherwise), filled by the @register decorators of
    the modules of `package` (every one is imported on first lookup). One for diffusion erasers (here), one for VLM
    erasers (vlm.registry); a subclass with its own `entry_class` serves other plug-ins (benchmarks.attacks)."""

    entry_class: ClassVar[type] = MethodEntry

    def __init__(self, kind: str, package: str):
        self.kind = kind  # how errors name a method: "method", "VLM method"
        self.package = package
        self.entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, summary: str, **entry_fields):
        """A class decorator: `entry_fields` are the entry class's (defaults, toy_defaults, families, quick, ...)."""
        def wrap(cls: type) -> type:
            self.entries[name] = self.entry_class(name, cls, summary, **entry_fields)
            return cls

        return wrap

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
            importlib.import_module(f"{self.package}.{module}")

    def available(self) -> dict[str, Entry]:
        self._load()
        return self.entries

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self.entries:
            raise UsageError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self.entries))}")
        return self.entries[name]

    def build_config(self, name: str, toy: bool, overrides: dict[str, Any] | None = None):
        """The method's config: its dataclass defaults, the registry's defaults, the toy overrides on a toy
        model, then the user's overrides (checked against the dataclass's fields)."""
        return self.entry_config(self.get(name), toy, overrides)

    def entry_config(self, entry, toy: bool, overrides: dict[str, Any] | None = None):
        """`build_config` of an entry in hand (an attack's VLM form, which the name alone does not pick)."""
        name = entry.name
        config_class = self.config_class(entry)
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        values = {**entry.defaults, **(entry.toy_defaults if toy else {})}
        for key, value in (overrides or {}).items():
            if key not in fields:
                trains = "" if getattr(entry, "trains", True) else \
                    " (it is training-free: it trains nothing at erase time)"
                raise UsageError(f"{name} has no option {key!r}{trains}; its options: {', '.join(fields)}")
            values[key] = _coerce(value, fields[key], name)
        return validate_config(config_class(**values), name)

    def config_class(self, entry: Entry) -> type:
        """The dataclass of an entry's options."""
        return entry.plugin.config_class


REGISTRY = Registry("method", "erasers.methods")
register = REGISTRY.register
available_methods = REGISTRY.available
get_method = REGISTRY.get
build_config = REGISTRY.build_config


def check_request_options(method: str, anchors: list[str], preserve: list[str]) -> None:
    """--anchor and --preserve only for a method that reads them (its entry's reads_anchors / reads_preserve): a
    text the method would ignore is refused with the methods that read it."""
    for flag, given, reads in (("--anchor", anchors, "reads_anchors"), ("--preserve", preserve, "reads_preserve")):
        if given and not getattr(get_method(method), reads):
            readers = sorted(name for name, entry in available_methods().items() if getattr(entry, reads))
            raise UsageError(f"{method} reads no {flag}, so it would be ignored; drop it, or use a method that "
                             f"reads it: {', '.join(readers)}")


def families_matrix() -> dict[str, dict[str, bool]]:
    """method -> family -> whether it edits that family: the README's families x methods table."""
    return {name: {family: family in entry.families for family in ALL_FAMILIES}
            for name, entry in sorted(available_methods().items())}


def _coerce(value: Any, field: dataclasses.Field, method: str) -> Any:
    if not isinstance(value, str):
        return value
    kind = field_kind(field)[0]  # "float | None" (a value a preset fills in when not given) reads as "float"
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
