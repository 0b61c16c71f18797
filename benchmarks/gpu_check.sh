#!/usr/bin/env bash
# One command for a bare GPU machine (torch + Triton + torchvision; no DALI/FFCV, nothing to install):
# the CUDA-marked kernel tests, the kernel benchmark (one table: bandwidths, floors, targets vs floor
# and public path, fused loss vs F.cross_entropy plain and in a CUDA graph, stages, registers, errors,
# launch sweep; about 2-4 minutes), the training-step overhead (LV-ViT-S, and a timm ViT-S through
# tl_fast.models.token_labeling against the bare model), the loader benchmark (when numba is
# importable; data generated on the spot), then a summary table.
# Run from anywhere:  bash benchmarks/gpu_check.sh      (about 4-6 minutes on an H100)
# Figures and logs land in ${GPU_CHECK_OUT:-$OUT or /tmp/tl_fast_gpu_check}. Each benchmark records its rows in
# benchmarks/results/ of the tree it runs in; the script copies those files to $OUT_DIR/results at the end
# (copy them back into the checkout, then python -m tools.render_benchmarks). On a copy of the tree without
# .git, set TL_FAST_COMMIT to the commit the copy was made from.
# Switches (environment): GPU_CHECK_TESTS=0 skips the tests, GPU_CHECK_BENCH=0 the kernel benchmark,
# GPU_CHECK_OVERHEAD=0 the training-step overhead, GPU_CHECK_LOADER=0 the loader benchmark;
# GPU_CHECK_TEST_FILES narrows the tests (default: the kernel, class-only, compat, loader and annotate tests);
# GPU_CHECK_CLASS=1 adds the class-token-only overhead for ResNet-50 (about 4 minutes) and
# GPU_CHECK_ANNOTATE=1 the annotation throughput against plain timm inference (about 5 minutes);
# GPU_CHECK_LOADER_ROUNDS sets the loader benchmark's rounds (default 5);
# GPU_CHECK_EVIDENCE_EPOCHS=N adds the token-labeling evidence runs (python -m benchmarks.token_label_evidence:
# class-token only vs token labeling + MixToken, two seeds, N epochs, on the demo dataset prepared
# in the background while the checks run), cut off so that the script ends within GPU_CHECK_DEADLINE
# seconds (default 560), with GPU_CHECK_EVIDENCE_ARGS as extra trainer flags (e.g. "--dim 192 --heads 6"),
# GPU_CHECK_EVIDENCE_VARIANTS as the runs (e.g. "cls-only token-label-mixtoken token-label-mixtoken-content",
# or the timm ViT's "vit-hard vit-class vit-tokens vit-tokens-nomix" with GPU_CHECK_EVIDENCE_BASELINE=vit-hard),
# GPU_CHECK_EVIDENCE_BASELINE as the run the others are compared with (default cls-only)
# and GPU_CHECK_EVIDENCE_SEEDS as the seeds (default "0 1");
# GPU_CHECK_DEMO_FROM=DIR copies DIR's annotator.pt and train_labels.tlstore into the demo folder first, so
# the runs train on the same labels as a CPU run made from DIR (the images are rendered again, the same).
# On an H100 with 16 cores, 4 parallel runs of the preset's student take about 1.7 s per epoch; at
# width 192, 150 epochs took 292-342 s.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels on the GPU
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-/tmp/tl_fast_gpu_check}}
mkdir -p "$OUT_DIR"
if ! git rev-parse HEAD >/dev/null 2>&1 && [ -z "${TL_FAST_COMMIT:-}" ]; then
    echo "note: no git checkout here; set TL_FAST_COMMIT=<commit> so the result rows name the code they measured"
fi
status=0
START=$SECONDS
EVIDENCE_EPOCHS=${GPU_CHECK_EVIDENCE_EPOCHS:-0}
DEMO_DIR=/tmp/tl_fast_demo
if [ "$EVIDENCE_EPOCHS" -gt 0 ]; then
    # CPU-only work (rendering, a small CNN): kept off the first 4 cores, which the timed checks use.
    PIN=""
    if [ -n "${GPU_CHECK_DEMO_FROM:-}" ]; then
        mkdir -p "$DEMO_DIR" && cp "$GPU_CHECK_DEMO_FROM"/annotator.pt "$GPU_CHECK_DEMO_FROM"/train_labels.tlstore "$DEMO_DIR"/
    fi
    if command -v taskset >/dev/null && [ "$(nproc)" -gt 8 ]; then PIN="taskset -c 4-$(($(nproc) - 1))"; fi
    TL_FAST_DATA=$DEMO_DIR $PIN "$PY" -c "from tl_fast.demo import prepare; print(prepare(progress=False).manifest['annotator'])" \
        > "$OUT_DIR/demo_prepare.log" 2>&1 &
    PREPARE_PID=$!
