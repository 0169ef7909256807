"""`python -m vlm.toy_build`: train the toy VLM from scratch on CPU, resumably, and export it to vlm/weights/toy-vlm.

The toy VLM is a `LlavaForConditionalGeneration`: the ToyCanvas toy CLIP's vision tower (frozen, as LLaVA keeps its
CLIP frozen), a two-layer MLP projector and a small Llama, with a byte-level BPE tokenizer trained here on the toy
world's text. Like MLLMU-Bench's "vanilla" model it is fine-tuned on everything: the ToyCanvas questions and every
MLLMU-Med patient (forget sets included), in generation, multiple-choice and cloze form.

Stages, each skipped when its output exists:
  world      the toy world in the MLLMU-Bench layout        -> BUILD/world
  tokenizer  byte-level BPE on the world's prompts           -> BUILD/tokenizer
  features   the frozen vision tower's features of every image (training views and test images)
             -> BUILD/features.safetensors
  train      projector + Llama, TrainingLoop (seeded, checkpointed, resumable)       -> BUILD/trained
  options    multiple choice by matching the options (phase 3, below), same loop      -> BUILD/options
  export     LlavaForConditionalGeneration + LlavaProcessor, fp16 safetensors -> vlm/weights/toy-vlm (atomic)
  evaluate   accuracy of the exported model on trained and test questions -> vlm/weights/toy-vlm/quality.json
Because the vision tower is frozen, its features are computed once and training runs the projector and the
language model only; the exported model recomputes them from pixels, and `evaluate` checks it end to end.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from safetensors.torch import load_file, save_file

from erasers.errors import UsageError
from erasers.files import atomic_dir, publish
from erasers.train import TrainingLoop

from .mllmu import LETTERS, PURE_TEXT, QA, multiple_choice_prompt, qa_items, read_split, row_images
from .models import TOY_VLM_DIR
from .tokenizer import LLAVA_CHAT_TEMPLATE, train_bpe
from .toyworld import WorldConfig, build_world

STAGES = ("world", "tokenizer", "features", "train", "options", "export", "evaluate")
IMAGE_TOKEN = "<image>"


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
    checkpoint_every: int = 250
    eval_every: int = 500
    eval_items: int = 200
    threads: int | None = None


def world_dir(cfg: ToyVLMConfig) -> Path:
    return Path(cfg.build_dir) / "world"


# ----------------------------------------------------------------------------------------------------------------
# World, tokenizer


def stage_world(cfg: ToyVLMConfig) -> None:
    if not (world_dir(cfg) / "world.json").exists():
        build_world(world_dir(cfg), WorldConfig(**cfg.world))


def load_rows(cfg: ToyVLMConfig) -> dict[str, list[dict]]:
    root = world_dir(cfg)
    return {"canvas": read_split(root / "ToyCanvas" / "train"), "canvas_test": read_split(root / "ToyCanvas" / "test"),
            "patients": read_split(root / "MLLMU-Med" / "Full_Set"),
            "patients_test": read_split(root / "MLLMU-Med" / "Test_Set"),
            "knowledge": read_split(root / "MLLMU-Med" / "Knowledge")}


def user_text(prompt: str, with_image: bool) -> str:
    """The chat template's user turn up to where the answer starts (what `LoadedVLM.prompt` produces)."""
    return f"USER: {IMAGE_TOKEN + chr(10) if with_image else ''}{prompt} ASSISTANT:"


def answer_text(answer: str) -> str:
    return f" {answer}</s>"


def stage_tokenizer(cfg: ToyVLMConfig) -> None:
    out = Path(cfg.build_dir) / "tokenizer"
    if (out / "tokenizer.json").exists():
        return
    corpus = []
    for rows in load_rows(cfg).values():
        for row in rows:
            corpus.append(row["biography"])
            corpus += [user_text(q.prompt, q.needs_image) + answer_text(q.answer) for q in qa_items(row)]
    tokenizer = train_bpe(corpus, cfg.vocab_size, [IMAGE_TOKEN], LLAVA_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    tmp = atomic_dir(out)
    tokenizer.save_pretrained(tmp)
    publish(tmp, out)


def load_tokenizer(cfg: ToyVLMConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(cfg.build_dir) / "tokenizer")


# ----------------------------------------------------------------------------------------------------------------
# Vision features


def clip_dir() -> Path:
    from benchmarks.toycanvas import CLIP_DIR

    return CLIP_DIR


def jitter(image: Image.Image, seed: int) -> Image.Image:
    """A training view: shifted by up to one pixel, brightness within 5%."""
    rng = np.random.default_rng(seed)
    shift = tuple(int(v) for v in rng.integers(-1, 2, 2))
    out = image.rotate(0, translate=shift, fillcolor=image.getpixel((0, 0)))
    return ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.95, 1.05)))


