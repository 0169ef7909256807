"""Training-free edits: what changes at generation time, not in the weights (SLD's safety guidance, the
negative-prompt baseline).

Such an edit is an edit directory holding `erasure.json` and no weights. Loading it (`erasers.edits.apply_edits`
calls the method's registry entry's `apply`) installs a *call edit* on the loaded pipeline: the pipeline's class is
swapped for a subclass of it whose `__call__` lets each installed call edit rewrite the call's arguments and, for the
duration of the call, act on the denoiser through forward hooks. So whatever draws images through the pipeline's own
call (`LoadedPipeline.generate`, `erasure compare`, the attack's `generate_from_ids`, the benchmarks, the app) draws
them with the edit, while the weights (and whatever trains on or searches against them) stay the base model's or the
weight edits'. Call edits stack, in the order their edits were given, after every weight edit.
"""

from __future__ import annotations

import contextlib
import inspect

from .prompts import EraseRequest


class CallEdit:
    """A generation-time edit: `rewrite` changes the pipeline call's keyword arguments (it may refuse them with a
    UsageError before anything is drawn); `during` is a context manager that is active while the call runs."""

    name = "call edit"

    def rewrite(self, pipeline, arguments: dict) -> dict:
        return arguments

    def during(self, pipeline):
        return contextlib.nullcontext()


def install_call_edit(pipeline, edit: CallEdit) -> None:
    """Make `edit` part of every later call of `pipeline` (after those installed before it)."""
    cls = type(pipeline)
    if not getattr(cls, "edited_call", False):
        # A subclass with the same name, so that nothing that reads the pipeline's class name sees a difference.
        pipeline.__class__ = type(cls.__name__, (cls,), {"__call__": _edited_call, "edited_call": True,
                                                         "__module__": cls.__module__, "__doc__": cls.__doc__})
        pipeline.call_edits = []
    pipeline.call_edits.append(edit)


def _edited_call(self, *args, **kwargs):
    original = type(self).__mro__[1]
    arguments = inspect.signature(original.__call__).bind_partial(self, *args, **kwargs).arguments
    arguments.pop("self")
    arguments.update(arguments.pop("kwargs", {}))
    with contextlib.ExitStack() as stack:
        for edit in self.call_edits:
            arguments = edit.rewrite(self, arguments)
            stack.enter_context(edit.during(self))
        return original.__call__(self, **arguments)


def call_argument(pipeline, arguments: dict, name: str):
    """The value a pipeline call uses for `name`: the one given, else its `__call__`'s default."""
    if name in arguments:
        return arguments[name]
    original = type(pipeline).__mro__[1] if getattr(type(pipeline), "edited_call", False) else type(pipeline)
    parameter = inspect.signature(original.__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def concept_text(metadata: dict) -> str:
    """The erased concepts' own text ("arrow", "Stripes style"), comma-joined: what a training-free edit steers away
    from unless its config names other text."""
    return ", ".join(EraseRequest(metadata["concepts"], metadata.get("kind", "concept")).concept_prompts())

