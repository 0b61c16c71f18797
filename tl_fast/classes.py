"""Class lists compared by name.

A class id is a position in a list of class names (for an image folder, its sorted class-folder
names), so one id means another class as soon as two lists differ: a val folder without the first
train class shifts every later id by one. Whatever pairs the ids of two sources goes through here:
a loader given the class list it must deliver ids of (the trainer's val split takes its train
split's), a label store against its image folder, a checkpoint against a run.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class ClassMismatch(ValueError):
    """Two class lists that cannot be paired by name; the message is one line naming the classes."""


def _names(names: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def match_classes(classes: Sequence[str], reference: Sequence[str], *, what: str,
                  reference_what: str) -> tuple[np.ndarray, list[str]]:
    """The ids of ``classes`` in ``reference``, matched by name: ``ids[i]`` is the position of
    ``classes[i]`` in ``reference`` (int64), and the classes of ``reference`` that ``classes`` lacks.

    Raises :class:`ClassMismatch` naming the classes of ``what`` that ``reference_what`` lacks (a
    model trained on ``reference`` has no output for them)."""
    position = {name: i for i, name in enumerate(reference)}
    extra = [c for c in classes if c not in position]
    if extra:
        raise ClassMismatch(
            f"{what} has {len(extra)} class(es) that {reference_what} lacks: {_names(extra)} (a model trained on "
            f"{reference_what} has no output for them): remove them from {what}, or train on them")
    ids = np.array([position[c] for c in classes], dtype=np.int64)
    present = set(classes)
    return ids, [c for c in reference if c not in present]


def same_classes(classes: Sequence[str], reference: Sequence[str], *, what: str, reference_what: str,
                 remedy: str) -> None:
    """Raise :class:`ClassMismatch` unless ``classes`` and ``reference`` are the same names in the
    same order (so every id means the same class), naming the first difference and ``remedy``."""
    classes, reference = list(classes), list(reference)
    if classes == reference:
        return
    extra = [c for c in classes if c not in set(reference)]
    lacking = [c for c in reference if c not in set(classes)]
    if extra or lacking:
        parts = ([f"{_names(extra)} only in {what}"] if extra else []) + \
            ([f"{_names(lacking)} only in {reference_what}"] if lacking else [])
        diff = "; ".join(parts)
    else:
        i = next(i for i, (a, b) in enumerate(zip(classes, reference)) if a != b)
        diff = f"the same names in another order (id {i} is {classes[i]!r} in {what}, {reference[i]!r} in " \
               f"{reference_what})"
    raise ClassMismatch(f"{what} has {len(classes)} classes and {reference_what} {len(reference)}, which differ by "
                        f"name: {diff}; its class ids would mean other classes: {remedy}")
