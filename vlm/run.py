"""The VLM side as library calls: erase a concept and save the edit (an interrupted training run resumes from
`OUT.partial/` when the same call is made again); ask a question with and without an edit.

    from vlm.run import erase, ask_before_after
    erase("toy-vlm", "sauce", "star", "runs/vlm-no-star")
    ask_before_after("toy-vlm", "runs/vlm-no-star", image, "What object is in this image?")
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from PIL import Image

from erasers.core import check_new_output, run_resumably
from erasers.images import open_image as open_image  # vlm.commands and the app read images through it
from erasers.outputs import RunDirectory

from .edits import applied, check_applies, save_vlm_edit, vlm_base_weights, vlm_edit_metadata
from .models import TOY_VLM, LoadedVLM, ask, load_vlm
from .registry import build_vlm_config, get_vlm_method
from .targets import resolve_target


def erase_loaded(loaded: LoadedVLM, method: str, concept: str, out: str | Path, options: dict | None = None,
                 data: str | Path | None = None, restart: bool = False, config=None) -> Path:
    """Erase `concept` from an already loaded VLM with `method` and save the edit to `out`; the loaded model is
    left as it was (LoRA layers are removed again after saving). `config`: the method's config when the caller
    has built it from `options` already."""
    config = config or build_vlm_config(method, loaded.is_toy, options)
    target = resolve_target(concept, data)
    out = check_new_output(Path(out))

    def save(content, cost: dict) -> Path:
        try:
            return save_vlm_edit(out, content, vlm_edit_metadata(loaded, method, config, concept, target.source), cost)
        finally:
            if content.adapter is not None:
                content.adapter.unload()

    with RunDirectory(out) as run:
        return run_resumably(run, vlm_run_signature(loaded, method, config, concept, data), restart, loaded.device,
                             lambda work_dir: get_vlm_method(method).eraser(config).erase(loaded, target, work_dir),
                             save)


def vlm_run_signature(loaded: LoadedVLM, method: str, config, concept: str, data) -> dict:
    """What makes two erase runs the same run: an interrupted one resumes only from its own checkpoints."""
    return {"method": method, "config": asdict(config), "concept": concept, "data": str(data or ""),
            "base": vlm_base_weights(loaded)}


def erase(model: str, method: str, concept: str, out: str | Path, options: dict | None = None,
          data: str | Path | None = None, device: str | None = None, restart: bool = False,
          precision: str | None = None) -> Path:
    """Erase `concept` from `model` held in `precision` (vlm.models.vlm_dtype; default "auto"); an interrupted run
    of the same call resumes from `out`.partial unless `restart`."""
    config = build_vlm_config(method, model == TOY_VLM, options)  # once, and before a slow model load
    check_new_output(Path(out))
    # So do an unknown concept and data the method cannot train on.
    get_vlm_method(method).eraser(config).check_target(resolve_target(concept, data))
    loaded = load_vlm(model, device=device, precision=precision)
    return erase_loaded(loaded, method, concept, out, options, data, restart, config)


def ask_before_after(loaded: LoadedVLM, edit: str | Path | None, image: Image.Image | None, question: str,
                     max_new_tokens: int = 50) -> tuple[str, str | None]:
    """The base model's answer and, with `edit`, the edited model's."""
    check_applies(loaded, edit)  # an edit that does not fit fails before the base answer is computed
    before = ask(loaded, image, question, max_new_tokens)
    if edit is None:
        return before, None
    with applied(loaded, edit):
        after = ask(loaded, image, question, max_new_tokens)
    return before, after
