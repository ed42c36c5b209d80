#!/usr/bin/env bash
# What one session on the GPU machine runs, in calls that fit its 10-minute limit, logs under $OUT:
#   bash benchmarks/device_session.sh check   the gpu-marked tests and the Mosaic kernels' ptxas reports
#   bash benchmarks/device_session.sh sweep   the open question of NOTES.md (the Triton backward's launches)
#   bash benchmarks/device_session.sh split   the Triton backward's time, kernel by kernel; fused dQ, launch order
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
    # NOTES.md section 19: the Triton backward's two kernels launched apart (old defaults named explicitly). Each kernel's candidates with the
    # other kernel at its old default (kv32x64w4s3 / q64x32w4s3, head dim 128; kv64x128w4s2 / q128x64w4s2 at 64).
    sweep 200 --implementation pallas_triton --mode fwdbwd --cases noop causal document --configs \
      kv32x64w4s3_q64x32w4s3 kv64x128w8s3_q64x32w4s3 kv64x64w4s3_q64x32w4s3 kv64x128w8s2_q64x32w4s3 \
      kv32x64w4s3_q128x64w8s3 kv32x64w4s3_q64x64w4s3 kv32x64w4s3_q128x64w8s2 kv64x128w8s3_q128x64w8s3
    sweep 120 --implementation pallas_triton --mode fwdbwd -B 8 -S 2048 --cases noop causal document --configs \
      kv32x64w4s3_q64x32w4s3 kv64x128w8s3_q64x32w4s3 kv64x64w4s3_q64x32w4s3 kv32x64w4s3_q64x64w4s3 \
      kv64x128w8s3_q64x64w4s3
    sweep 180 --implementation pallas_triton --mode fwdbwd -D 64 --cases noop causal document --configs \
      kv64x128w4s2_q128x64w4s2 kv32x64w4s3_q64x32w4s3 kv64x128w8s2_q64x32w4s3 kv64x64w4s3_q64x32w4s3 \
      kv32x64w4s3_q128x64w4s2 kv32x64w4s3_q64x64w4s3 kv64x128w8s3_q64x64w4s3
    # NOTES.md section 20: the Triton forward's tiles at head dim 64 (old default 128x64, 3 stages; new 64x128, 2),
    # and open lead 2's 128x128 with 3 stages.
    sweep 150 --implementation pallas_triton -D 64 --cases noop causal sliding_window prefix_lm document alibi \
      softcap per_head --configs fwd64x128w4s2 fwd128x64w4s3 fwd64x128w4s3 fwd128x128w4s3 fwd64x128w4s2
    ;;
  split)
    # NOTES.md open lead 1: where the Triton backward's time goes, in milliseconds: the forward alone, then the
    # forward with the dQ kernel (gradient of q), with the dK/dV kernel (of k and v), and with both.
    sweep 50 --implementation pallas_triton --ms --cases noop causal --configs triton
    for wrt in q kv qkv; do
      sweep 60 --implementation pallas_triton --mode fwdbwd --wrt "$wrt" --ms --cases noop causal --configs triton
    done
    # NOTES.md sections 21 and 22: dQ added up by the dK/dV kernel (bwd_fuse_dq=1) and the tile-first launch order
    # (bwd_tiles_first=1), against the defaults (timed first and last).
    sweep 200 --implementation pallas_triton --mode fwdbwd --cases noop causal document alibi --configs triton \
      triton_tiles_first triton_fuse_dq triton_tiles_first_fuse_dq triton
    sweep 130 --implementation pallas_triton --mode fwdbwd -B 8 -S 2048 --cases noop causal document --configs \
      triton triton_tiles_first triton_fuse_dq triton_tiles_first_fuse_dq
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
