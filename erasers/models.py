"""Loading diffusion pipelines: a local directory, a hub id or a registered name (MODEL_ALIASES); SD 1.x/2.x, SDXL
and Flux.

All architecture knowledge lives in `erasers/families/`: one `Family` record per pipeline family (which components
are text encoders, which is the denoiser) and one adapter class (how prompts become the denoiser's conditioning,
what it predicts, how x_t is sampled, which parameters read the text). A `LoadedPipeline` is the loaded record:
the pipeline, its family, its adapter, its vocabulary and training options; methods never test a pipeline's
class themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .errors import UsageError, first_line
from .families import FAMILIES, PIPELINE_FAMILIES, Family
from .files import read_json
from .images import drawn_images
from .inputs import STEPS
from .precision import TrainingOptions
from .vocabulary import ConceptVocabulary, read_vocabulary

# Model names that stand for a directory, registered by whoever ships the model: `benchmarks.toycanvas` registers
# "toy" (its pipeline directory) when imported, as the `erasure` command and the tests do. The library itself knows
# no model by name.
MODEL_ALIASES: dict[str, Path] = {}
# The file that marks a toy pipeline: its erasers take their toy defaults (erasers.registry), and it names the
# companions that ship beside it (an IP-Adapter, a CLIP) by path relative to the pipeline directory.
TOY_MARKER = "toycanvas.json"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedPipeline:
    """A diffusers pipeline with uniform access to its text encoders, tokenizers and denoiser."""

    pipeline: object
    family: Family
    source: str
    default_steps: int
    default_guidance: float
    # A toy pipeline (its directory carries TOY_MARKER): the erasers take their toy defaults.
    is_toy: bool = False
    # The concepts the pipeline's directory ships (erasers.vocabulary); None: concepts are free text.
    vocabulary: ConceptVocabulary | None = None
    # The local directory it was loaded from (None for a hub id).
    directory: Path | None = None
    # Training resolution in pixels (None: the pipeline's native one); Flux trains on latents of this size.
    resolution: int | None = None
    # Mixed precision, gradient checkpointing and the optimiser of the training-based erasers (erasers.precision).
    training: TrainingOptions = field(default_factory=TrainingOptions)
    # The diffusers PipelineQuantizationConfig it was loaded with (None: full precision): the components its
    # quant_mapping names load quantized, an edit's replacements of them too (load_component).
    quantization: object | None = None
    _adapter: object = field(default=None, repr=False)

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        return {name: getattr(self.pipeline, name) for name in self.family.text_encoders}

    @property
    def tokenizers(self) -> dict[str, object]:
        return {name: getattr(self.pipeline, name) for name in self.family.tokenizers}

    @property
    def text_encoder(self) -> nn.Module:
        """The CLIP text encoder every family has: the one text-encoder erasers edit and transfer."""
        return self.pipeline.text_encoder

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def adapter(self):
        """The family adapter (erasers.families): conditioning, prediction, sampling, text-reading parameters."""
        if self._adapter is None:
            from .families import adapter_class

            self._adapter = adapter_class(self.family.name)(self)
        return self._adapter

    @property
    def trained_text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders a text-encoder eraser (ESD-te) trains: every one the denoiser reads (SD: CLIP; SDXL:
        both CLIP encoders; Flux: CLIP, read pooled, and T5)."""
        return self.text_encoders

    def encode_text(self, prompts: list[str], text_encoder: nn.Module | None = None,
                    text_encoders: dict[str, nn.Module] | None = None):
        """The conditioning the denoiser reads for `prompts` (a families.Conditioning: token states, plus the
        pooled embedding on SDXL and Flux), through the pipeline's text encoders or the given ones (`text_encoder`
        stands in for the CLIP `text_encoder`); gradients flow when the caller has them enabled."""
        encoders = dict(text_encoders or {})
        if text_encoder is not None:
            encoders["text_encoder"] = text_encoder
        return self.adapter.encode_ids(self.adapter.tokenize(prompts), text_encoders=encoders)

    def companion(self, name: str) -> Path:
        """A file or directory a toy pipeline names in its marker as shipping beside it (e.g. "ip_adapter")."""
        companions = {}
        if self.is_toy:  # a toy pipeline is always a local directory
            companions = read_json(self.directory / TOY_MARKER, "rebuild the toy pipeline").get("companions", {})
        if name not in companions:
            raise UsageError(f"{self.source} ships no {name}; pass its location with --set {name}=PATH")
        return (self.directory / companions[name]).resolve()

    def image_size(self) -> int:
        """The side in pixels of the images `generate` draws by default."""
        pipeline = self.pipeline
        if getattr(pipeline, "default_sample_size", None):  # SDXL, Flux
            return int(pipeline.default_sample_size * pipeline.vae_scale_factor)
        return int(self.denoiser.config.sample_size * pipeline.vae_scale_factor)

    def freeze(self) -> None:
        """No gradient for any weight of the pipeline (denoiser, text encoders, VAE, image encoder), as diffusers'
        training scripts load them; an eraser then marks what it trains (train_only)."""
        for component in self.pipeline.components.values():
            if isinstance(component, nn.Module):
                component.requires_grad_(False)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int] | int = 0, steps: int | None = None,
                 guidance: float | None = None, batch_size: int = 16, progress: bool = True,
                 height: int | None = None, width: int | None = None) -> list[Image.Image]:
        """One image per prompt; image i uses seed seeds[i] (or seeds + i), so any subset regenerates identically.
        An image drawn blank (non-finite or one flat colour) carries the mark of erasers.images.drawn_images."""
        check_prompts(prompts)
        seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise UsageError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        steps = self.default_steps if steps is None else STEPS.check(steps, "steps")  # 0 is refused, not replaced
        guidance = self.default_guidance if guidance is None else guidance
        self.pipeline.set_progress_bar_config(disable=True)
        images: list[Image.Image] = []
        from tqdm.auto import tqdm

        with tqdm(total=len(prompts), desc="generating", unit="img", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + batch_size]]
                out = self.pipeline(prompt=chunk, generator=generators, num_inference_steps=steps,
                                    guidance_scale=guidance, height=height, width=width,
                                    callback_on_step_end=_advance(bar, start, len(chunk)), output_type="np")
                images += drawn_images(out.images)  # blank images marked: scorers report them as a failed edit
                bar.update(start + len(chunk) - bar.n)
        return images

    def load_component(self, name: str, path: str | Path, subfolder: str | None = None) -> nn.Module:
        """Load an edited text encoder or denoiser from `path` in place of this pipeline's `name`."""
        allowed = (*self.family.text_encoders, self.family.denoiser)
        if name not in allowed:
            raise UsageError(f"{self.family.name} pipelines have no component {name!r}; "
                             f"choose one of {', '.join(allowed)}")
        current = getattr(self.pipeline, name)
        location = Path(path) / subfolder if subfolder else Path(path)
        if not (location / "config.json").exists():
            raise UsageError(f"{location} holds no {name} (no config.json); pass the directory the edit was saved to")
        config = read_json(location / "config.json", f"save or download the {name} again")
        saved_class = saved_class_name(config, location / "config.json")
        if saved_class != type(current).__name__ and not _same_family_of_class(saved_class, type(current).__name__):
            raise UsageError(f"{location} holds a {saved_class}, but this pipeline's {name} is a "
                             f"{type(current).__name__}; pass the {name} directory of an edit")
        quantized = (self.quantization.quant_mapping or {}).get(name) if self.quantization is not None else None
        try:
            replacement = type(current).from_pretrained(location, dtype=self.dtype,
                                                        **({"quantization_config": quantized} if quantized else {}))
        except Exception as error:  # noqa: BLE001 - any failure here is a bad file the user must replace
            raise UsageError(f"could not load {name} from {location}: {first_line(error)}. The file may be "
                             "truncated or corrupt: save or download the edit again") from None
        self.check_compatible(name, replacement)
        from .fingerprint import remember_base

        remember_base(self, name)  # edits loaded later are compared with the base's weights, not this one's
        if replacement.device != self.device:  # bitsandbytes places its weights when loading, and moves none after
            replacement = replacement.to(self.device)
        self.pipeline.register_modules(**{name: replacement})
        return replacement

    def check_compatible(self, name: str, replacement: nn.Module) -> None:
        current = getattr(self.pipeline, name)
        for key in self.family.compatible_keys.get(name, ()):
            want, got = _config_value(current, key), _config_value(replacement, key)
            if want != got:
                raise UsageError(f"this {name} has {key}={got} but the {self.family.name} pipeline from {self.source} "
                                 f"expects {key}={want}: the edit was made for another base model; load it onto "
                                 "the model it was made from")