def training_images(cfg: ToyVLMConfig, rows: dict[str, list[dict]]) -> dict[str, list[Image.Image]]:
    """Every image the build needs, by group; patients get `patient_views` views (the first the original)."""
    patients = []
    for i, row in enumerate(rows["patients"]):
        image = row_images(row)[0]
        patients += [image] + [jitter(image, cfg.seed * 100_003 + i * 31 + v) for v in range(1, cfg.patient_views)]
    return {"canvas": [row_images(r)[0] for r in rows["canvas"]],
            "canvas_test": [row_images(r)[0] for r in rows["canvas_test"]],
            "patients": patients,
            "patients_test": [image for r in rows["patients_test"] for image in row_images(r)]}


def vision_tower(cfg: ToyVLMConfig):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(clip_dir(), dtype=torch.float32).eval()
    return model, CLIPImageProcessor.from_pretrained(clip_dir())


@torch.no_grad()
def image_features(cfg: ToyVLMConfig, model, processor, images: list[Image.Image]) -> torch.Tensor:
    """What LLaVA feeds its projector: the selected vision layer's tokens, (N, tokens, vision hidden)."""
    chunks = []
    for start in range(0, len(images), 256):
        pixels = processor(images=images[start:start + 256], return_tensors="pt").pixel_values
        states = model(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        chunks.append(states if cfg.vision_feature_select_strategy == "full" else states[:, 1:])
    return torch.cat(chunks)


FEATURES = "features.safetensors"  # safetensors, not a pickle: the build directory may be shared


def load_features(cfg: ToyVLMConfig) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    path = Path(cfg.build_dir) / FEATURES
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise UsageError(f"{path} is unreadable ({str(error).splitlines()[0][:80]}); delete it to recompute the "
                         "features") from None


def stage_features(cfg: ToyVLMConfig) -> None:
    out = Path(cfg.build_dir) / FEATURES
    if out.exists():
        return
    model, processor = vision_tower(cfg)
    images = training_images(cfg, load_rows(cfg))
    features = {group: image_features(cfg, model, processor, imgs).to(torch.float16) for group, imgs in images.items()}
    tmp = out.with_suffix(".tmp")
    save_file({group: tensor.contiguous() for group, tensor in features.items()}, tmp)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------------------------
# The model


def model_config(cfg: ToyVLMConfig, tokenizer, layers: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    clip = json.loads((clip_dir() / "config.json").read_text())
    vision = CLIPVisionConfig(**{k: v for k, v in clip["vision_config"].items() if k not in ("model_type",)})
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=layers or cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.heads,
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=True)
    tokens = (vision.image_size // vision.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(
        IMAGE_TOKEN), vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, image_seq_length=tokens,
        projector_hidden_act="gelu", tie_word_embeddings=True)


def new_model(cfg: ToyVLMConfig, tokenizer):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(model_config(cfg, tokenizer))
    vision = CLIPVisionModel.from_pretrained(clip_dir(), dtype=torch.float32)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.vision_tower.requires_grad_(False)
    return model


@dataclass
class Sample:
    qa: QA
    # (feature group, index) of the image, or None for a text-only question.
    image: tuple[str, int] | None


class Batcher:
    """Turns samples into padded token ids, answer labels and image features, the way the processor would."""

    def __init__(self, tokenizer, features: dict[str, torch.Tensor], image_tokens: int):
        self.tokenizer, self.features, self.image_tokens = tokenizer, features, image_tokens
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def encode(self, prompt: str, with_image: bool) -> list[int]:
        ids = self.tokenizer(user_text(prompt, with_image), add_special_tokens=False).input_ids
        at = ids.index(self.image_id) if with_image else None
        return ids if at is None else ids[:at] + [self.image_id] * self.image_tokens + ids[at + 1:]

    def __call__(self, samples: list[tuple[Sample, str]], with_answers: bool = True):
        """samples: (sample, prompt text). Returns ids, attention mask, labels (answer tokens only) and features."""
        rows, labels = [], []
        for sample, prompt in samples:
            ids = self.encode(prompt, sample.image is not None)
            answer = self.tokenizer(answer_text(sample.qa.answer), add_special_tokens=False).input_ids \
                if with_answers else []
            rows.append(ids + answer)
            labels.append([-100] * len(ids) + answer)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        # Left padding, as for generation: the answer always starts at the same position.
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        label = torch.tensor([[-100] * (width - len(r)) + lab for r, lab in zip(rows, labels)])
        images = [self.features[s.image[0]][s.image[1]] for s, _ in samples if s.image is not None]
        feats = torch.stack(images).float() if images else None
        return ids, mask, label, feats