fi

"$PY" - <<'EOF'
import torch, triton
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
import tl_fast.kernels  # noqa: F401  (fails early if the copy on this machine lacks the kernels)
for mod in ("numba", "timm", "pytest", "nvidia.dali", "ffcv"):
    try:
        m = __import__(mod, fromlist=["__version__"])
        print(f"  {mod} {getattr(m, '__version__', '?')}")
    except Exception as err:
        print(f"  {mod}: not importable ({type(err).__name__})")
EOF
[ $? -eq 0 ] || exit 1

echo "== CUDA kernel tests"
if [ "${GPU_CHECK_TESTS:-1}" != 1 ]; then
    tests_line="skipped (GPU_CHECK_TESTS=0)"
elif "$PY" -c "import pytest" 2>/dev/null; then
    timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda ${GPU_CHECK_TEST_FILES:-tests/test_kernels.py tests/test_class_only.py tests/test_compat.py tests/test_loader.py tests/test_annotate.py} \
        2>&1 | tee "$OUT_DIR/tests.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || status=1
    tests_line=$(tail -n 1 "$OUT_DIR/tests.log")
else
    # No pytest on the machine: the benchmark below checks the same full-size values itself.
    tests_line="pytest not installed: skipped (the benchmark's correctness checks stand in)"
    echo "$tests_line"
fi

echo "tests: $tests_line"
if [ "${GPU_CHECK_BENCH:-1}" = 1 ]; then
echo "== Token-label kernels (targets, fused loss, stages, registers, launch sweep)"
timeout 330 "$PY" -m benchmarks.kernel_throughput --sweep --json "$OUT_DIR/kernels_gpu.json" 2>&1 \
    | tee "$OUT_DIR/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== Kernel table"
"$PY" -m benchmarks.kernel_table "$OUT_DIR/kernels_gpu.json" || status=1
fi
if [ "${GPU_CHECK_OVERHEAD:-1}" = 1 ]; then
    echo "== Training-step overhead of token labeling (LV-ViT-S, B=128, bf16; target fused <= 1.01x cls-only)"
    timeout 180 "$PY" -m benchmarks.train_overhead --device cuda --rounds 30 --json "$OUT_DIR/train_overhead.json" \
        2>&1 | tee "$OUT_DIR/train_overhead.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    echo "== Token labeling on a timm ViT-S (token_labeling wrapper + fused loss) vs the bare model class-only"
    echo "   (B=128, bf16; target <= 1.02x)"
    timeout 180 "$PY" -m benchmarks.train_overhead --device cuda --model vit_small_patch16_224 --rounds 30 \
        --json "$OUT_DIR/train_overhead_vit.json" 2>&1 | tee "$OUT_DIR/train_overhead_vit.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ "${GPU_CHECK_CLASS:-0}" = 1 ]; then
    echo "== Class-token-only labels, ResNet-50 (B=128, 224 px, bf16; target class-fused <= 1.02x hard labels)"
    timeout 240 "$PY" -m benchmarks.class_label_overhead --device cuda --rounds 30 \
        --json "$OUT_DIR/class_label_overhead.json" 2>&1 | tee "$OUT_DIR/class_label_overhead.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ "${GPU_CHECK_ANNOTATE:-0}" = 1 ]; then
    echo "== Annotation vs plain timm inference (convnextv2_large at 384 px, bf16, channels-last; target >= 0.95x)"
    timeout 300 "$PY" -m benchmarks.annotate_throughput --device cuda --amp --channels-last --model convnextv2_large \
        --img-size 384 --batch-size 64 --workers "$(nproc)" --num-images 4096 --rounds 5 \
        --json "$OUT_DIR/annotate_gpu.json" 2>&1 | tee "$OUT_DIR/annotate.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

# Loader: the torch backend (workers decode and crop by the plan, augmentation on the GPU) vs the public
# PIL + torch.load loader, same workers. Needs numba (the store decoder); DALI and FFCV are not on the
# lent machine. Data: GPU_CHECK_DATA (imgs/ in ImageFolder layout + labels.tls), else 4,096
# ImageNet-sized JPEGs and a store generated here by tools/make_loader_data.py (a few seconds).
DATA=${GPU_CHECK_DATA:-/tmp/tl_fast_loader_data}  # outside $OUT: nothing large travels back
if [ "${GPU_CHECK_LOADER:-1}" != 1 ]; then
    echo "== Loader throughput: skipped (GPU_CHECK_LOADER=0)"
