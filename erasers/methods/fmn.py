"""Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models (Zhang et al., 2023).

Attention re-steering: the denoiser is fine-tuned so that its text-reading attention stops looking at the concept.
On noised latents of a few images of the concept (the base model draws them, seeded and cached in OUT.partial/),
conditioned on the concept's prompts ("a photo of {c}" / "a photo in the style of {c}"; on ToyCanvas the concept's
captions), the loss is the L2 norm (not squared) of the cross-attention softmax probabilities at the concept's
token positions, over every head, pixel (query) and text-reading attention layer:
    L = || concat_{layers} A_l[:, :, concept positions] ||_2
The probabilities are read by an attention processor set on the text-reading attentions for the run, which computes
the softmax explicitly (attn.get_attention_scores) and keeps the squared probabilities at the positions found by
tokenizing each prompt (the concept's own tokens; `positions=concept+end` also the end token, as the reference
configuration's `use_pooler`); erasers/attention_maps.py, which MACE shares. The whole UNet trains by default
(`parameters=xattn`: the text-reading attentions).

Optional first stage (`inversion`, off by default): textual inversion of `inversion_tokens` vectors that stand for
the concept, learnt with the plain denoising loss on the same images with the concept's words replaced by them;
the re-steering then acts on their positions. No tokenizer is saved: the vectors are training-time inputs only,
given to the text encoders as token embeddings (the family adapter's encode_ids).

Optional text stage (`text_steps`, off by default; not in the paper), after the re-steering: the same loss on the
text encoders' own self-attention, the probabilities that the end token and the padding put on the concept's tokens
(copied_attention), trained on the encoders' query/key projections with the retain prompts' token states held. A
causal encoder copies the concept, a style above all, into the end token and the padding, where the denoiser reads
most of a prompt; the denoiser's re-steering of those positions alone would re-steer every prompt that shares them.
The edit then holds the encoders beside the denoiser.

Families: SD and SDXL (both encoders' states share the 77 token positions). Flux is left out: its joint attention
runs one softmax over text and image tokens in every double and single block (with rotary embeddings), and no
text-reading attention of the kind FMN re-steers exists there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..anchors import draw_anchor_latents
from ..attention_maps import (
    POSITIONS,
    ConceptAttention,
    concept_positions,
    copied_attention,
    end_and_padding_positions,
    key_positions,
    spellings,
)
from ..errors import UsageError
from ..files import work_file
from ..losses import predict_noise
from ..models import LoadedPipeline
from ..parameters import trainable_parameters
from ..precision import build_optimizer, finish, train_only
from ..prompts import EraseRequest, default_retain_prompts
from ..registry import Eraser, register
from ..train import ParameterState, TrainingLoop, descend

PARAMETER_SETS = ("full", "xattn", "xattn-strict")
TEMPLATES = {"object": "a photo of {}", "style": "a photo in the style of {}"}


@dataclass
class FMNConfig:
    """Defaults are the paper's (the reference configuration for SD 2.1: whole UNet, lr 2e-6, 35 steps, batch 1,
    AdamW decay 1e-2, gradients clipped to norm 1, ~10 images of the concept)."""

    parameters: str = "full"           # "full": the whole UNet; "xattn": its text-reading attentions;
    #                                    "xattn-strict": only their key/value projections
    iterations: int = 35
    batch_size: int = 1
    lr: float = 2e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0         # 0: no clipping
    concept_images: int = 10           # images the base model draws per concept (spread over its prompts)
    # Off a concept vocabulary, which template prompts the concept: "object" ("a photo of {c}") or "style".
    concept_type: str = "object"
    # The key positions re-steered: "concept", its tokens (the paper); "concept+end", and the end token (the
    # reference configuration's use_pooler); "concept+after", and every later position (end token and padding).
    positions: str = "concept"
    # Not in the paper (0: off): how strongly the text-reading key/value projections keep what they give for the
    # retain prompts (the vocabulary's other captions and --preserve; with neither, COCO objects), as UCE's
    # preservation term does.
    preserve_weight: float = 0.0
    # Not in the paper (0: off): the text stage's steps (module docstring); a causal encoder copies a style into the
    # end token and the padding, where the denoiser's re-steering cannot cut it without cutting every prompt.
    text_steps: int = field(default=0, metadata={"min": 0})
    text_lr: float = 1e-3
    text_preserve_weight: float = 10.0
    inversion: bool = False            # learn vectors that stand for the concept first, and re-steer those
    inversion_tokens: int = 4
    inversion_steps: int = 500
    inversion_lr: float = 1e-3
    sample_steps: int = 50             # the concept images' sampling steps and guidance
    sample_guidance: float = 7.5
    seed: int = 0

    def __post_init__(self):
        # Checked when the config is built, before the pipeline loads or OUT.partial/ is made.
        if self.parameters not in PARAMETER_SETS:
            raise UsageError(f"fmn parameters must be one of {', '.join(PARAMETER_SETS)}, not {self.parameters!r}")
        if self.concept_type not in TEMPLATES:
            raise UsageError(f"fmn concept_type must be object or style, not {self.concept_type!r}")
        if self.positions not in POSITIONS:
            raise UsageError(f"fmn positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        if self.inversion and self.text_steps:
            raise UsageError("fmn: inversion and text_steps do not combine (the inversion replaces the concept's "
                             "words that the text stage re-steers the encoders away from); pass --set text_steps=0 "
                             "with inversion")


def fmn_prompts(request: EraseRequest, concept_type: str) -> list[str]:
    """The prompts the re-steering reads: the concept's captions with a vocabulary, else the paper's template."""
    if request.vocabulary is not None:
        return request.erase_prompts()
    return [TEMPLATES[concept_type].format(concept) for concept in request.concepts]


def slotted_ids(tokenizer, prompt: str, phrases: list[str], slots: int, length: int) -> tuple[list[int], int]:
    """`prompt`'s token ids with its first occurrence of the concept's tokens replaced by `slots` placeholder slots
    (the concept's first token id: the slots' embeddings are replaced anyway), at `length`; and the first slot."""
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
    for phrase in reversed(phrases):  # the longest spelling first
        words = tokenizer(phrase, add_special_tokens=False).input_ids
        start = next((i for i in range(len(ids) - len(words) + 1) if words and ids[i:i + len(words)] == words), None)
        if start is not None:
            break
    else:
        raise UsageError(f"fmn: the prompt {prompt!r} does not contain the concept ({', '.join(phrases)})")
    ids = (ids[:start] + words[:1] * slots + ids[start + len(words):] + [tokenizer.pad_token_id] * length)[:length]
    if tokenizer.eos_token_id not in ids[start + slots:]:  # the encoder pools at the end token: never cut it
        ids[-1] = tokenizer.eos_token_id
    return ids, start


class ConceptVectors(nn.Module):
    """Textual inversion without a new tokenizer: `tokens` learnt word embeddings per text encoder, put in every
    prompt's slots (where the concept's words were) through the adapter's encode_ids(token_embeddings=...)."""

    def __init__(self, loaded: LoadedPipeline, request: EraseRequest, prompts: list[str], tokens: int,
                 generator: torch.Generator):
        super().__init__()
        self.ids, self.starts, vectors = {}, {}, {}
        phrases = spellings(request)
        for name in loaded.family.text_encoders:
            tokenizer = loaded.tokenizers[name.replace("text_encoder", "tokenizer")]
            rows = [slotted_ids(tokenizer, p, phrases, tokens, loaded.adapter.text_length(name)) for p in prompts]
            self.ids[name] = torch.tensor([ids for ids, _ in rows], device=loaded.device)
            self.starts[name] = torch.tensor([start for _, start in rows])
            # Initialised as the concept's own word embeddings, then random ones of the table's scale (the
            # reference initialises from the concept's words and random tokens).
            table = loaded.text_encoders[name].get_input_embeddings().weight.detach().float().cpu()
            words = tokenizer(phrases[-1], add_special_tokens=False).input_ids
            start = [table[word] for word in words[:tokens]]
            random = torch.randn(tokens - len(start), table.shape[1], generator=generator) * table.std()
            vectors[name] = nn.Parameter(torch.cat([torch.stack(start), random]).to(loaded.device))
        self.vectors = nn.ParameterDict(vectors)

    def slot_positions(self, name: str, length: int) -> torch.Tensor:
        slots = self.starts[name][:, None] + torch.arange(len(self.vectors[name]))
        return torch.zeros(len(slots), length, dtype=torch.bool).scatter_(1, slots, True)

    def conditioning(self, loaded: LoadedPipeline, rows: torch.Tensor):
        embeddings = {}
        for name, vectors in self.vectors.items():
            ids = self.ids[name][rows]
            base = loaded.text_encoders[name].get_input_embeddings().weight.detach()[ids]
            where = self.slot_positions(name, ids.shape[1])[rows].to(ids.device)
            embeddings[name] = base.masked_scatter(where[..., None], vectors.to(base.dtype).repeat(len(rows), 1))
        return loaded.adapter.encode_ids({name: self.ids[name][rows] for name in self.vectors}, embeddings)


