"""The trainer's input errors: each is one ``error:`` line naming the file or flag and what to do,
without a Python traceback (:class:`InputError`, printed by :func:`tl_fast.train.main.main` and
``tl-fast train``). Tracebacks stay for bugs: only the checks here, the checkpoint reader and the
data-opening step raise it."""
from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class InputError(ValueError):
    """Bad input to the trainer (a flag, a file, the data); its message is the whole report."""


def check_output(output: str | os.PathLike) -> Path:
    """``--output`` as a folder this process can write (created if missing), or an :class:`InputError`."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file, not a folder: pass a folder for last.pth, best.pth and "
                         "log.jsonl (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"--output {out} is not a folder this process can write ({err.strerror or err}): pass "
                         "another --output") from None
    return out


@contextmanager
def data_errors(args: argparse.Namespace) -> Iterator[None]:
    """Turn the errors of opening the data (image folders, label store, class lists, packing a
    ``.beton``) into :class:`InputError`: the library's messages already say what is wrong and
    what to do; a ``KeyError``'s message is its first argument."""
    from tl_fast.classes import ClassMismatch
    from tl_fast.store import StoreError

    try:
        yield
    except (ClassMismatch, StoreError, FileNotFoundError, ValueError, KeyError) as err:
        if isinstance(err, InputError):
            raise
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        where = f"--data {args.data}" if args.data else "the demo data"
        raise InputError(f"{where}: {text}") from None


def check_batches(train_loader, args: argparse.Namespace, world_size: int) -> None:
    """An epoch of the train split must hold at least one loader batch per process."""
    if len(train_loader) > 0:
        return
    per_process = train_loader.num_samples // world_size
    loader_batch = args.batch_size // args.grad_accum_steps
    share = f"{per_process} per process, " if world_size > 1 else ""
    raise InputError(f"--batch-size {args.batch_size} is larger than the train split ({train_loader.num_samples} "
                     f"usable images, {share}{loader_batch} per loader batch): lower --batch-size so that one batch "
                     "fits the images of a process")
