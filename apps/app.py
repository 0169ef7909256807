"""The reviewers' Gradio app: the same prompt and seed through the base model and chosen edits, side by side.

    erasure app                                   # the toy pipeline, edits found under ./runs
    erasure app --model path/to/sd --edits runs   # any SD-family model and its edits

Tabs are built by the functions in `TABS`; a VLM tab (an image and a question, base and edited answers side by
side) is one more function there. Handlers turn every error into a message on the page (gr.Error).

`erasure app` writes only under `--output`: it points gradio's, tempfile's, onnxruntime's, matplotlib's and
torch's folders there before any of them is imported (apps.cli.confine_app_writes). Code that imports this module
itself should call that first: gradio reads its temporary folder when it is imported.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from erasers.edits import apply_edits, edit_kind, read_edit
from erasers.errors import UsageError
from erasers.files import check_output_path
from erasers.images import BLANK, check_drawn
from erasers.inputs import GUIDANCE, SEED, STEPS
from erasers.models import LoadedPipeline, check_prompts, load_pipeline
from erasers.registry import available_methods


@dataclass
class AppState:
    """The base model, the edits on offer, and pipelines with edits applied (loaded on first use)."""

    model: str
    edits_dir: Path | None
    classifier: object | None = None
    pipelines: dict[tuple[str, ...], LoadedPipeline] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    # Edits that failed to load (made for another base model, non-finite weights): left out of the page, with why.
    unusable: dict[str, str] = field(default_factory=dict)
    allow_other_base: bool = False

    def edits(self) -> dict[str, Path]:
        """The diffusion edits in `edits_dir`; VLM edits belong to the VLM tab, and a damaged edit (unreadable
        erasure.json, wrong field types) is left out (`skipped_edits` says why) rather than breaking the page."""
        found, self.skipped = {}, {}
        if not self.edits_dir or not self.edits_dir.is_dir():
            return found
        for path in sorted(self.edits_dir.iterdir()):
            if not (path / "erasure.json").exists() or edit_kind(path) == "vlm":
                continue
            if path.name in self.unusable:
                self.skipped[path.name] = self.unusable[path.name]
                continue
            try:
                read_edit(path)
            except UsageError as error:
                self.skipped[path.name] = str(error)
                continue
            found[path.name] = path
        return found

    def pipeline(self, edit_names: tuple[str, ...] = ()) -> LoadedPipeline:
        if edit_names not in self.pipelines:
            available = self.edits()
            missing = [name for name in edit_names if name not in available]
            if missing:
                raise UsageError(f"edit {missing[0]!r} is not in {self.edits_dir}; refresh the page")
            loaded = load_pipeline(self.model)
            apply_edits(loaded, [available[name] for name in edit_names], self.allow_other_base)
            if len(self.pipelines) >= 6:  # keep memory bounded: drop the oldest edited pipeline
                oldest = next(k for k in self.pipelines if k)
                del self.pipelines[oldest]
            self.pipelines[edit_names] = loaded
        return self.pipelines[edit_names]

    def describe(self, edit_name: str) -> str:
        meta = read_edit(self.edits()[edit_name])
        method = meta.get("method", "an edit")
        entry = available_methods().get(method)  # the registry's summary says what the method edits
        return f"{edit_name}: {method} erasing {', '.join(meta['concepts'])}" + (f" ({entry.summary})" if entry else "")


def _check_inputs(prompt: str, seed, steps, guidance) -> tuple[int, int, float]:
    check_prompts([prompt or ""])
    try:
        seed, steps, guidance = int(seed), int(steps), float(guidance)
    except (TypeError, ValueError):
        raise UsageError("seed and steps must be whole numbers and guidance a number") from None
    return SEED.check(seed, "seed"), STEPS.check(steps, "steps"), GUIDANCE.check(guidance, "guidance")


def _readout(state: AppState, image) -> str:
    """The classifier's reading of `image`, or why there is none: a blank image is a failed edit, not an erasure."""
    if image.info.get(BLANK):
        return f" | failed: a blank image ({image.info[BLANK]}), not an erasure; no classifier reading"
    if state.classifier is None:
        return ""
    objects, styles = state.classifier.predict([image])
    return f" | classifier: {objects[0]} / {styles[0]}"


