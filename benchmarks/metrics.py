"""UnlearnCanvas' erasure metrics, from classifier readouts of generated images.

Each record is one generated image: the object and style its prompt asked for and the object and style the
classifier read. For an erased concept of kind K (object or style):
  UA   unlearning accuracy: share of images whose prompt names the erased concept that the classifier does NOT
       read as that concept;
  IRA  in-domain retain accuracy: K-accuracy on images whose prompt names another concept of kind K;
  CRA  cross-domain retain accuracy: accuracy of the other kind on images whose prompt does not name the erased
       concept (objects when a style is erased, styles when an object is erased).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    object: str
    style: str
    predicted_object: str
    predicted_style: str


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def unlearncanvas_scores(records: list[Record], erased: list[str], kind: str) -> dict[str, float | None]:
    if kind not in ("object", "style"):
        raise ValueError(f"kind must be object or style, not {kind!r}")
    other = "style" if kind == "object" else "object"
    erased_set = {e.lower() for e in erased}
    targeted = [r for r in records if getattr(r, kind).lower() in erased_set]
    retained = [r for r in records if getattr(r, kind).lower() not in erased_set]
    return {
        "UA": _mean([getattr(r, f"predicted_{kind}").lower() not in erased_set for r in targeted]),
        "IRA": _mean([getattr(r, f"predicted_{kind}") == getattr(r, kind) for r in retained]),
        "CRA": _mean([getattr(r, f"predicted_{other}") == getattr(r, other) for r in retained]),
    }


def accuracy_scores(records: list[Record]) -> dict[str, float | None]:
    return {"object": _mean([r.predicted_object == r.object for r in records]),
            "style": _mean([r.predicted_style == r.style for r in records])}
