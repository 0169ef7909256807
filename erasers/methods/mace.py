"""MACE: Mass Concept Erasure in Diffusion Models (Lu et al., CVPR 2024, arXiv 2403.06135), reimplemented from the
paper alone (its code's licence forbids reuse).

Every concept of the request at once, in three stages on the text-reading attentions' keys and values (to_k/to_v):

1. Closed-form refinement (CFR). A causal text encoder mixes the concept into the states of the words after it
   and of the end and padding tokens, so those carry it too. For each concept's prompt, c are the states of the
   tokens it shares with the same prompt with the concept replaced by the mapping concept (`mapping`; tokens
   aligned by difflib, the start token left out), and v = W c' with c' the mapped prompt's states at the aligned
   positions:
       W' = (lamb W + sum v c^T + s (C1_p + w_d C1_d)) (lamb I + sum c c^T + s (C2_p + w_d C2_d))^-1
   C1 = sum W e e^T and C2 = sum e e^T over the states e (every position after the start token) of general
   captions (p: "a photo of a {COCO object}") and domain prompts (d: a vocabulary's captions of the other
   concepts, or --preserve). s = `preserve_scale`, w_d = `domain_weight`.
2. One rank-1 LoRA per concept on to_k/to_v (peft, on the refined weights), trained to drive down the attention the
   concept's tokens (and the end token: `positions`) receive:
       L = sum_layers || A_l[:, mask pixels, concept positions] ||_F       (not squared)
   on noised latents of the concept's images, at timesteps drawn with p(t) ~ sigmoid(0.05 (t - 200)) -
   sigmoid(0.05 (t - 400)) (t on a 1000-step scale, rescaled to the scheduler's). The images: `concept_images`
   per concept drawn by the base model for "a photo of the {c}" / "a photo in the style of {c}" (or a
   vocabulary's captions), every pixel counting (the paper's art-style setting); or a folder (`--images DIR`,
   with several concepts DIR/<concept>/) where a mask `<name>_mask.png` beside an image `<name>.png` restricts
   the loss to the pixels it marks, as segmentation masks do in the paper's object and celebrity settings.
3. Closed-form fusion of all LoRAs into one set of weights:
       W* = (lamb W + sum_i sum_e (W + dW_i) e e^T + s (C1_p + w_d C1_d)) (lamb I + sum_i sum_e e e^T + s (...))^-1
   e the states of concept i's prompts (every position after the start token), W the refined weights.
The edit is the denoiser with its new keys and values (`unet/`, loadable with from_pretrained), like UCE's.

Presets are the paper's configurations (`preset`): lr, iterations, lamb, preserve_scale, domain_weight and mapping
come from it unless given. Families: SD and SDXL. Flux has no text-reading attention map to suppress (its joint
attention takes one softmax over text and image tokens), and its text projections read a stream each block
rewrites from the image and the timestep, so neither closed form has fixed inputs there (see `why_not`).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..anchors import draw_anchor_latents, noised
from ..attention_maps import POSITIONS, ConceptAttention, concept_positions, key_positions, spellings
from ..closed_form import LeastSquaresEdit, token_columns, token_counts
from ..errors import UsageError
from ..files import work_file
from ..images import concept_folders, images_with_masks, read_images
from ..lora_adapters import add_lora, has_adapters, lora_deltas, remove_lora
from ..losses import predict_noise
from ..models import LoadedPipeline
from ..precision import build_optimizer, finish, train_only
from ..prompts import EraseRequest, default_retain_prompts, guide_prompt, supercategory_word
from ..registry import Eraser, register
from ..train import ParameterState, TrainingLoop

# The paper's configurations: lr, iterations, lamb, preserve_scale (s), domain_weight (w_d), mapping.
PRESET_FIELDS = ("lr", "iterations", "lamb", "preserve_scale", "domain_weight", "mapping")
PRESETS = {
    "object": (1e-5, 50, 1e3, 0.0, 0.0, "ground"),
    "art": (1e-4, 50, 0.0, 1e-4, 8e4, "art"),
    "celebrity": (1e-4, 50, 0.0, 1e-4, 8e3, "a woman"),
    "explicit": (1e-5, 120, 0.0, 7e-7, 0.0, "a person wearing clothes"),
}
# Prompts naming a concept off a vocabulary (the art preset uses the style ones); the first draws its images.
TEMPLATES = {
    "object": ("a photo of the {}", "an image of the {}", "a picture of the {}", "a close-up photo of the {}", "{}"),
    "style": ("a photo in the style of {}", "a painting in the style of {}", "an image in the style of {}",
              "an artwork by {}", "{}"),
}


@dataclass
class MACEConfig:
    """Fields left None take the preset's value (PRESETS); the rest are the paper's (AdamW decay 0.01, batch 1,
    rank-1 LoRAs, 8 images per concept)."""

    preset: str = "object"                 # object, art, celebrity or explicit
    lr: float | None = None
    iterations: int | None = None          # LoRA steps per concept
    lamb: float | None = field(default=None, metadata={"min": 0})   # 0: nothing pins W (the art preset)
    preserve_scale: float | None = None    # s: the general captions' weight (0: no preservation term)
    domain_weight: float | None = None     # w_d: the domain prompts' weight relative to the general captions'
    # What the concept is mapped to in the refinement; "supercategory": the vocabulary's word for its kind
    # ("object", "painting"). --anchor replaces it.
    mapping: str | None = None
    rank: int = field(default=1, metadata={"min": 1})
    batch_size: int = 1
    weight_decay: float = 0.01
    positions: str = "concept+end"         # the key positions suppressed (attention_maps.POSITIONS)
    concept_images: int = 8                # drawn by the base model per concept, without --images
    images: str = ""                       # a folder of the concept's images and masks (DIR/<concept>/ for several)
    sample_steps: int = 50                 # the drawn images' sampling steps and guidance
    sample_guidance: float = 7.5
    refine: bool = True                    # stage 1 (false: the paper's ablation without CFR)
    suppress: bool = True                  # stages 2 and 3 (false: CFR alone)
    seed: int = 0

    def __post_init__(self):
        # Checked when the config is built, before the pipeline loads or OUT.partial/ is made.
        if self.preset not in PRESETS:
            raise UsageError(f"mace preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        for name, value in zip(PRESET_FIELDS, PRESETS[self.preset]):
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.positions not in POSITIONS:
            raise UsageError(f"mace positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        if not (self.refine or self.suppress):
            raise UsageError("mace with refine=false and suppress=false would change nothing; keep one of them")
        if self.images and not Path(self.images).expanduser().is_dir():
            raise UsageError(f"--images {self.images} is not a folder; pass a folder of images of the concept")


def mace_timestep_weights(train_timesteps: int) -> torch.Tensor:
    """p(t) ~ sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400)) on the paper's 1000 steps, at `train_timesteps`."""
    t = torch.arange(train_timesteps, dtype=torch.float64) * 1000 / train_timesteps
    return torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))


