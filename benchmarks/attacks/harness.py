"""The run every attack shares (`erasure attack --attack NAME`, `run_attack`):

 1. inputs checked before any model loads: the edits (and that the attack applies to them: benchmarks.attacks
    check_applies), the judge, the prompts, the attack's options and what it needs of the machine
    (`Attack.check_environment`: the quantize attack's backend), --out;
 2. the base model loads; the attack checks what needs the tokenizers (`Attack.check`) and draws what it needs
    from the base model (`Attack.prepare`: UnlearnDiffAtk's and P4D's target images);
 3. the edits load (the base model's text encoders and denoiser stay at hand in `context.base`);
 4. each item in turn (`Attack.run_item`; by default the plain prompt on the edited model, judged, and only when
    it fails the attack's search, stopping at its first success), each finished item kept in OUT.partial/ so an
    interrupted run resumes where it stopped;
 5. the summary (`Attack.summarise`: Pre-ASR and ASR, or a curve), written in the one layout of results.py and
    recorded on each edit's model card.

Seeding: an item's images are drawn at its seed (--seed, rising by one per round over the prompts, or the CSV
row's); an attack's own randomness is seeded from its `seed` option and the item's seed (`item_generator`), so a
resumed run finishes as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from erasers.core import check_new_output
from erasers.edits import ADAPTER, apply_edits, check_edits, edit_kind, read_edit
from erasers.errors import UsageError
from erasers.images import check_drawn, drawn_images
from erasers.inputs import ATTACKED_PROMPTS, IMAGE_SIDE
from erasers.models import LoadedPipeline, is_toy_model, load_pipeline
from erasers.outputs import RunDirectory
from erasers.prompts import EraseRequest, make_request

from . import build_attack_config, check_applies, check_model_kinds, get_attack
from .judges import Judge, ToyJudge, judge_name, judge_reading
from .prompts import Item, PromptRow, check_seed_room, plan_items
from .results import ItemStore, Outcome, asr_summary, write_results


@dataclass
class AttackRun:
    """Where an attack runs and what it writes: the device, the images' resolution (None: the model's own),
    progress bars, and `out` for the results (None: nothing written); `allow_other_base` loads edits made for
    another base model; `restart` discards an interrupted run's items in OUT.partial/."""

    device: str | None = None
    out: str | Path | None = None
    progress: bool = True
    resolution: int | None = None
    allow_other_base: bool = False
    restart: bool = False


@dataclass
class BaseModel:
    """The base model's text encoders and denoiser as they were before the edits loaded, those the attack asks for
    (`Attack.needs_base`; None otherwise: a kept module holds its memory). Edits replace modules, so these are the
    originals; an edit that changes the denoiser in place, an adapter, gets a copy kept."""

    text_encoders: dict[str, torch.nn.Module] | None = None
    denoiser: torch.nn.Module | None = None


@dataclass
class Found:
    """What an attack's search found for one item: whether the judge accepted its image, the image, the prompt it
    came from, the judge's reading, and the attack's own details (tokens, losses...) for the item's record."""

    success: bool
    image: Any
    prompt: str
    reading: Any
    details: dict = field(default_factory=dict)


@dataclass
class AttackContext:
    """What an attack works with: the loaded pipeline (the base model in `prepare`, the edited one after), the
    concept (`request`), the judge, the edits, the base model's modules once the edits are in, and what `prepare`
    drew per item (`prepared[index]`; an image under "original" also goes into the results)."""

    loaded: LoadedPipeline
    request: EraseRequest
    judge: Judge
    edits: list[str]
    metadata: list[dict]
    progress: bool = True
    base: BaseModel | None = None
    prepared: dict[int, dict] = field(default_factory=dict)
    # OUT.partial/, taken on the first call (None when the run writes nothing): where an attack that trains keeps
    # its checkpoints (erasers.train.TrainingLoop's work_dir), so an interrupted run resumes its training too.
    work_dir: Callable[[], Path | None] = lambda: None

    @property
    def concept(self) -> str:
        return self.request.concept

    def verdict(self, image) -> tuple[bool, Any]:
        """The judge's (verdict, reading) on an image the edited model drew; a blank image is a failed edit, which
        the judge would read as the concept gone, so it stops the run instead of counting as "robust"."""
        check_drawn([image], f"the edited model ({', '.join(self.edits)})")
        return judge_reading(self.judge, image, self.concept)

    def generate(self, prompt: str, seed: int, guidance: float | None = None):
        """The pipeline's image of a plain prompt, as `generate_from_ids` draws it."""
        from erasers.adversarial import prompt_ids

        return generate_from_ids(self.loaded, prompt_ids(self.loaded, prompt, 0), seed, guidance)


def item_generator(config_seed: int, item_seed: int) -> torch.Generator:
    """An attack's random numbers for one item: the same for the item whatever ran before it (resumes)."""
    return torch.Generator().manual_seed((config_seed * 1_000_003 + item_seed) % 2 ** 64)


