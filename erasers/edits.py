"""Saving and loading edits: the edited components in diffusers/transformers format plus `erasure.json`.

    runs/no-star/
      unet/ or text_encoder/   loads with plain `from_pretrained`
      erasure.json             method, config, concepts, base model and its fingerprint, package version, cost
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .core import check_new_output
from .errors import UsageError
from .files import publish, read_json, writing_into
from .inputs import check_input
from .models import LoadedPipeline
from .prompts import EraseRequest

METADATA = "erasure.json"


def base_fingerprint(loaded: LoadedPipeline) -> str:
    """A cheap fingerprint of the base model's text encoder and denoiser weights (shapes and sums), to tell later
    which model an edit was made from."""
    digest = hashlib.sha256()
    for module in (loaded.text_encoder, loaded.denoiser):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}{tuple(tensor.shape)}{float(tensor.double().sum()):.6e}".encode())
    return digest.hexdigest()[:16]


def edit_metadata(loaded: LoadedPipeline, method: str, config, request: EraseRequest, fingerprint: str) -> dict:
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
        "base_fingerprint": fingerprint,
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
    publish(tmp, out)
    return out


def check_finite(module: nn.Module, what: str, remedy: str) -> None:
    """A UsageError when `module` holds a NaN or infinite weight: its images would be black or noise, which a
    classifier scores as the concept erased."""
    for name, parameter in module.named_parameters():
        if not torch.isfinite(parameter).all():
            raise UsageError(f"{what} holds non-finite weights (NaN or inf, first in {name}): a failed erase, not an "
                             f"erasure; {remedy}")


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
EDIT_OPTIONAL_FIELDS = {"method": "text", "config": "object", "anchors": "names", "preserve": "names",
                        "training": "object", "cost": "object"}
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


def apply_edits(loaded: LoadedPipeline, paths: list[str | Path]) -> list[dict]:
    """Load one or more edits onto a base pipeline. Edits stack when they touch different components (a
    text-encoder edit with a UNet edit); two edits of the same component are refused. Weights load first; then the
    edits whose method loads them itself (an SPM adapter, SLD's guidance: the registry entry's `apply`), in the
    order given, so that they act on the edited weights."""
    from .registry import available_methods

    applied: dict[str, str] = {}
    metadata = []
    installers = []
    for path in paths:
        meta = read_edit(path)
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
            module = loaded.load_component(component, path, subfolder=component)
            check_finite(module, f"edit {path}'s {component}", "re-run the erase that made it (a smaller lr)")
            applied[component] = str(path)
        if apply is not None:
            installers.append((apply, Path(path), meta))
        metadata.append(meta)
    for apply, path, meta in installers:
        apply(loaded, path, meta)
    return metadata