class Packer:
    """Packs several questions into one row behind a shared prefix, exactly as if each were asked alone: every
    question segment attends to the prefix and to itself only (a block 4D mask), and its positions continue from
    the prefix's. With the image prefix ("USER: <image>x65\n") computed once for four questions, a step costs
    about half the tokens of one row per question."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.tokenizer = batcher.tokenizer
        self.image_prefix = batcher.encode("", True)[:-len(self._ids(" ASSISTANT:"))]
        # An option line is "\n", its letter, ":", its text: how `option_marks` finds them in a prompt's ids.
        self.newline, self.colon = self._ids("\n")[0], self._ids(":")[-1]
        self.letters = {self._ids(f"\n{letter}:")[1]: letter for letter in LETTERS}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def segment(self, prompt: str, answer: str, after_image: bool) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of one question; after an image prefix the "USER: <image>\n" part is omitted."""
        text = f"{prompt} ASSISTANT:" if after_image else user_text(prompt, False)
        return self._ids(text), self._ids(answer_text(answer))

    def __call__(self, rows: list[tuple[tuple[str, int] | None, list[tuple[Sample, str]]]]):
        """rows: (image reference or None, [(sample, prompt)]). Returns ids, 4D mask, position ids, labels, feats."""
        built = []
        for image, questions in rows:
            prefix = self.image_prefix if image is not None else []
            ids, labels, segment, positions = list(prefix), [-100] * len(prefix), [-1] * len(prefix), \
                list(range(len(prefix)))
            for k, (sample, prompt) in enumerate(questions):
                question, answer = self.segment(prompt, sample.qa.answer, image is not None)
                ids += question + answer
                labels += [-100] * len(question) + answer
                segment += [k] * (len(question) + len(answer))
                positions += list(range(len(prefix), len(prefix) + len(question) + len(answer)))
            built.append((ids, labels, segment, positions))
        width = max(len(b[0]) for b in built)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([b[0] + [pad] * (width - len(b[0])) for b in built])
        labels = torch.tensor([b[1] + [-100] * (width - len(b[1])) for b in built])
        segment = torch.tensor([b[2] + [-2] * (width - len(b[2])) for b in built])
        positions = torch.tensor([b[3] + [0] * (width - len(b[3])) for b in built])
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == -1)
        mask = (causal & same)[:, None]
        images = [self.batcher.features[image[0]][image[1]] for image, _ in rows if image is not None]
        feats = torch.stack(images).float() if images else None
        return ids, mask, positions, labels, feats

    def option_marks(self, rows) -> list[tuple[int, int, bool]]:
        """(row, position, whether it is the right answer) of the last token of every option of every multiple-choice
        question in `rows`, at the positions `__call__` lays them out."""
        marks = []
        for r, (image, questions) in enumerate(rows):
            at = len(self.image_prefix) if image is not None else 0
            for sample, prompt in questions:
                question, answer = self.segment(prompt, sample.qa.answer, image is not None)
                if sample.qa.task == "classification":
                    starts = [k for k in range(len(question) - 2) if question[k] == self.newline
                              and question[k + 1] in self.letters and question[k + 2] == self.colon]
                    for k in starts:
                        end = question.index(self.newline, k + 3)
                        marks.append((r, at + end - 1, self.letters[question[k + 1]] == sample.qa.answer))
                at += len(question) + len(answer)
        return marks


def forward_hidden(model, ids: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor | None,
                   position_ids: torch.Tensor | None = None, all_layers: bool = False):
    """The language model's last hidden states, with projected cached image features in the image positions (with
    `all_layers`, the model output, whose `hidden_states` hold every layer's)."""
    embeds = model.get_input_embeddings()(ids)
    if feats is not None:
        projected = model.model.multi_modal_projector(feats).reshape(-1, embeds.shape[-1])
        image_mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, projected.to(embeds.dtype))
    if position_ids is None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                     use_cache=False, output_hidden_states=all_layers)
    return out if all_layers else out.last_hidden_state


