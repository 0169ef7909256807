"""Saving and loading edits: the edited components in diffusers/transformers format plus `erasure.json`.

    runs/no-star/
      unet/ or text_encoder/   loads with plain `from_pretrained`
      erasure.json             method, config, concepts, base model and its weights' record (erasers.fingerprint),
                               package version, cost
      README.md                its model card (erasers.cards): what it erased, how to load it, the figures it was
                               scored with
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .core import check_new_output
from .errors import FailedEdit, UsageError
from .files import publish, read_json, writing_into
from .fingerprint import (
    base_norms,
    base_weights,
    legacy_fingerprint,
    record_mismatch,
    replaced_components,
    weights_mismatch,
)
from .inputs import check_input
from .models import LoadedPipeline
from .prompts import EraseRequest

METADATA = "erasure.json"


def base_fingerprint(loaded: LoadedPipeline) -> dict:
    """The base model's record (erasers.fingerprint): each text encoder's and the denoiser's layout and weight norms
    as loaded, the same in any precision. Taken before an erase changes any weight, and saved as `base_weights`."""
    return base_weights(loaded)


def edit_metadata(loaded: LoadedPipeline, method: str, config, request: EraseRequest, fingerprint: dict) -> dict:
    """What erasure.json says of a diffusion edit beside its cost and versions."""
    return {
        "model_kind": "diffusion",
        "method": method,
        "config": dataclasses.asdict(config),
        "concepts": request.concepts,
        "kind": request.kind,
        "anchors": request.anchors,
        "preserve": request.preserve,
        "base_model": loaded.source,
        "base_family": loaded.family.name,
        "training": dataclasses.asdict(loaded.training),
        "resolution": loaded.resolution,
        "base_weights": fingerprint,
    }


def save_edit(out: str | Path, components: dict[str, nn.Module], metadata: dict, cost: dict | None = None) -> Path:
    """The edited `components` in diffusers/transformers format plus erasure.json (`metadata`, the components and
    `cost`: seconds and peak memory), written under a temporary name and renamed to `out`."""
    out = check_new_output(Path(out))
    for name, module in components.items():  # a diverged erase is a failure, never an edit that "erases" all
        check_finite(module, f"the erased {name}", "nothing was saved; lower the method's lr and run it again")
    with writing_into(out) as tmp:  # a full disk: one line, nothing left beside `out`
        for name, module in components.items():
            module.save_pretrained(tmp / name)
        return publish_with_metadata(tmp, out, {**metadata, "components": sorted(components)}, cost or {})


def publish_with_metadata(tmp: Path, out: Path, metadata: dict, cost: dict) -> Path:
    """Every saved edit's (diffusion or VLM) last step: `metadata` (with its model_kind) plus the versions, the time
    and the cost (its storage the files already in `tmp`) written as erasure.json, then `tmp` renamed to `out`."""
    storage = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    metadata = {
        **metadata,
        "erasure_suite_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cost": {"seconds": round(cost.get("seconds", 0.0), 2), "peak_memory_bytes": cost.get("peak_memory_bytes"),
                 "storage_bytes": storage, "runs": cost.get("runs", 1)},  # runs: an interrupted erase's resumes
    }
    (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
    from .cards import write_card

    write_card(tmp, shown_as=out)  # after the storage sum: the card is not the edit's weight
    publish(tmp, out)
    return out


def check_finite(module: nn.Module, what: str, remedy: str) -> None:
    """A FailedEdit when `module` holds a NaN or infinite weight: its images would be black or noise, which a
    classifier scores as the concept erased."""
    for name, parameter in module.named_parameters():
        if not torch.isfinite(parameter).all():
            raise nonfinite_error(what, name, remedy)


def nonfinite_error(what: str, name: str, remedy: str) -> FailedEdit:
    return FailedEdit(f"{what} holds non-finite weights (NaN or inf, first in {name}): a failed erase, not an "
                      f"erasure; {remedy}")


def nonfinite_weights(path: Path, components: list[str]) -> tuple[str, str] | None:
    """(component, weight) of the first NaN or infinite weight in the safetensors files of an edit's `components`,
    or None; read tensor by tensor before anything loads (a file that does not read is the loader's to report)."""
    from safetensors import SafetensorError, safe_open

    for component in components:
        for file in sorted((Path(path) / component).rglob("*.safetensors")):
            try:
                with safe_open(file, framework="pt") as weights:
                    for key in weights.keys():
                        if not torch.isfinite(weights.get_tensor(key)).all():
                            return component, key
            except (SafetensorError, OSError):
                continue
    return None


def edit_kind(path: str | Path) -> str | None:
    """The model_kind an edit directory's erasure.json declares ("diffusion", "vlm"; edits from before the field
    are diffusion edits), or None when it holds no readable erasure.json."""
    try:
        metadata = json.loads((Path(path) / METADATA).read_bytes())
    except (OSError, ValueError):
        return None
    return metadata.get("model_kind", "diffusion") if isinstance(metadata, dict) else None


def read_edit(path: str | Path) -> dict:
    path = check_input(path, "edit", "pass the --out directory of `erasure erase`", want_dir=True)
    metadata_file = path / METADATA
    if not metadata_file.exists():
        raise UsageError(f"{path} is not an edit (no {METADATA}); pass the --out directory of `erasure erase`")
    metadata = read_json(metadata_file, "re-run the erase that made it")
    if model_kind(metadata, metadata_file) != "diffusion":
        raise UsageError(f"{path} is a VLM edit; pass it to `erasure vlm ask` or `erasure bench mllmu-med`")
    check_metadata_fields(metadata_file, metadata, EDIT_FIELDS, EDIT_OPTIONAL_FIELDS)
    for component in metadata["components"]:
        if component not in (*COMPONENTS, ADAPTER):
            raise UsageError(f"{metadata_file} lists a component {component!r}; edits hold {', '.join(COMPONENTS)} "
                             f"or {ADAPTER}: re-run the erase that made it")
        if not (path / component).is_dir():
            raise UsageError(f"edit {path} lists {component} but has no {component}/ directory; re-run the erase")
    return metadata


# The fields commands read from erasure.json, by kind (see check_metadata_fields); more are allowed.
EDIT_FIELDS = {"concepts": "names+", "kind": "text", "components": "names"}
EDIT_OPTIONAL_FIELDS = {"method": "text", "config": "object", "base_weights": "object", "anchors": "names",
                        "preserve": "names", "training": "object", "cost": "object"}
MODEL_KINDS = ("diffusion", "vlm")


def model_kind(metadata: dict, metadata_file: Path) -> str:
    """The edit's model_kind (edits from before the field are diffusion edits), one of MODEL_KINDS."""
    kind = metadata.get("model_kind", "diffusion")
    if kind not in MODEL_KINDS:
        raise UsageError(f"{metadata_file}: field 'model_kind' should be one of {', '.join(MODEL_KINDS)}, not "
                         f"{json.dumps(kind)[:40]}; the file is corrupt or was edited by hand: re-run the erase")
    return kind
# Components an edit may hold: every family's text encoders and denoisers (also keeps paths inside the edit), and
# an "adapter" directory that the method's own loader (its registry entry's `apply`) installs.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
ADAPTER = "adapter"
_KINDS = {"text": "a non-empty string", "object": "a JSON object", "names": "a list of strings",
          "names+": "a non-empty list of strings"}


def check_metadata_fields(metadata_file: Path, metadata: dict, required: dict, optional: dict | None = None) -> None:
    """Each field of `required` is in `metadata`, and each of `optional` that is there, with its kind: "text" (a
    non-empty string), "object", "names" (a list of non-empty strings) or "names+" (the same, not empty)."""
    for name, kind in {**required, **(optional or {})}.items():
        if name not in metadata and name not in required:
            continue
        value = metadata.get(name)
        if kind == "text":
            ok = isinstance(value, str) and bool(value)
        elif kind == "object":
            ok = isinstance(value, dict)
        else:
            ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value) and \
                (bool(value) or kind == "names")
        if not ok:
            got = "missing" if name not in metadata else json.dumps(value)[:40]
            raise UsageError(f"{metadata_file}: field {name!r} should be {_KINDS[kind]}, not {got}; the file is "
                             "corrupt or was edited by hand: re-run the erase that made it")


