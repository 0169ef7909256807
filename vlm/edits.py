"""Saving, reading and applying VLM edits.

    runs/vlm-no-star/
      erasure.json        method, config, concept, what the method chose (layers, features), base model, its family
                          and weights' record (erasers.fingerprint), versions, cost; "model_kind": "vlm"
      edit.safetensors    hook-applied edits: SAUCE's autoencoder and feature list, MLLMEraser's steering maps
      adapter/            LoRA edits (peft's save_pretrained): the fine-tuning baselines

Written to a temporary directory and renamed (erasers.files). `applied(loaded, path)` applies an edit for the
duration of a `with` block: hooks on the decoder layers, or the LoRA adapter injected and unloaded afterwards, so
the same loaded model answers as the base outside the block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from erasers.core import check_new_output
from erasers.edits import METADATA, check_metadata_fields, model_kind, other_base, publish_with_metadata
from erasers.errors import UsageError
from erasers.files import read_json, writing_into
from erasers.fingerprint import compact, record_mismatch, weight_norms
from erasers.inputs import check_input
from erasers.validation import check_field

from .hooks import hook_layers
from .models import LoadedVLM

TENSORS = "edit.safetensors"
ADAPTER = "adapter"


def text_config(loaded: LoadedVLM):
    return getattr(loaded.model.config, "text_config", loaded.model.config)


# model -> weight_norms as first asked for, held weakly as the model is.
_BASE_NORMS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def vlm_base_norms(loaded: LoadedVLM) -> dict[str, list]:
    """name -> [shape, norm] of every parameter of the model (erasers.fingerprint.weight_norms), taken the first
    time it is asked for: an erase asks before it trains, and a LoRA's own weights are left out of the record."""
    if loaded.model not in _BASE_NORMS:
        _BASE_NORMS[loaded.model] = weight_norms(loaded.model)
    return _BASE_NORMS[loaded.model]


def vlm_base_weights(loaded: LoadedVLM) -> dict:
    """What a VLM edit records as `base_weights`: the diffusion edits' record (layout and norms) of the whole
    model, the same in any precision, so an edit made in bf16 loads onto the model held in fp32."""
    return {"model": compact(vlm_base_norms(loaded))}


def legacy_vlm_fingerprint(loaded: LoadedVLM, dtype: torch.dtype) -> str:
    """The `base_fingerprint` VLM edits recorded before `base_weights`: the text config's sizes and the token
    embedding's sum in the precision the model was held in (`dtype`), recomputed from this model's weights."""
    text = text_config(loaded)
    embedding = loaded.model.get_input_embeddings().weight.detach().to(dtype)
    digest = hashlib.sha256(f"{loaded.family.name}{text.hidden_size}{text.num_hidden_layers}{text.vocab_size}"
                            f"{float(embedding.double().sum()):.6e}".encode())
    return digest.hexdigest()[:16]


def base_mismatch(loaded: LoadedVLM, metadata: dict) -> str | None:
    """How `loaded` differs from the base model a VLM edit's erasure.json records, or None."""
    if metadata["base_family"] != loaded.family.name:
        return f"{metadata['base_family']} family; this model is {loaded.family.name}"
    if "base_weights" in metadata:
        record = metadata["base_weights"].get("model")
        return record_mismatch(record, vlm_base_norms(loaded), "this model")
    # An edit from before base_weights: its fingerprint summed the embedding in the precision the model was held
    # in, which it does not name. A model held in fp32 recomputes it in fp32, fp16 and bf16 (cast down exactly as a
    # load in that precision would); one held in a lower precision cannot recover the others' sums, so there only
    # the family above is compared, and the edit loads.
    if next(loaded.model.parameters()).dtype != torch.float32:
        return None
    fingerprint = metadata["base_fingerprint"]
    if any(legacy_vlm_fingerprint(loaded, dtype) == fingerprint for dtype in (torch.float32, torch.float16,
                                                                              torch.bfloat16)):
        return None
    return "its weights differ from the ones it records"


