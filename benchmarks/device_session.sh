#!/usr/bin/env bash
# What one session on the GPU machine runs, in calls that fit its 10-minute limit, logs under $OUT:
#   bash benchmarks/device_session.sh check   the gpu-marked tests and the Mosaic kernels' ptxas reports
#   bash benchmarks/device_session.sh sweep   the open questions of NOTES.md on the Triton forward's tiles
#   bash benchmarks/device_session.sh split   the Triton backward's time, kernel by kernel
#   bash benchmarks/device_session.sh run     the full benchmark (forward and forward+backward, every mask; D=128)
#   bash benchmarks/device_session.sh run64   the same at head dim 64
# Each step has its own time limit, so that a slow one cannot take the whole call.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"

sweep() {  # mosaic_sweep, its table lines only
  timeout "$1" python3 -m benchmarks.mosaic_sweep "${@:2}" 2>&1 | grep -E "^\||rror" | tee -a "$OUT/sweeps.md"
}

case "${1:-}" in
  check)
    # -v: each result is logged as it comes, so a failure is named even when the time limit cuts the summary off.
    timeout 300 python3 -m pytest -m gpu tests -n 8 -p no:benchmark -v -rf --tb=short >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -30
    # What ptxas says of every kernel (a C7513 line: its wgmmas serialized, NOTES.md section 12).
    timeout 90 python3 -m benchmarks.ptxas_report 2>&1 | grep -E "^##|ptxas|rror" | tee "$OUT/ptxas.txt"
    ;;
  sweep)
    # The open questions of NOTES.md on the Triton forward's tiles (section 19's backward sweeps are recorded
    # there with their configuration names). Head dim 64: the default (64x128, 2 stages) against the old one and
    # PyTorch FlexAttention's Hopper default, 128x128 with 3 stages (open lead 2).
    sweep 150 --implementation pallas_triton -D 64 --cases noop causal sliding_window prefix_lm document alibi \
      softcap per_head --configs fwd64x128w4s2 fwd128x64w4s3 fwd128x128w4s3 fwd64x128w4s2
    # Head dim 128: the default (128x64, 4 warps, 2 stages) against PyTorch's (128x64, 8 warps, 3 stages) and two
    # others; section 2 chose 4 warps on the H100, on a kernel since rewritten.
    sweep 120 --implementation pallas_triton --cases noop causal document alibi --configs fwd128x64w4s2 \
      fwd128x64w8s3 fwd64x128w4s2 fwd128x128w8s2 fwd128x64w4s2
    ;;
  split)
    # Where the Triton backward's time goes (NOTES.md section 23), in milliseconds: the forward alone, then the
    # forward with the dQ kernel (gradient of q), with the dK/dV kernel (of k and v), and with both.
    sweep 50 --implementation pallas_triton --ms --cases noop causal --configs triton
    for wrt in q kv qkv; do
      sweep 60 --implementation pallas_triton --mode fwdbwd --wrt "$wrt" --ms --cases noop causal --configs triton
    done
    ;;
  run)
    timeout 560 python3 -m benchmarks.run --suite prefill --shapes 2x16x8192x128,8x16x2048x128 --modes fwd,fwdbwd \
      --runs 10 --budget-s 480 --out "$OUT/run" 2>&1 | grep -v Warning | tail -40
    ;;
  run64)
    # Head dim 64, the forward issue's third shape.
    timeout 560 python3 -m benchmarks.run --suite prefill --shapes 2x16x8192x64 --modes fwd,fwdbwd \
      --runs 10 --budget-s 480 --out "$OUT/run64" 2>&1 | grep -v Warning | tail -25
    ;;
  *)
    echo "usage: bash benchmarks/device_session.sh check|sweep|split|run|run64" >&2; exit 2 ;;
esac
