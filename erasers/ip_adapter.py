"""IP-Adapter image conditioning, through diffusers' own machinery.

An IP-Adapter (Ye et al., 2023) adds image prompts to a text-conditioned UNet: a CLIP vision encoder's image
embedding goes through a small projection (`image_proj`: a linear layer to 4 tokens and a LayerNorm) and every
attention that reads the text gets a second, decoupled key/value pair for those image tokens (`to_k_ip`,
`to_v_ip`). diffusers loads the published checkpoints (`pipe.load_ip_adapter`), installs the image projection as
the UNet's `encoder_hid_proj` and `IPAdapterAttnProcessor2_0` in every attn2 (SD 1.x/2.x, SDXL). Flux's adapters
(XLabs' layout, diffusers' `FluxIPAdapterMixin`) put the IP keys/values in each joint block and read a separately
named image encoder. This module adds only what the suite needs around them:

- `load_ip_adapter`: `pipe.load_ip_adapter` from a local folder or hub id (published layout: one weight file with
  `image_proj.*` and `ip_adapter.*` tensors, an `image_encoder/` folder), then the one thing diffusers leaves out:
  text-reading attentions built as attn1 with `only_cross_attention` (the toy UNet's 16x16 blocks) also get an
  `IPAdapterAttnProcessor2_0`, whose weights the file stores under that processor's index in `attn_processors`
  (the original IP-Adapter numbering, whose odd indices are SD's attn2).
- `add_ip_adapter`: a fresh, trainable adapter of the same format (the toy adapter's starting point);
  `ip_adapter_parameters`, `ip_adapter_state_dict` and `save_ip_adapter` for training and shipping one.
- `encode_images`, `predict_noise_with_images` (through `WithImages`: the family adapter's denoiser call with the
  image embeddings joined) and `generate_with_images`: image embeddings, a conditioned denoiser call, and pipeline
  generation with `ip_adapter_image_embeds` (unconditional image = zeros, as diffusers does).
- `PUBLISHED` and `adapter_files`: each family's published adapter, Co-Erasing's default.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError, first_line
from .models import LoadedPipeline

IMAGE_TOKENS = 4                       # the published SD 1.5 IP-Adapter's image tokens (ImageProjection)
WEIGHT_NAME = "ip-adapter.safetensors"
FAMILIES = ("sd", "sdxl", "flux")
VIT_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
VIT_L = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class PublishedAdapter:
    """A family's published IP-Adapter: where its weights and image encoder are, and the CLIP whose text tower
    shares that encoder's space (Co-Erasing's refinement)."""

    source: str
    subfolder: str
    weight_name: str
    image_encoder_folder: str          # diffusers' meaning: no slash, inside `subfolder`; else from the root
    image_encoder: str | None          # a separate model (Flux adapters name one)
    text_clip: str


# SDXL's is the ViT-H adapter, whose image encoder is SD 1.5's (models/image_encoder): one refinement CLIP for both.
PUBLISHED = {
    "sd": PublishedAdapter("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors", "image_encoder", None, VIT_H),
    "sdxl": PublishedAdapter("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl_vit-h.safetensors",
                             "models/image_encoder", None, VIT_H),
    "flux": PublishedAdapter("XLabs-AI/flux-ip-adapter", "", "ip_adapter.safetensors", "image_encoder", VIT_L, VIT_L),
}


def adapter_files(source: str, family: str, subfolder: str = "", weight_name: str = "") -> dict:
    """`load_ip_adapter`'s arguments: no source, the family's published adapter; a source with no weight file named,
    `WEIGHT_NAME` in `subfolder` (the published layout, its image encoder in `image_encoder/`)."""
    if not source:
        published = PUBLISHED[family]
        return {"source": published.source, "subfolder": published.subfolder or None,
                "weight_name": published.weight_name, "image_encoder_folder": published.image_encoder_folder,
                "image_encoder": published.image_encoder}
    return {"source": source, "subfolder": subfolder or None, "weight_name": weight_name or WEIGHT_NAME}


def image_encoder_location(source: str | Path, subfolder: str | None, image_encoder_folder: str,
                           image_encoder: str | None = None) -> tuple[str, str]:
    """(model, subfolder) of an adapter's image encoder: `image_encoder` when named (Flux adapters name one), else
    `image_encoder_folder` in the adapter's source, as diffusers reads it (no slash: inside `subfolder`; else from
    the source's root)."""
    if image_encoder:
        return image_encoder, ""
    if "/" in image_encoder_folder:
        return str(source), image_encoder_folder
    return str(source), Path(subfolder or "", image_encoder_folder).as_posix()


