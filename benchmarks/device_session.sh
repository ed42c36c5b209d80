#!/usr/bin/env bash
# What one session on the GPU machine runs, in calls that fit its 10-minute limit, logs under $OUT:
#   bash benchmarks/device_session.sh check   the gpu-marked tests and the Mosaic kernels' ptxas reports
#   bash benchmarks/device_session.sh sweep   the open question of NOTES.md (the Triton kernels' tiles)
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
    timeout 300 python3 -m pytest -m gpu tests -n 4 -p no:benchmark -q 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
    # What ptxas says of every kernel (a C7513 line: its wgmmas serialized, NOTES.md section 12).
    timeout 90 python3 -m benchmarks.ptxas_report 2>&1 | grep -E "^##|ptxas|rror" | tee "$OUT/ptxas.txt"
    ;;
  sweep)
    # NOTES.md section 18: the Triton backward's tiles, chosen when its dK/dV kernel still transposed P and dS
    # (the two-warpgroup ones do not spill in benchmarks.triton_report); then the same at head dim 64.
    sweep 150 --implementation pallas_triton --mode fwdbwd --cases noop causal document \
      --configs triton bwd_m32_n64_w8_s3 bwd_m64_n64_w8_s2 bwd_m64_n128_w8_s3 bwd_m64_n64_w4_s3
    sweep 100 --implementation pallas_triton --mode fwdbwd -B 8 -S 2048 --cases noop causal document \
      --configs triton bwd_m32_n64_w8_s3 bwd_m64_n64_w8_s2
    sweep 120 --implementation pallas_triton --mode fwdbwd -D 64 --cases noop causal document \
      --configs triton bwd_m64_n128_w8_s2 bwd_m32_n64_w4_s3 bwd_m64_n64_w8_s2
    # The Triton forward with two warpgroups (its default spills in benchmarks.triton_report).
    sweep 60 --implementation pallas_triton --cases noop causal document --configs triton fwd_w8 triton fwd_w8
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
    echo "usage: bash benchmarks/device_session.sh check|sweep|run|run64" >&2; exit 2 ;;
esac
