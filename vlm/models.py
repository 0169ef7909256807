"""Loading vision-language models: "toy-vlm", a local directory or a hub id; LLaVA-1.5 and Qwen2.5-VL.

As on the diffusion side, the architecture knowledge lives here, in one `VLMFamily` record per model type: which
transformers class loads it and where its language model's decoder layers are. Erasers reach the layers through
`decoder_layers` and `vlm.hooks`, and ask questions through `ask`; none of them tests a model's class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from erasers.errors import UsageError, first_line
from erasers.files import read_json
from erasers.models import resolve_device

TOY_VLM = "toy-vlm"
TOY_VLM_DIR = Path(__file__).parent / "weights" / TOY_VLM


@dataclass(frozen=True)
class VLMFamily:
    name: str
    model_type: str
    model_class: str


LLAVA = VLMFamily("llava", "llava", "LlavaForConditionalGeneration")
QWEN2_5_VL = VLMFamily("qwen2.5-vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
VLM_FAMILIES: dict[str, VLMFamily] = {f.model_type: f for f in (LLAVA, QWEN2_5_VL)}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedVLM:
    """A vision-language model with its processor, and uniform access to its decoder layers."""

    model: nn.Module
    processor: object
    family: VLMFamily
    source: str
    is_toy: bool = False
    # Apply edits made for another base model too (--allow-other-base; vlm.edits.check_base refuses them otherwise).
    allow_other_base: bool = False

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def precision(self) -> str:
        """fp32, fp16 or bf16: the dtype the model is held and run in (recorded with edits and results)."""
        from erasers.precision import PRECISIONS

        dtype = next(self.model.parameters()).dtype
        return next((name for name, known in PRECISIONS.items() if known == dtype), str(dtype))

    def prompt(self, question: str, with_image: bool = True, examples: Sequence[tuple[bool, str]] = ()) -> str:
        """The model's chat prompt for one user turn, ending where the assistant's answer starts; `examples`
        ((with an image, text) pairs: few-shot examples) are user turns before it, as MLLMU-Bench's eval.py writes
        them."""
        messages = [{"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text",
                                                                                          "text": text}]}
                    for image, text in [*examples, (with_image, question)]]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, images: list[Image.Image | None], questions: list[str],
               examples: Sequence[Sequence[tuple[Image.Image | None, str]]] | None = None) -> dict:
        """Processor outputs for a batch of (image or None, question), left-padded for generation; `examples`: per
        question, the few-shot (image or None, text) turns asked before it."""
        if len(images) != len(questions):
            raise UsageError(f"got {len(images)} images but {len(questions)} questions; pass one image (or None) "
                             "per question")
        for i, question in enumerate(questions):
            if not isinstance(question, str) or not question.strip():
                raise UsageError(f"question {i + 1} is empty; every question needs some text")
        examples = examples or [()] * len(questions)
        prompts = [self.prompt(q, image is not None, [(shot is not None, text) for shot, text in shots])
                   for image, q, shots in zip(images, questions, examples)]
        # The processor takes the batch's images in the order of their placeholders: a question's examples' first.
        pictures = [picture.convert("RGB") for image, shots in zip(images, examples)
                    for picture in [*(shot for shot, _ in shots), image] if picture is not None]
        self.tokenizer.padding_side = "left"
        inputs = self.processor(images=pictures or None, text=prompts, padding=True, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a VLM's language model, first to last (LLaVA and Qwen2.5-VL alike)."""
    inner = getattr(model, "model", model)
    language_model = getattr(inner, "language_model", None)
    layers = getattr(language_model, "layers", None)
    if layers is None:  # transformers < 5 nested the language model as `language_model.model`
        layers = getattr(getattr(language_model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UsageError(f"{type(model).__name__} has no decoder layers at model.language_model.layers; "
                         f"supported VLMs: {', '.join(f.model_class for f in VLM_FAMILIES.values())}")
    return layers


def resolve_vlm_source(model: str) -> tuple[str, str | None]:
    """(path or hub id, model_type when it can be read without loading) for `model`, after the checks that need
    no network."""
    if model == TOY_VLM:
        if not (TOY_VLM_DIR / "config.json").exists():
            raise UsageError(f"the toy VLM is missing from {TOY_VLM_DIR}; build it with `erasure toy build-vlm`")
        return str(TOY_VLM_DIR), "llava"
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{model} is a file; pass a model directory (one with config.json)")
        config = path / "config.json"
        if not config.exists():
            raise UsageError(f"{model} is not a transformers model directory (no config.json)")
        model_type = read_json(config, "the download may be truncated: download the model again").get("model_type")
        return str(path), model_type if isinstance(model_type, str) else None
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        return model, None
    raise UsageError(f"unknown VLM {model!r}: pass '{TOY_VLM}', a local model directory, or a hub id such as "
                     "llava-hf/llava-1.5-7b-hf or Qwen/Qwen2.5-VL-7B-Instruct")


def _family(model_type: str | None, model: str) -> VLMFamily:
    if model_type not in VLM_FAMILIES:
        raise UsageError(f"{model} is a {model_type or 'model of unknown type'}, not a supported VLM; supported: "
                         f"{', '.join(f'{f.name} ({f.model_class})' for f in VLM_FAMILIES.values())}")
    return VLM_FAMILIES[model_type]


VLM_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def vlm_dtype(precision: str | None, device: str) -> torch.dtype:
    """The dtype `--precision` asks for on `device`: "auto" (or None) is bf16 on a CUDA GPU that supports it (the
    dtype LLaVA-1.5 and Qwen2.5-VL were trained in; Qwen2.5-VL overflows in fp16), fp16 on an older GPU, fp32 on
    CPU. A precision the device cannot run is a UsageError, before any weight is read."""
    from erasers.precision import PRECISIONS, check_precision, default_precision

    precision = precision or "auto"
    if precision not in VLM_PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(VLM_PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        precision = default_precision(device)
    check_precision(precision, device)
    return PRECISIONS[precision]


def load_vlm(model: str = TOY_VLM, device: str | None = None, dtype: torch.dtype | None = None,
             precision: str | None = None) -> LoadedVLM:
    """Load "toy-vlm", a local directory or a hub id holding a LLaVA(-1.5) or Qwen2.5-VL model and its processor,
    held in `dtype`, or else in `precision` (vlm_dtype: "auto" by default)."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    device = resolve_device(device)
    if dtype is None:
        dtype = vlm_dtype(precision, device)
    source, model_type = resolve_vlm_source(model)
    try:
        if model_type is None:
            model_type = AutoConfig.from_pretrained(source).model_type
    except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback from deep inside
        raise UsageError(f"could not read the config of {model}: {first_line(error)}; check the hub id and your "
                         "network, or download the model and pass its directory") from None
    family = _family(model_type, model)
    try:
        vlm = getattr(transformers, family.model_class).from_pretrained(source, dtype=dtype)
        processor = AutoProcessor.from_pretrained(source)
    except Exception as error:  # noqa: BLE001
        hint = ("a weight file may be truncated or corrupt: download or rebuild the model"
                + (" (erasure toy build-vlm)" if model == TOY_VLM else "")) if Path(source).exists() else \
            "check the hub id and your network, or download the model and pass its directory"
        raise UsageError(f"could not load {model}: {first_line(error)}; {hint}") from None
    return LoadedVLM(vlm.to(device).eval(), processor, family, model, model == TOY_VLM)


@torch.no_grad()
def ask_many(loaded: LoadedVLM, images: list[Image.Image | None], questions: list[str],
             max_new_tokens: int = 50, examples=None) -> list[str]:
    """Greedy answers to a batch of questions, each about its image (None: a text-only question), after its
    few-shot `examples` when given (see `LoadedVLM.inputs`)."""
    inputs = loaded.inputs(images, questions, examples)
    output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=loaded.tokenizer.pad_token_id)
    answers = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in loaded.tokenizer.batch_decode(answers, skip_special_tokens=True)]


def ask(loaded: LoadedVLM, image: Image.Image | None, question: str, max_new_tokens: int = 50) -> str:
    """The model's greedy answer to `question` about `image` (None: a text-only question)."""
    return ask_many(loaded, [image], [question], max_new_tokens)[0]