class Attack:
    """An attack (registered with benchmarks.attacks.register): built from its config; `run_attack` calls `check`,
    `prepare`, then `run_item` per item and `summarise`."""

    config_class: ClassVar[type]
    # What the search reads of the base model beside the edited one, kept in `context.base`: "text_encoders"
    # (Ring-A-Bell's own encoder), "denoiser" (P4D's target predictions).
    needs_base: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config):
        self.config = config
        # The last search's logged steps ({"step", "seconds", ...}, seconds since it started), which
        # benchmarks.step_cost times an attack's step from.
        self.history: list[dict] | None = None

    def plan(self, rows: list[PromptRow], count: int | None, seed: int) -> list[Item]:
        """The items to run, from the prompts (an attack whose items are not prompts, such as steps of a curve, plans
        its own: any frozen dataclass extending Item)."""
        return plan_items(rows, count, seed)

    def check_environment(self, device: str | None) -> None:
        """A UsageError for what this machine lacks (a library not installed, a GPU), before any model loads."""

    def check(self, loaded: LoadedPipeline, items: list[Item]) -> None:
        """A UsageError for what would fail later (prompts too long for the tokens to add), before any image."""

    def prepare(self, context: AttackContext, items: list[Item]) -> None:
        """With the base model, before the edits load, for the items still to run: fill `context.prepared`."""

    def run_item(self, context: AttackContext, item: Item) -> Outcome:
        """The plain prompt on the edited model, judged (Pre-ASR); only when it fails, the attack's `search`."""
        plain = context.generate(item.prompt, item.seed, item.guidance)
        success, reading = context.verdict(plain)
        record = {**item.record(), "pre_success": success, "attack_success": None, "success": success,
                  "final_prompt": item.prompt, "judge": reading}
        images = {"image": plain}
        original = context.prepared.get(item.index, {}).get("original")
        if original is not None:
            images["original"] = original
        if not success:
            found = self.search(context, item)
            record.update({**found.details, "attack_success": found.success, "success": found.success,
                           "final_prompt": found.prompt, "judge": found.reading})
            images.update(image=found.image, erased=plain)
        return Outcome(record, images)

    def search(self, context: AttackContext, item: Item) -> Found:
        raise NotImplementedError

    def loaded_pipelines(self) -> dict[str, LoadedPipeline]:
        """The pipelines `prepare` loaded beside the attacked one (quantize: one per level), by name."""
        return {}

    def summarise(self, records: list[dict]) -> dict:
        return asr_summary(records)


@torch.no_grad()
def generate_from_ids(loaded: LoadedPipeline, input_ids: dict[str, torch.Tensor], seed: int,
                      guidance: float | None = None):
    """One image for token ids (per text encoder), as `LoadedPipeline.generate` would draw it for the same prompt
    and seed (a blank one marked, erasers.images.drawn_images), at `guidance` (None: the model's)."""
    loaded.pipeline.set_progress_bar_config(disable=True)
    inputs = loaded.adapter.pipeline_inputs(loaded.adapter.encode_ids(input_ids), loaded.adapter.unconditional())
    drawn = loaded.pipeline(**inputs, generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np",
                            num_inference_steps=loaded.default_steps,
                            guidance_scale=loaded.default_guidance if guidance is None else guidance)
    return drawn_images(drawn.images)[0]


def draw_targets(context: AttackContext, items: list[Item]) -> None:
    """The base model's image of each item's prompt (at its seed and guidance) and that image's latent x_0, as the
    denoiser reads it: `prepared[index]["original"]` and `["target"]` (UnlearnDiffAtk's and P4D's targets)."""
    from tqdm.auto import tqdm

    from erasers.adversarial import prompt_ids

    loaded = context.loaded
    originals = [generate_from_ids(loaded, prompt_ids(loaded, item.prompt, 0), item.seed, item.guidance)
                 for item in tqdm(items, desc="targets", disable=not context.progress)]
    check_drawn(originals, f"the base model {loaded.source}", edited=False)
    for item, image in zip(items, originals):
        context.prepared.setdefault(item.index, {}).update(original=image, target=loaded.adapter.encode_image(image))