elif "$PY" -c "import numba, timm" 2>/dev/null; then
    if [ ! -f "$DATA/labels.tls" ]; then
        timeout 120 "$PY" -m tools.make_loader_data "$DATA" --images 4096 2>&1 | grep -v "img/s]" | tail -n 2
    fi
    echo "== Loader throughput (torch backend on the GPU vs the public loader)"
    timeout 300 "$PY" -m benchmarks.loader_throughput --images "$DATA/imgs" --labels "$DATA/labels.tls" \
        --backends torch --batch-size 64 --image-size 224 --workers "$(nproc)" --rounds "${GPU_CHECK_LOADER_ROUNDS:-5}" --warmup 12 \
        --batches 50 --device cuda --workdir /tmp/tl_fast_loader_work --json "$OUT_DIR/loader.json" \
        > "$OUT_DIR/loader.log" 2>&1
    [ $? -eq 0 ] || status=1
    tr '\r' '\n' < "$OUT_DIR/loader.log" | grep -v "it/s]\|img/s]"  # the table or the error, without progress bars
else
    echo "== Loader throughput: skipped (needs numba and timm importable)"
fi

if [ "$EVIDENCE_EPOCHS" -gt 0 ]; then
    echo "== Token-labeling evidence ($EVIDENCE_EPOCHS epochs, demo dataset)"
    wait "$PREPARE_PID" || { status=1; cat "$OUT_DIR/demo_prepare.log"; }
    tail -n 1 "$OUT_DIR/demo_prepare.log"
    left=$(( ${GPU_CHECK_DEADLINE:-560} - (SECONDS - START) - 20 ))
    workers=$(( $(nproc) / 4 - 1 )); [ "$workers" -ge 1 ] || workers=1
    "$PY" -m benchmarks.token_label_evidence --data "$DEMO_DIR" --epochs "$EVIDENCE_EPOCHS" \
        --seeds ${GPU_CHECK_EVIDENCE_SEEDS:-0 1} \
        --variants ${GPU_CHECK_EVIDENCE_VARIANTS:-cls-only token-label-mixtoken} \
        --baseline "${GPU_CHECK_EVIDENCE_BASELINE:-cls-only}" \
        --parallel 4 --workers "$workers" --threads 1 --eval-every 10 --time-limit "$left" \
        --out /tmp/tl_fast_evidence --summary "$OUT_DIR/evidence.json" -- ${GPU_CHECK_EVIDENCE_ARGS:-} || status=1
fi

mkdir -p "$OUT_DIR/results"
cp benchmarks/results/*.json "$OUT_DIR/results/" 2>/dev/null
echo "result rows: $OUT_DIR/results (copy into benchmarks/results/ of the checkout, then python -m tools.render_benchmarks)"

echo "== Summary (training step and loader)"
"$PY" - "$OUT_DIR" <<'EOF'
import json, os, sys
d = sys.argv[1]
def load(name):
    path = os.path.join(d, name)
    return json.load(open(path)) if os.path.exists(path) else None
t = load("train_overhead.json")
if t:
    r = t["results"]
    print(f"{'train step cls-only / fused / targets ms':<40}{r['cls-only']['median_ms']:>9.2f} / "
          f"{r['token-fused']['median_ms']:.2f} / {r.get('token-targets', {}).get('median_ms', float('nan')):.2f}")
    print(f"{'train step fused vs cls-only':<40}{t['ratio_fused']:>28.3f}x  <= 1.01x")
v = load("train_overhead_vit.json")
if v:
    print(f"{'ViT-S step: wrapper (hard) vs bare':<40}{v['ratio_wrapper']:>28.3f}x")
    print(f"{'ViT-S step: token-fused vs bare cls-only':<40}{v['ratio_fused']:>28.3f}x  <= 1.02x")
l = load("loader.json")
if l:
    b = l["backends"]["torch"]
    print(f"{'loader torch on / off / public img/s':<40}{b['on'][0]:>9.0f} / {b['off'][0]:.0f} / {l['public'][0]:.0f}")
    print(f"{'loader labels on/off':<40}{b['on'][0] / b['off'][0]:>28.3f}   >= 0.97")
    print(f"{'loader fastest vs public':<40}{l['fastest_vs_public']:>27.2f}x  >= 2x")
EOF
exit $status
