"""Atomic checkpoints and random-generator state, for exact resume; the class list a checkpoint was
trained on, checked when a run resumes from it or fine-tunes from it."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..classes import ClassMismatch, same_classes
from .checks import InputError


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` with ``torch.save`` to a temporary file beside ``path``, fsync it, then rename:
    a crash at any point leaves either the previous checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class MissingCheckpoint(InputError, FileNotFoundError):
    """No checkpoint where one was asked for (also a ``FileNotFoundError``, as before)."""


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", flag: str = "--resume") -> Any:
    """``torch.load`` of ``path``; a missing or unreadable file is a one-line
    :class:`~tl_fast.train.checks.InputError` naming it, ``flag`` and what to do."""
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpoint(f"{flag}: no checkpoint at {path}: train without {flag} first, or point {flag} to a "
                                "file written by this trainer")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch.load: UnpicklingError, RuntimeError (zip reader), EOFError, ...
        said = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""  # torch's first sentence
        raise InputError(f"{flag}: {path} is damaged or not a checkpoint ({type(err).__name__}: {said[:200]}): move "
                         f"it aside (its run may have left a good best.pth) or drop {flag}") from None


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    flag: str = "--resume") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a missing, damaged or foreign file is a
    one-line :class:`~tl_fast.train.checks.InputError` naming it, ``flag`` and what to do."""
    ckpt = load_file(path, map_location, flag)
    if not isinstance(ckpt, dict):
        raise InputError(f"{flag}: {path} holds a {type(ckpt).__name__}, not a checkpoint of this trainer: point "
                         f"{flag} to last.pth of a run, or drop {flag}")
    return ckpt


def resume(path: Path, ckpt: dict[str, Any], classes: list[str], *, model, ema, optimizer, scheduler, scaler,
           loader) -> dict[str, Any]:
    """Put the run's model, EMA, optimizer, schedule, grad scaler, random generators and loader where
    ``ckpt`` (read from ``path``) left them; returns its progress (``state``). A checkpoint of other
    classes (by name) or of another model, optimizer or data is an :class:`InputError`."""
    if ckpt.get("classes") is not None:
        try:
            same_classes(list(classes), list(ckpt["classes"]), what="the train split", reference_what=f"{path}",
                         remedy="resume with the data it was trained on, or start a new --output without --resume")
        except ClassMismatch as err:
            raise InputError(f"--resume: {err}") from None
    try:
        model.load_state_dict(ckpt["model"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"])
        loader.set_epoch(state["epoch"])
        loader.load_state_dict(ckpt["loader"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:  # state dicts that do not fit this run
        said = (err.args[0] if isinstance(err, KeyError) and err.args else str(err)).strip()
        said = said.splitlines()[0] if said else type(err).__name__
        what = f"it lacks {said!r}" if isinstance(err, KeyError) else said[:300]
        raise InputError(f"--resume: {path} does not fit this run ({what}): resume with the options and data it was "
                         "written with, or move it aside / drop --resume to start anew") from None
    return state


def check_initial_classes(path: str, ckpt: Any, classes: list[str]) -> bool:
    """Whether the fine-tuning checkpoint ``ckpt`` (read from ``path``) was trained on ``classes``:
    True if so or if it records no class list (a timm or official file), False if it records
    other classes (its classifier then scores other classes and is re-initialized)."""
    recorded = ckpt.get("classes") if isinstance(ckpt, dict) else None
    if recorded is None:
        return True
    try:
        same_classes(list(classes), list(recorded), what="the train split", reference_what=path, remedy="")
    except ClassMismatch:
        return False
    return True


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (CPU) and CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct, reproducible seed per (run seed, rank, global step) for the model's own randomness
    (drop path, dropout): reseeding every step makes a resumed run draw exactly what the
    uninterrupted run would have drawn, on every rank."""
    return (seed * 1_000_003 + rank * 104_729 + step * 7_919 + 12_345) % (2**63 - 1)