def answer_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over answer tokens of a Batcher batch (ids, mask, labels, feats) or a Packer batch
    (ids, 4D mask, positions, labels, feats)."""
    if len(batch) == 5:
        ids, mask, positions, labels, feats = batch
    else:
        (ids, mask, labels, feats), positions = batch, None
    return _answer_loss(model, forward_hidden(model, ids, mask, feats, positions), labels)


def _answer_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits, targets[keep]), int(keep.sum())


def pooled_mean(*parts: tuple[torch.Tensor, int]) -> torch.Tensor:
    """The mean over all items of (mean, count) parts, as if their items had been averaged together."""
    return sum(mean * count for mean, count in parts) / max(sum(count for _, count in parts), 1)


def answer_and_mark_loss(model, probe: torch.nn.Linear, layer: int, packer: Packer, rows):
    """Phase 3's losses on packed `rows`: (answer loss, answer tokens, option-mark loss, options). The mark loss is
    the probe's binary cross-entropy at each option's last token, the right option weighted as the three wrong."""
    ids, mask, positions, labels, feats = packer(rows)
    out = forward_hidden(model, ids, mask, feats, positions, all_layers=True)
    loss, tokens = _answer_loss(model, out.last_hidden_state, labels)
    marks = packer.option_marks(rows)
    if not marks:
        return loss, tokens, torch.zeros(()), 0
    row, position, right = (torch.tensor(column) for column in zip(*marks))
    logits = probe(out.hidden_states[layer][row, position]).squeeze(-1)
    weight = torch.tensor(float(len(LETTERS) - 1))
    return loss, tokens, F.binary_cross_entropy_with_logits(logits, right.float(), pos_weight=weight), len(marks)


@torch.no_grad()
def greedy(model, batcher: Batcher, samples: list[tuple[Sample, str]], max_new_tokens: int = 12) -> list[str]:
    """Greedy answers computed from cached features (no KV cache: answers are a few tokens)."""
    ids, mask, _, feats = batcher(samples, with_answers=False)
    eos = batcher.tokenizer.eos_token_id
    out = [[] for _ in samples]
    done = torch.zeros(len(samples), dtype=torch.bool)
    for _ in range(max_new_tokens):
        hidden = forward_hidden(model, ids, mask, feats)
        next_ids = model.lm_head(hidden[:, -1]).argmax(-1)
        for i, token in enumerate(next_ids.tolist()):
            if not done[i]:
                if token == eos:
                    done[i] = True
                else:
                    out[i].append(token)
        if done.all():
            break
        ids = torch.cat([ids, next_ids[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return [batcher.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


# ----------------------------------------------------------------------------------------------------------------
# Scoring (MLLMU-Bench's rules: first letter for multiple choice, containment for cloze; exact for generation)


def normalise(text: str) -> str:
    return re.sub(r"[\s.]+$", "", text.strip().lower())


def is_correct(qa: QA, answer: str) -> bool:
    if qa.task == "classification":
        return answer.strip()[:1].upper() == qa.answer
    if qa.task == "mask":
        return normalise(qa.answer) in answer.lower()
    return normalise(answer) == normalise(qa.answer)


def accuracy_table(records: list[tuple[str, QA, bool]]) -> dict[str, dict[str, float]]:
    """{source: {task/type: accuracy, "all": accuracy}} from (source, qa, correct) records."""
    table: dict[str, dict[str, list[bool]]] = {}
    for source, qa, ok in records:
        groups = table.setdefault(source, {})
        groups.setdefault("all", []).append(ok)
        groups.setdefault(f"{qa.task}/{qa.type}", []).append(ok)
    return {s: {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(g.items())} for s, g in table.items()}


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class Pools:
    """What each step draws from: images with their questions (patients: any view of the scan) and text-only
    questions (patients by name, and the medical knowledge facts)."""

    canvas: list[tuple[tuple[str, int], list[QA]]]
    patients: list[tuple[list[tuple[str, int]], list[QA]]]
    text: list[QA]

    @cached_property
    def multiple_choice(self) -> list[QA]:
        return [q for _, items in self.canvas + self.patients for q in items if q.task == "classification"] + \
            [q for q in self.text if q.task == "classification"]


def training_pools(cfg: ToyVLMConfig, rows: dict[str, list[dict]]) -> Pools:
    canvas = [(("canvas", i), qa_items(r)) for i, r in enumerate(rows["canvas"])]
    patients, text = [], []
    for i, row in enumerate(rows["patients"]):
        items = qa_items(row)
        views = [("patients", i * cfg.patient_views + v) for v in range(cfg.patient_views)]
        patients.append((views, [q for q in items if q.needs_image]))
        text += [q for q in items if not q.needs_image]
    text += [q for r in rows["knowledge"] for q in qa_items(r)]
    return Pools(canvas, patients, text)


def draw_rows(cfg: ToyVLMConfig, pools: Pools, generator: torch.Generator, reshuffle: float | None = None,
              choices_per_image: int | None = None):
    """One step's rows for the Packer: image rows (patients, then ToyCanvas) and text rows. With
    `choices_per_image`, each image row carries that many multiple-choice questions and the rest of its
    `questions_per_image` from the image's other questions."""
    reshuffle = cfg.reshuffle if reshuffle is None else reshuffle

    def pick(n: int, k: int) -> list[int]:
        return torch.randperm(n, generator=generator)[:k].tolist()

    def questions(items: list[QA], image) -> list[tuple[Sample, str]]:
        if choices_per_image is None:
            chosen = [items[j] for j in pick(len(items), cfg.questions_per_image)]
        else:
            choices = [q for q in items if q.task == "classification"]
            others = [q for q in items if q.task != "classification"]
            chosen = [choices[j] for j in pick(len(choices), choices_per_image)]
            chosen += [others[j] for j in pick(len(others), cfg.questions_per_image - len(chosen))]
        return [prompt_for(Sample(qa, image), generator, reshuffle) for qa in chosen]

    image_rows = []
    for i in torch.randint(len(pools.patients), (cfg.patient_rows,), generator=generator).tolist():
        views, items = pools.patients[i]
        view = views[int(torch.randint(len(views), (1,), generator=generator))]
        image_rows.append((view, questions(items, view)))
    for i in torch.randint(len(pools.canvas), (cfg.canvas_rows,), generator=generator).tolist():
        image, items = pools.canvas[i]
        image_rows.append((image, questions(items, image)))
    picked = torch.randint(len(pools.text), (cfg.text_rows * cfg.text_per_row,), generator=generator).tolist()
    text = [prompt_for(Sample(pools.text[i], None), generator, reshuffle) for i in picked]
    text_rows = [(None, text[r * cfg.text_per_row:(r + 1) * cfg.text_per_row]) for r in range(cfg.text_rows)]
    return image_rows, text_rows


