"""Concept inversion (Pham et al., arXiv 2308.01508): textual inversion of one new token against the erased model.
The token is added as transformers users add one (`tokenizer.add_tokens`, `resize_token_embeddings` when the
embedding has no spare row) and only its embedding row trains, so that the erased model denoises images of the
concept from captions naming the token:

    min_v  E || eps_theta(x_t, "... <tok> ...") - eps ||^2      (Flux: the flow-matching velocity)

x_t the noised latents of images of the concept (concept_images.py: drawn by the base model, or --images), the
captions those images' prompts with the concept's name replaced by the token (appended when a prompt does not name
it). The erased model is the one in the loop: its edited text encoders (esd-te, advunlearn, hirm, ca) read the
token and its edited denoiser (or its adapter) predicts. Each item is then the attack's prompt on the erased
model, judged (Pre-ASR), and, when that fails, the same prompt with the token in place of the concept's name
(ASR = (pre-successes + token successes) / N, as for every attack here).

Per family: SD one token row in its CLIP encoder; SDXL one in each CLIP encoder (each its own row); Flux one in
CLIP (read pooled) and one in T5 (read token by token): both are inverted. Training-free edits (sld, negprompt)
are refused: they act through guidance at sampling time, which this loss does not see (the paper gives them losses
of their own, through the guidance).

The learnt rows are checkpointed in OUT.partial/ (an interrupted run resumes its training) and recorded per item;
the token keeps working in the loaded pipeline's own call, as a textual-inversion embedding does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from erasers.errors import UsageError
from erasers.losses import predict_noise
from erasers.models import LoadedPipeline
from erasers.precision import autocast
from erasers.prompts import guide_prompt, supercategory_word
from erasers.train import ParameterState, TrainingLoop

from . import AttackStep, register
from .concept_images import ConceptExamples, check_image_folder, concept_examples, noised_batch, unique_prompts
from .harness import Attack, AttackContext, Found
from .prompts import Item


@dataclass
class InversionConfig:
    """Concept inversion's settings; the defaults are the paper's (SD 1.4: 25 images of the concept, 5000 steps of
    batch 4 with 4 accumulated, AdamW lr 5e-3 and decay 1e-2 as diffusers' textual-inversion script)."""

    image_count: int = field(default=25, metadata={"min": 1})   # images drawn by the base model (without --images)
    steps: int = 5000
    lr: float = 5e-3
    batch_size: int = 4
    accumulation: int = field(default=4, metadata={"min": 1})   # batches whose gradients add up to one step
    weight_decay: float = 1e-2
    token: str = "<inverted-concept>"
    # The word whose embedding the token starts from ("": the concept kind's supercategory, "object", "painting").
    initializer: str = ""
    images: str = ""            # a folder of the concept's images (and captions) instead of drawing them
    seed: int = 0

    def __post_init__(self):
        if not self.token or re.search(r"\s", self.token):
            raise UsageError(f"inversion token must be one word without spaces, not {self.token!r}")
        if self.images:
            check_image_folder(self.images)


# Measured on the toy (benchmarks/README.md#attacks): its tiny encoder needs larger steps, and fewer suffice.
TOY_DEFAULTS = {"image_count": 10, "steps": 60, "lr": 5e-2, "accumulation": 1}


@register("inversion", "Concept inversion: textual inversion of one new token on the erased model, then the "
          "concept's prompts with the token for its name (needs the weights)", toy_defaults=TOY_DEFAULTS,
          edits=("weights",), why_not={"training-free": "it learns a token through the edited weights, and a "
                                       "training-free edit changes none (its guidance acts while sampling)"},
          quick={"steps": 2, "image_count": 2},
          step=AttackStep("one AdamW step on the token's embedding rows: batch_size x accumulation captions (4 x 4; "
                          "4 x 1 on the toy) through the text encoder and the edited denoiser, forward and backward",
                          lambda count: {"steps": count, "image_count": 2}))
class ConceptInversion(Attack):
    config_class = InversionConfig

    def __init__(self, config):
        super().__init__(config)
        self.prompts: list[str] = []
        self.examples: ConceptExamples | None = None
        self.history: list[dict] | None = None

    def check(self, loaded: LoadedPipeline, items: list[Item]) -> None:
        self.prompts = unique_prompts(item.prompt for item in items)  # every item's, so a resumed run trains alike
        check_new_token(loaded, self.config.token)

    def prepare(self, context: AttackContext, items: list[Item]) -> None:
        if items:
            self.examples = concept_examples(context.loaded, self.prompts, self.config.image_count, self.config.seed,
                                             self.config.images, context.progress)

    def search(self, context: AttackContext, item: Item) -> Found:
        if self.history is None:  # once, on the erased model, at the first item that needs it
            self.history = learn_token(context.loaded, self.examples, context.concept, self.config,
                                       supercategory_word(context.request), context.work_dir(), context.progress)
        prompt = with_token(item.prompt, context.concept, self.config.token)
        image = context.generate(prompt, item.seed, item.guidance)
        success, reading = context.verdict(image)
        return Found(success, image, prompt, reading, {"token": self.config.token, "loss_first":
                                                        self.history[0]["loss"], "loss_last": self.history[-1]["loss"]})


def with_token(prompt: str, concept: str, token: str) -> str:
    """`prompt` with the concept's name (any case) replaced by the token, or the token appended where the prompt
    does not name it."""
    replaced = guide_prompt(prompt, [concept], token)
    return replaced if token in replaced else f"{prompt}, {token}"


def check_new_token(loaded: LoadedPipeline, token: str) -> None:
    """The token must be new to every tokenizer (or one this process added): a word of the vocabulary would be
    learnt over."""
    for tokenizer in loaded.tokenizers.values():
        if token in tokenizer.get_vocab() and token not in tokenizer.get_added_vocab():
            raise UsageError(f"inversion token {token!r} is already a word of the model's vocabulary; pass a new "
                             "one with --set token=<...>")


def add_token(loaded: LoadedPipeline, token: str, initializer: str) -> dict[str, int]:
    """Add `token` to every tokenizer and its encoder's embedding (a new row only where the embedding has no spare
    one: T5's is padded past its vocabulary), its row set to the mean embedding of `initializer`'s tokens; returns
    its id per text encoder."""
    ids = {}
    for name, encoder in loaded.text_encoders.items():
        tokenizer = loaded.tokenizers[name.replace("text_encoder", "tokenizer")]
        tokenizer.add_tokens([token])
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id >= encoder.get_input_embeddings().weight.shape[0]:
            encoder.resize_token_embeddings(token_id + 1, mean_resizing=False)
        start = tokenizer(initializer, add_special_tokens=False).input_ids
        if not start:
            raise UsageError(f"inversion initializer {initializer!r} has no tokens; pass a word with --set "
                             "initializer=WORD")
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[token_id] = weight[torch.tensor(start, device=weight.device)].mean(0)
        ids[name] = token_id
    return ids


def learn_token(loaded: LoadedPipeline, examples: ConceptExamples, concept: str, config: InversionConfig,
                default_initializer: str = "thing", work_dir=None, progress: bool = True) -> list[dict]:
    """Textual inversion of `config.token` on `loaded` as it is (the erased model in an attack): the token is added
    (add_token), its rows trained on `examples` (their captions naming the concept get the token in its place), and
    written into the embeddings, so the pipeline's own call reads it. Returns the logged losses."""
    token_ids = add_token(loaded, config.token, config.initializer or default_initializer)
    encoders = loaded.text_encoders
    rows = {name: nn.Parameter(encoders[name].get_input_embeddings().weight[token_id].detach().float().clone())
            for name, token_id in token_ids.items()}
    loaded.freeze()
    captions = [with_token(caption, concept, config.token) for caption in examples.captions]
    tokenized = loaded.adapter.tokenize(captions)
    optimizer = torch.optim.AdamW(rows.values(), lr=config.lr, weight_decay=config.weight_decay)
    denoiser = loaded.denoiser

    def step(_, generator):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(config.accumulation):
            pick = torch.randint(len(examples), (config.batch_size,), generator=generator)
            ids = {name: tensor[pick.to(tensor.device)] for name, tensor in tokenized.items()}
            with autocast(loaded):
                embeddings = {name: token_embeddings(encoders[name], ids[name], token_ids[name], rows[name])
                              for name in encoders}
                cond = loaded.adapter.encode_ids(ids, embeddings)
                x_t, t, target = noised_batch(loaded, examples.latents[pick.to(examples.latents.device)], generator)
                loss = F.mse_loss(predict_noise(denoiser, x_t, t, cond).float(), target.float())
            (loss / config.accumulation).backward()
            total += loss.item() / config.accumulation
        optimizer.step()
        return {"loss": total}

    state = {"token": ParameterState(list(rows.values())), "optimizer": optimizer}
    loop = TrainingLoop("inversion", config.steps, state, config.seed, work_dir, checkpoint_every=250,
                        progress=progress)
    history = loop.run(step)
    with torch.no_grad():
        for name, token_id in token_ids.items():
            weight = encoders[name].get_input_embeddings().weight
            weight[token_id] = rows[name].to(weight.dtype)
    return logged(loop) if loop.log_path is not None else history


def logged(loop: TrainingLoop) -> list[dict]:
    """A checkpointed loop's whole log, over every run that resumed it (a step logged twice, because a run died
    before its checkpoint, counts once: the later record)."""
    records = {}
    for line in loop.log_path.read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def token_embeddings(encoder: nn.Module, ids: torch.Tensor, token_id: int, row: torch.Tensor) -> torch.Tensor:
    """The encoder's token embeddings of `ids` with the trained `row` wherever the token stands (gradients reach
    the row alone)."""
    embedded = encoder.get_input_embeddings()(ids).detach()
    return torch.where((ids == token_id)[..., None], row.to(embedded.dtype), embedded)
