"""Prompt sets shared by every eraser: what to erase, what to keep, and how a concept is validated.

On a pipeline that ships a concept vocabulary (erasers/vocabulary.py; the ToyCanvas pipeline does) a concept is one
of its objects or styles, and its prompts are the captions that contain it; on any other model a concept is free
text, used as its own prompt (as ESD and UCE do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UsageError
from .vocabulary import ConceptVocabulary

MAX_CONCEPT_TOKENS = 75


@dataclass
class EraseRequest:
    """What to erase. `kind` is "object", "style", "unsafe" or "concept" (free text on a user's model)."""

    concepts: list[str]
    kind: str = "concept"
    anchors: list[str] = field(default_factory=list)
    preserve: list[str] = field(default_factory=list)
    # The pipeline's concept vocabulary (None: free-text concepts).
    vocabulary: ConceptVocabulary | None = None

    @property
    def concept(self) -> str:
        return self.concepts[0]

    def concept_prompts(self) -> list[str]:
        """The concepts' own text, as ESD and UCE prompt with it ("Stripes style" for a style)."""
        return [concept if self.kind != "style" else f"{concept} style" for concept in self.concepts]

    def erase_prompts(self) -> list[str]:
        """Prompts that evoke the concepts: the concept text itself, plus, with a vocabulary, every caption naming
        it."""
        prompts = []
        for concept, own in zip(self.concepts, self.concept_prompts()):
            prompts.append(own)
            if self.vocabulary is not None:
                prompts += _captions(self.vocabulary, concept, self.kind)
        return prompts

    def neutral_prompts(self, prompts: list[str], word: str | None = None) -> list[str]:
        """`prompts` with the concepts replaced by `word` (default: their supercategory word, "A object image in
        Stripes style."): ESD's neutral contrast, HiRM's neutral prompts, UCE's guides."""
        word = supercategory_word(self) if word is None else word
        return [guide_prompt(p, self.concepts, word) for p in prompts]

    def retain_prompts(self) -> list[str]:
        """Prompts of other concepts, which an eraser should leave as they were: with a vocabulary its captions
        without the erased concepts, and the --preserve prompts in any case."""
        vocabulary = self.vocabulary
        if vocabulary is not None:
            erased = {c.lower() for c in self.concepts}
            return [vocabulary.caption(o, s) for o, s in vocabulary.all_pairs()
                    if o.lower() not in erased and s.lower() not in erased] + list(self.preserve)
        return list(self.preserve)


# AdvUnlearn retains "a photo of {COCO object}" prompts; off the toy world, with no --preserve, the erasers that
# need retain prompts (AdvUnlearn, DoCo) use these.
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def default_retain_prompts(request: EraseRequest) -> list[str]:
    """Retain prompts where the request names none (off the toy world, no --preserve): COCO objects, as
    AdvUnlearn, less any that name an erased concept."""
    erased = [c.lower() for c in request.concepts]
    return [f"a photo of a {name}" for name in COCO_OBJECTS if not any(c in name or name in c for c in erased)]


def _captions(vocabulary: ConceptVocabulary, concept: str, kind: str) -> list[str]:
    if kind in ("object", "unsafe"):
        return [vocabulary.caption(concept, style) for style in vocabulary.styles]
    return [vocabulary.caption(o, concept) for o in vocabulary.objects]


# The broader word that stands in for a concept of each kind (HiRM's target, ESD's neutral contrast).
SUPERCATEGORIES = {"object": "object", "unsafe": "object", "style": "painting", "concept": "thing"}


def supercategory_word(request: EraseRequest) -> str:
    words = {**SUPERCATEGORIES, **(request.vocabulary.supercategories if request.vocabulary else {})}
    return words.get("object" if request.kind == "unsafe" else request.kind, "thing")


def guide_prompt(prompt: str, concepts: list[str], guide: str) -> str:
    """`prompt` with each concept (any case) replaced by `guide`: UCE's guide text, HiRM's and ESD's neutral one."""
    for concept in concepts:
        # Captions write a name's underscores as spaces (UnlearnCanvas' "Van_Gogh" is "Van Gogh" in its captions).
        for spelling in {concept, concept.replace("_", " ")}:
            prompt = re.sub(re.escape(spelling), guide, prompt, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", prompt).strip()


def make_request(concepts: list[str], tokenizer, vocabulary: ConceptVocabulary | None = None,
                 anchors: list[str] | None = None, preserve: list[str] | None = None) -> EraseRequest:
    """Validate concepts for a model: with a `vocabulary` (the pipeline's, `loaded.vocabulary`) they must be its
    objects or styles (or "unsafe", its unsafe object); anywhere they must be non-empty text the tokenizer can
    hold."""
    if not concepts or not all(c and c.strip() for c in concepts):
        raise UsageError("no concept given; pass --concept NAME (for the toy model: an object such as star, or a "
                         "style such as Stripes)")
    concepts = [c.strip() for c in concepts]
    kind = "concept"
    if vocabulary is not None:
        concepts, kind = _vocabulary_concepts(concepts, vocabulary)
    check_contradictions(concepts, anchors or [], preserve or [])
    for concept in concepts:
        ids = tokenizer(concept).input_ids
        if len(ids) - 2 > MAX_CONCEPT_TOKENS:
            raise UsageError(f"the concept {concept[:40]!r}... is {len(ids) - 2} tokens long; the text encoder "
                             f"reads at most {MAX_CONCEPT_TOKENS}")
        unknown = tokenizer.unk_token_id
        if unknown is not None and unknown in ids[1:-1] and unknown != tokenizer.eos_token_id:
            raise UsageError(f"the model's vocabulary cannot express {concept!r} (unknown tokens); spell it in words "
                             "the tokenizer knows")
    return EraseRequest(concepts, kind, list(anchors or []), list(preserve or []), vocabulary)


def check_contradictions(concepts: list[str], anchors: list[str], preserve: list[str]) -> None:
    """A request that contradicts itself is refused, not half-honoured: a concept named twice, or one that is also
    to be preserved or is its own anchor (compared as text, in any case, "_" as a space)."""
    seen: set[str] = set()
    for concept in concepts:
        if _as_text(concept) in seen:
            raise UsageError(f"--concept {concept} is given twice; name each concept once")
        seen.add(_as_text(concept))
    for flag, prompts in (("--preserve", preserve), ("--anchor", anchors)):
        both = [p for p in prompts if _as_text(p) in seen]
        if both:
            role = "preserved" if flag == "--preserve" else "its own anchor"
            raise UsageError(f"{both[0]!r} is both erased (--concept) and {role} ({flag}); drop one of them")


def _as_text(text: str) -> str:
    return " ".join(text.replace("_", " ").lower().split())


def _vocabulary_concepts(concepts: list[str], vocabulary: ConceptVocabulary) -> tuple[list[str], str]:
    kinds, normalised = set(), []
    for concept in concepts:
        if concept.lower() == "unsafe" and vocabulary.unsafe_object:
            concept, found = vocabulary.unsafe_object, "unsafe"
        else:
            try:
                found = vocabulary.concept_kind(concept)
            except KeyError:
                unsafe = "; or 'unsafe'" if vocabulary.unsafe_object else ""
                raise UsageError(f"the model does not know the concept {concept!r}; its objects: "
                                 f"{', '.join(vocabulary.objects)}; styles: {', '.join(vocabulary.styles)}{unsafe}"
                                 ) from None
            concept = vocabulary.canonical(concept)
        kinds.add(found)
        normalised.append(concept)
    if len(kinds) > 1:
        raise UsageError("erase objects and styles in separate requests: UnlearnCanvas scores each kind apart")
    return normalised, kinds.pop()