class ProjectionDrift:
    """How far the trained text-reading key/value projections have moved on what they read for the retain prompts,
    relative to what they gave: sum_l ||(W_l - W0_l) X_l^T||^2 / sum_l ||W0_l X_l^T||^2 over every position of every
    retain prompt (padding included: the re-steered later positions are padding too), through each group's Gram
    matrix X^T X so a step costs no text or denoiser pass. In float32 outside the erase's autocast: a half-precision
    Gram matrix of thousands of positions overflows, and early differences W - W0 are below fp16's resolution."""

    def __init__(self, loaded: LoadedPipeline, prompts: list[str], trained: list[nn.Parameter]):
        trained_ids = {id(parameter) for parameter in trained}
        self.device_type = torch.device(loaded.device).type
        self.terms = []
        with torch.autocast(self.device_type, enabled=False):
            for linears, inputs in loaded.adapter.text_projection_inputs(prompts):
                columns = inputs.reshape(-1, inputs.shape[-1]).float()
                columns = columns / len(columns) ** 0.5
                gram = columns.T @ columns
                self.terms += [(linear.weight, linear.weight.detach().float().clone(), gram) for linear in linears
                               if id(linear.weight) in trained_ids]
            self.scale = sum(((w0 @ gram) * w0).sum() for _, w0, gram in self.terms) if self.terms else 1.0

    def __call__(self) -> torch.Tensor:
        if not self.terms:
            return torch.zeros(())
        total = 0
        with torch.autocast(self.device_type, enabled=False):
            for weight, w0, gram in self.terms:
                moved = weight.float() - w0
                total = total + ((moved @ gram) * moved).sum()
        return total / self.scale