def check_ip_adapter(source: str | Path, subfolder: str | None = None, weight_name: str = WEIGHT_NAME,
                     image_encoder_folder: str = "image_encoder", image_encoder: str | None = None) -> int:
    """That the adapter's weight file and image encoder can be had (local, cached or downloaded: the weight file
    is fetched, the encoder's config read), before any training needs them; returns the image embedding's size."""
    from diffusers.utils import _get_model_file
    from transformers import CLIPVisionConfig

    if str(source).startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
        raise UsageError(f"the IP-Adapter folder {source} does not exist; pass --set ip_adapter=PATH (a folder with "
                         "the weight file and image_encoder/) or a hub id")
    what = "weight file"
    try:
        _get_model_file(str(source), weights_name=weight_name, subfolder=subfolder or None)
        what = "image encoder"
        encoder_source, encoder_subfolder = image_encoder_location(source, subfolder, image_encoder_folder,
                                                                   image_encoder)
        return CLIPVisionConfig.from_pretrained(encoder_source, subfolder=encoder_subfolder).projection_dim
    except Exception as error:  # noqa: BLE001 - missing files, no network, a wrong repository: one clear line
        raise UsageError(f"the IP-Adapter {source} ({subfolder or '.'}/{weight_name}) has no readable {what}: "
                         f"{first_line(error)}; pass --set ip_adapter=PATH (a folder with the weight file and "
                         "image_encoder/) or a hub id you can reach") from None


