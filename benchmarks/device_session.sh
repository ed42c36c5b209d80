#!/usr/bin/env bash
# What one session on the GPU machine runs, in calls that fit its 10-minute limit, logs under $OUT:
#   bash benchmarks/device_session.sh check   the gpu-marked tests, the kernels' ptxas reports, then the open
#                                             questions of NOTES.md (sweeps)
#   bash benchmarks/device_session.sh run     the full benchmark (forward and forward+backward, every mask and shape)
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
    # NOTES.md section 12: the overlapped walk, now that ptxas no longer serializes it; at D=64 the softmax is as
    # long as the matmuls it should hide behind.
    sweep 60 --cases noop causal softcap document --configs no_overlap overlap
    sweep 40 --cases noop causal -D 64 --configs no_overlap overlap
    # Section 16: whether the second query buffer costs anything at 8K (one sample each said noop -4%, softcap -5%).
    sweep 60 --cases noop softcap document --configs q_buffers_1 q_buffers_2
    ;;
  run)
    timeout 560 python3 -m benchmarks.run --suite prefill --shapes 2x16x8192x128,8x16x2048x128 --modes fwd,fwdbwd \
      --runs 10 --budget-s 480 --out "$OUT/run" 2>&1 | grep -v Warning | tail -40
    ;;
  *)
    echo "usage: bash benchmarks/device_session.sh check|run" >&2; exit 2 ;;
esac