def lookup_question(sample: Sample) -> tuple[Sample, str]:
    """A multiple-choice question turned into "Which option is {its answer}?" over the same options, text only."""
    qa = sample.qa
    options = dict(qa.options)
    question = f"Which option is {options[qa.answer]}?"
    return Sample(QA(qa.id, qa.row_id, qa.task, PURE_TEXT, question, "", qa.answer, qa.options), None), \
        multiple_choice_prompt(question, options)


def lookup_rows(cfg: ToyVLMConfig, pools: Pools, generator: torch.Generator):
    """Phase 3's text rows of option lookups, every option list reshuffled."""
    choices = pools.multiple_choice
    picked = torch.randint(len(choices), (cfg.lookup_rows * cfg.text_per_row,), generator=generator).tolist()
    questions = [lookup_question(prompt_for(Sample(choices[i], None), generator, 1.0)[0]) for i in picked]
    return [(None, questions[r * cfg.text_per_row:(r + 1) * cfg.text_per_row]) for r in range(cfg.lookup_rows)]


def prompt_for(sample: Sample, generator: torch.Generator | None, reshuffle: float) -> tuple[Sample, str]:
    qa = sample.qa
    if qa.task != "classification" or generator is None or torch.rand(1, generator=generator).item() >= reshuffle:
        return sample, qa.prompt
    order = torch.randperm(len(qa.options), generator=generator).tolist()
    options = dict(qa.options)
    correct = options[qa.answer]
    shuffled = {LETTERS[k]: qa.options[j][1] for k, j in enumerate(order)}
    letter = next(k for k, v in shuffled.items() if v == correct)
    moved = Sample(QA(qa.id, qa.row_id, qa.task, qa.type, qa.question, "", letter, tuple(shuffled.items())),
                   sample.image)
    return moved, multiple_choice_prompt(qa.question, shuffled)


