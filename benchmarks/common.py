"""Shared set-up for the benchmarks: realistic inputs, timing with medians, the machine's name."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import numpy as np
import torch

from tl_fast.plan import AugmentConfig, draw_mix_box, plan_batch


def machine_name(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def smooth_topk_maps(batch: int, num_classes: int, topk: int, size: int, seed: int = 0):
    """Annotator-like maps: a few object classes per image, spatially smooth logits, top-k kept.

    Returns ``values [B, k, H, W]`` float16 and ``indices [B, k, H, W]`` int16/int32."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 12, 4, 4, generator=gen) * 3  # 12 candidate classes, coarse layout
    classes = torch.stack([torch.randperm(num_classes, generator=gen)[:12] for _ in range(batch)])
    field = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    field = field + 0.3 * torch.randn(batch, 12, size, size, generator=gen)
    top = field.topk(topk, dim=1)
    values = (top.values + 2.0).half()
    idx = torch.gather(classes[:, :, None, None].expand(-1, -1, size, size), 1, top.indices)
    return values, idx.to(torch.int16 if num_classes <= 32767 else torch.int32)


def crop_flip_plan(batch: int, seed: int = 0):
    """A training plan without RandAugment geometry (what the public path supports)."""
    sizes = np.stack([np.full(batch, 375), np.full(batch, 500)], 1)
    return plan_batch(seed, 0, np.arange(batch), sizes, AugmentConfig(randaugment=None))


def mix_box(grid: tuple[int, int], seed: int = 0) -> tuple[int, int, int, int]:
    return tuple(int(x) for x in draw_mix_box(seed, 0, [0], grid).boxes[0])


def time_cpu(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Wall-clock seconds: median and 20th/80th percentiles over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = np.percentile(times, [20, 80])
    return {"median": statistics.median(times), "p20": float(q[0]), "p80": float(q[1])}


def interleaved_step_times(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                           rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps taking turns in every round (so a drift of the
    machine's speed touches them alike); CUDA is synchronized around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(seconds) -> dict[str, float]:
    """Median and 20th / 80th percentiles of ``seconds``, in milliseconds."""
    return {"median_ms": 1e3 * float(np.median(seconds)), "p20_ms": 1e3 * float(np.percentile(seconds, 20)),
            "p80_ms": 1e3 * float(np.percentile(seconds, 80))}