def _same_family_of_class(saved: str, wanted: str) -> bool:
    # A CLIP text encoder saved with or without its projection, or as a whole CLIPModel, loads as either.
    return saved.startswith("CLIP") and wanted.startswith("CLIPText") and ("Vision" not in saved)


def _config_value(module: nn.Module, key: str):
    value = getattr(module.config, key, None)
    return list(value) if isinstance(value, (list, tuple)) else value


def check_prompts(prompts: list[str]) -> None:
    if not prompts:
        raise UsageError("the prompt list is empty; pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"prompt {i + 1} is empty; every prompt needs some text")


def resolve_source(model: str) -> str:
    """The path or hub id that `model` names, after checking what can be checked without loading."""
    if model in MODEL_ALIASES:
        directory = MODEL_ALIASES[model]
        if not (directory / "model_index.json").exists():
            raise UsageError(f"the {model} pipeline is missing from {directory}; rebuild it (for 'toy': "
                             "`erasure toy build`)")
        return str(directory)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{model} is a file; pass a diffusers pipeline directory (one with model_index.json)")
        if not (path / "model_index.json").exists():
            config = path / "config.json"
            if config.exists():
                values = read_json(config, "download the model again, or pass a pipeline directory")
                kind = saved_class_name(values, config)
                raise UsageError(f"{model} holds a single model ({kind}), not a diffusers pipeline; pass the "
                                 "pipeline directory, or load this component with --text-encoder/--unet")
            raise UsageError(f"{model} is not a diffusers pipeline directory (no model_index.json)")
        return str(path)
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return model
    raise UsageError(f"unknown model {model!r}: pass 'toy', a local pipeline directory, or a hub id such as "
                     "stable-diffusion-v1-5/stable-diffusion-v1-5")


def is_toy_model(model: str) -> bool:
    """Whether `model` names a toy pipeline (its directory carries TOY_MARKER), known before it loads."""
    return (Path(resolve_source(model)) / TOY_MARKER).exists()


def resolve_device(device: str | None) -> str:
    """`device` checked against this machine ("cpu", "cuda", "cuda:1", "mps"); None: cuda when available."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device; use cpu or cuda (cuda:0, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, {torch.version.cuda or 'no CUDA build'}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type != "cpu":
        raise UsageError(f"--device {device!r} is not supported; use cpu or cuda")
    return str(parsed)


def check_component_configs(source: Path, index: dict) -> None:
    """Every component's config.json of a local pipeline is readable JSON, so that a damaged file is named
    instead of failing deep inside diffusers."""
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        for config_name in ("config.json", "scheduler_config.json", "preprocessor_config.json",
                            "tokenizer_config.json", "special_tokens_map.json"):
            config = source / name / config_name
            if config.exists():
                values = read_json(config, f"download or rebuild the pipeline's {name}")
                if config_name == "config.json":
                    saved_class_name(values, config)


def saved_class_name(config: dict, path: Path) -> str:
    """The class a component's config.json names (diffusers' `_class_name`, else transformers' first
    `architectures`), which must be text."""
    name = config.get("_class_name")
    if name is None:
        architectures = config.get("architectures") or ["?"]
        name = architectures[0] if isinstance(architectures, list) else architectures
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{path} names its class {name!r}, not a class name: the file is corrupt; save or "
                         "download it again")
    return name


def _family_of(class_name: str, source: str) -> Family:
    if class_name in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[class_name]
    for known, family in PIPELINE_FAMILIES.items():
        # Variants (img2img, inpainting) share their base family's components.
        if class_name.startswith(known.removesuffix("Pipeline")):
            return family
    raise UsageError(f"{source} is a {class_name}, which erasure-suite does not support; supported families: "
                     f"{', '.join(sorted(FAMILIES))} ({', '.join(PIPELINE_FAMILIES)})")


def _check_family(found: Family, wanted: str | None, model: str) -> Family:
    if wanted is not None and found.name != wanted:
        raise UsageError(f"{model} is a {found.name} pipeline, not {wanted}; drop --family or pass a {wanted} model")
    return found


def _advance(bar, done: int, size: int):
    """A pipeline's step-end callback that moves `bar` through the `size` images of a batch as its denoising steps
    pass, so a batch of 50 shows progress per image rather than once at its end."""

    def callback(pipeline, step: int, timestep, tensors: dict) -> dict:
        steps = max(getattr(pipeline, "num_timesteps", 0) or 1, step + 1)
        bar.update(done + size * (step + 1) // steps - bar.n)
        return tensors

    return callback


def load_pipeline(model: str = "toy", family: str | None = None, device: str | None = None,
                  dtype: torch.dtype | None = None, quantization=None) -> LoadedPipeline:
    """Load "toy", a local pipeline directory or a hub id. `family` ("sd", "sdxl", "flux"), when given, is
    checked against what the directory holds; `quantization`, a diffusers PipelineQuantizationConfig, loads the
    components it names quantized (and the edits later loaded in their place)."""
    from diffusers import DiffusionPipeline

    if family is not None and family not in FAMILIES:
        raise UsageError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    source = resolve_source(model)
    local_index = Path(source) / "model_index.json"
    device = resolve_device(device)
    if local_index.exists():
        index = read_json(local_index, "download or rebuild the pipeline (for 'toy': erasure toy build)")
        _check_family(_family_of(str(index.get("_class_name", "?")), model), family, model)
        check_component_configs(Path(source), index)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype, quantization_config=quantization)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback from deep inside
        hint = ("check the hub id and your network, or download the model and pass its directory"
                if not Path(source).exists() else
                "a weight file may be truncated or corrupt: download or rebuild the model "
                "(for 'toy': erasure toy build)")
        raise UsageError(f"could not load {model}: {first_line(error)}; {hint}") from None
    found = _check_family(_family_of(type(pipeline).__name__, model), family, model)
    pipeline.to(device)
    steps, guidance = found.default_steps, found.default_guidance
    sampling = Path(source) / "sampling.json"
    if sampling.exists():
        recommended = read_json(sampling, "delete it or rebuild the pipeline")
        steps, guidance = recommended.get("num_inference_steps", steps), recommended.get("guidance_scale", guidance)
        if not isinstance(steps, int) or not isinstance(guidance, (int, float)) or steps < 1:
            raise UsageError(f"{sampling} holds num_inference_steps={steps!r}, guidance_scale={guidance!r}; it "
                             "needs a positive integer and a number: fix or delete it")
    directory = Path(source) if Path(source).is_dir() else None
    loaded = LoadedPipeline(pipeline, found, model, steps, guidance,
                            is_toy=directory is not None and (directory / TOY_MARKER).exists(),
                            vocabulary=read_vocabulary(directory) if directory is not None else None,
                            directory=directory, quantization=quantization)
    loaded.freeze()
    return loaded