def eval_samples(cfg: ToyVLMConfig, rows: dict[str, list[dict]], count: int) -> dict[str, list[Sample]]:
    """Fixed seeded samples of trained questions (image views: the original), for accuracy during training."""
    rng = np.random.default_rng([cfg.seed, 7])
    canvas = [Sample(q, ("canvas", i)) for i, r in enumerate(rows["canvas"]) for q in qa_items(r)]
    patients = [Sample(q, ("patients", i * cfg.patient_views) if q.needs_image else None)
                for i, r in enumerate(rows["patients"]) for q in qa_items(r)]
    pick = {"canvas": canvas, "patient_image": [s for s in patients if s.image is not None],
            "patient_text": [s for s in patients if s.image is None]}
    return {k: [v[i] for i in rng.choice(len(v), min(count, len(v)), replace=False)] for k, v in pick.items()}


def evaluate_cached(model, batcher: Batcher, sets: dict[str, list[Sample]]) -> dict[str, float]:
    """acc_{set}: accuracy on each set; mc_{set}: on its multiple-choice questions alone; mc_shuffled_{set}: on them
    with every option list reshuffled (fixed seed), where a memorised letter is right by chance only."""
    model.eval()
    scores = {}

    def correct(asked: list[tuple[Sample, str]]) -> list[bool]:
        results = []
        for start in range(0, len(asked), 100):
            chunk = asked[start:start + 100]
            results += [is_correct(s.qa, a) for (s, _), a in zip(chunk, greedy(model, batcher, chunk))]
        return results

    for name, samples in sets.items():
        results = correct([prompt_for(s, None, 0) for s in samples])
        scores[f"acc_{name}"] = round(sum(results) / len(results), 4)
        mc = [s for s in samples if s.qa.task == "classification"]
        mc_ok = [ok for s, ok in zip(samples, results) if s.qa.task == "classification"]
        scores[f"mc_{name}"] = round(sum(mc_ok) / max(len(mc_ok), 1), 4)
        generator = torch.Generator().manual_seed(17)
        shuffled = correct([prompt_for(s, generator, 1.0) for s in mc])
        scores[f"mc_shuffled_{name}"] = round(sum(shuffled) / max(len(shuffled), 1), 4)
    model.train()
    return scores


def grow(cfg: ToyVLMConfig, model, tokenizer):
    """`model` with `grow_layers` more decoder layers on top, initialised so that the output is unchanged."""
    from transformers import LlavaForConditionalGeneration

    from .models import decoder_layers

    torch.manual_seed(cfg.seed + 1)
    bigger = LlavaForConditionalGeneration(model_config(cfg, tokenizer, cfg.layers + cfg.grow_layers))
    missing, unexpected = bigger.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".layers." in key for key in missing), (missing, unexpected)
    for layer in decoder_layers(bigger)[cfg.layers:]:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    bigger.model.vision_tower.requires_grad_(False)
    return bigger


@dataclass
class Setup:
    """What every training phase reads: tokenizer, cached features (in the Batcher), the Packer, pools and
    evaluation sets."""

    tokenizer: object
    batcher: Batcher
    packer: Packer
    pools: Pools
    checks: dict[str, list[Sample]]


def training_setup(cfg: ToyVLMConfig, image_tokens: int) -> Setup:
    tokenizer = load_tokenizer(cfg)
    rows = load_rows(cfg)
    batcher = Batcher(tokenizer, load_features(cfg), image_tokens)
    return Setup(tokenizer, batcher, Packer(batcher), training_pools(cfg, rows),
                 eval_samples(cfg, rows, cfg.eval_items))