def other_base_error(path, made_for: str, here: str, why: str) -> UsageError:
    """The one line an edit made for another base model gets, from every loader of edits (diffusion and VLM)."""
    return UsageError(f"{path} was made for another base model ({made_for}; {why}), not {here}: load it onto the "
                      "model it was made from, or pass --allow-other-base to load it anyway (a deliberate transfer)")


def check_base(loaded: LoadedPipeline, meta: dict, path, allow_other_base: bool = False) -> None:
    """Refuse an edit made for another base model than `loaded` (its family, or its recorded weights), unless
    `allow_other_base`: then it loads, with a note on stderr."""
    why = base_mismatch(loaded, meta, Path(path))
    if why is not None:
        other_base(path, meta.get("base_model"), loaded.source, why, allow_other_base, loaded.pipeline)


def other_base(path, made_for: str | None, here: str, why: str, allow_other_base: bool, model: object) -> None:
    """An edit at `path` made for another base model than `here` (`why`), for every loader of edits (diffusion and
    VLM): refused in one line, or with `allow_other_base` loaded with a note, once per loaded `model`."""
    if not allow_other_base:
        raise other_base_error(path, made_for or "a model it does not name", here, why)
    noted = _NOTED.setdefault(model, set())
    if str(path) not in noted:  # a command may check an edit before it loads it
        noted.add(str(path))
        print(f"erasure: note: {path} was made for another base model ({why}); loading it anyway "
              "(--allow-other-base)", file=sys.stderr)