def run_attack(name: str, model: str, edits: list[str | Path], concept: str | None = None, *,
               prompts: list[str] | list[PromptRow] | None = None, count: int | None = None, seed: int = 188,
               config=None, judge: Judge | None = None, **run) -> dict:
    """Attack `name` against `edits` (stacked) on `model`: `count` items of `concept`'s prompts (the toy
    captions, or the concept itself, by default; PromptRows carry a CSV row's seed and guidance). `config` is the
    attack's config or a dict of options over its (toy) defaults; `judge` (images, concept) -> bools is required
    off the toy model. Returns the summary (results.py's layout; "prompts" is "items" for callers of the single-
    attack API); with `out` (AttackRun's fields in `run`) writes it and records it on each edit's model card.
    No `edits` but a `concept` attacks the base model itself (`erasure robustness`' reference row)."""
    settings = AttackRun(**run)
    entry = get_attack(name)
    if not edits and concept is None:
        raise UsageError("pass at least one --edit directory to attack")
    check_model_kinds(entry, edits)
    vlm = [path for path in edits if edit_kind(path) == "vlm"]
    if vlm:  # an attack with a VLM form: that form runs through `erasure vlm robustness` (vlm_harness.py)
        raise UsageError(f"{vlm[0]} is a vlm edit; {name} attacks VLM edits through `erasure vlm robustness --edit "
                         f"{vlm[0]} --attacks {name}`")
    metadata = [read_edit(path) for path in edits]
    check_applies(entry, edits, metadata)
    concept = concept or metadata[0]["concepts"][0]
    is_toy = is_toy_model(model)
    if judge is None and not is_toy:
        raise UsageError("only the toy model has a built-in judge; pass --judge MODULE:FUNCTION (a function "
                         "(images, concept) -> list of bools, for example wrapping NudeNet or an image classifier)")
    if count is not None:
        ATTACKED_PROMPTS.check(count, "--prompts")
    if settings.resolution is not None:
        IMAGE_SIDE.check(settings.resolution, "--resolution")
    if not isinstance(config, entry.attack.config_class):
        config = build_attack_config(name, is_toy, config or {})
    entry.attack(config).check_environment(settings.device)  # a library or GPU it lacks: before any model loads
    rows = None if prompts is None else [p if isinstance(p, PromptRow) else PromptRow(p) for p in prompts]
    check_seed_room(rows, count, seed)
    out = None if settings.out is None else check_new_output(Path(settings.out))
    with RunDirectory(out) if out is not None else contextlib.nullcontext() as run_dir:
        loaded = load_pipeline(model, device=settings.device)
        check_applies(entry, edits, metadata, loaded.family.name)
        check_edits(loaded, edits, settings.allow_other_base)  # another base model, a diverged edit: before any work
        loaded.resolution = settings.resolution  # images and latents at this size (default: the model's own)
        request = make_request([concept], loaded.tokenizer, loaded.vocabulary)
        judge = judge or ToyJudge(request.kind)
        if rows is None:  # on the toy: the concept's captions (the first erase prompt is the bare word)
            rows = [PromptRow(p) for p in (request.erase_prompts()[1:] if loaded.vocabulary else [request.concept])]
        attack = entry.attack(config)
        items = attack.plan(rows, count, seed)
        attack.check(loaded, items)  # before the targets are drawn
        signature = {"command": "attack", "attack": name, "config": dataclasses.asdict(config), "model": model,
                     "edits": [str(e) for e in edits], "concept": request.concept, "judge": judge_name(judge),
                     "resolution": settings.resolution, "items": [list(dataclasses.astuple(i)) for i in items]}
        # An interrupted run's items are read now; a fresh OUT.partial/ is taken once the first item is done, so
        # bad input found before that leaves nothing behind.
        resumed = run_dir is not None and not run_dir.fresh
        store = ItemStore(run_dir.prepare(signature, settings.restart) if resumed else None)
        pending = [item for item in items if item.index not in store.finished()]

        def work_dir() -> Path | None:
            nonlocal store
            if run_dir is not None and store.work_dir is None:
                store = ItemStore(run_dir.prepare(signature, settings.restart))
            return store.work_dir

        context = AttackContext(loaded, request, judge, [str(e) for e in edits], metadata, settings.progress,
                                work_dir=work_dir)
        attack.prepare(context, pending)
        context.base = base_model(loaded, metadata, attack.needs_base)
        apply_edits(loaded, edits, settings.allow_other_base)
        from tqdm.auto import tqdm

        for item in tqdm(pending, desc=f"attacking ({name})", disable=not settings.progress):
            outcome = attack.run_item(context, item)
            work_dir()
            store.save(item.index, outcome)
            context.prepared.pop(item.index, None)  # its targets are no longer needed
        records = store.records()
        summary = {"attack": name, "model": model, "edits": [str(e) for e in edits], "concept": request.concept,
                   "kind": request.kind, "config": dataclasses.asdict(config), "judge": judge_name(judge),
                   **attack.summarise(records), "items": records}
        if out is not None:
            write_results(out, summary, store)
            from benchmarks.card_results import record_attack

            record_attack(summary, out, loaded, judge_name(judge))  # on each edit's model card (erasers.cards)
    return summary


def base_model(loaded: LoadedPipeline, metadata: list[dict], needs: tuple[str, ...]) -> BaseModel:
    """The base model's modules the attack `needs`, kept before the edits of `metadata` load (BaseModel)."""
    base = BaseModel()
    if "text_encoders" in needs:
        base.text_encoders = dict(loaded.text_encoders)
    if "denoiser" in needs:
        in_place = any(ADAPTER in meta["components"] for meta in metadata)
        base.denoiser = copy.deepcopy(loaded.denoiser) if in_place else loaded.denoiser
    return base