def run_phase(cfg: ToyVLMConfig, setup: Setup, name: str, model, stop: int, schedule_steps: int, lr: float,
              losses, extra_modules: dict | None = None):
    """Train `model` (and `extra_modules`, training-only) on `losses(generator) -> (loss, metrics)` for `stop` steps
    of a `schedule_steps`-step one-cycle schedule, seeded, checkpointed and resumable, evaluating every `eval_every`."""
    modules = {"model": model, **(extra_modules or {})}
    trainable = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=schedule_steps, pct_start=0.05)
    loop = TrainingLoop(name, stop, {**modules, "opt": optimizer, "sched": schedule}, cfg.seed, cfg.build_dir,
                        cfg.checkpoint_every)
    eval_log = Path(cfg.build_dir) / "logs" / "toy-vlm-eval.jsonl"
    for module in modules.values():
        module.train()
    started = time.time()

    def step(step_index, generator):
        loss, metrics = losses(generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        if (step_index + 1) % cfg.eval_every == 0 or step_index + 1 == stop:
            metrics.update(evaluate_cached(model, setup.batcher, setup.checks))
            record = {"phase": name, "step": step_index + 1, "seconds": round(time.time() - started, 1), **metrics}
            with eval_log.open("a") as log:
                log.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
        return metrics

    loop.run(step)
    return model


def save_trained(model, out: Path) -> None:
    tmp = atomic_dir(out)
    model.eval().save_pretrained(tmp)
    publish(tmp, out)


def stage_train(cfg: ToyVLMConfig) -> None:
    """Phases 1 and 2: every question, options in their stored order half the time."""
    model = new_model(cfg, load_tokenizer(cfg))
    setup = training_setup(cfg, model.config.image_seq_length)

    def losses(generator):
        image_rows, text_rows = draw_rows(cfg, setup.pools, generator)
        loss_image, n_image = answer_loss(model, setup.packer(image_rows))
        loss_text, n_text = answer_loss(model, setup.packer(text_rows))
        loss = pooled_mean((loss_image, n_image), (loss_text, n_text))
        return loss, {"loss": loss.item(), "loss_image": loss_image.item(), "loss_text": loss_text.item()}

    model = run_phase(cfg, setup, "toy-vlm", model, cfg.grow_at, cfg.steps, cfg.lr, losses)
    if cfg.grow_layers:
        model = grow(cfg, model, setup.tokenizer)
        model = run_phase(cfg, setup, "toy-vlm-grow", model, cfg.grow_steps, cfg.grow_steps, cfg.grow_lr, losses)
    save_trained(model, Path(cfg.build_dir) / "trained")


def stage_options(cfg: ToyVLMConfig) -> None:
    """Phase 3 on phase 2's model: the option-mark probe, option lookups, options mostly reshuffled."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(Path(cfg.build_dir) / "trained", dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)
    setup = training_setup(cfg, model.config.image_seq_length)
    torch.manual_seed(cfg.seed + 2)
    probe = torch.nn.Linear(model.config.text_config.hidden_size, 1)
    layer = cfg.option_probe_layer

    def losses(generator):
        image_rows, text_rows = draw_rows(cfg, setup.pools, generator, cfg.options_reshuffle,
                                          cfg.options_choices_per_image)
        text_rows += lookup_rows(cfg, setup.pools, generator)
        loss_image, n_image, mark_image, m_image = answer_and_mark_loss(model, probe, layer, setup.packer, image_rows)
        loss_text, n_text, mark_text, m_text = answer_and_mark_loss(model, probe, layer, setup.packer, text_rows)
        answer = pooled_mean((loss_image, n_image), (loss_text, n_text))
        marks = pooled_mean((mark_image, m_image), (mark_text, m_text))
        return answer + cfg.option_probe_weight * marks, {"loss": answer.item(), "loss_marks": marks.item()}

    model = run_phase(cfg, setup, "toy-vlm-options", model, cfg.options_steps, cfg.options_steps, cfg.options_lr,
                      losses, {"probe": probe})
    save_trained(model, Path(cfg.build_dir) / "options")


# ----------------------------------------------------------------------------------------------------------------
# Export and evaluation


def make_processor(cfg: ToyVLMConfig, tokenizer):
    """The toy VLM's LlavaProcessor: the toy CLIP's image processor, the trained tokenizer, LLaVA-1.5's template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    patch_size = json.loads((clip_dir() / "config.json").read_text())["vision_config"]["patch_size"]
    return LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(clip_dir()), tokenizer=tokenizer,
                          patch_size=patch_size, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def stage_export(cfg: ToyVLMConfig) -> None:
    from transformers import LlavaForConditionalGeneration

    from benchmarks.toycanvas.build import declare_float32

    tokenizer = load_tokenizer(cfg)
    model = LlavaForConditionalGeneration.from_pretrained(Path(cfg.build_dir) / "options", dtype=torch.float32)
    final = Path(cfg.out_dir)
    tmp = atomic_dir(final)
    model.to(torch.float16).save_pretrained(tmp)
    declare_float32(tmp / "config.json")
    make_processor(cfg, tokenizer).save_pretrained(tmp)
    (tmp / "toyvlm.json").write_text(json.dumps({"build_config": asdict(cfg), "torch": torch.__version__}, indent=2))
    for log in sorted((Path(cfg.build_dir) / "logs").glob("toy-vlm*.jsonl")):
        (tmp / "logs").mkdir(exist_ok=True)
        (tmp / "logs" / log.name).write_bytes(log.read_bytes())
    publish(tmp, final)


def evaluate_model(loaded, rows: list[dict], source: str, tasks=("generation", "classification", "mask"),
                   batch_size: int = 64, progress: bool = True) -> list[tuple[str, QA, bool]]:
    """(source, question, correct) for every question of `rows`, asked to a loaded VLM through its processor."""
    from tqdm.auto import tqdm

    from .models import ask_many

    items = []
    for row in rows:
        images = row_images(row)
        for qa in qa_items(row, tasks):
            views = images if qa.needs_image else [None]
            items += [(qa, view) for view in views]
    records = []
    for start in tqdm(range(0, len(items), batch_size), desc=f"asking {source}", disable=not progress):
        chunk = items[start:start + batch_size]
        answers = ask_many(loaded, [view for _, view in chunk], [qa.prompt for qa, _ in chunk], max_new_tokens=12)
        records += [(source, qa, is_correct(qa, answer)) for (qa, _), answer in zip(chunk, answers)]
    return records


def stage_evaluate(cfg: ToyVLMConfig) -> dict:
    from .models import load_vlm

    loaded = load_vlm(cfg.out_dir, device="cpu")
    rows = load_rows(cfg)
    rng = np.random.default_rng([cfg.seed, 8])
    canvas_sample = [rows["canvas"][i] for i in rng.choice(len(rows["canvas"]), 150, replace=False)]
    records = (evaluate_model(loaded, canvas_sample, "ToyCanvas trained (150 images)")
               + evaluate_model(loaded, rows["patients"], "MLLMU-Med trained (Full_Set)")
               + evaluate_model(loaded, rows["knowledge"], "Knowledge")
               + evaluate_model(loaded, rows["canvas_test"][:100], "ToyCanvas test (100 held-out images, paraphrases)")
               + evaluate_model(loaded, rows["patients_test"], "MLLMU-Med Test_Set (transformed, paraphrased)"))
    table = accuracy_table(records)
    out = Path(cfg.out_dir) / "quality.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"accuracy_percent": table, "bar": ">= 90% on trained ToyCanvas and patient questions",
                               "met": all(table[s]["all"] >= 90 for s in table if "trained" in s)}, indent=2))
    os.replace(tmp, out)
    print(json.dumps(table, indent=2))
    return table


