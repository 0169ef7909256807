"""The toy VLM's build settings: its size, the batches, and the four training phases' schedules (phase 3's
comment says why it exists)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vlm.models import TOY_VLM_DIR

from ..world import WorldConfig


@dataclass
class ToyVLMConfig:
    build_dir: str = ".toybuild/vlm"
    out_dir: str = str(TOY_VLM_DIR)
    seed: int = 0
    world: dict = field(default_factory=lambda: asdict(WorldConfig()))
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    intermediate: int = 384
    # The toy CLIP's last layer, CLS token included: its CLS carries what CLIP was trained to match to captions.
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"
    patient_views: int = 4
    # Phase 1 runs the first `grow_at` steps of a `steps`-step one-cycle schedule on a `layers`-layer Llama; phase 2
    # ("grow") appends `grow_layers` layers whose output projections start at zero (the function is unchanged) and
    # trains all of it for `grow_steps` on a fresh cycle, so that the extra depth does not cost relearning the facts.
    # Neither the three layers nor the six learned to answer multiple choice by its options (phase 3 below).
    steps: int = 5000
    grow_at: int = 2250
    grow_layers: int = 3
    grow_steps: int = 2000
    grow_lr: float = 1e-3
    # Per step: rows of one patient scan view and of one ToyCanvas image, each carrying `questions_per_image` of
    # that image's questions behind one shared image prefix, and rows packing `text_per_row` text-only questions.
    patient_rows: int = 8
    canvas_rows: int = 8
    questions_per_image: int = 6
    text_rows: int = 4
    text_per_row: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.01
    # Share of multiple-choice samples whose options are reshuffled (new letters) when drawn.
    reshuffle: float = 0.5
    # Phase 3 ("options"). After phases 1-2 the model recalls what an image shows and a patient's facts, but answers
    # multiple choice only where it memorised the letter: with reshuffled options it is at chance, because finding
    # the recalled answer among the options and copying its letter never emerged from the answer-letter loss alone.
    # Phase 3 breaks that into two steps the model learns in a few hundred steps each. A linear probe (training
    # only, not exported) reads layer `option_probe_layer` at the last token of every option and is trained to say
    # whether that option is the right one, so each option checks itself against the image or the named patient;
    # the answer loss then only has to find the option so marked and copy its letter. `lookup_rows` rows of "Which
    # option is {answer}?" text questions train the copying on its own. Options are reshuffled more often than in
    # phases 1-2 so that a memorised letter is rarely right, and each image row asks `options_choices_per_image`
    # multiple-choice questions (about a third in phases 1-2).
    options_steps: int = 2000
    options_choices_per_image: int = 3
    options_lr: float = 1e-3
    options_reshuffle: float = 0.75
    option_probe_layer: int = 4
    option_probe_weight: float = 1.0
    lookup_rows: int = 2
    # Phase 4 ("wordings", build/wordings.py says why): per step, fewer of phase 3's rows (`wording_old_rows`
    # patient and ToyCanvas image rows, as many text rows, and the lookups) plus rows of open questions in wordings
    # composed from frames, nouns and image references, on a fresh one-cycle schedule at a lower rate.
    wording_steps: int = 800
    wording_old_rows: int = 4
    wording_lr: float = 5e-4
    wording_canvas_rows: int = 6
    wording_patient_rows: int = 4
    wording_text_rows: int = 2
    wording_weight: float = 1.0
    checkpoint_every: int = 250
    eval_every: int = 500
    eval_items: int = 200
    threads: int | None = None
