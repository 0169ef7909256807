"""The main job as a library call: erase concepts from a diffusion pipeline and save the edit.

    from erasers.run import erase
    erase("path/to/sd", "uce", ["Van Gogh"], "runs/no-van-gogh", device="cuda", precision="bf16")
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .chains import BaseEdit
from .core import check_new_output, run_resumably
from .edits import base_fingerprint, edit_metadata, save_edit
from .errors import UsageError
from .files import plain_json
from .inputs import IMAGE_SIDE
from .models import is_toy_model, load_pipeline, resolve_device
from .outputs import RunDirectory
from .precision import TrainingOptions, autocast, check_precision, default_precision
from .prompts import check_contradictions, make_request
from .registry import build_config, check_request_options, get_method


@dataclass
class EraseSpec:
    """One erase: `method` removes `concepts` from `model` (a directory, hub id or registered name) into `out`.
    `precision` (fp32, fp16, bf16; default bf16 on a CUDA GPU that supports it, fp32 on CPU),
    `gradient_checkpointing` and `optimizer` (adam, adam8bit) are erasers.precision's options; `resolution` is the
    training resolution in pixels (default: the model's native one); an interrupted run resumes from
    `out`.partial unless `restart`. With `base_edit` the erase continues from that edit (erasers.chains;
    `allow_other_base` takes one made for another base model)."""

    model: str
    method: str
    concepts: list[str]
    out: Path
    anchors: list[str] = field(default_factory=list)
    preserve: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    device: str | None = None
    precision: str | None = None
    gradient_checkpointing: bool = False
    optimizer: str = "adam"
    resolution: int | None = None
    restart: bool = False
    # An edit to continue from (erasers.chains): loaded first, the new edit holds the chain.
    base_edit: Path | None = None
    allow_other_base: bool = False


def erase(model: str, method: str, concepts: list[str], out: str | Path, **settings) -> Path:
    """Erase `concepts` from `model` with `method` and save the edit to `out`; `settings` are EraseSpec's other
    fields (options, device, precision, ...)."""
    return erase_spec(EraseSpec(model, method, list(concepts), Path(out), **settings))


def erase_spec(spec: EraseSpec) -> Path:
    """Validate everything that can be checked before the model loads (config, output, device, precision,
    resolution), load, let the eraser check its own resources, then erase resumably and save."""
    config = build_config(spec.method, is_toy_model(spec.model), spec.options)
    check_training_options(spec)
    check_request_options(spec.method, spec.anchors, spec.preserve)
    check_contradictions(spec.concepts, spec.anchors, spec.preserve)  # again with the vocabulary's names later
    base_edit = BaseEdit.read(spec.base_edit) if spec.base_edit is not None else None
    out = check_new_output(spec.out)
    device = resolve_device(spec.device)
    training = TrainingOptions(spec.precision or default_precision(device), spec.gradient_checkpointing,
                               spec.optimizer)
    check_precision(training.precision, device)
    if spec.resolution is not None:
        IMAGE_SIDE.check(spec.resolution, "--resolution")
    with RunDirectory(out) as run:  # a second run on the same --out refuses before loading a model
        return _erase_loaded(spec, run, config, training, device, base_edit)


def check_training_options(spec: EraseSpec) -> None:
    """A training-free method (SLD, negative prompts) asked for training options is a mistake, not a no-op."""
    if get_method(spec.method).trains:
        return
    asked = [flag for flag, given in (("--gradient-checkpointing", spec.gradient_checkpointing),
                                      ("--optimizer", spec.optimizer != "adam"),
                                      ("--resolution", spec.resolution is not None)) if given]
    if asked:
        raise UsageError(f"{spec.method} is training-free: it trains nothing, so {', '.join(asked)} does not apply; "
                         "drop it (the edit acts when images are generated)")


def _erase_loaded(spec: EraseSpec, run: RunDirectory, config, training: TrainingOptions, device: str,
                  base_edit: BaseEdit | None = None) -> Path:
    entry = get_method(spec.method)
    loaded = load_pipeline(spec.model, device=device, dtype=training.dtype)
    if loaded.family.name not in entry.families:
        raise UsageError(f"{spec.method} does not apply to {loaded.family.name} pipelines ({loaded.source}); it "
                         f"edits {', '.join(entry.families)}")
    loaded.training, loaded.resolution = training, spec.resolution
    if base_edit is not None:  # before the fingerprint, which still records the base's weights
        base_edit.load_onto(loaded, spec.allow_other_base)
    request = make_request(spec.concepts, loaded.tokenizer, loaded.vocabulary, spec.anchors, spec.preserve)
    if base_edit is not None:
        base_edit.check_request(request)
    eraser = entry.eraser(config)
    eraser.check(loaded, request)
    fingerprint = base_fingerprint(loaded)
    signature = run_signature(spec.method, config, request, fingerprint, training, spec.resolution)
    if base_edit is not None:  # a changed parent is another run: its checkpoints are not resumed
        signature["base_edit"] = base_edit.records

    def work(work_dir: Path):
        with autocast(loaded):
            return eraser.erase(loaded, request, work_dir)

    def save(components, cost: dict) -> Path:
        metadata = edit_metadata(loaded, spec.method, config, request, fingerprint)
        if base_edit is not None:
            components, metadata = base_edit.link(components, metadata)
        return save_edit(spec.out, components, metadata, cost)

    return run_resumably(run, signature, spec.restart, loaded.device, work, save)


def run_signature(method: str, config, request, fingerprint: dict, training: TrainingOptions | None = None,
                  resolution: int | None = None) -> dict:
    """What makes two erase runs the same run: an interrupted one resumes only from its own checkpoints. As JSON
    values (tuples as lists), so it compares equal to the run.json an interrupted run left."""
    return plain_json({"method": method, "config": asdict(config), "request": asdict(request), "base": fingerprint,
                       "training": asdict(training or TrainingOptions()), "resolution": resolution})