def vlm_edit_metadata(loaded: LoadedVLM, method: str, config, concept: str, target_source: str = "") -> dict:
    """What erasure.json says of a VLM edit beside its files, cost and versions."""
    return {"model_kind": "vlm", "method": method, "config": dataclasses.asdict(config), "concept": concept,
            "concept_source": target_source, "base_model": loaded.source, "base_family": loaded.family.name,
            "base_weights": vlm_base_weights(loaded), "precision": loaded.precision}


def save_vlm_edit(out: str | Path, content, metadata: dict, cost: dict | None = None) -> Path:
    """An eraser's EditContent (hook tensors and/or a LoRA adapter) plus erasure.json, written under a temporary name
    and renamed to `out`."""
    out = check_new_output(Path(out))
    with writing_into(out) as tmp:  # a full disk: one line, nothing left beside `out`
        return _write_vlm_edit(tmp, out, content, metadata, cost)


def _write_vlm_edit(tmp: Path, out: Path, content, metadata: dict, cost: dict | None) -> Path:
    from safetensors.torch import save_file

    if content.tensors:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in content.tensors.items()}, tmp / TENSORS)
    if content.adapter is not None:
        content.adapter.save_pretrained(tmp / ADAPTER)
    files = sorted([TENSORS] * bool(content.tensors) + [ADAPTER] * (content.adapter is not None))
    return publish_with_metadata(tmp, out, {**metadata, "info": content.info, "files": files}, cost or {})


# The fields commands read from a VLM edit's erasure.json, and their JSON types; the base's record is base_weights
# (base_fingerprint in edits made before it).
VLM_EDIT_FIELDS = {"method": "text", "concept": "text", "files": "names+", "config": "object", "info": "object",
                   "base_model": "text", "base_family": "text"}
VLM_BASE_RECORDS = {"base_weights": "object", "base_fingerprint": "text"}


def read_vlm_edit(path: str | Path) -> dict:
    path = check_input(path, "edit", "pass the --out directory of `erasure vlm erase`", want_dir=True)
    metadata_file = path / METADATA
    if not metadata_file.exists():
        raise UsageError(f"{path} is not an edit (no {METADATA}); pass the --out directory of `erasure vlm erase`")
    metadata = read_json(metadata_file, "re-run the erase that made it")
    if model_kind(metadata, metadata_file) != "vlm":
        raise UsageError(f"{path} is a diffusion-model edit; VLM commands take edits of `erasure vlm erase`")
    check_metadata_fields(metadata_file, metadata, VLM_EDIT_FIELDS, VLM_BASE_RECORDS)
    if not VLM_BASE_RECORDS.keys() & metadata.keys():
        check_metadata_fields(metadata_file, metadata, {"base_weights": "object"})  # says it is missing
    method = metadata["method"]
    for name in metadata["files"]:
        if name not in (TENSORS, ADAPTER):
            raise UsageError(f"{metadata_file} lists a file {name!r}; VLM edits hold {TENSORS} and/or {ADAPTER}: "
                             "re-run the erase that made it")
        if not (path / name).exists():
            raise UsageError(f"edit {path} lists {name} but lacks it; re-run the erase that made it")
    from .registry import get_vlm_method

    check_edit_config(get_vlm_method(method).eraser.config_class, metadata["config"], metadata_file)
    return metadata


def check_edit_config(config_class: type, config: dict, metadata_file: Path) -> None:
    """The recorded config's values of the method's fields, by the rules its options are checked by (a `k` that is
    text, a negative count); fields a later version dropped are let through."""
    try:
        for field in dataclasses.fields(config_class):
            if field.name in config:
                check_field("its config", field, config[field.name], noun="field")
    except UsageError as error:
        raise UsageError(f"{metadata_file}: {error}; the file is corrupt or was edited by hand: re-run the erase "
                         "that made it") from None


