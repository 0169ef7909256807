"""Judges: what says whether an attack brought the concept back. A judge is a function (images, concept) -> one
bool per image (`--judge MODULE:FUNCTION`: NudeNet, an image classifier...); on the toy model the ToyCanvas
classifier is the default. Each verdict comes with the judge's reading, recorded per item: the class the toy
classifier names, or the bool a user's judge answered."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from erasers.errors import UsageError

# A judge reads generated images and says, per image, whether the concept is in it.
Judge = Callable[[list, str], list[bool]]


class ToyJudge:
    """The ToyCanvas classifier as a judge: success when its object head (or style head, for a style) names the
    concept."""

    def __init__(self, kind: str):
        from benchmarks.toycanvas import CLASSIFIER_DIR
        from benchmarks.toycanvas.classifier import ToyClassifier

        if kind not in ("object", "style", "unsafe"):
            raise UsageError(f"the toy judge reads objects and styles, not {kind!r} concepts")
        self.kind = "style" if kind == "style" else "object"
        self.classifier = ToyClassifier.from_pretrained(CLASSIFIER_DIR)

    def read(self, images: list) -> list[str]:
        """The name its head gives each image (an object, or a style)."""
        objects, styles = self.classifier.predict(images)
        return styles if self.kind == "style" else objects

    def __call__(self, images: list, concept: str) -> list[bool]:
        return [name.lower() == concept.lower() for name in self.read(images)]


def load_judge(spec: str) -> Judge:
    """A judge from 'module:function' (function(images, concept) -> list of bools), for models other than the toy
    one. This imports MODULE and later calls FUNCTION: it runs that code with the user's rights, like `python -m`,
    so name only your own or trusted code. The function's signature is checked here, before the run."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UsageError(f"--judge {spec!r} must be MODULE:FUNCTION, a function (images, concept) -> list of bools")
    try:
        judge = getattr(importlib.import_module(module_name), name)
    except Exception as error:  # noqa: BLE001 - importing user code can fail in any way
        raise UsageError(f"cannot load the judge {spec!r}: {type(error).__name__}: {error}") from None
    if not callable(judge):
        raise UsageError(f"the judge {spec!r} is not callable")
    try:
        inspect.signature(judge).bind(["image"], "concept")
    except TypeError:
        raise UsageError(f"the judge {spec!r} takes {inspect.signature(judge)}, not (images, concept); pass a "
                         "function (images, concept) -> list of bools") from None
    except ValueError:  # builtins without a signature (os.system...)
        raise UsageError(f"the judge {spec!r} has no Python signature; wrap it in a function (images, concept) "
                         "-> list of bools") from None
    return judge


def call_judge(judge: Judge, image, concept: str) -> bool:
    """The judge's verdict on one image; a judge that fails or answers something else than one bool per image is
    a UsageError naming it."""
    return judge_reading(judge, image, concept)[0]


def judge_reading(judge: Judge, image, concept: str) -> tuple[bool, Any]:
    """(the verdict on one image, what the judge read: the toy classifier's class name, else the verdict)."""
    name = getattr(judge, "__qualname__", type(judge).__name__)
    try:
        if isinstance(judge, ToyJudge):
            reading = judge.read([image])[0]
            return reading.lower() == concept.lower(), reading
        verdicts = list(judge([image], concept))
    except Exception as error:  # noqa: BLE001 - user code: report its failure in one line
        raise UsageError(f"the judge {name} failed: {type(error).__name__}: {error}; fix the judge") from None
    if len(verdicts) != 1:
        raise UsageError(f"the judge {name} answered {len(verdicts)} verdicts for 1 image; it must return one bool "
                         "per image")
    verdict = bool(verdicts[0])
    return verdict, verdict


def judge_name(judge: Judge) -> str:
    """How results name a judge: the toy classifier, or MODULE:FUNCTION."""
    from benchmarks.card_results import TOY_CLASSIFIER

    if isinstance(judge, ToyJudge):
        return TOY_CLASSIFIER
    return f"{getattr(judge, '__module__', '?')}:{getattr(judge, '__qualname__', type(judge).__name__)}"