def concept_prompts(request: EraseRequest, concept: str, preset: str) -> list[str]:
    """The prompts naming one concept: its text and a vocabulary's captions of it, else the templates."""
    if request.vocabulary is not None:
        return dataclasses.replace(request, concepts=[concept]).erase_prompts()
    return [template.format(concept) for template in TEMPLATES["style" if preset == "art" else "object"]]


def image_prompts(request: EraseRequest, concept: str, preset: str) -> list[str]:
    """What the concept's images are drawn for (and the LoRA reads with them): the captions, or the first template."""
    prompts = concept_prompts(request, concept, preset)
    return prompts[1:] if request.vocabulary is not None else prompts[:1]


def mapping_text(request: EraseRequest, index: int, mapping: str) -> str:
    """What concept `index` is mapped to: --anchor texts in turn, else the config's mapping."""
    if request.anchors:
        return request.anchors[index % len(request.anchors)]
    return supercategory_word(request) if mapping == "supercategory" else mapping


def shared_positions(ids: list[int], mapped_ids: list[int]) -> list[tuple[int, int]]:
    """(position in the prompt, position in the mapped prompt) of every token the two share, aligned by difflib
    (the words before and after the concept, the end token, the padding), the start token left out."""
    matcher = difflib.SequenceMatcher(None, ids, mapped_ids, autojunk=False)
    return [(a + k, b + k) for a, b, size in matcher.get_matching_blocks() for k in range(size) if a + k > 0]


