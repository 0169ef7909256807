"""One validator for every method's config (diffusion and VLM erasers, the attack, the benchmark's protocol),
called when the config is built: a bad value fails with one line before a model loads or anything is written.

The rules follow the field's type and name, so a new method gets them by naming its fields conventionally:

    every float                     finite (no nan, inf)
    every int / float / str / bool  of that type (an int field takes no 2.5, a float no "x")
    seed                            0 .. 2**63 - 1
    lr, *_lr, eta, lamb, gamma, beta, temperature              > 0
    warmup, warmup_steps, warmup_*                              >= 0
    iterations, steps, *_steps, epochs, batch_size, *_every,
      max_new_tokens, tokens, *_tokens, *_images, *_samples,
      *_dims, features, expansion, k, lora_r, lora_alpha        >= 1
    *_batch, *_weight, *_scale, *_epsilon, *_decay, *_norm      >= 0
    *_dropout                                                   0 <= x < 1
    *_energy, *_fraction, *_ratio                               0 < x <= 1

A field can state its own bounds instead, in its metadata (they replace the name's rule):

    ddim_steps: int = field(default=50, metadata={"min": 3})
    margin: float = field(default=0.1, metadata={"min": 0, "max": 1, "min_exclusive": True})
    width: int | None = field(default=None, metadata={"min": 8, "multiple": 8})    # None: not given

The same rules check values read from files (an I2P CSV row, an edit's metadata): `check_field` with the name
the file gives the value and a `noun` ("column", "field") in place of "option".
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

from .errors import UsageError

MAX_SEED = 2 ** 63 - 1

# (name patterns, min, max, min exclusive, max exclusive); the first rule whose pattern matches applies.
RULES: tuple[tuple[tuple[str, ...], float | None, float | None, bool, bool], ...] = (
    (("seed",), 0, MAX_SEED, False, False),
    (("warmup", "warmup_steps", "warmup_*"), 0, None, False, False),
    (("lr", "*_lr", "eta", "lamb", "gamma", "beta", "temperature"), 0, None, True, False),
    (("iterations", "steps", "*_steps", "epochs", "batch_size", "*_every", "max_new_tokens", "tokens", "*_tokens",
      "*_images", "*_samples", "*_dims", "features", "expansion", "k", "lora_r", "lora_alpha"), 1, None, False, False),
    (("*_batch", "*_weight", "*_scale", "*_epsilon", "*_decay", "*_norm"), 0, None, False, False),
    (("*_dropout",), 0, 1, False, True),
    (("*_energy", "*_fraction", "*_ratio"), 0, 1, True, False),
)

_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def bounds(field: dataclasses.Field) -> tuple[float | None, float | None, bool, bool] | None:
    """(min, max, min exclusive, max exclusive) of a config field: its metadata's, else its name's rule; name rules
    apply to numeric fields only (a str field such as a weight file's name is not a weight)."""
    meta = field.metadata
    if "min" in meta or "max" in meta:
        return meta.get("min"), meta.get("max"), meta.get("min_exclusive", False), meta.get("max_exclusive", False)
    kind = field_kind(field)[0]
    if kind not in ("int", "float"):
        return None
    for patterns, low, high, low_open, high_open in RULES:
        if any(fnmatch.fnmatchcase(field.name, pattern) for pattern in patterns):
            return low, high, low_open, high_open
    return None


def validate_config(config: Any, owner: str) -> Any:
    """Check every field of the dataclass `config` (of method `owner`) by the rules above; returns it."""
    for field in dataclasses.fields(config):
        check_field(owner, field, getattr(config, field.name))
    return config


def field_kind(field: dataclasses.Field) -> tuple[str, bool]:
    """The field's type name ("int", "float", ...) and whether it may be None ("int | None")."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    parts = [part.strip() for part in kind.split("|")]
    optional = "None" in parts and len(parts) == 2
    return (next(p for p in parts if p != "None") if optional else kind), optional


def check_field(owner: str, field: dataclasses.Field, value: Any, name: str | None = None,
                noun: str = "option") -> None:
    """`value` checked by `field`'s rules; the error names it `name` (default: the field's name) as `owner`'s
    `noun`: "--prompts x.csv line 3 column sd_seed=-1 is out of range ..."."""
    kind, optional = field_kind(field)
    if optional and value is None:
        return
    name = name or field.name
    check_value(owner, name, value, kind, bounds(field), field.default, noun)
    multiple = field.metadata.get("multiple")
    if multiple and isinstance(value, int) and value % multiple:
        raise UsageError(f"{owner} {noun} {name}={value} must be a multiple of {multiple}")


def check_value(owner: str, name: str, value: Any, kind: str, limits, default: Any = dataclasses.MISSING,
                noun: str = "option") -> None:
    example = "" if default in (dataclasses.MISSING, None) else f" (default {default})"
    allowed = _TYPES.get(kind)
    if allowed is not None and (not isinstance(value, allowed) or (kind != "bool" and isinstance(value, bool))):
        raise UsageError(f"{owner} {noun} {name} wants a {kind}, got {value!r}{example}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{owner} {noun} {name}={value} must be a finite number{example}")
    if limits is None:
        return
    low, high, low_open, high_open = limits
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise UsageError(f"{owner} {noun} {name}={value} is out of range: it must be {describe(limits)}{example}")


def describe(limits) -> str:
    low, high, low_open, high_open = limits
    parts = []
    if low is not None:
        parts.append(f"{'above' if low_open else 'at least'} {low}")
    if high is not None:
        parts.append(f"{'below' if high_open else 'at most'} {high}")
    return " and ".join(parts)


def check_lr_schedule(owner: str, schedule: str) -> None:
    """`schedule` must be one of diffusers' get_scheduler names ("constant", "cosine", ...)."""
    from diffusers.optimization import SchedulerType

    names = [kind.value for kind in SchedulerType]
    if schedule not in names:
        raise UsageError(f"{owner} lr_schedule must be one of diffusers' schedulers ({', '.join(names)}), "
                         f"not {schedule!r}")

