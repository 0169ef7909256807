"""A pipeline's concept vocabulary: the objects and styles it was trained to draw and the caption that names them.

A pipeline directory that ships `concepts.json` (the ToyCanvas pipeline does; so could a user's
UnlearnCanvas-finetuned SD 1.5 with its 50 styles x 20 objects) gets the same prompt sets on every eraser: a concept
must be one of its objects or styles, its erase prompts are every caption that names it, its retain prompts the
captions of the rest. The file (all keys required unless marked):

    {"objects": ["star", ...], "styles": ["Flat", ...],
     "caption_template": "A {object} image in {style} style.",
     "supercategories": {"object": "object", "style": "painting"},
     "unsafe_object": "skull",                       # optional: what `--concept unsafe` erases
     "paraphrase_templates": ["A picture of a {object} drawn in {style} style.", ...],   # optional
     "object_synonyms": {"star": ["pentagram", ...], ...}}                                # optional
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .files import read_json

FILE_NAME = "concepts.json"


@dataclass(frozen=True)
class ConceptVocabulary:
    objects: tuple[str, ...]
    styles: tuple[str, ...]
    caption_template: str
    supercategories: dict[str, str]
    unsafe_object: str | None = None
    paraphrase_templates: tuple[str, ...] = ()
    object_synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def caption(self, object_name: str, style: str) -> str:
        return self.caption_template.format(object=object_name, style=style.replace("_", " "))

    def all_pairs(self) -> list[tuple[str, str]]:
        return [(o, s) for s in self.styles for o in self.objects]

    def concept_kind(self, concept: str) -> str:
        """'object' or 'style' for one of the vocabulary's concepts (any case); KeyError otherwise."""
        lowered = concept.lower()
        if lowered in (o.lower() for o in self.objects):
            return "object"
        if lowered in (s.lower() for s in self.styles):
            return "style"
        raise KeyError(concept)

    def canonical(self, concept: str) -> str:
        """The vocabulary's own spelling of a concept given in any case."""
        return next(c for c in (*self.objects, *self.styles) if c.lower() == concept.lower())

    def paraphrases(self, object_name: str, style: str) -> list[str]:
        names = (object_name, *self.object_synonyms.get(object_name, ()))
        return [t.format(object=name, style=style) for t in self.paraphrase_templates for name in names]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def read_vocabulary(directory: str | Path) -> ConceptVocabulary | None:
    """The vocabulary a pipeline directory ships, or None (a hub id, or a directory without the file)."""
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        return None
    remedy = "fix it (its format: erasers/vocabulary.py) or delete it"
    values = read_json(path, remedy)
    fields = {f.name: f for f in dataclasses.fields(ConceptVocabulary)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"{path} has an unknown key {unknown[0]!r}; keys: {', '.join(fields)}; {remedy}")
    try:
        vocabulary = ConceptVocabulary(
            objects=_names(values["objects"]), styles=_names(values["styles"]),
            caption_template=_template(values["caption_template"], ("{object}", "{style}")),
            supercategories=_word_map(values["supercategories"]),
            unsafe_object=values.get("unsafe_object"),
            paraphrase_templates=tuple(_template(t, ("{object}",)) for t in values.get("paraphrase_templates", ())),
            object_synonyms={k: _names(v) for k, v in _mapping(values.get("object_synonyms", {})).items()})
    except KeyError as missing:
        raise UsageError(f"{path} lacks the key {missing}; {remedy}") from None
    except (TypeError, ValueError) as error:
        raise UsageError(f"{path}: {error}; {remedy}") from None
    if vocabulary.unsafe_object is not None and vocabulary.unsafe_object not in vocabulary.objects:
        raise UsageError(f"{path}: unsafe_object {vocabulary.unsafe_object!r} is not one of its objects; {remedy}")
    return vocabulary


def _names(value) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{json.dumps(value)[:40]} should be a non-empty list of names")
    return tuple(value)


def _template(value, fields: tuple[str, ...]) -> str:
    if not isinstance(value, str) or not all(f in value for f in fields):
        raise ValueError(f"template {json.dumps(value)[:60]} should be a string holding {' and '.join(fields)}")
    return value


def _mapping(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{json.dumps(value)[:40]} should be a JSON object")
    return value


def _word_map(value) -> dict[str, str]:
    if not all(isinstance(v, str) and v.strip() for v in _mapping(value).values()):
        raise ValueError("supercategories should map each kind to a word")
    return dict(value)