def _processor_module(unet, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def _text_only_attn1(unet) -> list[tuple[int, str]]:
    """(index in attn_processors, name) of attn1 layers that read the text (only_cross_attention blocks)."""
    return [(i, name) for i, name in enumerate(unet.attn_processors)
            if name.endswith("attn1.processor") and _processor_module(unet, name).is_cross_attention]


def _complete_text_only_attn1(unet, ip_weights: dict[str, torch.Tensor] | None) -> None:
    """Give diffusers' IP processor to the text-reading attn1 layers that `_load_ip_adapter_weights` skips; without
    it they would receive the (text, image) tuple with a plain processor. Their weights are `ip_weights`' entries
    under the layer's processor index, or, when None, copies of the layer's text keys/values (as `add_ip_adapter`
    starts every IP layer)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    processors = dict(unet.attn_processors)
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    tokens = getattr(projection, "num_tokens", getattr(projection, "num_image_text_embeds", IMAGE_TOKENS))
    for index, name in _text_only_attn1(unet):
        attention = _processor_module(unet, name)
        processor = IPAdapterAttnProcessor2_0(hidden_size=attention.to_q.out_features,
                                              cross_attention_dim=unet.config.cross_attention_dim,
                                              num_tokens=(tokens,), scale=1.0)
        if ip_weights is not None:
            keys = (f"{index}.to_k_ip.weight", f"{index}.to_v_ip.weight")
            if not all(key in ip_weights for key in keys):
                raise UsageError(f"this UNet's {name.removesuffix('.processor')} reads the text, but the IP-Adapter "
                                 f"file has no {keys[0]}: it was made for another UNet; use one trained for this "
                                 "model")
            processor.load_state_dict({"to_k_ip.0.weight": ip_weights[keys[0]],
                                       "to_v_ip.0.weight": ip_weights[keys[1]]})
        else:
            processor.load_state_dict({"to_k_ip.0.weight": attention.to_k.weight.detach().clone(),
                                       "to_v_ip.0.weight": attention.to_v.weight.detach().clone()})
        processors[name] = processor.to(unet.device, unet.dtype)
    unet.set_attn_processor(processors)


@contextmanager
def denoiser_dtypes_kept(loaded: LoadedPipeline):
    """diffusers' UNet IP-Adapter loader ends with `unet.to(dtype=unet.dtype)`, the dtype of the UNet's first
    parameter. Under mixed precision (frozen weights in bf16/fp16, trained ones in fp32) that cast Co-Erasing's
    fp32 parameters, trained in stage 1, down to half precision (their Adam state stayed fp32, so stage 2 failed),
    or the whole UNet up to fp32. Each existing parameter keeps its dtype and value; the adapter's new (frozen)
    ones take the frozen weights' dtype."""
    unet = loaded.denoiser
    before = dict(unet.named_parameters())
    dtypes = {name: parameter.dtype for name, parameter in before.items()}
    loader_dtype = unet.dtype
    # What a cast to the loader's dtype would round: kept on the CPU, not beside the model on its GPU.
    rounded = {name: parameter.detach().to("cpu", copy=True) for name, parameter in before.items()
               if parameter.dtype.is_floating_point and parameter.dtype.itemsize > loader_dtype.itemsize}
    yield
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if name not in dtypes:
                if parameter.dtype != loaded.dtype and parameter.dtype.is_floating_point:
                    parameter.data = parameter.data.to(loaded.dtype)
            elif name in rounded:
                parameter.data = rounded[name].to(parameter.device)
            elif parameter.dtype != dtypes[name]:
                parameter.data = parameter.data.to(dtypes[name])


def load_ip_adapter(loaded: LoadedPipeline, source: str | Path, subfolder: str | None = None,
                    weight_name: str = WEIGHT_NAME, image_encoder_folder: str | None = "image_encoder",
                    image_encoder: str | None = None, scale: float = 1.0) -> None:
    """Load a published-format IP-Adapter (local folder or hub id) into an SD, SDXL or Flux pipeline with
    diffusers' `load_ip_adapter`; the toy adapter: `load_ip_adapter(loaded, TOY_IP_ADAPTER_DIR)`. Flux's loader
    (XLabs' layout) takes its image encoder from `image_encoder` (a hub id or path) or else from
    `image_encoder_folder` in the adapter's folder."""
    from safetensors.torch import load_file

    local = Path(source) / (subfolder or "")
    if Path(source).exists() and not (local / weight_name).is_file():
        raise UsageError(f"{local} has no {weight_name}; pass the folder of an IP-Adapter (its weight file and "
                         "image_encoder/), or --set ip_adapter_weight=NAME")
    if loaded.family.name == "flux":
        encoder_source, encoder_subfolder = image_encoder_location(source, subfolder, image_encoder_folder,
                                                                   image_encoder)
        files = {"image_encoder_pretrained_model_name_or_path": encoder_source,
                 "image_encoder_subfolder": encoder_subfolder, "image_encoder_dtype": loaded.dtype}
    else:
        files = {"image_encoder_folder": image_encoder_folder}
    try:
        with denoiser_dtypes_kept(loaded):
            loaded.pipeline.load_ip_adapter(str(source), subfolder=subfolder or "", weight_name=weight_name,
                                            **files)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UsageError(f"could not load the IP-Adapter {source}: {first_line(error)}; pass a folder or "
                         f"hub id holding an IP-Adapter for this {loaded.family.name} denoiser in the published "
                         "format") from None
    unet = loaded.denoiser
    if _text_only_attn1(unet):
        # diffusers resolves local and hub files alike; after the load above the file is local or cached.
        from diffusers.utils import _get_model_file

        path = _get_model_file(str(source), weights_name=weight_name, subfolder=subfolder or None)
        weights = load_file(path) if weight_name.endswith(".safetensors") else torch.load(path, weights_only=True)
        ip_weights = ({k.removeprefix("ip_adapter."): v for k, v in weights.items() if k.startswith("ip_adapter.")}
                      if weight_name.endswith(".safetensors") else weights["ip_adapter"])
        _complete_text_only_attn1(unet, ip_weights)
    loaded.pipeline.set_ip_adapter_scale(scale)


def add_ip_adapter(loaded: LoadedPipeline, image_encoder, seed: int = 0, tokens: int = IMAGE_TOKENS,
                   hidden_multiplier: int = 0) -> None:
    """A fresh adapter for `image_encoder` (a CLIPVisionModelWithProjection), IP keys/values initialised from the
    text keys/values (as the IP-Adapter paper does), loaded through diffusers' own `load_ip_adapter` from a state
    dict. Its image projection: with `hidden_multiplier` 0, the published SD 1.5 adapter's (a linear layer to 4
    tokens and a LayerNorm: diffusers' `ImageProjection`, whose token count diffusers fixes at 4); else an MLP
    (hidden width `hidden_multiplier` x the embedding's) to `tokens` tokens and a LayerNorm, diffusers'
    `IPAdapterFaceIDImageProjection` (the layout of the published FaceID adapters, which diffusers recognises by
    its keys and reads the token count from). On Flux (XLabs' layout, which diffusers reads with the linear
    projection only): image tokens as wide as the T5 states, and random IP keys/values with biases in each joint
    block."""
    unet = loaded.denoiser
    flux = loaded.family.name == "flux"
    generator = torch.Generator().manual_seed(seed)
    width = unet.config.joint_attention_dim if flux else unet.config.cross_attention_dim
    embed_dim = image_encoder.config.projection_dim
    if flux and hidden_multiplier:
        raise UsageError("diffusers reads Flux IP-Adapters with the linear image projection only; leave "
                         "hidden_multiplier at 0")

    def linear(rows, columns):
        return torch.randn(rows, columns, generator=generator) / columns ** 0.5, torch.zeros(rows)

    norm = {"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}
    if hidden_multiplier:
        (w0, b0), (w2, b2) = linear(embed_dim * hidden_multiplier, embed_dim), linear(
            tokens * width, embed_dim * hidden_multiplier)
        image_proj = {"proj.0.weight": w0, "proj.0.bias": b0, "proj.2.weight": w2, "proj.2.bias": b2, **norm}
    elif tokens != IMAGE_TOKENS:
        raise UsageError(f"diffusers' linear ImageProjection has {IMAGE_TOKENS} tokens; for {tokens} pass "
                         "hidden_multiplier (an MLP projection)")
    else:
        weight, bias = linear(IMAGE_TOKENS * width, embed_dim)
        image_proj = {"proj.weight": weight, "proj.bias": bias, **norm}
    ip_layers = {}
    if flux:
        joint = [name for name in unet.attn_processors if name.startswith("transformer_blocks.")]
        for index in range(len(joint)):
            for kind in ("k", "v"):
                weight, bias = linear(unet.inner_dim, width)
                ip_layers.update({f"{index}.to_{kind}_ip.weight": weight, f"{index}.to_{kind}_ip.bias": bias})
    else:
        for index, name in enumerate(unet.attn_processors):
            if not name.endswith("attn1.processor"):
                attention = _processor_module(unet, name)
                ip_layers[f"{index}.to_k_ip.weight"] = attention.to_k.weight.detach().clone()
                ip_layers[f"{index}.to_v_ip.weight"] = attention.to_v.weight.detach().clone()
    loaded.pipeline.register_modules(image_encoder=image_encoder.to(loaded.device))
    with denoiser_dtypes_kept(loaded):
        loaded.pipeline.load_ip_adapter({"image_proj": image_proj, "ip_adapter": ip_layers}, subfolder=None,
                                        weight_name=None, low_cpu_mem_usage=False)
    _complete_text_only_attn1(unet, None)


def ip_adapter_parameters(unet) -> list[nn.Parameter]:
    """What an IP-Adapter trains: the image projection and every IP key/value layer."""
    parameters = list(unet.encoder_hid_proj.parameters())
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            parameters += list(processor.to_k_ip.parameters()) + list(processor.to_v_ip.parameters())
    return parameters


def ip_adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's adapter in the published flat format: `image_proj.proj.*` (the MLP projection's
    `image_proj.proj.{0,2}.*`), `image_proj.norm.*` and `ip_adapter.{processor index}.to_{k,v}_ip.weight`."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    published = {"image_embeds": "proj", "ff.net.0.proj": "proj.0", "ff.net.2": "proj.2"}

    def published_name(key):
        for diffusers_name, name in published.items():
            if key.startswith(diffusers_name + "."):
                return name + key[len(diffusers_name):]
        return key

    state = {f"image_proj.{published_name(k)}": v for k, v in projection.state_dict().items()}
    # A UNet's IP layers are numbered by processor (attn1 and attn2 alike); Flux's IP processors are the joint
    # blocks', which come first, so the same index is the joint block's.
    for index, (name, processor) in enumerate(unet.attn_processors.items()):
        if hasattr(processor, "to_k_ip"):
            for kind in ("k", "v"):
                layer = getattr(processor, f"to_{kind}_ip")[0]
                state[f"ip_adapter.{index}.to_{kind}_ip.weight"] = layer.weight
                if layer.bias is not None:  # Flux's
                    state[f"ip_adapter.{index}.to_{kind}_ip.bias"] = layer.bias
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_ip_adapter(unet, image_encoder, out: Path, weight_name: str = WEIGHT_NAME,
                    dtype: torch.dtype = torch.float16) -> None:
    """Write `weight_name` and `image_encoder/` into `out` (an existing directory), the published layout."""
    from safetensors.torch import save_file

    save_file({k: v.to(dtype) for k, v in ip_adapter_state_dict(unet).items()}, str(Path(out) / weight_name))
    image_encoder.to(dtype).save_pretrained(Path(out) / "image_encoder")
    image_encoder.float()


@torch.no_grad()
def encode_images(loaded: LoadedPipeline, images) -> torch.Tensor:
    """CLIP image embeddings (N, D) of PIL images or uint8 arrays, as the pipeline's own `encode_image` makes them."""
    pipe = loaded.pipeline
    if getattr(pipe, "image_encoder", None) is None:
        raise UsageError("no IP-Adapter is loaded; load one first (erasers.ip_adapter.load_ip_adapter)")
    pixels = pipe.feature_extractor(images=list(images), return_tensors="pt").pixel_values
    return pipe.image_encoder(pixels.to(loaded.device, pipe.image_encoder.dtype)).image_embeds.to(loaded.dtype)


class WithImages(nn.Module):
    """The denoiser as the family adapter calls it, with image embeddings joined to the call (the family adapter's
    `with_image_embeds`: a UNet's added conditions, beside SDXL's pooled text and size ids; Flux's joint attention
    arguments): one embedding (1, D) for every row or one per row. `guided`: the batch is a classifier-free one
    (unconditional half first), whose unconditional half gets a zero image, as diffusers' pipeline gives it."""

    def __init__(self, denoiser, image_embeds: torch.Tensor, adapter, guided: bool = False):
        super().__init__()
        self.denoiser, self.image_embeds, self.adapter, self.guided = denoiser, image_embeds, adapter, guided

    @property
    def config(self):  # what the family adapter reads of the denoiser (Flux: guidance_embeds)
        return self.denoiser.config

    def forward(self, *args, **call):
        batch = (args[0] if args else call["hidden_states"]).shape[0]
        rows = batch // 2 if self.guided else batch
        embeds = self.image_embeds if self.image_embeds.shape[0] == rows else self.image_embeds.expand(rows, -1)
        if self.guided:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
        return self.denoiser(*args, **self.adapter.with_image_embeds(call, embeds))


def predict_noise_with_images(denoiser, latents: torch.Tensor, timestep, text_states, image_embeds: torch.Tensor):
    """The denoiser's prediction with text (a Conditioning from `loaded.encode_text`, or SD states) and image
    embeddings (B, D) as conditions, through the family adapter's call."""
    from .families import UNetAdapter, predict

    adapter = getattr(text_states, "adapter", None) or UNetAdapter(None)
    return predict(WithImages(denoiser, image_embeds, adapter), latents, timestep, text_states)


@contextmanager
def _one_image_per_prompt(pipe):
    """diffusers' SD pipeline takes one image prompt per call: `prepare_ip_adapter_image_embeds` repeats
    `ip_adapter_image_embeds` for every prompt of the batch, so per-prompt embeddings (B, 1, D) would reach the
    UNet B times over and each sample would attend to the tokens of every image of its batch (a blend of all their
    objects). Inside this context the pipeline passes the given embeddings through unrepeated: one per prompt,
    negatives first under classifier-free guidance, the order of its own prompt embeddings."""
    pipe.prepare_ip_adapter_image_embeds = lambda image, embeds, device, *_: [e.to(device) for e in embeds]
    try:
        yield
    finally:
        del pipe.prepare_ip_adapter_image_embeds


@torch.no_grad()
def generate_with_images(loaded: LoadedPipeline, prompts: list[str], image_embeds: torch.Tensor, seeds: list[int],
                         steps: int | None = None, guidance: float | None = None, batch_size: int = 25,
                         progress: bool = True):
    """One image per (prompt, image embedding, seed), each prompt conditioned on its own image; the unconditional
    branch gets the empty prompt and a zero image embedding, as diffusers' pipeline does for `ip_adapter_image`."""
    from tqdm.auto import tqdm

    if not len(prompts) == len(image_embeds) == len(seeds):
        raise UsageError(f"generate_with_images needs one image embedding and one seed per prompt; got "
                         f"{len(prompts)} prompts, {len(image_embeds)} embeddings and {len(seeds)} seeds")
    steps = steps or loaded.default_steps
    guidance = loaded.default_guidance if guidance is None else guidance
    pipe = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    images = []
    with tqdm(total=len(prompts), desc="generating with images", unit="img", disable=not progress) as bar, \
            _one_image_per_prompt(pipe):
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            embeds = image_embeds[chunk][:, None]
            both = torch.cat([torch.zeros_like(embeds), embeds]) if guidance > 1 else embeds
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]]
            out = pipe(prompt=prompts[chunk], ip_adapter_image_embeds=[both], generator=generators,
                       num_inference_steps=steps, guidance_scale=guidance)
            images += out.images
            bar.update(len(prompts[chunk]))
    return images