_NOTED: "weakref.WeakKeyDictionary[object, set[str]]" = weakref.WeakKeyDictionary()


def base_mismatch(loaded: LoadedPipeline, meta: dict, path: Path) -> str | None:
    """How `loaded` differs from the base model an edit's erasure.json (`meta`) records, or None."""
    family = meta.get("base_family")
    if family is not None and family != loaded.family.name:
        return f"{family} family; this pipeline is {loaded.family.name}"
    if not meta["components"]:  # training-free: no weights, it acts through whichever pipeline draws (guidance.py)
        return None
    if "base_weights" in meta:
        return weights_mismatch(meta["base_weights"], loaded)
    # An edit from before base_weights: compare what it recorded where that can be compared. An SPM adapter's
    # adapter.json holds its denoiser's norms, comparable in any precision. The old base_fingerprint summed the
    # text encoder's and denoiser's weights to 7 digits in the precision the edit was made in: recomputed only when
    # both are still the loaded ones, held in that precision or in fp32 (cast down exactly). Otherwise only the
    # family above was comparable, and the edit loads.
    if ADAPTER in meta["components"]:
        from .lora_adapters import ADAPTER_INFO

        info = read_json(path / ADAPTER / ADAPTER_INFO, "re-run the erase that made it")
        if isinstance(info, dict) and "base" in info:
            return record_mismatch(info["base"], base_norms(loaded)[loaded.family.denoiser], "the denoiser")
    from .precision import PRECISIONS

    dtype = PRECISIONS.get(str((meta.get("training") or {}).get("precision")))
    fingerprint = meta.get("base_fingerprint")
    untouched = not replaced_components(loaded) & {"text_encoder", loaded.family.denoiser}
    if dtype is not None and isinstance(fingerprint, str) and untouched and loaded.dtype in (dtype, torch.float32):
        if legacy_fingerprint(loaded, dtype) != fingerprint:
            return "its weights differ from the ones it records"
    return None


def check_edits(loaded: LoadedPipeline, paths: list[str | Path], allow_other_base: bool = False) -> list[dict]:
    """Each edit of `paths` read and checked against `loaded` before any of them loads: made for this base model
    (unless `allow_other_base`) and holding finite weights (a FailedEdit otherwise). apply_edits starts with it;
    a command that draws images before it loads edits (the attack's targets) calls it first."""
    metadata = []
    for path in paths:
        meta = read_edit(path)
        check_base(loaded, meta, path, allow_other_base)
        found = nonfinite_weights(Path(path), meta["components"])
        if found is not None:
            raise nonfinite_error(f"edit {path}'s {found[0]}", found[1],
                                  "re-run the erase that made it (a smaller lr)")
        metadata.append(meta)
    return metadata


def apply_edits(loaded: LoadedPipeline, paths: list[str | Path], allow_other_base: bool = False) -> list[dict]:
    """Load one or more edits onto a base pipeline, each checked first (check_edits: its base model, unless
    `allow_other_base`, and finite weights). Edits stack when they touch different components (a text-encoder
    edit with a UNet edit); two edits of the same component are refused. Weights load first; then the edits whose
    method loads them itself (an SPM adapter, SLD's guidance: the registry entry's `apply`), in the order given, so
    that they act on the edited weights; a chain (erasers.chains) carries its ancestors' weights and installs their
    guidance before its own."""
    from .chains import chain_installers
    from .registry import available_methods

    applied: dict[str, str] = {}
    installers = []
    metadata = check_edits(loaded, paths, allow_other_base)
    for path, meta in zip(paths, metadata):
        entry = available_methods().get(meta.get("method"))  # an edit of a since-renamed method loads its weights
        apply = entry.apply if entry is not None else None
        if apply is None and ADAPTER in meta["components"]:
            raise UsageError(f"{path} holds an adapter but names no method that loads one; re-run the erase")
        for component in meta["components"]:
            if component == ADAPTER:
                continue
            if component in applied:
                raise UsageError(f"{path} and {applied[component]} both edit the {component}; stack edits of "
                                 "different components (for example a text-encoder edit with a UNet edit)")
            loaded.load_component(component, path, subfolder=component)
            applied[component] = str(path)
        installers += chain_installers(Path(path), meta, apply)  # a chain's training-free ancestors first
    for apply, path, meta in installers:
        apply(loaded, path, meta)
    return metadata