def edit_layer(loaded: LoadedVLM, value, name: str) -> int:
    """`value` (an edit's recorded layer) if it is a decoder layer of `loaded` (negative: from the last)."""
    count = len(loaded.layers)
    if not isinstance(value, int) or isinstance(value, bool) or not -count <= value < count:
        raise UsageError(f"its info's {name} is {json.dumps(value)[:40]}, not a decoder layer of this model "
                         f"(0 to {count - 1})")
    return value


def edit_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    """The edit's tensor `name`, which must have `shape` (None: any size) and finite values."""
    tensor = tensors.get(name)
    if tensor is None:
        raise UsageError(f"its {TENSORS} lacks {name}")
    if tensor.dim() != len(shape) or any(want not in (None, got) for want, got in zip(shape, tensor.shape)):
        wanted = "(" + ", ".join("any" if n is None else str(n) for n in shape) + ")"
        raise UsageError(f"its {name} has shape {tuple(tensor.shape)}, but this model needs {wanted}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise UsageError(f"its {name} holds non-finite values (NaN or inf)")
    return tensor


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path / TENSORS)
    except (SafetensorError, OSError, ValueError) as error:
        raise UsageError(f"{path / TENSORS} is corrupt ({str(error).splitlines()[0]}); re-run the erase that "
                         "made it") from None


def check_base(loaded: LoadedVLM, metadata: dict, path: Path) -> None:
    """An edit made for another base model (its family, or its recorded weights) is refused in the one line a
    diffusion edit gets (erasers.edits.other_base), unless the model was loaded with `allow_other_base`."""
    why = base_mismatch(loaded, metadata)
    if why is not None:
        other_base(path, metadata.get("base_model"), loaded.source, why, loaded.allow_other_base, loaded.model)


@contextmanager
def applied(loaded: LoadedVLM, path: str | Path | None):
    """Within the block, `loaded` answers with the edit at `path` applied (None: unchanged)."""
    if path is None:
        yield None
        return
    path = Path(path)
    metadata = read_vlm_edit(path)
    check_base(loaded, metadata, path)
    if ADAPTER in metadata["files"]:
        wrapped = load_adapter(loaded, path)
        try:
            yield metadata
        finally:
            # Removes the LoRA layers again (without merging): `loaded.model` is the base model after the block.
            wrapped.unload()
        return
    from .registry import get_vlm_method

    tensors = load_tensors(path)
    eraser = get_vlm_method(metadata["method"]).eraser
    try:
        eraser.check_edit(loaded, tensors, metadata["config"], metadata["info"])
    except UsageError as error:
        raise UsageError(f"edit {path} does not fit this model or is damaged: {error}; re-run the erase that made "
                         "it") from None
    try:
        edits = eraser.layer_edits(loaded, tensors, metadata["config"], metadata["info"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
        raise UsageError(f"{path / TENSORS} does not fit this model ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}); re-run the erase") from None
    watch = edits.pop("input_ids", None)  # registry.VLMEraser.layer_edits: a reader of the prompt's token ids
    with hook_layers(loaded.model, edit=edits, watch_input_ids=watch):
        yield metadata


def load_adapter(loaded: LoadedVLM, path: Path):
    """A LoRA edit's adapter (named "default") injected into `loaded.model`: the peft model, whose `unload()` takes
    it out again."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(loaded.model, path / ADAPTER)
    except Exception as error:  # noqa: BLE001 - one line instead of peft's traceback
        raise UsageError(f"could not load the adapter in {path}: {str(error).splitlines()[0]}; re-run the "
                         "erase that made it") from None


def check_applies(loaded: LoadedVLM, path: str | Path | None) -> None:
    """Apply the edit at `path` to `loaded` and take it off again, so that an edit that does not fit (another
    model, damaged tensors or info) fails before a long evaluation of the base model rather than after it."""
    with applied(loaded, path):
        pass
