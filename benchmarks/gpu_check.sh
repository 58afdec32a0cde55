#!/usr/bin/env bash
# The GPU check of the compiled Layca step, in one run of under 8 minutes on one H100:
#
#   1. the CUDA tests (pytest -m cuda): compiled vs eager vs the float64 reference on CUDA in float32 and bfloat16,
#      no host synchronisation in the step (torch.cuda.set_sync_debug_mode("error")), and a one-GPU DDP fit with
#      LaycaCallback on a small CNN, for both implementations;
#   2. the GPU rows of benchmarks/step_cost.py on ResNet-50 and ViT-B/16 shapes (float32) and ResNet-50 in
#      bfloat16: Layca(SGD fused) compiled and eager against SGD(fused=True), the same steps captured in a CUDA
#      graph, the SGD + Layca prototype compiled together, timm's Lars and AdamP when timm imports;
#   3. benchmarks/monitor_cost.py on CUDA (a monitor update against an SGD step; short fits).
#
# Run from the repository root:  bash benchmarks/gpu_check.sh
# The package need not be installed (the repository root goes on PYTHONPATH); torch, lightning and tensorboard must
# be, and pytest (hypothesis is optional). Reports go to $OUT/gpu_check/ when $OUT is set, else to
# benchmarks/results/gpu_check/: summary.md (what ran, how long, exit codes), env.txt, nvidia-smi.txt,
# cuda_tests.txt, step_cost_cuda.md, monitor_cost_cuda.txt. Each stage has its own time limit, so the whole run
# stays under 8 minutes whatever happens; a stage that fails or times out is recorded and the next one runs.
set -u -o pipefail

cd "$(dirname "$0")/.."
REPORTS="${OUT:-benchmarks/results}/gpu_check"
mkdir -p "$REPORTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
SUMMARY="$REPORTS/summary.md"
START=$(date +%s)

{
    echo "# GPU check"
    echo
    echo "- date: $(date -Iseconds)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')$(git status --porcelain lightning_layca 2>/dev/null | grep -q . && echo ' (lightning_layca/ modified)')"
    echo
    echo "| stage | limit s | seconds | exit code | report |"
    echo "|---|---:|---:|---:|---|"
} > "$SUMMARY"

stage() {  # stage NAME LIMIT_S REPORT COMMAND...
    local name=$1 limit=$2 report=$3
    shift 3
    local t0=$(date +%s)
    echo "[gpu_check] $name (limit ${limit} s) -> $REPORTS/$report"
    timeout --kill-after=10 "$limit" "$@" > "$REPORTS/$report" 2>&1
    local code=$?
    local t1=$(date +%s)
    [ "$code" -eq 124 ] && echo "(timed out after ${limit} s)" >> "$REPORTS/$report"
    echo "| $name | $limit | $((t1 - t0)) | $code | $report |" >> "$SUMMARY"
    tail -n 5 "$REPORTS/$report"
}

nvidia-smi > "$REPORTS/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$REPORTS/nvidia-smi.txt"
"$PY" - > "$REPORTS/env.txt" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
for name in ("lightning", "timm", "tensorboard", "pytest", "hypothesis", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "not importable:", type(error).__name__, error)
EOF
cat "$REPORTS/env.txt"

# 1. CUDA tests (every test marked `cuda`; a test file that cannot be imported here, for want of hypothesis say, is
#    reported and the others run). The first of them compiles the fused step (float32, then bfloat16) into Inductor's cache, which the
#    benchmark then reuses.
stage "CUDA tests" 180 cuda_tests.txt "$PY" -m pytest -m cuda tests -q -rA -p no:cacheprovider \
    --continue-on-collection-errors

# 2. Step cost on GPU shapes (no per-tensor reference: it synchronises per layer and says nothing new on GPU).
stage "step_cost (CUDA)" 200 step_cost_cuda.log "$PY" -m benchmarks.step_cost --device cuda \
    --sets resnet50,vitb16,resnet50@bf16 --no-reference --repeats 15 --block 10 --warmup 3 \
    --out "$REPORTS/step_cost_cuda.md"

# 3. Monitoring cost on GPU: the micro benchmark (eager and compiled sums: its Triton kernels compile first) and
#    short fits.
stage "monitor_cost (CUDA)" 120 monitor_cost_cuda.txt "$PY" -m benchmarks.monitor_cost --device cuda \
    --repeats 50 --rounds 2 --steps 100 --epochs 1

echo >> "$SUMMARY"
echo "- total: $(( $(date +%s) - START )) s" >> "$SUMMARY"
cat "$SUMMARY"