# Toy defaults, measured on ToyCanvas (benchmarks/results/NOTES.md, Forget-Me-Not, has every tuning run). The whole
# UNet (the paper's) re-steered the arrow only by breaking every object. The toy's text encoder puts a caption's
# style in the end token and the padding, so the later positions are re-steered too, with preserve_weight holding
# what the other captions' keys and values give there; without the text stage, which stops the encoder copying the
# concept there, Stripes was erased at some training seeds only.
TOY_DEFAULTS = {"parameters": "xattn-strict", "positions": "concept+after", "preserve_weight": 30.0, "lr": 4e-3,
                "iterations": 100, "sample_steps": 25, "sample_guidance": 5.0, "text_steps": 100}


@register("fmn", "Forget-Me-Not: fine-tune the UNet so its cross-attention stops looking at the concept's tokens",
          toy_defaults=TOY_DEFAULTS,
          quick={"iterations": 6, "concept_images": 2, "sample_steps": 2, "lr": 1e-3, "text_steps": 3},
          families=("sd", "sdxl"),
          why_not={"flux": "Flux has no cross-attention: its joint attention takes one softmax over the text and "
                           "image tokens together (rotary positions, double and single blocks), so there are no "
                           "text-reading attention maps to re-steer as the paper does on SD's attn2"},
          step_cost_models=("toy", "sd15"),
          multi_concept="one loss over all: images of every concept, each at its own tokens",
          reads_preserve=True)
