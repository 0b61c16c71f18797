"""Shared test set-up.

Hypothesis is a pytest plugin, so pytest rewrites the asserts of every hypothesis module it imports,
which means ``ast.parse``. Some hypothesis modules are imported lazily, in the middle of a test
(the optimiser, and the failure-patch writer after a failing example). On CPython 3.11 the ``ast``
module's recursion counter is shared by all threads, so such a parse running while a loader's
pipeline thread compiles numba code (which parses source too) can fail with ``SystemError: AST
constructor recursion depth mismatch``. Importing those modules here, at collection time, keeps
the parsing out of the tests.
"""
from __future__ import annotations

import importlib

_EAGER_MODULES = (
    "hypothesis",
    "hypothesis.strategies",
    "hypothesis.extra",
    "hypothesis.extra._patching",
    "hypothesis.internal.conjecture.engine",
    "hypothesis.internal.conjecture.optimiser",
    "hypothesis.internal.conjecture.shrinker",
    "hypothesis.internal.conjecture.pareto",
    "hypothesis.database",
    "hypothesis.extra.numpy",
)

for _name in _EAGER_MODULES:
    try:
        importlib.import_module(_name)
    except ImportError:  # optional pieces (hypothesis itself, or an extra's dependency) may be missing
        pass
