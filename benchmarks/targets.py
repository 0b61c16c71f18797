"""The claims BENCHMARKS.md reports on: the performance targets of docs/spec.md section 5, in its
order, then the other figures the README states. Every result row names one of them (``target``);
``tools/render_benchmarks.py`` draws one table per entry, in this order."""
from __future__ import annotations

from dataclasses import dataclass

NO_GPU_SINCE_REDESIGN = (
    "No current measurement. No GPU has been lent since the Triton kernels were redesigned (merged in "
    "`14b6487`); the H100 timings of November 2026 are of the kernels before that and are left out. "
    "`bash benchmarks/gpu_check.sh` measures this on a GPU. Without one, CI checks what can be checked: "
    "`python -m tools.kernel_report` compiles every kernel for sm_90 and `tests/test_kernel_report.py` "
    "asserts no register spills and 128-bit stores ([docs/kernels.md](docs/kernels.md)).")


@dataclass(frozen=True)
class Target:
    id: str
    title: str
    goal: str  # as docs/spec.md section 5 states it (or the README's claim)
    benchmarks: tuple[str, ...]  # the modules under benchmarks/ that measure it
    spec: bool = True  # a row of docs/spec.md section 5's table
    missing: str = "No current measurement."  # said when no row names this target
    reading: str = ""  # one paragraph on how to read the rows (or a pointer to a docs page)


_ALL = (
    Target("gpu-token-targets", "Token targets on a GPU",
           "B=128, 14x14 grid, K=1000, 18x18 top-5 maps, crop+flip+MixToken: within 1.5x of the memory floor "
           "(compressed maps read plus targets written, over the write bandwidth measured in the same run), f32 "
           "and bf16; >= 150x the public path on the same GPU", ("kernel_throughput",),
           missing=NO_GPU_SINCE_REDESIGN),
    Target("gpu-fused-loss", "Fused token-label loss on a GPU, forward + backward",
           "<= 1.0x the time of plain `F.cross_entropy` with hard labels on the same logits",
           ("kernel_throughput",), missing=NO_GPU_SINCE_REDESIGN),
    Target("cpu-token-targets", "Token targets on a CPU",
           "same sizes as on the GPU: >= 8x faster than the public path on the same CPU, also on a loaded host "
           "at default settings", ("label_throughput",),
           reading="The three paths run interleaved, one call each per round; a busy loop stands for a loaded "
                   "host. How the CPU path gets there: [docs/cpu-path.md](docs/cpu-path.md)."),
    Target("label-store", "Label store",
           "lossless mode <= 60% of the public `.pt` bytes per image on annotator output; batched gather "
           ">= 200k maps/s on one core, also on a 1.28M-record store",
           ("store_throughput", "scale_check", "annotate_throughput"),
           reading="Bytes are per record (or per image for the whole file, index and manifest included). The "
                   "1.28M-record gathers and why the loaders map a store the way they do: "
                   "[docs/store-at-scale.md](docs/store-at-scale.md)."),
    Target("loader-labels-on-off", "Loader: token labels on against off",
           "images/s with token labels >= 0.97x the same backend without them", ("loader_throughput",),
           reading="On two shared cores single ratios scatter around 1 by more than the label work costs; the "
                   "label share (label-side host time per batch over the batch time) bounds what labels can "
                   "cost."),
    Target("loader-vs-peers", "Loader against what users run today",
           "with token labels on, >= 1.0x the native FFCV / DALI pipeline without labels (same images, crop + "
           "flip, same machine); >= 2x the public approach (PIL + one `.pt` file per sample) with the same "
           "augmentations", ("loader_peers", "loader_throughput"),
           reading="Where the time goes and what was tried: [docs/loaders-vs-native.md](docs/loaders-vs-native.md) "
                   "and [docs/cpu-path.md](docs/cpu-path.md)."),
    Target("train-step-overhead", "LV-ViT training step: token labeling against class-token only",
           "LV-ViT-S on a GPU, token labeling with the fused loss: <= 1.01x the class-token-only step time",
           ("train_overhead",),
           reading="The target is a GPU step, and the only GPU rows are of the kernels before their redesign "
                   "(carried, marked below); `bash benchmarks/gpu_check.sh` measures the current ones. The CPU "
                   "rows time the same step of the demo model on a shared CPU, where the numba targets and the "
                   "soft-target loss stand in for the fused kernel: they show the path runs, and the spread "
                   "shows how much of the ratio is noise."),
    Target("class-only-overhead", "Class-token-only labels for any classifier",
           "ResNet-50 step with pooled machine labels <= 1.02x the hard-label step on a GPU (ReLabel's public "
           "path: +31.5%)", ("class_label_overhead",),
           reading="The target is a GPU step; no GPU has been lent since the class-only mode took its current "
                   "kernel path, so only CPU rows exist. On a CPU the whole-step ratio is noise (the two "
                   "class-token variants compute the same thing there, targets then soft cross-entropy, and still "
                   "differ); the loss timed alone on fixed logits says what the labels add to a step."),
    Target("timm-token-labeling", "Token labeling on a timm ViT-S",
           "wrapper + fused loss <= 1.02x the same model trained class-token only, GPU step",
           ("train_overhead",),
           missing="No current measurement: no GPU has been lent since `tl_fast.models.token_labeling` "
                   "(docs/spec.md section 4) was built; `bash benchmarks/gpu_check.sh` runs `python -m "
                   "benchmarks.train_overhead --device cuda --model vit_small_patch16_224`.",
           reading="The target is a GPU step, and none has been measured: no GPU has been lent since "
                   "`tl_fast.models.token_labeling` (docs/spec.md section 4) was built; `bash benchmarks/gpu_check.sh` "
                   "runs `python -m benchmarks.train_overhead --device cuda --model vit_small_patch16_224`. The CPU "
                   "rows time small timm ViTs on a shared CPU: within their spread, the wrapper costs a few percent "
                   "at most there. Accuracy on the demo: \"Token labeling on the demo\" below."),
    Target("demo", "Token labeling on the demo",
           "2 idle cores, data prepared: token labeling vs the class-token baseline on the same budget: >= 50% "
           "val top-1, >= +5 points on the mean of 2 seeds, both runs in <= 5 min of training",
           ("demo_gain", "token_label_evidence"),
           reading="The sweep behind the demo's recipe (both labelings on seeds 0 and 1 over batch size, learning "
                   "rate and student, with the command of every cell), the earlier runs and why MixToken costs "
                   "accuracy on the demo: [docs/demo-evidence.md](docs/demo-evidence.md)."),
    Target("annotate", "Machine annotation against plain inference",
           "`tl-fast annotate` >= 0.95x the images/s of a plain timm inference loop over the same images, model "
           "and batch", ("annotate_throughput",), spec=False),
    Target("imagenet-scale", "Host-side tools at ImageNet scale",
           "indexing, `convert-pt`, the store's writer and `verify()` on ImageNet-sized inputs", ("scale_check",),
           spec=False),
)

TARGETS: dict[str, Target] = {t.id: t for t in _ALL}
