"""The annotation run: every rank annotates its blocks of images, rank 0 assembles one store.

Per rank, three things overlap: DataLoader workers decode and resize images, the main thread runs
the model, its dense head and the top-k, and a writer thread encodes the records into block files
(:mod:`tl_fast.annotate.partial`). Blocks are dealt to ranks round-robin from the ones not yet
finished, and each block is cut into the same batches on any rank, so the records do not depend on
the world size. After a barrier, rank 0 copies the blocks, in image order, into the store with
one atomic :class:`tl_fast.store.StoreWriter`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..store import LabelStore, StoreWriter
from .dense import DenseClassifier
from .images import BlockBatches, ImageList, ResizedImages, list_images
from .models import build_model, data_config, weights_digest
from .partial import PRED_TOPK, BatchResult, BlockWriter, PartialResults, partial_folder, read_block
from .ranks import GlobalProgress, Ranks, setup_ranks

log = logging.getLogger("tl_fast.annotate")

STAGES = ("data", "forward", "dense head", "top-k", "hand-off")


@dataclass
class AnnotateResult:
    """What ``annotate`` did. Accuracies are image-level (the model's pooled output) on folder labels.

    ``stage_seconds`` is this rank's loop time per stage (``data``: waiting for decoded batches;
    ``hand-off``: passing results to the writer thread, including waiting for it) and ``writer``, the
    writer thread's busy time, which overlaps the loop. On CUDA the stages are host times unless
    ``profile=True`` synchronizes after each."""

    store: Path
    num_images: int
    num_classes: int
    topk: int
    map_size: tuple[int, int]
    top1: float
    top5: float
    skipped: list[str] = field(default_factory=list)
    resumed: int = 0  # images taken from partial results of an earlier, interrupted run
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    rank_images: int = 0  # images this rank annotated in this run
    loop_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    assemble_seconds: float = 0.0


def _fingerprint(settings: dict, keys: Sequence[str]) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for k in keys:
        h.update(k.encode() + b"\n")
    return h.hexdigest()


class _StageTimer:
    def __init__(self, device: torch.device, sync: bool):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync and device.type == "cuda"
        self.device = device

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - t0


def _list_images(ranks: Ranks, root, progress: bool) -> ImageList:
    """Rank 0 lists (and caches the image-size index) first; the others then read the cache."""
    if ranks.is_main:
        try:
            imgs, problem = list_images(root, progress=progress), None
        except (ValueError, FileNotFoundError) as err:
            imgs, problem = None, err
        ranks.agree(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        return imgs
    ranks.agree(None)
    return list_images(root, quiet=True)


def annotate(
    images: str | os.PathLike,
    store: str | os.PathLike,
    *,
    model: str | nn.Module,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    topk: int = 5,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    channels_last: bool = False,
    lossy: bool = False,
    flush_every: int = 4096,
    restart: bool = False,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    metadata: dict[str, Any] | None = None,
    profile: bool = False,
) -> AnnotateResult:
    """Annotate every image under ``images`` (ImageFolder layout) and write the store ``store``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or with ``torch.distributed`` already initialized) every
    rank runs this function: each annotates its share, rank 0 writes the store, and every rank
    returns the same result (its own ``rank_*`` and ``stage_seconds``). ``store`` must then be on a
    filesystem every node shares.

    Args:
        model: timm model name, ``module:callable`` path, or an ``nn.Module`` (then ``checkpoint``,
            ``num_classes`` and ``pretrained`` are not used).
        num_classes: K of the model; default: the number of class folders (or the model's own
            classifier with ``pretrained``).
        img_size: square input size; default: the model's ``pretrained_cfg`` input size, else 224.
        topk: scores kept per map position.
        num_workers: decoding workers per rank; default ``min(8, CPUs / ranks on this node)``.
        amp / channels_last: bfloat16 autocast (CUDA) / channels-last memory format.
        flush_every: images per block, the unit of resume (rounded up to whole batches). A resumed
            run keeps the block size of the run it resumes.
        restart: discard partial results of an earlier run instead of resuming them.
        on_batch: called as ``on_batch(done, total)`` after each batch with this rank's count
            (including resumed images; progress hooks, tests).
        metadata: extra JSON entries for the store's metadata (beside ``annotator``).
        profile: on CUDA, synchronize after each stage so ``stage_seconds`` are device times.

    Unreadable images are skipped with a warning and listed in the result; they get no record.
    """
    start = time.perf_counter()
    ranks = setup_ranks(device)
    try:
        return _annotate(ranks, start, images, store, model=model, checkpoint=checkpoint, num_classes=num_classes,
                         pretrained=pretrained, img_size=img_size, topk=topk, batch_size=batch_size,
                         num_workers=num_workers, amp=amp, channels_last=channels_last, lossy=lossy,
                         flush_every=flush_every, restart=restart, progress=progress, on_batch=on_batch,
                         metadata=metadata, profile=profile)
    finally:
        ranks.close()


def _annotate(ranks: Ranks, start: float, images, store, *, model, checkpoint, num_classes, pretrained, img_size,
              topk, batch_size, num_workers, amp, channels_last, lossy, flush_every, restart, progress, on_batch,
              metadata, profile) -> AnnotateResult:
    dev = ranks.device
    imgs = _list_images(ranks, images, progress)
    keys, store = imgs.keys, Path(store)
    if isinstance(model, nn.Module):
        net, model_name = model.eval(), type(model).__name__
    else:
        model_name = model
        if num_classes is None and not pretrained:
            num_classes = len(imgs.classes)
        net = build_model(model, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained,
                          img_size=img_size)
    dcfg = data_config(net, img_size)
    size = dcfg["img_size"]
    settings = {"model": model_name, "weights": weights_digest(net), "num_classes": num_classes,
                "pretrained": pretrained, "data": dcfg, "topk": int(topk), "amp": bool(amp), "lossy": bool(lossy),
                "root": str(imgs.root.resolve())}
    fingerprint = _fingerprint(settings, keys)
    fingerprints = ranks.gather(fingerprint)
    if len(set(fingerprints)) > 1:
        raise RuntimeError("the ranks see different images, settings or weights (fingerprints "
                           f"{', '.join(f[:8] for f in fingerprints)}); give every rank the same arguments and files")
    dense_net = DenseClassifier(net).to(dev)
    if channels_last:
        dense_net = dense_net.to(memory_format=torch.channels_last)

    # The partial folder: rank 0 creates or checks it and lists the finished blocks.
    partial = PartialResults(partial_folder(store))
    wanted_block = max(1, math.ceil(flush_every / batch_size)) * batch_size
    state: tuple | None = None
    if ranks.is_main:
        try:
            block_size = partial.prepare(fingerprint, wanted_block, restart)
            state, problem = (block_size, partial.done_blocks()), None
        except RuntimeError as err:
            problem = err
        ranks.agree(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        ranks.gather(state)
    else:
        ranks.agree(None)
        state = ranks.gather(None)[0]
    block_size, done = state
    ranks.agree(None if ranks.is_main else partial.check(fingerprint))
    if block_size != wanted_block and ranks.is_main:
        log.info("resuming with the earlier run's block size, %d images (asked: %d)", block_size, wanted_block)

    n_images = len(keys)
    n_blocks = math.ceil(n_images / block_size)
    done_set = set(done)
    todo = [j for j in range(n_blocks) if j not in done_set]
    mine = todo[ranks.rank::ranks.world_size]
    sampler = BlockBatches(mine, block_size, n_images, batch_size)
    resumed = sum(min(n_images, (j + 1) * block_size) - j * block_size for j in done)
    batches_per_rank = [len(BlockBatches(todo[r::ranks.world_size], block_size, n_images, batch_size))
                        for r in range(ranks.world_size)]

    loop_start = time.perf_counter()
    timer = _StageTimer(dev, profile)
    rank_images = 0
    writer = None
    bar = GlobalProgress(ranks, n_images, resumed, batches_per_rank, enabled=progress)
    try:
        if mine:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            workers = (max(1, min(8, (os.cpu_count() or 1) // max(1, local_world))) if num_workers is None
                       else int(num_workers))
            dataset = ResizedImages(imgs.root, imgs.paths, size, dcfg["interpolation"])
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                                 pin_memory=dev.type == "cuda")
            writer = BlockWriter(partial, {j: sampler.block_range(j) for j in mine}, keys, imgs.paths, fingerprint,
                                 topk=topk, lossy=lossy, model_name=model_name,
                                 image_fingerprints=imgs.fingerprints)
            rank_images = _loop(loader, sampler, dense_net, writer, bar, timer, dcfg, dev, topk=topk, amp=amp,
                                channels_last=channels_last, model_name=model_name, on_batch=on_batch,
                                resumed=resumed, total=n_images)
            writer.close()
        bar.finish(rank_images)
    except BaseException:
        if writer is not None:
            writer.abort()
        bar.close()
        raise
    loop_seconds = time.perf_counter() - loop_start
    ranks.barrier()

    # Rank 0 assembles the store; every rank gets the result (or rank 0's error).
    t0 = time.perf_counter()
    result: AnnotateResult | None = None
    problem: Exception | None = None
    if ranks.is_main:
        try:
            result = _assemble(partial, store, imgs, fingerprint, block_size, n_blocks, topk=topk,
                               lossy=lossy, size=size, model_name=model_name,
                               checkpoint=checkpoint, metadata=metadata, resumed=resumed)
        except (RuntimeError, ValueError, OSError) as err:
            problem = err
    shared = ranks.gather((result, None if problem is None else f"{type(problem).__name__}: {problem}"))[0]
    if problem is not None:
        raise problem
    if shared[1] is not None:
        raise RuntimeError(f"rank 0 could not assemble the store: {shared[1]}")
    result = shared[0]
    result.assemble_seconds = time.perf_counter() - t0
    result.seconds = time.perf_counter() - start
    result.rank, result.world_size, result.rank_images = ranks.rank, ranks.world_size, rank_images
    result.loop_seconds = loop_seconds
    result.stage_seconds = {**{s: timer.seconds.get(s, 0.0) for s in STAGES},
                            "writer": writer.busy_seconds if writer is not None else 0.0}
    log.info(_summary(result, len(mine)))
    return result


@torch.inference_mode()
def _loop(loader, sampler: BlockBatches, dense_net: DenseClassifier, writer: BlockWriter, bar: GlobalProgress,
          timer: _StageTimer, dcfg: dict, dev: torch.device, *, topk: int, amp: bool, channels_last: bool,
          model_name: str, on_batch, resumed: int, total: int) -> int:
    """Run the model over this rank's batches; returns the number of images done."""
    mean = torch.tensor(dcfg["mean"], device=dev).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(dcfg["std"], device=dev).view(1, 3, 1, 1) * 255.0
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda")
    cuda = dev.type == "cuda"
    done = batches = 0
    it = iter(loader)
    while True:
        with timer("data"):
            try:
                images, ids, ok = next(it)
            except StopIteration:
                break
        positions = ids.numpy()
        block = int(positions[0]) // sampler.block_size  # batches never straddle blocks
        with timer("forward"):
            x = images.to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = (x.float() - mean) / std
            with autocast:
                feats, logits = dense_net.backbone(x)
        with timer("dense head"):
            with autocast:
                dense = dense_net.dense_head(feats, x)
            if dense.ndim != 4 or logits.ndim != 2 or dense.shape[:2] != logits.shape:
                raise RuntimeError(f"{model_name}: dense output {tuple(dense.shape)} and logits "
                                   f"{tuple(logits.shape)} do not fit ([B, K, h, w] and [B, K])")
        num_k = dense.shape[1]
        if topk > num_k:
            raise ValueError(f"--topk {topk} exceeds the model's {num_k} classes")
        with timer("top-k"):
            dense = dense.float()
            vals, cls = dense.topk(topk, dim=1)  # sorted, largest first
            pred = logits.float().topk(min(PRED_TOPK, num_k), dim=1).indices
            if pred.shape[1] < PRED_TOPK:
                pred = torch.cat([pred, pred[:, :1].expand(-1, PRED_TOPK - pred.shape[1])], 1)
            out = (vals.to(torch.float16), cls.to(torch.int16 if num_k <= 32767 else torch.int32),
                   pred, torch.isfinite(dense).flatten(1).all(1))
        with timer("hand-off"):
            ready = None
            if cuda:
                host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in out]
                for h, t in zip(host, out):
                    h.copy_(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                out = host
            writer.put(BatchResult(block, positions, num_k, *out, ok=ok, ready=ready))
        done += len(positions)
        batches += 1
        bar.step(batches, done, len(positions))
        if on_batch is not None:
            on_batch(resumed + done, total)
    return done


def _assemble(partial: PartialResults, store: Path, imgs: ImageList, fingerprint: str, block_size: int,
              n_blocks: int, *, topk: int, lossy: bool, size: int, model_name: str,
              checkpoint, metadata, resumed: int) -> AnnotateResult:
    """Check every block, compute the image-level accuracy, and copy the blocks into ``store``."""
    n = len(imgs)
    missing = [j for j in range(n_blocks) if not partial.block_path(j).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {n_blocks} finished blocks are not visible to rank 0 in {partial.folder} "
                           f"(e.g. {partial.block_path(missing[0]).name}): STORE must be on a filesystem that every "
                           "node shares")
    with LabelStore.open(partial.block_path(0)) as first:  # the model's K and map size, as the blocks hold them
        num_k, map_size = first.num_classes, first.map_size
    pred = np.zeros((n, PRED_TOPK), np.int64)
    skipped = np.zeros(n, bool)
    for j in range(n_blocks):
        a, b = j * block_size, min(n, (j + 1) * block_size)
        pred[a:b], skipped[a:b] = read_block(partial, j, a, b - a, fingerprint, imgs.keys)
    labels = np.asarray(imgs.labels)
    good = ~skipped
    top1 = float((pred[good, 0] == labels[good]).mean()) if good.any() else float("nan")
    top5 = float((pred[good] == labels[good, None]).any(1).mean()) if good.any() else float("nan")
    if num_k != len(imgs.classes):
        log.warning("the model has %d classes but %s has %d class folders: the accuracy report assumes "
                    "class i is the i-th folder in sorted order", num_k, imgs.root, len(imgs.classes))
    skipped_paths = [p for p, _ in imgs.skipped] + [imgs.paths[i] for i in np.flatnonzero(skipped)]
    meta = {"annotator": {"model": model_name, "checkpoint": None if checkpoint is None else str(checkpoint),
                          "img_size": size, "scores": "logits", "image_top1": top1, "image_top5": top5,
                          "skipped": len(skipped_paths)}, **(metadata or {})}
    if num_k == len(imgs.classes):
        # The class list the ids mean (the folder's, as the accuracy above assumes): loaders and
        # pack-ffcv refuse to pair the store with a folder of other classes.
        meta.setdefault("classes", list(imgs.classes))
    with StoreWriter(store, num_classes=num_k, topk=topk, map_size=map_size, lossy=lossy, metadata=meta) as writer:
        for j in range(n_blocks):
            with LabelStore.open(partial.block_path(j)) as block:
                writer.copy_from(block)
    partial.remove()
    return AnnotateResult(store=store, num_images=int(good.sum()), num_classes=num_k, topk=topk,
                          map_size=tuple(map_size), top1=top1, top5=top5, skipped=skipped_paths, resumed=resumed)


def _summary(res: AnnotateResult, blocks: int) -> str:
    loop = max(res.loop_seconds, 1e-9)
    shares = ", ".join(f"{name} {100 * sec / loop:.0f}%" for name, sec in res.stage_seconds.items())
    rate = res.rank_images / loop
    return (f"annotate rank {res.rank}/{res.world_size}: {res.rank_images} images in {blocks} blocks, "
            f"{loop:.1f} s, {rate:.1f} img/s; {shares} of the loop (writer overlaps)")
