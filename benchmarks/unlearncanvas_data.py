"""UnlearnCanvas as published: the dataset's folder layout, its ViT-L/16 style and object classifiers (the
checkpoints' own format), its sampling, and FID's features, for `erasure bench unlearncanvas`.

    DATA/{style}/{object}/{index}.jpg      50 or 60 styles x 20 objects (underscores in names, e.g. Van_Gogh)
    DATA/Seed_Images/{object}/{index}.jpg  the unstylised photos
    classifier checkpoints: torch.save({"model_state_dict": ...}) of timm vit_large_patch16_224.augreg_in21k with
    its head replaced by Linear(1024, classes); classes in the order of UnlearnCanvas' constants (below); inputs
    resized to 224, normalised with mean = std = 0.5; top-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from benchmarks.erasure_bench import Benchmark, FeatureExtractor
from benchmarks.merge import file_digest, listing_digest
from erasers import inputs
from erasers.errors import UsageError

OBJECTS = ("Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs",
           "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls")
SEED_IMAGES = "Seed_Images"
STYLES_50 = (
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
    "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
    "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism", "Ink_Art",
    "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic", "Neon_Lines", "On_Fire",
    "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust", "Sketch", "Sponge_Dabbed",
    "Structuralism", "Superstring", "Surrealism", "Ukiyoe", "Van_Gogh", "Vibrant_Flow", "Warm_Love", "Warm_Smear",
    "Watercolor", "Winter")
STYLES_60_EXTRA = ("Blue_Blooming", "Crypto_Punks", "Dreamweave", "Foliage_Patchwork", "Impasto", "Palette_Knife",
                   "Pointillism", "Rainwash", "Realistic_Watercolor", "Techno")
# The style classifiers' class order: the 50-style one is alphabetical with Seed_Images among the styles; the
# 60-style one is alphabetical except Palette_Knife, which the published constants place after Liquid_Dreams.
STYLE_CLASSES_50 = tuple(sorted((*STYLES_50, SEED_IMAGES)))
_sorted_61 = sorted((*STYLES_50, *STYLES_60_EXTRA, SEED_IMAGES))
_sorted_61.remove("Palette_Knife")
STYLE_CLASSES_60 = tuple(_sorted_61[:_sorted_61.index("Liquid_Dreams") + 1] + ["Palette_Knife"]
                         + _sorted_61[_sorted_61.index("Liquid_Dreams") + 1:])
SEEDS = (188, 288, 588, 688, 888)
STEPS, GUIDANCE, SIZE = 100, 9.0, 512
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CLASSIFIER_INPUT = 224


def read_dataset(path: str | Path) -> dict[str, dict[str, list[Path]]]:
    """{style: {object: [image files]}} of a folder in UnlearnCanvas' layout; one UsageError line otherwise."""
    root = Path(path)
    layout = "expected DATA/{style}/{object}/{index}.jpg with UnlearnCanvas' style and object names"
    if not root.is_dir():
        raise UsageError(f"--data {path} is not a directory; {layout}")
    known_styles = {*STYLES_50, *STYLES_60_EXTRA, SEED_IMAGES}
    data: dict[str, dict[str, list[Path]]] = {}
    for style_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if style_dir.name not in known_styles:
            raise UsageError(f"--data {path}: {style_dir.name}/ is not an UnlearnCanvas style folder; {layout}")
        objects = {}
        for object_dir in sorted(p for p in style_dir.iterdir() if p.is_dir()):
            if object_dir.name not in OBJECTS:
                raise UsageError(f"--data {path}: {style_dir.name}/{object_dir.name}/ is not an UnlearnCanvas object "
                                 f"folder; {layout}")
            files = sorted(f for f in object_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                objects[object_dir.name] = files
        if not objects:
            raise UsageError(f"--data {path}: {style_dir.name}/ holds no object folders with images; {layout}")
        data[style_dir.name] = objects
    if not [s for s in data if s != SEED_IMAGES]:
        raise UsageError(f"--data {path} holds no style folders; {layout}")
    return data


class VitClassifier:
    """One of UnlearnCanvas' classifiers loaded from its checkpoint: timm's ViT-L/16 with a linear head. Width,
    depth and patch size are read from the checkpoint (the published ones are ViT-L/16), so a small model saved in
    the same format loads too."""

    def __init__(self, path: str | Path, classes: tuple[str, ...] | None, what: str, device: str | None = None):
        import timm

        state = _read_checkpoint(path, what)
        head = state.get("head.weight")
        if head is None or "cls_token" not in state or "patch_embed.proj.weight" not in state:
            raise UsageError(f"{path} is not a ViT classifier checkpoint (no head.weight / cls_token / patch_embed); "
                             f"pass UnlearnCanvas' {what} classifier")
        if classes is not None and head.shape[0] != len(classes):
            raise UsageError(f"{path} has {head.shape[0]} output classes but UnlearnCanvas' {what} classifier has "
                             f"{len(classes)}; pass the {what} classifier checkpoint")
        width = state["cls_token"].shape[-1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        patch = state["patch_embed.proj.weight"].shape[-1]
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0
        heads = 16 if width % 16 == 0 else 1  # ViT-L/16 has 16 heads; head count is not in the weights' shapes
        self.model = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=head.shape[0],
                                       embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                                       patch_size=patch, img_size=CLASSIFIER_INPUT)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as error:
            raise UsageError(f"{path} does not fit a ViT-L/16 classifier: {str(error).splitlines()[0]}; pass "
                             f"UnlearnCanvas' {what} classifier checkpoint") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval().to(self.device)
        self.classes = classes or tuple(str(i) for i in range(head.shape[0]))

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """The published transform: Resize((224, 224)), ToTensor, Normalize(0.5, 0.5)."""
        from torchvision import transforms

        transform = transforms.Compose([transforms.Resize((CLASSIFIER_INPUT, CLASSIFIER_INPUT)),
                                        transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        return torch.stack([transform(im.convert("RGB")) for im in images]).to(self.device)

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> list[str]:
        return [self.classes[i] for i in self.model(self.pixels(images)).argmax(-1).tolist()]

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        tokens = self.model.forward_features(self.pixels(images))
        return self.model.forward_head(tokens, pre_logits=True).double().cpu()


def _read_checkpoint(path: str | Path, what: str) -> dict:
    inputs.check_input(path, f"{what} classifier", f"pass UnlearnCanvas' {what} classifier checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read is a bad file the user must replace
        raise UsageError(f"could not read the {what} classifier {path}: {type(error).__name__}; download it again") \
            from None
    state = checkpoint.get("model_state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds no state dict; pass UnlearnCanvas' {what} classifier checkpoint")
    return state


def load_classifiers(style_path: str, object_path: str, device: str | None = None) -> tuple[VitClassifier, ...]:
    """The style classifier (51 classes: 50 styles + Seed_Images, or 61) and the object classifier (20)."""
    state = _read_checkpoint(style_path, "style")
    count = state["head.weight"].shape[0] if "head.weight" in state else None
    classes = {len(STYLE_CLASSES_50): STYLE_CLASSES_50, len(STYLE_CLASSES_60): STYLE_CLASSES_60}.get(count)
    if classes is None:
        raise UsageError(f"{style_path} has {count} output classes; UnlearnCanvas' style classifier has "
                         f"{len(STYLE_CLASSES_50)} (50 styles + Seed_Images) or {len(STYLE_CLASSES_60)} (60-style)")
    return VitClassifier(style_path, classes, "style", device), VitClassifier(object_path, OBJECTS, "object", device)


def inception_features(weights: str | Path) -> FeatureExtractor:
    """torchmetrics' FID Inception-v3 (torch-fidelity's port, 2048-d pool features at 299 px) from local weights."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    inputs.check_input(weights, "--inception", "pass torch-fidelity's Inception-v3 weights file "
                       "(pt_inception-2015-12-05), or leave it out to use the style classifier's features")
    inception = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights)).inception

    @torch.no_grad()
    def extract(images: list[Image.Image]) -> torch.Tensor:
        pixels = [torch.from_numpy(_array(im.convert("RGB").resize((299, 299), Image.BICUBIC))) for im in images]
        return inception(torch.stack(pixels).permute(0, 3, 1, 2).contiguous()).double().cpu()

    return FeatureExtractor(f"inception-v3 (2048-d pool, {Path(weights).name})", extract)


def _array(image: Image.Image):
    import numpy as np

    return np.asarray(image, dtype=np.uint8).copy()


@dataclass(frozen=True)
class Protocol:
    """UnlearnCanvas' sampling (the published seeds, DDIM 100 steps, guidance 9.0, 512 px) and FID's options: FID
    on `inception`'s features (None: the style classifier's), against at most `reference_per_pair` dataset images
    per style x object (None: all)."""

    seeds: tuple[int, ...] = SEEDS
    steps: int = STEPS
    guidance: float = GUIDANCE
    size: int = SIZE
    fid: bool = True
    inception: str | None = None
    reference_per_pair: int | None = None

    def __post_init__(self):
        """The same limits as the options that set these fields (erasers.inputs), for callers of the library."""
        for seed in self.seeds:
            inputs.SEED.check(seed, "seed")
        inputs.STEPS.check(self.steps, "--steps")
        inputs.GUIDANCE.check(self.guidance, "--guidance")
        inputs.IMAGE_SIDE.check(self.size, "--size")
        if self.reference_per_pair is not None:
            inputs.POSITIVE.check(self.reference_per_pair, "--fid-reference-per-pair")


def unlearncanvas_benchmark(data_path: str, style_classifier: str, object_classifier: str, model: str,
                            protocol: Protocol = Protocol(), device: str | None = None) -> Benchmark:
    """Answer set: every style x object of the data folder (restricted to the styles the style classifier knows:
    the 50-style experiments use the 50-style classes) at the protocol's seeds and sampling, saved as
    {style}_{object}_seed{seed}.jpg."""
    seeds, steps, guidance, size = protocol.seeds, protocol.steps, protocol.guidance, protocol.size
    inception, fid, reference_per_pair = protocol.inception, protocol.fid, protocol.reference_per_pair
    data = read_dataset(data_path)
    style_model, object_model = load_classifiers(style_classifier, object_classifier, device)
    styles = tuple(s for s in style_model.classes if s in data and s != SEED_IMAGES)
    if not styles:
        raise UsageError(f"--data {data_path} has none of the style classifier's styles")
    objects = tuple(o for o in OBJECTS if all(o in data[s] for s in styles))
    if not objects:
        raise UsageError(f"--data {data_path}: no object folder is present under every style")

    def classify(images):
        return object_model.predict(images), style_model.predict(images)

    features = None
    if fid:
        features = inception_features(inception) if inception else FeatureExtractor(
            "style-classifier (UnlearnCanvas ViT style classifier, pre-logits features; no Inception weights given)",
            style_model.features)

    def reference(excluded: set[str]) -> list:
        # FID's reference: the dataset's stylised images without the erased concept; Seed_Images left out.
        return [(str(f.relative_to(data_path)), lambda f=f: _open(f)) for s in styles for o in objects
                if s not in excluded and o not in excluded for f in data[s][o][:reference_per_pair]]

    return Benchmark(name="unlearncanvas", model=model, objects=objects, styles=styles, seeds=tuple(seeds),
                     steps=steps, guidance=guidance, size=size, scheduler="ddim", suffix=".jpg", classify=classify,
                     features=features, reference=reference if fid else None, device=device,
                     extra={"data": str(data_path), "style_classes": len(style_model.classes)},
                     fingerprint=lambda: {"classifier": file_digest([style_classifier, object_classifier]),
                                          "data": listing_digest(data_path, [f for s in data.values() for o in
                                                                             s.values() for f in o]),
                                          "inception": file_digest([inception]) if inception else None,
                                          "fid_reference_per_pair": reference_per_pair})


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