@torch.no_grad()
def cooccurring_columns(loaded: LoadedPipeline, prompts: list[str], mapped: list[str]):
    """CFR's inputs c (d, n) and the mapped prompts' states c' at the aligned positions (d, n)."""
    name = loaded.adapter.token_states_encoder
    ids, mapped_ids = loaded.adapter.tokenize(prompts)[name].tolist(), loaded.adapter.tokenize(mapped)[name].tolist()
    states = loaded.encode_text(prompts).states.double().cpu()
    mapped_states = loaded.encode_text(mapped).states.double().cpu()
    columns, mapped_columns = [], []
    for row in range(len(prompts)):
        pairs = shared_positions(ids[row], mapped_ids[row])
        columns.append(states[row, [a for a, _ in pairs]])
        mapped_columns.append(mapped_states[row, [b for _, b in pairs]])
    return torch.cat(columns).T, torch.cat(mapped_columns).T


def all_positions(loaded: LoadedPipeline, prompts: list[str]) -> torch.Tensor:
    """The states of every position after the start token (end token and padding included), as columns."""
    return token_columns(loaded, prompts, token_counts(loaded, prompts, include_padding=True))


def preservation_inputs(loaded: LoadedPipeline, request: EraseRequest, cfg: MACEConfig) -> list:
    """[(s, general captions' columns), (s w_d, domain prompts' columns)]: the terms with a weight above 0."""
    terms = []
    if cfg.preserve_scale > 0:
        terms.append((cfg.preserve_scale, all_positions(loaded, default_retain_prompts(request))))
        domain = request.preserve or request.retain_prompts()
        if cfg.domain_weight > 0 and domain:
            terms.append((cfg.preserve_scale * cfg.domain_weight, all_positions(loaded, domain)))
    return terms


def edited_weight(closed_form: LeastSquaresEdit, weight: torch.Tensor, moved: list[torch.Tensor]) -> torch.Tensor:
    """The closed form's weight when its first inputs should give `moved` (CFR: W c'; fusion: (W + dW_i) e) and the
    rest, the preservation terms, what `weight` gives them."""
    kept = [weight @ columns for _, columns in closed_form.inputs[len(moved):]]
    return closed_form.solve(weight, moved + kept)


def fusion(lamb: float, concept_columns: list[torch.Tensor], preservation: list = ()) -> LeastSquaresEdit:
    """Stage 3's closed form: one input per concept (its prompts' columns e), then the preservation terms."""
    return LeastSquaresEdit(lamb, [(1.0, c) for c in concept_columns] + list(preservation),
                            concept_columns[0].shape[0])