def stage_outputs(cfg: ToyVLMConfig) -> dict[str, Path]:
    build, out = Path(cfg.build_dir), Path(cfg.out_dir)
    return {"world": build / "world" / "world.json", "tokenizer": build / "tokenizer" / "tokenizer.json",
            "features": build / FEATURES, "train": build / "trained" / "config.json",
            "options": build / "options" / "config.json",
            "export": out / "config.json", "evaluate": out / "quality.json"}


def run(cfg: ToyVLMConfig, stages: tuple[str, ...] = STAGES) -> None:
    """Run `stages` in order, skipping each whose output exists and is newer than the previous stage's (delete an
    output to redo its stage)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    outputs = stage_outputs(cfg)
    for name in stages:
        before = STAGES[STAGES.index(name) - 1] if name != STAGES[0] else None
        output = outputs[name]
        stale = before is not None and outputs[before].exists() and output.exists() and \
            outputs[before].stat().st_mtime > output.stat().st_mtime
        if output.exists() and not stale:
            print(f"{name}: done ({output})")
            continue
        globals()[f"stage_{name}"](cfg)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stages", nargs="*", default=list(STAGES), help=f"stages to run (default: {' '.join(STAGES)})")
    parser.add_argument("--build-dir", default=ToyVLMConfig.build_dir)
    parser.add_argument("--out-dir", default=ToyVLMConfig.out_dir)
    parser.add_argument("--steps", type=int, default=ToyVLMConfig.steps)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    run(ToyVLMConfig(build_dir=args.build_dir, out_dir=args.out_dir, steps=args.steps, threads=args.threads),
        tuple(args.stages))