class ForgetMeNot(Eraser):
    config_class = FMNConfig

    def check(self, loaded: LoadedPipeline, request: EraseRequest) -> None:
        cfg = self.config
        if request.preserve and not (cfg.preserve_weight or cfg.text_steps):
            raise UsageError("fmn keeps --preserve prompts only through preserve_weight or the text stage, both off "
                             "here; pass --set preserve_weight=30 or --set text_steps=100, or drop --preserve")

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        cfg = self.config
        torch.manual_seed(cfg.seed)
        unet, adapter = loaded.denoiser, loaded.adapter
        prompts = fmn_prompts(request, cfg.concept_type)
        images, image_prompt = draw_anchor_latents(
            loaded, prompts, cfg.concept_images, cfg.sample_steps, cfg.sample_guidance,
            cfg.seed, work_file(work_dir, "concept_latents.safetensors"),
            concepts=len(request.concepts))
        loaded.freeze()
        name = adapter.token_states_encoder
        tokenizer = loaded.tokenizers[name.replace("text_encoder", "tokenizer")]
        if cfg.inversion:
            vectors = ConceptVectors(loaded, request, prompts, cfg.inversion_tokens,
                                     torch.Generator().manual_seed(cfg.seed))
            self.inversion_history = self.invert(loaded, vectors, images, image_prompt, work_dir)
            with torch.no_grad():
                states = vectors.conditioning(loaded, torch.arange(len(prompts)))
            ids = vectors.ids[name]
            positions = vectors.slot_positions(name, ids.shape[1]).to(ids.device)
        else:
            ids = adapter.tokenize(prompts)[name]
            positions = concept_positions(tokenizer, ids, spellings(request))
            with torch.no_grad():
                states = loaded.encode_text(prompts)
        positions = key_positions(positions, cfg.positions, tokenizer, ids)

        parameters = train_only(loaded, trainable_parameters(loaded, cfg.parameters), unet)
        optimizer = build_optimizer(loaded, parameters, cfg.lr, cfg.weight_decay)
        retain = request.retain_prompts() or default_retain_prompts(request)
        drift = ProjectionDrift(loaded, retain, parameters) if cfg.preserve_weight else None

        def step(_, generator):
            picked = torch.randint(len(images), (cfg.batch_size,), generator=generator)
            k = image_prompt[picked]
            x_t, t, _ = adapter.noised(images[picked], generator)
            attention.positions = positions[k]
            predict_noise(unet, x_t, t, states[k])  # the processors add up the concept's attention
            resteer = attention.norm()
            kept = drift() if drift is not None else torch.zeros(())
            loss = resteer + cfg.preserve_weight * kept
            descend(loss, optimizer, parameters, cfg.max_grad_norm)
            return {"loss": loss.item(), "attention": resteer.item(), "drift": kept.item()}

        unet.train()
        with ConceptAttention(unet, adapter.text_attention_names()) as attention:
            self.history = TrainingLoop("fmn", cfg.iterations, {"params": ParameterState(parameters),
                                                                 "opt": optimizer}, cfg.seed, work_dir,
                                         checkpoint_every=50).run(step)
        edited = {loaded.family.denoiser: finish(loaded, unet.eval())}
        if cfg.text_steps:  # after the re-steering, which is trained on what the base encoders give
            edited.update(self.resteer_text(loaded, request, prompts, retain, work_dir))
        return edited

    def resteer_text(self, loaded: LoadedPipeline, request: EraseRequest, prompts: list[str], retain: list[str],
                     work_dir: Path | None) -> dict[str, nn.Module]:
        """The text stage: the encoders' self-attention query/key projections train so that the end token and the
        padding stop attending to the concept's tokens (the L2 norm of those probabilities, as the re-steering's),
        while the retain prompts' token states (and SDXL's pooled embedding) and the concept prompts' states before
        the end token stay where they were (relative squared drift). Returns the edited encoders, frozen again."""
        cfg = self.config
        encoders = loaded.trained_text_encoders
        ids = loaded.adapter.tokenize(prompts)
        tokenizers = {name: loaded.tokenizers[name.replace("text_encoder", "tokenizer")] for name in encoders}
        positions = {name: concept_positions(tokenizers[name], ids[name], spellings(request)) for name in encoders}
        queries = {name: end_and_padding_positions(tokenizers[name], ids[name]) for name in encoders}
        held_prompts = retain + prompts
        cut = queries[loaded.adapter.token_states_encoder]
        held_positions = torch.cat([torch.ones(len(retain), cut.shape[1], dtype=torch.bool, device=loaded.device),
                                    ~cut])[..., None]
        with torch.no_grad():
            base = loaded.encode_text(held_prompts)
        held = base.states.float() * held_positions
        # SDXL's pooled text_embeds are the second encoder's end token, which this stage trains: held for the
        # retain prompts too.
        held_pooled = None if base.pooled is None else base.pooled[:len(retain)].float()

        def drift_from(conditioning) -> torch.Tensor:
            drift = (conditioning.states.float() * held_positions - held).pow(2).sum() / held.pow(2).sum()
            if held_pooled is not None:
                pooled = conditioning.pooled[:len(retain)].float()
                drift = drift + (pooled - held_pooled).pow(2).sum() / held_pooled.pow(2).sum()
            return drift

        # No gradient checkpointing here: copied_attention switches the encoders to their eager attention for its
        # own call only, and a checkpointed layer would recompute it in the backward pass with the other one.
        parameters = train_only(loaded, [p for encoder in encoders.values() for key, p in encoder.named_parameters()
                                         if "self_attn.q_proj" in key or "self_attn.k_proj" in key])
        optimizer = build_optimizer(loaded, parameters, cfg.text_lr, cfg.weight_decay)

        def step(_, generator):
            copied = sum(copied_attention(encoders[encoder_name], ids[encoder_name], positions[encoder_name],
                                          queries[encoder_name]) for encoder_name in encoders).sqrt()
            drift = drift_from(loaded.encode_text(held_prompts))
            loss = copied + cfg.text_preserve_weight * drift
            descend(loss, optimizer, parameters, cfg.max_grad_norm)
            return {"text_loss": loss.item(), "copied": copied.item(), "text_drift": drift.item()}

        self.text_history = TrainingLoop("fmn-text", cfg.text_steps, {"params": ParameterState(parameters),
                                                                      "opt": optimizer}, cfg.seed, work_dir,
                                         checkpoint_every=50).run(step)
        return {name: finish(loaded, encoder.eval()) for name, encoder in encoders.items()}

    def invert(self, loaded: LoadedPipeline, vectors: ConceptVectors, images, image_prompt, work_dir) -> list[dict]:
        """Textual inversion: the vectors learn to reproduce the concept's images under the plain denoising loss,
        the denoiser and text encoders frozen."""
        cfg = self.config
        optimizer = build_optimizer(loaded, list(vectors.parameters()), cfg.inversion_lr)

        def step(_, generator):
            picked = torch.randint(len(images), (cfg.batch_size,), generator=generator)
            x_t, t, target = loaded.adapter.noised(images[picked], generator)
            prediction = predict_noise(loaded.denoiser, x_t, t, vectors.conditioning(loaded, image_prompt[picked]))
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"inversion_loss": loss.item()}

        return TrainingLoop("fmn-inversion", cfg.inversion_steps, {"vectors": vectors, "opt": optimizer}, cfg.seed,
                            work_dir, checkpoint_every=100).run(step)
