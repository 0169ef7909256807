"""The app's VLM tab: an image and a question, answered by the base VLM and by an edited one, side by side.

The VLM ("toy-vlm" unless `ERASURE_APP_VLM` names another) loads on the first question; the edits on offer are the
VLM edits (erasure.json with "model_kind": "vlm") in the app's edits folder. Errors become page messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from erasers.errors import UsageError

MAX_QUESTION = 500


def vlm_edits(edits_dir: Path | None) -> dict[str, Path]:
    """The VLM edits in `edits_dir`; others, and damaged ones (unreadable erasure.json, wrong fields), are left
    out."""
    from vlm.edits import read_vlm_edit

    found = {}
    if edits_dir and edits_dir.is_dir():
        for path in sorted(edits_dir.iterdir()):
            if not (path / "erasure.json").is_file():
                continue
            try:
                read_vlm_edit(path)
            except UsageError:
                continue
            found[path.name] = path
    return found


@dataclass
class VLMState:
    model: str
    edits_dir: Path | None
    loaded: object = None
    cache: dict = field(default_factory=dict)
    allow_other_base: bool = False  # `erasure app --allow-other-base`: edits made for another base model apply too

    def vlm(self):
        if self.loaded is None:
            from vlm.models import load_vlm

            self.loaded = load_vlm(self.model)
            self.loaded.allow_other_base = self.allow_other_base
        return self.loaded


def answer_pair(state: VLMState, image, question: str, edit_name: str | None) -> tuple[str, str]:
    """(base answer, edited answer) to `question` about `image` (a PIL image or None)."""
    from vlm.run import ask_before_after

    try:
        question = (question or "").strip()
        if not question:
            raise UsageError("type a question, e.g. 'What object is in this image?'")
        if len(question) > MAX_QUESTION:
            raise UsageError(f"the question is longer than {MAX_QUESTION} characters")
        edit = None
        if edit_name:
            edits = vlm_edits(state.edits_dir)
            if edit_name not in edits:
                raise UsageError(f"VLM edit {edit_name!r} is not in {state.edits_dir}; refresh the page")
            edit = edits[edit_name]
        picture = image.convert("RGB") if image is not None else None
        before, after = ask_before_after(state.vlm(), edit, picture, question)
        return before, after if after is not None else "(choose an edit)"
    except UsageError as error:
        raise gr.Error(str(error)) from None


def example_image():
    import numpy as np

    from benchmarks.toycanvas.render import render, sample_scene

    return render(sample_scene(np.random.default_rng(0), "star", "Flat", count=1))


def vlm_tab(state) -> None:
    vlm_state = VLMState(os.environ.get("ERASURE_APP_VLM", "toy-vlm"), getattr(state, "edits_dir", None),
                         allow_other_base=getattr(state, "allow_other_base", False))
    with gr.Tab("VLM"):
        names = list(vlm_edits(vlm_state.edits_dir))
        with gr.Row():
            image = gr.Image(value=example_image(), type="pil", label="Image (leave empty for a text question)",
                             format="png", height=256)
            with gr.Column():
                question = gr.Textbox(label="Question", value="What object is in this image?")
                edit = gr.Dropdown(names, value=names[0] if names else None, label="VLM edit")
                run = gr.Button("Ask both", variant="primary")
        with gr.Row():
            base = gr.Textbox(label=f"Base ({vlm_state.model})")
            edited = gr.Textbox(label="Edited")
        run.click(lambda *a: answer_pair(vlm_state, *a), [image, question, edit], [base, edited], api_name="ask_vlm")