def fused_weight(closed_form: LeastSquaresEdit, weight: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Stage 3 for one linear: the weight whose outputs on concept i's columns are its LoRA's, (W + dW_i) e."""
    moved = [(weight + delta) @ columns for delta, (_, columns) in zip(deltas, closed_form.inputs)]
    return edited_weight(closed_form, weight, moved)


@torch.no_grad()
def user_images(loaded: LoadedPipeline, pairs: list[tuple[Path, Path | None]]):
    """Latents of a user's images at the training resolution (centre-cropped square) and their masks at the latent's
    resolution (None when no image has one; an image without a mask counts every pixel)."""
    from PIL import ImageOps

    side = loaded.adapter.latent_size() * loaded.pipeline.vae_scale_factor
    images = read_images([image for image, _ in pairs])
    latents = torch.cat([loaded.adapter.encode_image(ImageOps.fit(image, (side, side))) for image in images])
    if all(mask is None for _, mask in pairs):
        return latents, None
    masks = [torch.ones(side, side) if mask is None else
             torch.from_numpy(np.asarray(ImageOps.fit(read_images([mask])[0].convert("L"), (side, side))) > 127).float()
             for _, mask in pairs]
    return latents, torch.nn.functional.adaptive_max_pool2d(torch.stack(masks)[:, None], latents.shape[-2:])


# Measured on ToyCanvas (benchmarks/results/NOTES.md, MACE, has the runs): the tiny UNet needs larger steps than
# SD's (SPM's rank-1 LoRA trains at 1e-2 there too) and fewer of them: the fused LoRAs of several concepts break the
# concepts left once they train much past 40 steps. The paper's art weighting (nothing pins W, lamb 0; the other
# captions as the domain term, s w_d = 8) keeps the styles left and lets 40 steps erase five styles at once, and it
# serves objects as well as the object pinning (lamb 1e3) did. The vocabulary's supercategory word is the mapping
# (the toy's text encoder never saw "ground"; the COCO captions are words it never saw either).
TOY_DEFAULTS = {"lr": 1e-2, "iterations": 40, "lamb": 0.0, "preserve_scale": 1e-4, "domain_weight": 8e4,
                "mapping": "supercategory", "sample_steps": 25, "sample_guidance": 5.0}


@register("mace", "MACE: closed-form refinement of cross-attention keys/values, one LoRA per concept suppressing its "
          "attention maps, closed-form fusion of the LoRAs", toy_defaults=TOY_DEFAULTS,
          quick={"iterations": 4, "concept_images": 1, "sample_steps": 2, "lr": 1e-2, "lamb": 1.0,
                 "preserve_scale": 1.0, "domain_weight": 1.0},
          families=("sd", "sdxl"),
          why_not={"flux": "MACE's LoRAs suppress cross-attention maps, the probabilities pixels put on the "
                           "concept's tokens, and Flux has none: its joint attention takes one softmax over the text "
                           "and image tokens together (rotary positions, double and single blocks); and both closed "
                           "forms assume keys and values computed from fixed text-encoder states, while Flux's "
                           "add_k/add_v_proj read a text stream each block rewrites from the image tokens and the "
                           "timestep (uce edits Flux on recorded inputs)"},
          variants={"nocfr": {"refine": False}, "cfr": {"suppress": False}},
          step_cost_models=("toy", "sd15"), reads_anchors=True, reads_preserve=True,
          multi_concept="one closed form over all, then one LoRA each, fused in one closed form")
class MACE(Eraser):
    config_class = MACEConfig

    def check(self, loaded: LoadedPipeline, request: EraseRequest) -> None:
        if has_adapters(loaded.denoiser):
            raise UsageError("mace trains its LoRAs on the base denoiser, and this one already holds LoRA adapters; "
                             "load the base model without them")
        cfg = self.config
        if request.preserve and not (cfg.preserve_scale > 0 and cfg.domain_weight > 0):
            raise UsageError(f"mace keeps --preserve prompts with weight preserve_scale x domain_weight, 0 in the "
                             f"{cfg.preset} preset here; pass --set preserve_scale=1e-4 --set domain_weight=1e4 "
                             "(or other values above 0), or drop --preserve")
        if not cfg.suppress:
            return
        self.suppressed_positions(loaded, request)  # a prompt without the concept's tokens fails here
        if cfg.images:
            for folder in concept_folders(cfg.images, request.concepts):
                read_images([path for pair in images_with_masks(folder) for path in pair if path is not None])

    def suppressed_positions(self, loaded: LoadedPipeline, request: EraseRequest) -> list[torch.Tensor]:
        """Per concept, the key positions stage 2 suppresses in each of its image prompts."""
        name = loaded.adapter.token_states_encoder
        tokenizer = loaded.tokenizers[name.replace("text_encoder", "tokenizer")]
        found = []
        for concept in request.concepts:
            ids = loaded.adapter.tokenize(image_prompts(request, concept, self.config.preset))[name]
            phrases = spellings(dataclasses.replace(request, concepts=[concept]))
            found.append(key_positions(concept_positions(tokenizer, ids, phrases), self.config.positions, tokenizer,
                                       ids))
        return found

    def erase(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None = None):
        cfg = self.config
        self.check(loaded, request)
        unet = loaded.denoiser
        linears = {f"{name}.{projection}": module for name, k, v in loaded.adapter.cross_attention_kv()
                   for projection, module in (("to_k", k), ("to_v", v))}
        for linear in linears.values():  # neither closed form's result is rounded to half precision
            linear.weight.data = linear.weight.data.float()
        data = self.concept_data(loaded, request, work_dir) if cfg.suppress else []  # from the base model
        preservation = preservation_inputs(loaded, request, cfg)
        if cfg.refine:
            self.refine(loaded, request, linears, preservation)
        if cfg.suppress:
            trained = [self.train_lora(loaded, i, concept, work_dir) for i, concept in enumerate(data)]
            self.histories = [history for history, _ in trained]
            self.history = [row for history in self.histories for row in history]
            prompts = [concept_prompts(request, c, cfg.preset) for c in request.concepts]
            closed_form = fusion(cfg.lamb, [all_positions(loaded, p) for p in prompts], preservation)
            with torch.no_grad():
                for key in linears:
                    linear = unet.get_submodule(key)  # the plain linear again, the LoRAs unloaded
                    weight = linear.weight.double().cpu()
                    edited = fused_weight(closed_form, weight, [deltas[key] for _, deltas in trained])
                    linear.weight.copy_(edited.to(linear.weight))
        return {loaded.family.denoiser: finish(loaded, unet.eval())}

    @torch.no_grad()
    def refine(self, loaded: LoadedPipeline, request: EraseRequest, linears: dict, preservation: list) -> None:
        """Stage 1, every concept's prompts in one closed form."""
        prompts, mapped = [], []
        for i, concept in enumerate(request.concepts):
            own = concept_prompts(request, concept, self.config.preset)
            target = mapping_text(request, i, self.config.mapping)
            prompts += own
            mapped += [guide_prompt(p, [concept], target) for p in own]
        columns, mapped_columns = cooccurring_columns(loaded, prompts, mapped)
        closed_form = LeastSquaresEdit(self.config.lamb, [(1.0, columns)] + preservation, columns.shape[0])
        for linear in linears.values():
            weight = linear.weight.double().cpu()
            linear.weight.copy_(edited_weight(closed_form, weight, [weight @ mapped_columns]).to(linear.weight))

    def concept_data(self, loaded: LoadedPipeline, request: EraseRequest, work_dir: Path | None) -> list[dict]:
        """Per concept: its images' latents (drawn once, cached in OUT.partial/, or the user's), masks, the prompt
        each image is read with, those prompts' states and the key positions to suppress."""
        cfg = self.config
        folders = concept_folders(cfg.images, request.concepts) if cfg.images else [None] * len(request.concepts)
        data = []
        for i, (concept, folder, positions) in enumerate(zip(request.concepts, folders,
                                                             self.suppressed_positions(loaded, request))):
            prompts = image_prompts(request, concept, cfg.preset)
            if folder is None:
                cache = work_file(work_dir, f"mace_concept_{i}_latents.safetensors")
                latents, index = draw_anchor_latents(loaded, prompts, cfg.concept_images, cfg.sample_steps,
                                                     cfg.sample_guidance, cfg.seed, cache)
                masks = None
            else:
                latents, masks = user_images(loaded, images_with_masks(folder))
                index = torch.arange(len(latents)) % len(prompts)
            with torch.no_grad():
                states = loaded.encode_text(prompts)
            data.append({"latents": latents.to(loaded.device, loaded.dtype), "masks": masks, "index": index,
                         "states": states, "positions": positions})
        return data

    def train_lora(self, loaded: LoadedPipeline, index: int, data: dict, work_dir: Path | None):
        """Stage 2 for one concept: its rank-1 LoRA on every to_k/to_v trained against its attention maps. Returns
        the loss history and each linear's dW, the adapter unloaded."""
        cfg, unet, adapter = self.config, loaded.denoiser, loaded.adapter
        names = adapter.text_attention_names()
        torch.manual_seed(cfg.seed + index)  # the adapter's down projections start random
        name = f"mace_{index}"
        parameters = train_only(loaded, add_lora(loaded, name, [f"{n}.{p}" for n in names for p in ("to_k", "to_v")],
                                                 cfg.rank), unet)
        optimizer = build_optimizer(loaded, parameters, cfg.lr, cfg.weight_decay)
        weights = mace_timestep_weights(adapter.training_scheduler.config.num_train_timesteps)
        latents, masks, states = data["latents"], data["masks"], data["states"]

        def step(_, generator):
            picked = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
            t = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=generator)
            x_t, t, _ = noised(loaded, latents[picked], generator, t)
            k = data["index"][picked]
            attention.positions = data["positions"][k]
            attention.pixels = masks[picked].to(loaded.device) if masks is not None else None
            predict_noise(unet, x_t, t, states[k])  # the processors add up the concept's attention
            loss = attention.layer_norms()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        unet.train()
        try:
            with ConceptAttention(unet, names) as attention:
                history = TrainingLoop(f"mace-lora-{index}", cfg.iterations, {"params": ParameterState(parameters),
                                                                              "opt": optimizer},
                                       cfg.seed + index, work_dir, checkpoint_every=50).run(step)
            deltas = lora_deltas(unet, name)
        finally:
            remove_lora(loaded)  # the plain linears again, holding the refined weights
            unet.eval()
        return history, deltas
