"""More rows of the bad-input table (apps/bad_inputs.py), one module per topic: each module defines `CASES`, a
list of `apps.bad_inputs.Case`, and registers the files its cases need with `apps.bad_input_fixtures.fixture`.
Every module of this package is collected; nothing else lists them."""

from __future__ import annotations

import importlib
import pkgutil


def topic_cases() -> list:
    cases = []
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        cases += importlib.import_module(f"{__name__}.{module.name}").CASES
    return cases
