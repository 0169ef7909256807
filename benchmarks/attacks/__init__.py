"""Attacks on erased models behind `erasure attack --attack NAME` (default unlearndiffatk): the registry, filled by
the @register decorators of the modules of this package. Every module here is imported on first lookup (pkgutil),
so nothing else lists the attacks; the shared parts live here once:

    harness.py   the run: base model, what the attack draws from it, the edits, the resumable per-item loop
    results.py   the one result layout (OUT/attack.json, images/, attack.png), written atomically
    judges.py    --judge MODULE:FUNCTION and the toy judge
    prompts.py   --prompts N, --prompt-file and --prompts-csv (the published prompt sets' layouts)

A new attack is one file here:

    @dataclass
    class MyConfig:                      # its options (`--set key=value`), checked by erasers.validation's rules
        steps: int = 100
        seed: int = 0

    @register("mine", "one line for `erasure attack --help`", toy_defaults={"steps": 5}, quick={"steps": 1},
              edits=("weights",), families=("sd", "sdxl"))
    class MyAttack(Attack):
        config_class = MyConfig
        needs_base = ("denoiser",)                   # the base modules it reads beside the edited ones, if any

        def search(self, context, item) -> Found:     # one item whose plain prompt did not bring the concept back
            ...

Attack (harness.py) says what else an attack may override: `plan` (its items, when they are not prompts),
`check` (before any image), `prepare` (with the base model, before the edits load), `run_item` (the whole item, for
protocols other than plain-then-search) and `summarise` (an ASR, or a curve). tests/test_attacks.py runs every
registered attack with its `quick` options and checks the result layout.
Its registration's `step` (an AttackStep: what one step is, the options of a timed run) puts it in
benchmarks.step_cost; its search logs its steps' times in `self.history`.

An attack that also applies to VLM edits names its VLM form in its registration (`vlm=`: an AttackEntry whose class
is a vlm_harness.VLMAttack, in a file vlm_NAME.py here), so one name, one registry entry and one rule ("does this
attack apply to this kind of edit?", `model_kinds`) serve both `erasure robustness` and `erasure vlm robustness`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from erasers.edits import edit_kind
from erasers.errors import UsageError
from erasers.registry import Entry, Registry

# The forms of edit an attack may apply to: "weights" (an edit holding weights or an adapter) and "training-free"
# (an erasure.json without weights, acting at generation time: sld, negprompt; erasers/guidance.py).
EDIT_FORMS = ("weights", "training-free")
DEFAULT_ATTACK = "unlearndiffatk"


@dataclasses.dataclass(frozen=True)
class AttackStep:
    """What one step of an attack is, for benchmarks.step_cost: said in words (`what`), and the options that make a
    run of `count` steps with nothing else timed in between (`options(count)`: image checks only at the end, few
    images drawn beforehand). The run's steps are read from the attack's `history` (Attack.history); an attack
    whose cost is at sampling (`sampling`: quantize) has the sampling step of each pipeline it loads
    (Attack.loaded_pipelines) timed against the unquantized pipeline's."""

    what: str
    options: Callable[[int], dict[str, Any]]
    # The architectures step_cost measures it on by default (benchmarks.step_cost.MODELS).
    models: tuple[str, ...] = ("toy", "sd15")
    sampling: bool = False


@dataclasses.dataclass(frozen=True)
class AttackEntry(Entry):
    """A registered attack: its class, its defaults and what it applies to (the shared Entry's fields; `why_not`
    also names the edit forms it leaves out), which `erasure attack` checks before any model loads (one line, exit
    2, nothing written)."""

    # The forms of edit (EDIT_FORMS) it attacks.
    edits: tuple[str, ...] = EDIT_FORMS
    # The attack's form for VLM edits (vlm_harness.py; its class, options and defaults), run by `erasure vlm
    # robustness`; None for an attack on diffusion models only.
    vlm: AttackEntry | None = None
    # What step_cost times as one of its steps (None: not timed; the VLM forms).
    step: AttackStep | None = None

    @property
    def attack(self) -> type:
        return self.plugin

    @property
    def model_kinds(self) -> tuple[str, ...]:
        """The kinds of model ("diffusion", "vlm") it attacks."""
        return ("diffusion", "vlm") if self.vlm is not None else ("diffusion",)


class AttackRegistry(Registry):
    entry_class = AttackEntry


REGISTRY = AttackRegistry("attack", __name__)
register = REGISTRY.register
available_attacks = REGISTRY.available
get_attack = REGISTRY.get
build_attack_config = REGISTRY.build_config


def vlm_form(name: str) -> AttackEntry:
    """The VLM form of attack `name`; refused in one line, with the attacks that have one, when it has none."""
    entry = get_attack(name)
    if entry.vlm is None:
        raise UsageError(f"{name} attacks diffusion edits only; attacks on VLM edits: "
                         f"{', '.join(sorted(n for n, e in available_attacks().items() if e.vlm is not None))}")
    return entry.vlm


def build_vlm_attack_config(name: str, toy: bool, overrides: dict[str, Any] | None = None):
    """The options of attack `name`'s VLM form: its defaults, the toy's on the toy VLM, then `overrides`."""
    return REGISTRY.entry_config(vlm_form(name), toy, overrides)


def edit_form(metadata: dict) -> str:
    """"weights" or "training-free" (no components: the edit acts through the pipeline's call)."""
    return "weights" if metadata["components"] else "training-free"


def check_model_kinds(entry: AttackEntry, edits: list[str | Path]) -> None:
    """Refuse an edit of a model kind the attack does not attack (a VLM edit), before the edit is read further."""
    for path in edits:
        kind = edit_kind(path)
        if kind is not None and kind not in entry.model_kinds:
            raise UsageError(f"{entry.name} attacks {' and '.join(entry.model_kinds)} edits, and {path} is a {kind} "
                             f"edit; {_others(entry, 'model_kinds', kind)}")


def check_applies(entry: AttackEntry, edits: list[str | Path], metadata: list[dict],
                  family: str | None = None) -> None:
    """Refuse, in one line, an edit the attack does not apply to: a form of edit (weights, training-free) or a
    family (the edit's recorded base family, or `family` once the model is loaded) it leaves out."""
    for path, meta in zip(edits, metadata):
        form = edit_form(meta)
        if form not in entry.edits:
            why = entry.why_not.get(form, f"it attacks {' and '.join(entry.edits)} edits")
            method = f" ({meta['method']})" if meta.get("method") else ""
            raise UsageError(f"{entry.name} does not apply to {path}, a {form} edit{method}: {why}; "
                             f"{_others(entry, 'edits', form)}")
        for found in (meta.get("base_family"), family):
            if found is not None and found not in entry.families:
                why = entry.why_not.get(found, f"it runs on {', '.join(entry.families)}")
                raise UsageError(f"{entry.name} does not run on {found} models ({path}): {why}; "
                                 f"{_others(entry, 'families', found)}")


def _others(entry: AttackEntry, field: str, value: str) -> str:
    others = sorted(name for name, other in available_attacks().items() if value in getattr(other, field))
    return f"attacks that do: {', '.join(others)}" if others else "no attack here does"