def _scale(image, factor: int):
    from PIL import Image

    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def side_by_side(state: AppState, prompt: str, seed, steps, guidance, chosen: list[str] | None, stack: bool,
                 progress=gr.Progress(track_tqdm=True)):
    """Base, each chosen edit, and (when asked) all chosen edits stacked: one image each, same prompt and seed."""
    try:
        seed, steps, guidance = _check_inputs(prompt, seed, steps, guidance)
        variants: list[tuple[str, tuple[str, ...]]] = [("base", ())]
        variants += [(state.describe(name), (name,)) for name in chosen or []]
        if stack and chosen and len(chosen) > 1:
            variants.append((f"stack: {' + '.join(chosen)}", tuple(chosen)))
        gallery = []
        for label, names in progress.tqdm(variants, desc="generating"):
            loaded = state.pipeline(names)
            image = loaded.generate([prompt], seeds=[seed], steps=steps, guidance=guidance, progress=False)[0]
            factor = max(1, 256 // image.width)
            gallery.append((_scale(image, factor), label + _readout(state, image)))
        return gallery
    except UsageError as error:
        raise gr.Error(str(error)) from None


def benchmark_grid(state: AppState, edit_name: str | None, seed, progress=gr.Progress(track_tqdm=True)):
    """The edit's concept prompts and as many unrelated ones, base above and edit below, with UA/IRA/CRA."""
    from benchmarks.figures import labelled_grid
    from benchmarks.unlearncanvas import AnswerSet, classify_answer_set, score

    try:
        if not edit_name:
            raise UsageError("choose an edit first")
        if state.classifier is None:
            raise UsageError("the gallery scores edits with the ToyCanvas classifier; it runs on the toy model")
        seed = _check_inputs("gallery", seed, 1, 0)[0]
        if edit_name not in state.edits():
            raise UsageError(f"edit {edit_name!r} is not in {state.edits_dir}; refresh the page")
        meta = read_edit(state.edits()[edit_name])
        concept, kind = meta["concepts"][0], "style" if meta["kind"] == "style" else "object"
        answers = AnswerSet.for_concept(concept, kind, seeds=(seed,))
        base_records, base_images = classify_answer_set(state.pipeline(()), state.classifier, answers)
        check_drawn(base_images, f"the base model {state.model}", edited=False)
        records, images = classify_answer_set(state.pipeline((edit_name,)), state.classifier, answers)
        check_drawn(images, f"the edit {edit_name}")  # a failed edit: an error, no table of scores
        labels = [f"{o}/{s}" for o, s in answers.pairs]
        grid = labelled_grid(base_images + images, len(labels), ["base", "edited"], labels, scale=3)
        rows = [("base", score(base_records, meta["concepts"], kind)),
                ("edited", score(records, meta["concepts"], kind))]
        table = "| model | UA | IRA | CRA |\n|---|---|---|---|\n" + "\n".join(
            f"| {name} | {s['UA']:.0%} | {s['IRA']:.0%} | {s['CRA']:.0%} |" for name, s in rows)
        return grid, table
    except UsageError as error:
        raise gr.Error(str(error)) from None


def diffusion_tab(state: AppState):
    with gr.Tab("Diffusion"):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="A arrow image in Stripes style.", scale=3)
            seed = gr.Number(label="Seed", value=0, precision=0)
        with gr.Row():
            # The same limits as `erasure generate`'s (erasers.inputs): one set for the CLI and the app.
            steps = gr.Slider(STEPS.low, STEPS.high, value=25, step=1, label="Steps")
            guidance = gr.Slider(GUIDANCE.low, GUIDANCE.high, value=5.0, step=0.5, label="Guidance")
        names = list(state.edits())
        chosen = gr.CheckboxGroup(names, value=names[:2], label="Edits to compare with the base")
        stack = gr.Checkbox(label="Also show the chosen edits stacked", value=False)
        run = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(label="Same prompt and seed", columns=4, height="auto", format="png", elem_id="comparison")
        inputs = [prompt, seed, steps, guidance, chosen, stack]
        run.click(lambda *a: side_by_side(state, *a), inputs, gallery, api_name="generate")
        return inputs, gallery


def gallery_tab(state: AppState) -> None:
    with gr.Tab("Benchmark gallery"):
        names = list(state.edits())
        edit = gr.Dropdown(names, value=names[0] if names else None, label="Edit")
        seed = gr.Number(label="Seed", value=188, precision=0)
        run = gr.Button("Run the concept's benchmark prompts", variant="primary")
        grid = gr.Image(label="Before (top) / after (bottom)", format="png", type="pil")
        table = gr.Markdown()
        run.click(lambda *a: benchmark_grid(state, *a), [edit, seed], [grid, table], api_name="gallery")


from apps.vlm_tab import vlm_tab  # noqa: E402  (the VLM tab: base and edited answers side by side)

TABS = [diffusion_tab, gallery_tab, vlm_tab]


def build_app(model: str = "toy", edits_dir: str | Path | None = "runs", output_dir: str | Path = "app-output",
              generate_on_load: bool = True, allow_other_base: bool = False) -> gr.Blocks:
    output_dir = check_output_path(Path(output_dir).resolve(), "--output")
    output_dir.mkdir(parents=True, exist_ok=True)
    # Gradio writes every image it serves to its cache, whose folder it reads per image: keep it in our output
    # folder even when the caller imported gradio before confine_app_writes could run.
    os.environ["GRADIO_TEMP_DIR"] = str(output_dir / "cache")
    state = AppState(model, Path(edits_dir) if edits_dir else None, allow_other_base=allow_other_base)
    base = state.pipeline(())
    if base.is_toy:
        from benchmarks.toycanvas import CLASSIFIER_DIR
        from benchmarks.toycanvas.classifier import ToyClassifier

        state.classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)
    # Load the edits the page opens with now, so the first comparison is ready when a browser asks for it. One
    # that cannot load (made for another base model, non-finite weights) is left out, as a damaged one is.
    for name in list(state.edits())[:2]:
        try:
            state.pipeline((name,))
        except UsageError as error:
            state.unusable[name] = str(error)
    state.edits()  # the skipped edits, with those that did not load
    for name, reason in state.skipped.items():
        print(f"erasure: skipping the edit {name}: {reason}", file=sys.stderr)
    with gr.Blocks(title="erasure-suite: before / after") as app:
        gr.Markdown(f"## erasure-suite — base vs edits\nModel: `{model}`; edits from `{edits_dir}`.")
        first = None
        for build_tab in TABS:
            built = build_tab(state)
            first = first or built
        if generate_on_load and first:
            # Reviewers open the page to a first comparison, not to an empty gallery.
            inputs, gallery = first
            app.load(lambda *a: side_by_side(state, *a), inputs, gallery)
    return app


def launch(model: str = "toy", edits_dir: str | None = "runs", output_dir: str = "app-output",
           host: str = "127.0.0.1", port: int = 7860, allow_other_base: bool = False, **kwargs):
    app = build_app(model, edits_dir, output_dir, allow_other_base=allow_other_base)
    return app.launch(server_name=host, server_port=port, **kwargs)
