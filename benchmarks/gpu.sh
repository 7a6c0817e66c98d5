#!/usr/bin/env bash
# The GPU check at real size, one run, under 8 minutes on one H200 (bf16, random weights, no hub):
#   1. precompute: regnety_160 teacher (DeiT's), 224 px DeiT views of synthetic photo-like JPEGs
#      (benchmarks/common.py photo_like_jpegs), teacher alone vs the whole pipeline;
#   2. train: deit_small_distilled_patch16_224 plain vs from a label store vs online distillation
#      with resnet50 and regnety_160 teachers (timm's TokenDistillationTask).
# Installs nothing beyond `make setup`. Prints every figure; the log is also kept in $LOG.
#
#   bash benchmarks/gpu.sh            # real size, on a GPU
#   bash benchmarks/gpu.sh --tiny     # the same scripts at toy size on CPU (does it run at all?)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1
# Stable CPU-side timings (DESIGN.md: glibc malloc swings conv benchmarks by 40%).
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824
LOG=${LOG:-gpu-bench.log}

if [ "${1:-}" = "--tiny" ]; then
  DEVICE=cpu
  # The same scripts and code paths; a small teacher (regnety_160 is 16 GFLOPs a view: minutes on a CPU).
  PRE=(--teacher resnet18 --images 8 --views 2 --batch-size 8 --workers 1 --device cpu)
  TRAIN=(--student deit_tiny_distilled_patch16_224 --teachers resnet18 --input-size 64 --batch-size 8
         --images 16 --image-size 96,72 --rounds 1 --workers 1 --device cpu)
  LIMIT=600
  PRE_NAME="precompute (tiny: teacher resnet18, fp32 on CPU)"
  TRAIN_NAME="train (tiny: student deit_tiny_distilled, fp32 on CPU)"
else
  DEVICE=cuda
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: use --tiny on CPU")'
  CPUS=$(nproc)
  WORKERS=$(( CPUS > 2 ? CPUS - 2 : 1 ))
  # 1024 images x 10 views = 10240 DeiT views of 500x375 JPEGs: the teacher's share is measurable,
  # and the run (5 passes: forward, 2 render-only, 3 full) fits its budget.
  PRE=(--teacher regnety_160 --images 1024 --views 10 --batch-size 256 --workers "$WORKERS" --device cuda)
  TRAIN=(--student deit_small_distilled_patch16_224 --teachers resnet50,regnety_160 --input-size 224
         --batch-size 128 --images 2048 --image-size 500,375 --rounds 3 --workers "$WORKERS" --device cuda)
  LIMIT=270
  PRE_NAME="precompute (teacher regnety_160, bf16 on CUDA)"
  TRAIN_NAME="train (student deit_small_distilled, bf16 autocast on CUDA)"
fi

{
  echo "== gpu.sh $(date -u +%FT%TZ) device=$DEVICE"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
  "$PY" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.version.cuda,
  "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())'
} 2>&1 | tee "$LOG"

run() {  # run NAME CMD...: time it, keep its output, stop the whole check on failure
  local name=$1; shift
  echo; echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  set +e
  timeout "$LIMIT" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "== $name: exit $rc in $(( SECONDS - t0 ))s" | tee -a "$LOG"
  return "$rc"
}

T0=$SECONDS
run "$PRE_NAME" "$PY" benchmarks/precompute_bench.py "${PRE[@]}"
run "$TRAIN_NAME" "$PY" benchmarks/train_bench.py "${TRAIN[@]}"
echo; echo "== gpu.sh done in $(( SECONDS - T0 ))s; log: $LOG" | tee -a "$LOG"
