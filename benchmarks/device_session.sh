#!/usr/bin/env bash
# What one session on the GPU machine runs, in calls that fit its 10-minute limit, logs under $OUT:
#   bash benchmarks/device_session.sh check   the gpu-marked tests but test_pallas_mosaic.py's; the Mosaic kernels' ptxas reports
#   bash benchmarks/device_session.sh checkmosaic  the gpu-marked tests of test_pallas_mosaic.py
#   bash benchmarks/device_session.sh softcap2 NOTES.md sections 47-49: soft-capping's new defaults, tests and sweeps
#   bash benchmarks/device_session.sh softcap38 the same tests, then run 37's shapes beside the anchors (run 38)
#   bash benchmarks/device_session.sh checkmosaic2 checkmosaic less softcap38's tests
#   bash benchmarks/device_session.sh softcap38tests softcap38's tests alone
#   bash benchmarks/device_session.sh exp2int NOTES.md section 50: the integer shift's gpu tests and sweeps
#   bash benchmarks/device_session.sh softcap51 section 50's open questions: sweeps at 80 columns, SASS of 64 and 80
#   bash benchmarks/device_session.sh fold51  section 51: full attention's folded row sums, gpu tests, beside the anchors
#   bash benchmarks/device_session.sh window51 section 51: the JAX timings over PyTorch's 600 ms window, or not
#   bash benchmarks/device_session.sh ramp52  section 52: speed and clock over the first second of load, ours, cuDNN, SDPA
#   bash benchmarks/device_session.sh fold52  section 52: the folded row sums on causal (and D=64 full attention) in sweeps
#                                             timed over the sustained window
#   bash benchmarks/device_session.sh tiles53 section 53: the D=64 Triton forward's 64 x 64 default (gpu tests, sweeps);
#                                             the Mosaic fold on sliding window, prefix LM and causal
#   bash benchmarks/device_session.sh leads54 section 53's leads: D=64 soft-capping's exp2 columns beside causal;
#                                             ALiBi's forward folded and not in Nsight Compute
#   bash benchmarks/device_session.sh backward58 section 57's leads in Nsight Compute: the 8K D=128 backward beside
#                                             SDPA's; forward64_58: the 8K D=64 forward beside SDPA's
#   bash benchmarks/device_session.sh max59   section 59: the row maxima by column halves (now the default); what
#                                             rescaling and the running maximum cost (bounds); max59tests: its gpu tests,
#                                             then the default against the chains at the three shapes
#   bash benchmarks/device_session.sh anchor60 section 60: the anchored walk against the running maximum at 8K D=64,
#                                             then its gpu tests; anchor60b: its sweeps at B=8 and at 8K D=128
#   bash benchmarks/device_session.sh repair61 section 61: the repair launch gated, against ungated and none, in sweeps;
#                                             then the repairs' and fully masked rows' gpu tests; anchor60tests:
#                                             anchor60's gpu tests alone; anchor61: the first tile's maxima's
#                                             cost (section 61's lead)
#   bash benchmarks/device_session.sh softcap62 section 62's lead: soft-capping's exp2 columns on the FMA units at
#                                             D=128 (folded) and D=64, and its queries scaled, in sweeps
#   bash benchmarks/device_session.sh alibi66 section 66: ALiBi on the running maximum beside the anchors at the three
#                                             shapes; then ALiBi's gpu tests and the repairs' (the anchored walk asked for)
#   bash benchmarks/device_session.sh mufu67  section 67: each special-function instruction's rate alone (mufu_rate)
#   bash benchmarks/device_session.sh softcap68 section 68: soft-capping at 8K D=128 on the overlapped walk, with exp2
#                                             columns on the FMA units, in sweeps; then one launch each of soft-capping
#                                             and causal at 8K D=128 in Nsight Compute (their SASS)
#   bash benchmarks/device_session.sh bwd73   section 73: soft-capping's backward on overlap 1 without automatic
#                                             barriers: its gpu tests, then sweeps at the three shapes
#   bash benchmarks/device_session.sh softcap70 section 70: gpu tests of BlockMasks without full-block lists;
#                                             soft-capping's backward schedules (ptxas, sweeps at 8K D=128 and B=8);
#                                             the plain walk's causal step at 8K D=128 in Nsight Compute
#   bash benchmarks/device_session.sh timer57 section 57: every issue shape beside the anchors, all timed one way (TIMER=)
#   bash benchmarks/device_session.sh boundary55 sections 37 and 55: B=8 S=2048's forward against 8K's in Nsight Compute
#   bash benchmarks/device_session.sh sweep   NOTES.md section 26: the Triton kernels' stages, now that 3 overlap
#   bash benchmarks/device_session.sh indices NOTES.md section 25: the index vectors converted before a subtract
#   bash benchmarks/device_session.sh exp2    NOTES.md section 28: exp2 by the flush-to-zero instruction or libdevice
#   bash benchmarks/device_session.sh fma     NOTES.md section 29: multiply-adds as one fma or two instructions
#   bash benchmarks/device_session.sh copywarps NOTES.md section 31: the Mosaic kernels' copy loops in one warp or four
#   bash benchmarks/device_session.sh overlap NOTES.md section 33: the backward's products overlapped, fewer barriers
#   bash benchmarks/device_session.sh overlap2k the same at B=8, S=2048 and at head dim 64
#   bash benchmarks/device_session.sh bwdrun  the backward's gpu tests, then forward+backward beside the anchors
#   bash benchmarks/device_session.sh fused2k the backward's gpu tests, then B=8, S=2048 with the default mask's walks known
#   bash benchmarks/device_session.sh clocks  NOTES.md section 31: clocks and power, one launch at a time or back to back;
#                                             the B=8, S=2048 backward's dQ paths
#   bash benchmarks/device_session.sh tiles64 the D=64 forward's launches, and its cells timed without the host
#   bash benchmarks/device_session.sh split   the Triton backward's time, kernel by kernel
#   bash benchmarks/device_session.sh run     the full benchmark (forward and forward+backward, every mask; D=128);
#                                             ROUNDS=N for run, run2k and run64: benchmarks.run --rounds N
#   bash benchmarks/device_session.sh run2k   the B=8, S=2048 shape alone (every mask; run 20 did not reach the last three)
#   bash benchmarks/device_session.sh run64   the same at head dim 64
#   bash benchmarks/device_session.sh torch   PyTorch FlexAttention's compiled forward kernels (IR, PTX) at D=64
#   bash benchmarks/device_session.sh pipes   Nsight Compute's pipe, shared-memory and stall metrics for the Mosaic
#                                             forward at D=64 and the dK/dV kernel (NOTES.md section 34)
#   bash benchmarks/device_session.sh l2      where the backward kernels' memory traffic goes: L2 sectors by operation, hits, DRAM
#   bash benchmarks/device_session.sh order   the backward's programs launched head by head against batch and heads innermost
#   bash benchmarks/device_session.sh fusedq  with that order, where fusing dQ pays: shorter walks (causal, document, window)
#   bash benchmarks/device_session.sh indices36 NOTES.md section 36: the forward's float index tiles: their gpu tests,
#                                             sweeps at three shapes, ptxas
#   bash benchmarks/device_session.sh alibi36 the same beside the anchors: D=64 four masks, ALiBi at both D=128 shapes
#   bash benchmarks/device_session.sh aux     return_aux's max_scores on the GPU: the Mosaic and Triton forwards' gpu tests
#                                             (with the forward variants and fully masked rows, which no GPU has run
#                                             on the tree since section 36's second call)
#   bash benchmarks/device_session.sh api     the gpu tests of the fifteenth session's API (query-block selections, the
#                                             decoding idiom, batch-1 keys and values, dot_product_attention) and the
#                                             Mosaic tests, after the read analysis changed (NOTES.md, fifteenth session)
#   bash benchmarks/device_session.sh offsets the sixteenth session's gpu tests (query-block selections of a document
#                                             mask on the Mosaic kernels, mods of no index, x64), then the Mosaic
#                                             tests of every mod and the backward schedules (NOTES.md, sixteenth session)
#   bash benchmarks/device_session.sh shared  key and value of batch 1 read without copies: their gpu tests, the Triton files'
#   bash benchmarks/device_session.sh newrun  the same new gpu tests, then run 27's benchmark command
#   bash benchmarks/device_session.sh pingpong the eighteenth session's gpu tests (batch-1 keys on the Mosaic forward,
#                                             programs of many items), the Triton files'
#   bash benchmarks/device_session.sh kvloop  NOTES.md section 39: the Mosaic backward's dK/dV programs adding up the query
#                                             batches of key and value of batch 1: gpu tests, then timed against the broadcast
#   bash benchmarks/device_session.sh scaleq  NOTES.md sections 39 and 40: the gpu tests of the Triton backward's batch loop and
#                                             of the queries scaled in shared memory; their sweeps (scaled queries against
#                                             scaled scores on soft-capping and ALiBi; the Triton batch loop on and off)
#   bash benchmarks/device_session.sh alibi   NOTES.md section 40: the gpu tests `check` did not reach on an H200, then ALiBi
#                                             (the queries scaled by default) and full attention beside the anchors
#   bash benchmarks/device_session.sh softcap NOTES.md sections 42-43: the gpu tests of the fixed maximum and the
#                                             captured array's gradient, then soft-capping with the fixed maximum or not
#   bash benchmarks/device_session.sh ncu     Nsight Compute on our D=64 forward and PyTorch's: launch, occupancy,
#                                             issue, and the SASS the GPU runs (NOTES.md section 27)
# Each step has its own time limit, so that a slow one cannot take the whole call.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"

ncu_mosaic_forward() {  # one launch of our Mosaic forward alone in Nsight Compute (the ncu case below):
  # head dim, case, the reports' tag, kernel_options as JSON
  NCU_IMPL=pallas_mosaic NCU_TORCH=none NCU_D="$1" NCU_CASES="$2" NCU_KERNELS=flex_attention_forward NCU_LAUNCHES=1 \
    NCU_TAG="$3" NCU_OPTIONS="$4" bash "$0" ncu
}

ncu_full_attention_shapes() {  # the ncu case below on the D=128 full-attention forward at B=8 S=2048, then 8K:
  # PyTorch's kernel beside ours (none, sdpa), the kernels' regular expression, launches, the files' tag prefix,
  # the report lines shown
  for run in "8 2048" "2 8192"; do
    read -r batch length <<<"$run"
    NCU_IMPL=pallas_mosaic NCU_TORCH="$1" NCU_D=128 NCU_B="$batch" NCU_S="$length" NCU_CASES=noop \
      NCU_KERNELS="$2" NCU_LAUNCHES="$3" NCU_TAG="$4b${batch}_" bash "$0" ncu | grep -E "$5"
  done
}

# The report lines of a profile of ours beside SDPA's: each kernel's name, duration, issue, grid and registers.
ncu_beside_sdpa_lines="flex_attention|sdpa|cudnn|flash|Duration|Issue Slots|No Eligible|Grid Size|Block Size"
ncu_beside_sdpa_lines+="|Registers Per"

sweep() {  # mosaic_sweep, its table lines only
  timeout "$1" python3 -m benchmarks.mosaic_sweep "${@:2}" 2>&1 | grep -E "^\||rror" | tee -a "$OUT/sweeps.md"
}

case "${1:-}" in
  check)
    # -v: each result is logged as it comes, so a failure is named even when the time limit cuts the summary off.
    # Every gpu test but test_pallas_mosaic.py's (about 40: 150-200 s at 8 workers), then what ptxas says of every
    # Mosaic kernel (a C7513 line: its wgmmas serialized, NOTES.md section 12). `checkmosaic` runs the rest: the
    # whole no longer fits one call (on an H200 the Mosaic tests' compiles ran out of the limit at 93%).
    timeout 300 python3 -m pytest -m gpu tests --ignore=tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf \
      --tb=short >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -30
    timeout 120 python3 -m benchmarks.ptxas_report 2>&1 | grep -E "^##|ptxas|rror" | tee "$OUT/ptxas.txt"
    ;;
  checkmosaic)
    timeout 560 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -30
    ;;
  sweep)
    # NOTES.md section 26: with the walks' starts carried, 3 stages overlap a step's copies with the compute; 2 do
    # not. The forward at 3 stages (4 and 8 warps) against the 2-stage defaults, and the backward's stages.
    sweep 150 --implementation pallas_triton --cases noop causal document alibi --configs defaults fwd128x64w4s3 \
      fwd128x64w8s3 fwd128x128w8s3 defaults
    sweep 150 --implementation pallas_triton -D 64 --cases noop causal sliding_window alibi --configs defaults \
      fwd64x128w4s3 fwd128x128w4s3 fwd128x64w4s3 defaults
    sweep 200 --implementation pallas_triton --mode fwdbwd --cases noop causal alibi --configs defaults \
      kv64x128w8s2_q128x64w8s2 kv64x128w8s4_q128x64w8s4 defaults
    ;;
  indices)
    # NOTES.md section 25: the index vectors converted before the subtract (the default) against the conversion
    # per score ("int_indices"), each timed twice, where it should show: ALiBi at D=64 (the Triton forward) and
    # at D=128 (forward+backward, the one D=128 cell under 0.85x PyTorch in run 12).
    sweep 130 --implementation pallas_triton -D 64 --cases alibi noop --configs defaults int_indices defaults \
      int_indices
    sweep 200 --implementation pallas_triton --mode fwdbwd --cases alibi --configs defaults int_indices \
      defaults int_indices
    ;;
  exp2)
    # NOTES.md section 28: the Triton kernels' exp2 as PTX's ex2.approx.ftz.f32 (the default) against libdevice's
    # __nv_exp2f ("libdevice_exp2"), each timed twice: the D=64 forward, the D=128 forward, forward+backward.
    sweep 150 --implementation pallas_triton -D 64 --cases noop causal sliding_window alibi --configs defaults \
      libdevice_exp2 defaults libdevice_exp2
    sweep 120 --implementation pallas_triton --cases noop causal alibi --configs defaults libdevice_exp2 defaults \
      libdevice_exp2
    sweep 200 --implementation pallas_triton --mode fwdbwd --cases noop causal alibi --configs defaults \
      libdevice_exp2 defaults libdevice_exp2
    ;;
  fma)
    # NOTES.md section 29: the Triton kernels' multiply-adds as PTX's fma.rn.f32 (the default) against a multiply
    # and an add ("separate_mul_add", which XLA compiles to two instructions), each timed twice.
    triton_files="tests/test_pallas_triton_forward.py tests/test_pallas_triton_backward.py tests/test_decode.py"
    timeout 150 python3 -m pytest -m gpu $triton_files -n 8 -p no:benchmark -v -rf --tb=short \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    echo "D=64 forward, burst timer" >> "$OUT/sweeps.md"
    sweep 150 --implementation pallas_triton -D 64 --cases noop causal sliding_window prefix_lm alibi \
      --configs defaults separate_mul_add defaults separate_mul_add
    echo "D=128 forward, burst timer" >> "$OUT/sweeps.md"
    sweep 100 --implementation pallas_triton --cases noop causal alibi --configs defaults separate_mul_add \
      defaults separate_mul_add
    echo "D=128 forward+backward, burst timer" >> "$OUT/sweeps.md"
    sweep 150 --implementation pallas_triton --mode fwdbwd --cases noop causal alibi --configs defaults \
      separate_mul_add defaults separate_mul_add
    ;;
  copywarps)
    # NOTES.md section 31: the Mosaic GPU tests (every mod, forward and gradients; the options), then the memory
    # warpgroups' copy loops in one warp against all four (forward and backward alike), each timed twice.
    timeout 300 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "every_supported or options or fully_masked or vmap_of_grad" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    echo "D=128 forward" >> "$OUT/sweeps.md"
    sweep 100 --cases noop causal softcap --configs copy_warps_1 copy_warps_4 copy_warps_1 copy_warps_4
    echo "D=128 forward+backward" >> "$OUT/sweeps.md"
    sweep 150 --mode fwdbwd --cases noop causal --configs copy_warps_1 copy_warps_4 copy_warps_1 copy_warps_4
    echo "B=8, S=2048 forward" >> "$OUT/sweeps.md"
    sweep 80 -B 8 -S 2048 --cases noop causal --configs copy_warps_1 copy_warps_4 copy_warps_1 copy_warps_4
    ;;
  overlap)
    # NOTES.md section 33: the backward kernels' products overlapped with the softmax and dS (mosaic_bwd_overlap 1,
    # 2), and the dK/dV kernel without Pallas's automatic barriers: the gpu tests of those paths for every mod, what
    # ptxas says of them (spills), then forward+backward timed against the defaults.
    timeout 330 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "backward_schedules or head_dims_and_options" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    timeout 60 python3 -m benchmarks.ptxas_report --only "backward softcap" "overlap" 2>&1 | grep -E "^##|ptxas|rror" \
      | tee "$OUT/ptxas.txt"
    echo "D=128 forward+backward" >> "$OUT/sweeps.md"
    sweep 180 --mode fwdbwd --cases noop causal --configs bwd_overlap_0 bwd_overlap_1 bwd_overlap_2 \
      bwd_no_auto_barriers bwd_overlap_2_nab bwd_overlap_0
    ;;
  overlap2k)
    # The same at B=8, S=2048 (dQ kernel of its own by default, and fused), and at head dim 64.
    echo "B=8, S=2048 forward+backward" >> "$OUT/sweeps.md"
    sweep 200 --mode fwdbwd -B 8 -S 2048 --cases noop causal --configs bwd_overlap_0 bwd_overlap_1 bwd_overlap_2 \
      bwd_overlap_2_nab bwd_fused_dq bwd_overlap_0
    echo "D=64 forward+backward" >> "$OUT/sweeps.md"
    sweep 150 --mode fwdbwd -D 64 --cases noop causal --configs bwd_overlap_0 bwd_overlap_1 bwd_overlap_2 \
      bwd_overlap_2_nab bwd_overlap_0
    timeout 60 python3 -m benchmarks.ptxas_report --only "backward fused" "backward overlap 0 fused" \
      "backward overlap 1 fused" 2>&1 | grep -E "^##|ptxas|rror" | tee "$OUT/ptxas.txt"
    ;;
  bwdrun)
    # NOTES.md section 33, with its schedule the default: the gpu tests of every backward schedule, then forward+
    # backward of pallas_mosaic beside the anchors at both D=128 shapes (RUN_SHAPES; the forward is unchanged).
    # (The 45 tests took about 255 s in the ninth session: 260 cut off only pytest's summary line.)
    timeout 285 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "every_supported or backward_schedules or head_dims_and_options or fully_masked or vmap_of_grad" \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    timeout 300 python3 -m benchmarks.run --suite prefill --shapes "${RUN_SHAPES:-2x16x8192x128,8x16x2048x128}" \
      --modes fwdbwd --implementations pallas_mosaic --runs 10 --budget-s 260 --out "$OUT/run" 2>&1 \
      | grep -v Warning | tail -30
    ;;
  fused2k)
    # NOTES.md section 35: the gpu tests of every backward schedule with section 34's launch order, then the B=8,
    # S=2048 cells that run 20 did not reach or that the default mask's walk length changes (noop, alibi: dQ fused).
    timeout 285 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "every_supported or backward_schedules or head_dims_and_options or fully_masked or vmap_of_grad" \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    timeout 270 python3 -m benchmarks.run --suite prefill --shapes 8x16x2048x128 --cases noop,alibi,softcap,per_head \
      --modes fwd,fwdbwd --runs 10 --budget-s 230 --out "$OUT/run" 2>&1 | grep -v Warning | tail -14
    ;;
  clocks)
    # NOTES.md section 31, lead 0: is a forward slower back to back than alone, and does the SM clock say why?
    timeout 120 python3 -m benchmarks.clocks --case noop 2>&1 | grep -E "^\||H200|H100|rror" | tee "$OUT/clocks.md"
    # Lead 1 at B=8, S=2048 (the default there is the dQ kernel of its own, 2 stages): dQ fused, or 3 stages.
    echo "B=8, S=2048 forward+backward" >> "$OUT/sweeps.md"
    sweep 170 --mode fwdbwd -B 8 -S 2048 --cases noop causal --configs bwd_mosaic bwd_fused_dq bwd_dq_kernel_s3 \
      bwd_mosaic bwd_fused_dq bwd_dq_kernel_s3
    ;;
  tiles64)
    # (Twenty-seventh session: ALiBi and per-head masks first, the two where the D=64 forward reads under 0.85x
    # PyTorch FlexAttention on equal windows, NOTES.md section 52.)
    # The D=64 forward's launch, after section 29, and how much of each cell is the host's: the defaults timed with
    # eight calls in one program (no host work between them) beside the usual bursts, then launches with 128-query
    # tiles, which read each key tile from L2 half as often, and 3 stages.
    echo "D=64 forward, unrolled timer" >> "$OUT/sweeps.md"
    sweep 120 --implementation pallas_triton -D 64 --timer unrolled --cases noop causal sliding_window prefix_lm \
      alibi document --configs defaults
    echo "D=64 forward, burst timer" >> "$OUT/sweeps.md"
    sweep 240 --implementation pallas_triton -D 64 --cases alibi per_head noop causal sliding_window prefix_lm \
      --configs defaults fwd128x64w4s2 fwd128x64w4s3 fwd64x128w4s3 fwd128x128w8s2 fwd64x64w4s3 defaults
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
      --runs 10 --rounds "${ROUNDS:-1}" --budget-s 480 --out "$OUT/run" 2>&1 | grep -v Warning | tail -40
    ;;
  run2k)
    # The B=8, S=2048 shape alone: `run` spends most of its budget at 8K and skipped the last masks here (run 20).
    # pallas_mosaic beside the anchors (pallas_triton left out for time).
    timeout 500 python3 -m benchmarks.run --suite prefill --shapes 8x16x2048x128 --modes fwd,fwdbwd \
      --implementations pallas_mosaic --runs 10 --rounds "${ROUNDS:-1}" --budget-s 420 --out "$OUT/run2k" 2>&1 | grep -v Warning | tail -25
    ;;
  run64)
    # Head dim 64, the forward issue's third shape.
    timeout 560 python3 -m benchmarks.run --suite prefill --shapes 2x16x8192x64 --modes fwd,fwdbwd \
      --runs 10 --rounds "${ROUNDS:-1}" --budget-s 480 --out "$OUT/run64" 2>&1 | grep -v Warning | tail -25
    ;;
  torch)
    # NOTES.md section 27: what PyTorch's kernel compiles to, read offline beside triton_report's view of ours.
    TRITON_CACHE_DIR=/tmp/torch_triton_cache timeout 200 python3 -m benchmarks.torch_flex_artifacts \
      --cases noop alibi causal -D 64 --out "$OUT/torch_kernels" 2>&1 | grep -v Warning | tail -12
    ;;
  pipes)
    # NOTES.md section 34: which unit bounds each kernel. Per configuration, one text file: the details page and the
    # raw metrics of the pipes (tensor, FMA, ALU, XU: exp2), shared memory (wavefronts, bank conflicts, MIO) and
    # the stall reasons, of ours and, where given, SDPA's or FlexAttention's kernel run beside it.
    wanted="flex|triton_tem|flash|fmha|cudnn|kernel|Registers|Occupancy|Issue Slots|No Eligible|Executed Ipc|Duration|Stall|Grid Size|L2|L1|DRAM|Memory Throughput"
    wanted_raw="pipe_|mio|lsu|mem_shared|stalled|issue_active|sm__inst_executed.avg|throughput.avg.pct|gpu__time_duration.sum|launch__grid_size|launch__registers|smsp__cycles_active.avg |sm__cycles_elapsed.avg "
    pipes_case() {  # name, kernel regex, launches, profile_forward's arguments
      local name=$1 kernels=$2 launches=$3; shift 3
      timeout 110 ncu --clock-control none --kernel-name regex:"$kernels" --launch-count "$launches" \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
        --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats \
        --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables -o "/tmp/ncu_$name" -f \
        python3 -m benchmarks.profile_forward --calls 0 --implementation pallas_mosaic "$@" 2>&1 \
        | grep -v Warning | tail -3
      { timeout 40 ncu --import "/tmp/ncu_$name.ncu-rep" --page details 2>&1 | grep -E "$wanted|Pipe|Shared|Bank"
        echo "## raw"
        timeout 40 ncu --import "/tmp/ncu_$name.ncu-rep" --page raw 2>&1 | grep -E "flex|triton|flash|fmha|cudnn|$wanted_raw"
      } > "$OUT/pipes_$name.txt"
      grep -E "Duration|pipe_tensor.*pct|pipe_xu.*pct|pipe_fma.*pct|mem_shared.*pct|Issue Slots Busy" \
        "$OUT/pipes_$name.txt" | head -24
    }
    pipes_case fwd64_noop "flex_attention_forward|flash|fmha|cudnn" 2 --case noop -D 64 --torch sdpa
    pipes_case fwd64_alibi "flex_attention_forward|triton_tem" 2 --case alibi -D 64 --torch flex
    pipes_case bwd64_noop "flex_attention_dkdv|bwd|dgrad" 4 --case noop -D 64 --mode fwdbwd --torch sdpa
    pipes_case bwd128_noop "flex_attention_dkdv|bwd|dgrad" 4 --case noop -D 128 --mode fwdbwd --torch sdpa
    pipes_case bwd128_2k_fused "flex_attention_dkdv" 1 --case noop -D 128 -B 8 -S 2048 --mode fwdbwd --torch none \
      --kernel-options '{"mosaic_bwd_fuse_dq": 1}'
    ;;
  l2)
    # NOTES.md section 34: the fused dK/dV kernel at B=8, S=2048 ran at 74% of DRAM bandwidth with 19% L2 hits (70% at
    # 8K). Per kernel: L2 sectors by operation (loads, stores, TMA reduce-adds) and their hits, DRAM bytes read and
    # written, the long-scoreboard stall; ours (fused, unfused) and SDPA's backward beside them.
    l2_case() {  # name, launches, profile_forward's arguments
      local name=$1 launches=$2; shift 2
      timeout 150 ncu --clock-control none --launch-count "$launches" \
        --kernel-name regex:"flex_attention_(dkdv|dq)|sdpa|flash|fmha|bprop|dgrad|cudnn" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis_Chart --section MemoryWorkloadAnalysis_Tables \
        --section WarpStateStats -o "/tmp/l2_$name" -f \
        python3 -m benchmarks.profile_forward --calls 0 --implementation pallas_mosaic --mode fwdbwd "$@" 2>&1 \
        | grep -v Warning | tail -2
      timeout 40 ncu --import "/tmp/l2_$name.ncu-rep" --page raw 2>&1 \
        | grep -E "\(.*\)x\(|lts__t_sectors_op|lts__t_sector_op|lts__t_sector_hit|dram__bytes|gpu__time_duration.sum|tensor_cycles_active.avg.pct|stalled_long_scoreboard_per_issue|lts__t_sectors.sum |lts__t_sectors_srcunit_tex.sum " \
        | grep -vE "\.(min|max)\." > "$OUT/l2_$name.txt"
      grep -E "\(.*\)x\(|dram__bytes_(read|write).sum |duration" "$OUT/l2_$name.txt"
    }
    l2_case 2k_fused 1 --case noop -D 128 -B 8 -S 2048 --torch none --kernel-options '{"mosaic_bwd_fuse_dq": 1}'
    l2_case 2k_unfused 8 --case noop -D 128 -B 8 -S 2048 --torch sdpa
    l2_case 8k_fused 8 --case noop -D 128 --torch sdpa
    ;;
  order)
    # NOTES.md section 34: the backward's programs launched head by head (the default now) against the batch and
    # heads innermost (mosaic_bwd_heads_inner 1, the earlier order): gpu tests, then forward+backward.
    timeout 150 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "head_dims_and_options or fully_masked" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    echo "B=8, S=2048 forward+backward" >> "$OUT/sweeps.md"
    sweep 190 --mode fwdbwd -B 8 -S 2048 --cases noop causal --configs bwd_heads_inner bwd_mosaic \
      bwd_heads_inner_fused bwd_fused_dq bwd_mosaic
    echo "D=128 forward+backward" >> "$OUT/sweeps.md"
    sweep 150 --mode fwdbwd --cases noop causal --configs bwd_heads_inner bwd_mosaic bwd_heads_inner bwd_mosaic
    ;;
  fusedq)
    # NOTES.md section 34: with the programs launched head by head, dQ fused against its kernel of its own on the
    # walks the threshold (FUSE_DQ_MIN_KEY_TILES) decides between.
    echo "B=8, S=2048 forward+backward" >> "$OUT/sweeps.md"
    sweep 110 --mode fwdbwd -B 8 -S 2048 --cases causal sliding_window document --configs bwd_dq_kernel bwd_fused_dq
    echo "D=128 forward+backward" >> "$OUT/sweeps.md"
    sweep 80 --mode fwdbwd --cases document --configs bwd_dq_kernel bwd_fused_dq
    ;;
  indices36)
    # NOTES.md section 36. The forward's gpu tests (every mod, with the index tiles and without), then ALiBi (index
    # conversions) and soft-capping under each, at head dim 64, 128 and B=8, S=2048; last, what ptxas says of the
    # kernels (spills). The section's two calls also swept exp2 partly on the FMA units and the forward without
    # its ping-pong, both slower and since taken out.
    timeout 200 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "forward_variants or fully_masked" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    echo "D=64 forward" >> "$OUT/sweeps.md"
    sweep 120 -D 64 --cases alibi softcap noop causal --configs defaults fwd_int_indices defaults fwd_int_indices
    echo "D=128 forward" >> "$OUT/sweeps.md"
    sweep 90 --cases alibi softcap noop --configs defaults fwd_int_indices defaults fwd_int_indices
    echo "B=8 S=2048 D=128 forward" >> "$OUT/sweeps.md"
    sweep 80 -B 8 -S 2048 --cases alibi softcap causal --configs defaults fwd_int_indices defaults fwd_int_indices
    timeout 80 python3 -m benchmarks.ptxas_report --out "$OUT/dump" --only alibi 2>&1 \
      | grep -E "^##|ptxas|rror" | tee "$OUT/ptxas.txt"
    tar czf "$OUT/dump.tgz" --exclude "*.mlir-passes.log" -C "$OUT" dump 2>/dev/null && rm -rf "$OUT/dump"
    ;;
  alibi36)
    # NOTES.md section 36 beside the anchors: head dim 64 (full, causal, ALiBi, soft-capping), then ALiBi at both
    # D=128 shapes, with the index tiles the default.
    timeout 300 python3 -m benchmarks.run --suite prefill --shapes 2x16x8192x64 --cases noop,causal,alibi,softcap \
      --modes fwd,fwdbwd --implementations pallas_mosaic --runs 10 --budget-s 250 --out "$OUT/run64" 2>&1 | grep -v Warning | tail -14
    timeout 200 python3 -m benchmarks.run --suite prefill --shapes 8x16x2048x128,2x16x8192x128 --cases alibi \
      --modes fwd,fwdbwd --implementations pallas_mosaic --runs 10 --budget-s 150 --out "$OUT/runalibi" 2>&1 | grep -v Warning | tail -8
    ;;
  aux)
    # The forward kernels' max_scores output (a third output only when asked for), against the reference: the
    # Mosaic forward's, then the Triton forward's and decode kernel's (their gpu tests compare every output).
    timeout 240 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "max_scores or forward_variants or fully_masked" >"$OUT/gpu_tests.txt" 2>&1
    timeout 150 python3 -m pytest -m gpu tests/test_pallas_triton_forward.py tests/test_decode.py -n 8 \
      -p no:benchmark -v -rf --tb=short >>"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -20
    ;;
  api)
    timeout 330 python3 -m pytest -m gpu tests/test_block_mask.py tests/test_api.py tests/test_dot_product.py \
      tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -20
    ;;
  shared)
    # The seventeenth session's change: pallas_triton's forward kernels read key and value of batch 1 for every
    # query batch (prefill and decode); the gpu tests of it, then the Triton kernels' own gpu tests.
    timeout 120 python3 -m pytest -m gpu tests/test_api.py -k batch_one -n 4 -p no:benchmark -v -rf --tb=short \
      >"$OUT/gpu_tests.txt" 2>&1
    triton_files="tests/test_pallas_triton_forward.py tests/test_pallas_triton_backward.py tests/test_decode.py"
    timeout 200 python3 -m pytest -m gpu $triton_files -n 8 -p no:benchmark -v -rf --tb=short >>"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -20
    ;;
  pingpong)
    # Key and value of batch 1 now read once by the Mosaic forward too (the default prefill test runs it) and
    # programs of several work items; then the Triton files (as `shared`). NOTES.md section 37: the call went on
    # to sweep an option of the items' boundaries (mosaic_fwd_item_overlap, since taken out) at B=8, S=2048,
    # then at 8K and D=64.
    timeout 150 python3 -m pytest -m gpu tests/test_api.py tests/test_pallas_mosaic.py -k "batch_one or many_items" \
      -n 8 -p no:benchmark -v -rf --tb=short >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    triton_files="tests/test_pallas_triton_forward.py tests/test_pallas_triton_backward.py tests/test_decode.py"
    timeout 200 python3 -m pytest -m gpu $triton_files -n 8 -p no:benchmark -v -rf --tb=short >>"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    ;;
  newrun)
    # The sixteenth session's new gpu tests (as `offsets`), then run 27's command: the tree beside the anchors.
    # (With the seventeenth session's: key and value of batch 1 on the decode kernel.)
    timeout 150 python3 -m pytest -m gpu tests/test_pallas_mosaic.py tests/test_api.py \
      -k "no_index or x64 or selections_of_a_document or batch_one" \
      -n 8 -p no:benchmark -v -rf --tb=short >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -12
    timeout 420 python3 -m benchmarks.run --suite prefill --shapes 2x16x8192x128,8x16x2048x128 --modes fwd,fwdbwd \
      --implementations pallas_mosaic --runs 10 --budget-s 330 --out "$OUT/run" 2>&1 | grep -v Warning | tail -30
    ;;
  offsets)
    new="no_index or x64 or selections_of_a_document"
    timeout 150 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -k "$new" -n 8 -p no:benchmark -v -rf \
      --tb=short >"$OUT/gpu_tests.txt" 2>&1
    timeout 250 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -k "not ($new)" -n 8 -p no:benchmark -v -rf \
      --tb=short >>"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -20
    ;;
  kvloop)
    timeout 170 python3 -m pytest -m gpu tests/test_pallas_mosaic.py tests/test_api.py -k "batch_one" -n 8 \
      -p no:benchmark -v -rf --tb=short >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    timeout 120 python3 -m benchmarks.shared_kv 2>&1 | grep -E "^\||rror" | tee "$OUT/shared_kv.md"
    timeout 80 python3 -m benchmarks.shared_kv -S 8192 -B 2 2>&1 | grep -E "^\||rror" | tee -a "$OUT/shared_kv.md"
    ;;
  scaleq)
    timeout 160 python3 -m pytest -m gpu tests/test_api.py tests/test_pallas_mosaic.py \
      -k "batch_one_on_the_default_kernels or scaled or scalings_folded or head_dim_64_where" -n 8 -p no:benchmark -v -rf --tb=short \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    # The same configuration twice, first and last, shows the spread of one process.
    sweep 110 -D 64 --cases softcap causal alibi --configs scaled_scores scaled_queries scaled_scores scaled_queries
    sweep 90 -B 8 -S 2048 --cases softcap causal alibi --configs scaled_scores scaled_queries scaled_scores \
      scaled_queries
    sweep 70 --cases softcap alibi --configs scaled_scores scaled_queries
    timeout 90 python3 -m benchmarks.shared_kv --implementation pallas_triton 2>&1 | grep -E "^\||rror" \
      | tee "$OUT/shared_kv.md"
    timeout 45 python3 -m benchmarks.shared_kv --implementation pallas_triton -S 8192 -B 2 2>&1 \
      | grep -E "^\||rror" | tee -a "$OUT/shared_kv.md"
    ;;
  alibi)
    timeout 120 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "batch_one_gradients or gradient_of_a_captured_array or selections_of_a_document or no_index or x64" \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    timeout 200 python3 -m benchmarks.run --suite prefill --shapes 2x16x8192x64 --cases alibi,noop --modes fwd,fwdbwd \
      --implementations pallas_mosaic --runs 10 --budget-s 130 --out "$OUT/run_d64" 2>&1 | grep -v Warning | tail -12
    timeout 200 python3 -m benchmarks.run --suite prefill --shapes 8x16x2048x128,2x16x8192x128 --cases alibi \
      --modes fwd,fwdbwd --implementations pallas_mosaic --runs 10 --budget-s 130 --out "$OUT/run_d128" 2>&1 \
      | grep -v Warning | tail -12
    ;;
  softcap)
    # NOTES.md sections 42 and 43: the gpu tests of the softmax against soft-capping's cap and of the captured
    # array's gradient (queries scaled exactly where a backward follows), with every supported mod's; then
    # soft-capping's forward with the fixed maximum and the running one (each first and last: one process' spread).
    timeout 200 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "fixed_maximum or captured_array or scalings_folded or max_scores_match or every_supported_mod" \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    sweep 120 -D 64 --cases softcap causal --configs running_max fixed_max running_max
    sweep 100 -B 8 -S 2048 --cases softcap --configs running_max fixed_max running_max
    sweep 80 --cases softcap --configs running_max fixed_max
    ;;
  softcap2)
    # NOTES.md sections 47-49: soft-capping's defaults (exp2 on the FMA units at D=64, row sums folded above) under
    # the gpu tests of every supported mod and the fixed maximum's, then each default against the former one, and
    # the document mask's loss to the fold at D=128 (section 48) once more.
    timeout 240 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 8 -p no:benchmark -v -rf --tb=short \
      -k "fixed_maximum or every_supported_mod or head_dims_and_options or fully_masked" \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    sweep 60 -D 64 --cases softcap --configs exp2_fma_0 exp2_fma_64 exp2_fma_0 exp2_fma_64
    sweep 60 --cases softcap document --configs row_sum_each_tile row_sum_fold row_sum_each_tile row_sum_fold
    sweep 60 -B 8 -S 2048 --cases softcap --configs row_sum_each_tile row_sum_fold row_sum_each_tile row_sum_fold
    ;;
  softcap38)
    # The gpu tests of soft-capping's defaults (NOTES.md section 49), then run 37's shapes beside the anchors.
    timeout 240 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 12 -p no:benchmark -v -rf --tb=short \
      -k "fixed_maximum or every_supported_mod or head_dims_and_options or fully_masked" \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    timeout 300 python3 -m benchmarks.run --suite prefill --shapes 8x16x2048x128,2x16x8192x64,2x16x8192x128 \
      --cases softcap,causal --modes fwd,fwdbwd --implementations pallas_mosaic --runs 10 --budget-s 250 \
      --out "$OUT/${RUN_TAG:-run38}" 2>&1 | grep -v Warning | tail -30
    ;;
  softcap38tests)
    # softcap38's gpu tests alone: every supported mod's forward and gradients on the defaults, the fixed maximum,
    # head dims and options, fully masked rows (checkmosaic2 leaves them out).
    timeout 240 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 14 -p no:benchmark -v -rf --tb=short \
      -k "fixed_maximum or every_supported_mod or head_dims_and_options or fully_masked" \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    ;;
  max59)
    # Section 59: the running maximum's cost. Full attention and causal at the three shapes of issue 8, forward,
    # the chains (Mosaic GPU's reduction, the default before section 59) first and last: the row maxima by column
    # halves (max_tree), no rescaling of the accumulator (a bound, wrong results), a fixed shift in place of the
    # maximum (a bound, right on these inputs).
    for shape in "-S 8192 -D 64" "-B 8 -S 2048 -D 128" "-S 8192 -D 128"; do
      sweep 180 $shape --cases noop causal --configs max_chain max_tree no_rescale fixed_shift_10 max_chain
    done
    ;;
  max59tests)
    # The forward's gpu tests that run the running maximum, now by column halves: every supported mod (gradients
    # too), head dims 64 to 256 and the options, fully masked rows, many items, the plain walk and the chains.
    timeout 330 python3 -m pytest -p no:benchmark -m gpu -q -n 14 tests/test_pallas_mosaic.py -rf --tb=short -k \
      "every_supported_mod or head_dims_and_options or fully_masked or many_items or nothing_is_masked or \
(forward_variants and (plain or max-chain))" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -12
    for shape in "-S 8192 -D 64" "-B 8 -S 2048 -D 128" "-S 8192 -D 128"; do
      sweep 80 $shape --cases noop --configs max_chain max_tree max_chain max_tree
    done
    ;;
  anchor60)
    # Section 60: the anchored walk (the first key tile's maxima shift the whole walk, certified, failed items run
    # again) against the running maximum and the fixed-shift bound, and its worst case (every item run again), at
    # 8K D=64; then its gpu tests: its repairs, the repair launch alone, every supported mod with gradients, fully
    # masked rows, many items, the forward variants (the running maximum among them), vmap of grad.
    sweep 100 -S 8192 -D 64 --cases noop causal --configs running anchored fixed_shift_10 repair_all
    timeout 420 python3 -m pytest -p no:benchmark -m gpu -q -n 14 tests/test_pallas_mosaic.py -rf --tb=short -k \
      "anchored or repair_launch or every_supported_mod or fully_masked or many_items or nothing_is_masked or \
plain_masks or vmap_of_grad or (forward_variants and (plain or running-max or overlap))" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -20
    ;;
  anchor60b)
    # Section 60's repairs' tests, then its sweep at B=8 S=2048 and 8K D=128, alternating the anchored walk and the
    # running maximum.
    timeout 200 python3 -m pytest -p no:benchmark -m gpu -q -n 6 tests/test_pallas_mosaic.py -rf --tb=short -k \
      "anchored_walk_repairs" >"$OUT/gpu_tests_b.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests_b.txt" | tail -12
    for shape in "-B 8 -S 2048 -D 128" "-S 8192 -D 128"; do
      sweep 140 $shape --cases noop causal --configs running anchored fixed_shift_10 running anchored
    done
    ;;
  repair61)
    # Section 61: the repair launch gated (every program ends after one read where no item failed) against the
    # former launch (each program reading each of its items' flags) and no repair at all (a bound), beside the
    # fixed-shift bound, at B=8 S=2048; the gpu tests of the repairs and of fully masked rows; the sweep at 8K D=64.
    echo "-B 8 -S 2048 -D 128" >> "$OUT/sweeps.md"
    sweep 130 -B 8 -S 2048 -D 128 --cases causal noop --configs anchored repair_ungated no_repair fixed_shift_10 \
      anchored
    timeout 200 python3 -m pytest -p no:benchmark -m gpu -q -n 14 tests/test_pallas_mosaic.py -rf --tb=short -k \
      "anchored or repair_launch or fully_masked" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -20
    echo "-S 8192 -D 64" >> "$OUT/sweeps.md"
    sweep 130 -S 8192 -D 64 --cases causal noop --configs anchored repair_ungated no_repair fixed_shift_10 anchored
    ;;
  anchor61)
    # Section 61's lead: what the first tile's maxima cost the anchored walk (anchor_constant keeps the peeled step
    # and the certificate, not the maxima), beside the fixed-shift bound, at B=8 S=2048 and 8K D=64.
    for shape in "-B 8 -S 2048 -D 128" "-S 8192 -D 64"; do
      echo "$shape" >> "$OUT/sweeps.md"
      sweep 110 $shape --cases causal noop --configs anchored anchor_constant fixed_shift_10 anchored anchor_constant
    done
    ;;
  softcap62)
    # Section 62's lead: soft-capping's exp2 columns on the FMA units at D=128 with the fold (the default there is
    # 0 columns, folded; section 47 measured 32 columns +7% without the fold), and at D=64 around its 80; each with
    # the queries scaled by scale / cap (a multiply a score less; section 50 measured it at 64 columns only).
    for shape in "-S 8192 -D 128" "-B 8 -S 2048 -D 128"; do
      echo "$shape" >> "$OUT/sweeps.md"
      sweep 110 $shape --cases softcap \
        --configs exp2_fma_0 exp2_fma_16 exp2_fma_32 exp2_fma_48 scaled_queries exp2_fma_0
    done
    echo "-S 8192 -D 64" >> "$OUT/sweeps.md"
    sweep 90 -S 8192 -D 64 --cases softcap --configs exp2_fma_80 exp2_fma_64 exp2_fma_96 scaled_queries exp2_fma_80
    ;;
  anchor60tests)
    # anchor60's gpu tests alone.
    timeout 420 python3 -m pytest -p no:benchmark -m gpu -q -n 14 tests/test_pallas_mosaic.py -rf --tb=short -k \
      "anchored or repair_launch or every_supported_mod or fully_masked or many_items or nothing_is_masked or \
plain_masks or vmap_of_grad or (forward_variants and (plain or running-max or overlap))" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -20
    ;;
  checkmosaic2)
    # checkmosaic less softcap38's tests, at 14 workers (the compiles are the time).
    timeout 560 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 14 -p no:benchmark -v -rf --tb=short \
      -k "not (fixed_maximum or every_supported_mod or head_dims_and_options or fully_masked)" \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -30
    ;;
  exp2int)
    # NOTES.md section 50: the fixed maximum's shift an integer, folded into the exp2 polynomial's rounding. Its gpu
    # tests (the fixed maximum's, every supported mod's forward with the polynomial), then at D=64 soft-capping the
    # new form against the former (exp2_shift_first), the scaled queries, a quadratic, more columns.
    timeout 230 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 14 -p no:benchmark -v -rf --tb=short \
      -k "fixed_maximum or (forward_variants and (exp2 or softcap)) or (head_dims_and_options and 64)" \
      >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    sweep 130 -D 64 --cases softcap --configs defaults exp2_shift_first scaled_queries exp2_quadratic exp2_fma_96 \
      defaults exp2_shift_first exp2_fma_80
    ;;
  softcap51)
    # NOTES.md section 50's open questions at D=64 soft-capping: the scaled queries and the quadratic at the new
    # default's 80 columns, and the SASS of 64 columns against 80 (the integer form was 7% slower at 64). Read the
    # SASS back here with python -m benchmarks.ncu_sass ncu_c64_softcap_sass.csv.gz --against ...c80...
    sweep 100 -D 64 --cases softcap --configs defaults scaled_queries exp2_quadratic exp2_fma_64 defaults \
      scaled_queries exp2_quadratic exp2_fma_64
    for columns in 64 80; do
      ncu_mosaic_forward 64 softcap "c${columns}_" "{\"mosaic_fwd_exp2_fma\": $columns}" \
        | grep -E "Duration|Issue Slots|No Eligible"
    done
    ;;
  fold51)
    # NOTES.md section 51: the row sums folded by default for full attention at D=128. Its gpu tests (and every
    # supported mod's, noop among them), then full attention beside the anchors at run 38's shapes, in three
    # interleaved rounds (benchmarks.run --rounds).
    # 150 s did not reach the tests' end on a cold machine (twenty-sixth session): the compiles are the time.
    timeout 260 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 14 -p no:benchmark -v -rf --tb=short \
      -k "full_attention or every_supported_mod" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    timeout 260 python3 -m benchmarks.run --suite prefill --shapes 8x16x2048x128,2x16x8192x64,2x16x8192x128 \
      --cases noop --modes fwd,fwdbwd --implementations pallas_mosaic --runs 10 --rounds 3 --budget-s 220 \
      --out "$OUT/${RUN_TAG:-run40}" 2>&1 | grep -v Warning | tail -22
    ;;
  window51)
    # NOTES.md section 51: the JAX timer's window. Until the twenty-sixth session time_jax loaded the GPU for about
    # 10 bursts (some 80 ms at 8K) while PyTorch's do_bench loads it for 600 ms; now benchmarks.run stretches the JAX
    # timings to the same (--jax-window-ms, 500 by default). The same cells both ways, two rounds each.
    for window in 0 500; do
      timeout 270 python3 -m benchmarks.run --suite prefill --shapes 2x16x8192x128,2x16x8192x64 --cases noop,causal \
        --modes fwd,fwdbwd --implementations pallas_mosaic --runs 10 --rounds 2 --jax-window-ms $window \
        --budget-s 230 --out "$OUT/window$window" 2>&1 | grep -E "^\|" | tail -8
    done
    ;;
  ramp52)
    # NOTES.md section 52: why the former 45-85 ms window read our forward 9-13% high and cuDNN's 1-6%: each
    # implementation's speed and SM clock over the first 1.2 s of load after 3 s of idle, 8K D=128.
    for case in noop causal; do
      timeout 140 python3 -m benchmarks.clocks --ramp --case $case 2>&1 | grep -E "^\||H200|H100|rror" \
        | tee -a "$OUT/ramp.md"
    done
    # Does cuDNN's timed program copy for the layout swaps around jax.nn.dot_product_attention? Its compiled HLO.
    timeout 100 python3 -c "
import jax, jax.numpy as jnp
from benchmarks import jax_impls
from benchmarks.cases import CASES
q = jnp.zeros((2, 16, 8192, 128), jnp.bfloat16)
f = jax_impls.dot_product_attention(CASES['noop'], 'cudnn', 2, 16, 8192, 8192)
print(jax.jit(f).lower(q, q, q).compile().as_text())" >"$OUT/cudnn_hlo.txt" 2>&1
    echo "copies or transposes in cuDNN's program: \
$(grep -cE "^ *%?[a-z_.0-9-]+ = .*(copy|transpose)\(" "$OUT/cudnn_hlo.txt")"
    ;;
  fold52)
    # NOTES.md section 52: section 48's folded row sums were measured on causal only at 8K D=128 (+2%, short
    # window) and on full attention at D=64 (-2%); ALiBi (no mask_mod) takes them by default at D=128 since
    # section 51 without a measurement. All three again, now that sweeps load the GPU for 600 ms a cell,
    # interleaved twice. Causal has one partial tile in each query tile's walk, where section 50 placed the fold's
    # loss on the document mask (many partial tiles).
    for shape in "-S 8192 -D 128" "-B 8 -S 2048 -D 128"; do
      echo "$shape" >> "$OUT/sweeps.md"
      sweep 200 $shape --cases causal alibi noop --configs row_sum_each_tile row_sum_fold row_sum_each_tile \
        row_sum_fold
    done
    echo "-S 8192 -D 64" >> "$OUT/sweeps.md"
    sweep 150 -S 8192 -D 64 --cases causal noop --configs row_sum_each_tile row_sum_fold row_sum_each_tile \
      row_sum_fold
    ;;
  tiles53)
    # NOTES.md section 53: the D=64 Triton forward's new default (64 x 64, 4 warps, 3 stages): its gpu tests, then
    # beside section 29's 128 x 64 on every mask, interleaved twice; then the Mosaic forward's folded row sums on
    # the masks without captured arrays at D=128 (sliding window, prefix LM, causal), where a static rule could
    # take them.
    timeout 200 python3 -m pytest -p no:benchmark -m gpu -q tests/test_pallas_triton_forward.py \
      tests/test_pallas_triton_backward.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
    echo "D=64 Triton forward" >> "$OUT/sweeps.md"
    sweep 150 --implementation pallas_triton -D 64 --cases document softcap per_head alibi causal sliding_window noop \
      --configs defaults fwd128x64w4s3 defaults fwd128x64w4s3
    for shape in "-S 8192 -D 128" "-B 8 -S 2048 -D 128"; do
      echo "$shape" >> "$OUT/sweeps.md"
      sweep 100 $shape --cases sliding_window prefix_lm causal --configs row_sum_each_tile row_sum_fold \
        row_sum_each_tile row_sum_fold
    done
    ;;
  leads54)
    # NOTES.md section 53's open leads. Soft-capping's D=64 forward read 0.896x causal's in run 44 (H100), against
    # 0.91x on the H200: its exp2 columns on the FMA units (section 50 chose 80 of 128 over short windows) beside
    # causal, over the sustained window. Then ALiBi's forward at D=128 with the row sums folded and not, one
    # launch each in Nsight Compute (registers, issue, stalls; SASS as section 50 took for the document mask):
    # read the SASS back with python -m benchmarks.ncu_sass ncu_fold1_alibi_sass.csv.gz --against ...fold0...
    sweep 150 -D 64 --cases softcap causal --configs defaults exp2_fma_64 exp2_fma_96 exp2_fma_112 defaults \
      exp2_fma_64 exp2_fma_96 exp2_fma_112
    for fold in 0 1; do
      ncu_mosaic_forward 128 alibi "fold${fold}_" "{\"mosaic_fwd_row_sum_fold\": $fold}" \
        | grep -E "Duration|Registers Per|Issue Slots|No Eligible"
    done
    ;;
  boundary55)
    # Sections 37, 55 and 56: where full attention's forward spends its time at B=8 S=2048 against 8K, one launch
    # of our kernel at each in Nsight Compute: its duration, issue and stall figures, and its SASS with the stall
    # samples of every instruction, read back here with
    # python -m benchmarks.ncu_sass ncu_b8_noop_sass.csv.gz --against ncu_b2_noop_sass.csv.gz.
    ncu_full_attention_shapes none flex_attention_forward 1 "" "Duration|Issue Slots|No Eligible"
    ;;
  sdpa56)
    # Section 56: SDPA's forward at B=8 S=2048 against 8K in Nsight Compute, the first launch of ours and of
    # SDPA's at each: whether its kernel loses per flop at the shorter walks as ours does (5.8% in boundary55).
    ncu_full_attention_shapes sdpa "flex_attention_forward|flash|fmha|cudnn|sdpa" 2 sdpa_ \
      "Duration|Issue Slots|No Eligible|Grid Size|Block Size|Registers Per|Waves"
    ;;
  alibi66)
    # Section 66: ALiBi's forward on the running maximum, its default again, beside the anchors at the three shapes of
    # the issues (one round, as runs 63 to 65 timed it on the anchored walk); then every ALiBi gpu test of the Mosaic
    # backend and the repair tests, which now ask for the anchored walk under their score_mods.
    timeout 330 python3 -m benchmarks.run --suite prefill --shapes 2x16x8192x128,2x16x8192x64,8x16x2048x128 \
      --cases alibi --modes fwd,fwdbwd --implementations pallas_mosaic --timer bursts --runs 10 --rounds 1 \
      --budget-s 300 --out "$OUT/alibi66" 2>&1 | grep -E "^\||^Run|ceilings" | tail -12
    timeout 240 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 14 -p no:benchmark -v -rf --tb=short \
      -k "alibi or repair" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    ;;
  softcap68)
    # Section 68: soft-capping at 8K D=128, whose special-function work a score (tanh and exp2, 1/8 clock an SM)
    # equals the tensor cores' (512 flops at 4096 a clock): the overlapped walk (off by default under a score_mod
    # since section 54 measured it 7% slower then), with 0, 16 and 32 exp2 columns on the FMA units, interleaved
    # with the default; then the default's step and causal's in Nsight Compute, one launch each, for their SASS
    # (read back with python -m benchmarks.ncu_sass ncu_d128_softcap_sass.csv.gz --top 12).
    sweep 200 -D 128 --cases softcap --configs defaults overlap overlap_exp2_fma_16 overlap_exp2_fma_32 \
      exp2_fma_32 defaults overlap overlap_exp2_fma_32
    NCU_IMPL=pallas_mosaic NCU_TORCH=none NCU_D=128 NCU_CASES="softcap causal" NCU_KERNELS=flex_attention_forward \
      NCU_LAUNCHES=1 NCU_TAG=d128_ bash "$0" ncu | grep -E "Duration|Issue Slots|No Eligible|Registers Per"
    ;;
  softcap70)
    # Section 70, first: the gpu tests of BlockMasks without full-block lists (written this session, every walk
    # evaluating the mask_mod at each step, forward and gradients). Then soft-capping's backward schedule, last
    # measured in section 33 (overlap 2 then 10% slower, spilling 40% more): what ptxas says of each, and
    # forward+backward interleaved with the default (overlap 0 with Pallas's barriers) at 8K D=128 and B=8
    # S=2048. Last, the plain walk's causal step at 8K D=128 in Nsight Compute, beside soft-capping's profile of
    # `softcap68` (the same walk): about 8 minutes in all.
    timeout 150 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 14 -p no:benchmark -v -rf --tb=short \
      -k "partial_blocks_only" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    timeout 90 python3 -m benchmarks.ptxas_report --only "backward softcap" "overlap 1 softcap" "overlap 2 softcap" \
      2>&1 | grep -E "^##|ptxas|rror" | tee "$OUT/ptxas.txt"
    sweep 200 -D 128 --mode fwdbwd --cases softcap --configs defaults bwd_overlap_1 bwd_overlap_1_nab \
      bwd_overlap_2 bwd_overlap_2_nab defaults
    sweep 110 -B 8 -S 2048 -D 128 --mode fwdbwd --cases softcap --configs defaults bwd_overlap_1_nab \
      bwd_overlap_2_nab defaults
    NCU_IMPL=pallas_mosaic NCU_TORCH=none NCU_D=128 NCU_CASES=causal NCU_KERNELS=flex_attention_forward \
      NCU_LAUNCHES=1 NCU_TAG=d128_plain_ NCU_OPTIONS='{"mosaic_fwd_overlap": 0}' bash "$0" ncu \
      | grep -E "Duration|SM Frequency|Elapsed Cycles|Issue Slots|No Eligible|Registers Per"
    ;;
  bwd73)
    # Section 73: soft-capping's backward on overlap 1 without automatic barriers, its default since. Its gpu tests
    # (the backward schedules, soft-capped causal among them; the head dims and options, soft-capping at 64), what
    # ptxas says of it, then forward+backward interleaved with the earlier schedule (overlap 0 with the barriers) at
    # 8K D=128, B=8 S=2048 and 8K D=64 (about 8 minutes).
    timeout 200 python3 -m pytest -m gpu tests/test_pallas_mosaic.py -n 14 -p no:benchmark -v -rf --tb=short \
      -k "backward_schedules or head_dims_and_options" >"$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    timeout 60 python3 -m benchmarks.ptxas_report --only "backward softcap fused dQ" 2>&1 | grep -E "^##|ptxas|rror" \
      | tee "$OUT/ptxas.txt"
    sweep 100 -D 128 --mode fwdbwd --cases softcap --configs bwd_overlap_0 defaults bwd_overlap_0 defaults
    sweep 80 -B 8 -S 2048 -D 128 --mode fwdbwd --cases softcap --configs bwd_overlap_0 defaults bwd_overlap_0 defaults
    sweep 100 -D 64 --mode fwdbwd --cases softcap --configs bwd_overlap_0 defaults bwd_overlap_0 defaults
    ;;
  mufu67)
    # Section 67: results a clock an SM of ex2, tanh, rcp in float32 and in float16 and bfloat16 pairs, each alone,
    # beside the FMA units' (the clock's calibration); two processes, to see the spread.
    for _ in 1 2; do
      timeout 100 python3 -m benchmarks.mufu_rate 2>&1 | grep -vi warning | tee -a "$OUT/mufu.md"
    done
    ;;
  timer57)
    # Section 57: the three shapes of the issues beside the anchors, every implementation timed one way (TIMER=bursts
    # by default; flushed: each call after a 256 MB write; do_bench: torch by do_bench as before), pallas_mosaic alone.
    # SHAPES and CASES narrow it (ROUNDS=4 times each implementation first once, and four times as long).
    timeout 585 python3 -m benchmarks.run --suite prefill \
      --shapes "${SHAPES:-8x16x2048x128,2x16x8192x128,2x16x8192x64}" ${CASES:+--cases "$CASES"} --modes fwd,fwdbwd \
      --implementations pallas_mosaic --timer "${TIMER:-bursts}" --runs 10 --rounds "${ROUNDS:-1}" \
      --budget-s 520 --out "$OUT/timer57" 2>&1 | grep -v Warning | tail -45
    ;;
  backward58)
    # Section 57's first lead: the 8K D=128 backward beside SDPA's (ours takes 4-6% longer where our forward is
    # 5-7% faster), one launch of each backward kernel in Nsight Compute, full attention then causal.
    NCU_IMPL=pallas_mosaic NCU_TORCH=sdpa NCU_D=128 NCU_B=2 NCU_S=8192 NCU_CASES="noop causal" NCU_MODE=fwdbwd \
      NCU_KERNELS="flex_attention_d|bprop|bwd|dot_do" NCU_LAUNCHES=6 NCU_TAG=bwd_ bash "$0" ncu \
      | grep -E "$ncu_beside_sdpa_lines"
    ;;
  forward64_58)
    # Section 57's second lead: the 8K D=64 forward beside SDPA's (0.96-0.99 in bursts), one launch each.
    NCU_IMPL=pallas_mosaic NCU_TORCH=sdpa NCU_D=64 NCU_B=2 NCU_S=8192 NCU_CASES="noop causal" \
      NCU_KERNELS="flex_attention_forward|flash|fmha|cudnn|sdpa" NCU_LAUNCHES=2 NCU_TAG=d64_ bash "$0" ncu \
      | grep -E "$ncu_beside_sdpa_lines"
    ;;
  gaps56)
    # Section 56: whether do_bench's cache flushes between SDPA's calls raise its rate under the power cap, most at
    # B=8 S=2048: ours and SDPA's full-attention forward each timed in bursts and with gaps, three rounds.
    timeout 200 python3 -m benchmarks.timer_gaps --rounds 3 2>&1 | grep -v -i warning | tee "$OUT/timer_gaps.md"
    ;;
  ncu)
    # NOTES.md sections 27 and 29: what the GPU runs for our forward beside PyTorch's, per case: each kernel's
    # occupancy, issue and stall reasons, L2 and DRAM throughput (NOTES.md section 29 suspects L2 for the D=64
    # forward on 64-query tiles), and its SASS with the times each instruction ran (SourceCounters).
    # --clock-control none: the clocks stay as the machine sets them. Defaults: the Triton forward at D=64 beside
    # PyTorch FlexAttention on noop, ALiBi and sliding window. For the Mosaic forward beside SDPA's:
    #   NCU_IMPL=pallas_mosaic NCU_TORCH=sdpa NCU_D=128 NCU_CASES="noop causal" \
    #     NCU_KERNELS="flex_attention|flash|fmha|cudnn|sdpa" bash ... ncu
    # (NCU_KERNELS is a regular expression over kernel names; "." also takes the input generation's kernels, which
    # come first; NCU_LAUNCHES caps the launches profiled, 8 by default; NCU_MODE=fwdbwd runs the gradients too;
    # NCU_B and NCU_S set the batch and the length, 2 and 8192 by default; NCU_TAG prefixes the files' case names,
    # so that one call can profile one case at two shapes; NCU_OPTIONS, our kernel_options as JSON.)
    # The reports are reduced here to one text file and one SASS file per case, to stay within $OUT's limit; read
    # the SASS files back here with python -m benchmarks.ncu_sass ncu_<case>_sass.csv.gz.
    wanted="flex|triton_tem|kernel|Registers|Shared Memory Config|Occupancy|Issue Slots|No Eligible|Executed Ipc|Duration|Stall|Block Size|Grid Size|Waves|L2|L1|DRAM|Memory Throughput|SM Frequency|Cycles"
    for case in ${NCU_CASES:-noop alibi sliding_window}; do
      timeout 150 ncu --clock-control none --kernel-name regex:"${NCU_KERNELS:-flex_attention_forward|triton_tem}" \
        --launch-count "${NCU_LAUNCHES:-8}" --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
        --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats \
        --section MemoryWorkloadAnalysis \
        --section SourceCounters --import-source no -o "/tmp/ncu_${NCU_TAG:-}$case" -f \
        python3 -m benchmarks.profile_forward --case "$case" -D "${NCU_D:-64}" -B "${NCU_B:-2}" -S "${NCU_S:-8192}" --calls 0 \
        --implementation "${NCU_IMPL:-pallas_triton}" --torch "${NCU_TORCH:-flex}" --mode "${NCU_MODE:-fwd}" \
        ${NCU_OPTIONS:+--kernel-options "$NCU_OPTIONS"} 2>&1 | grep -v Warning | tail -4
      timeout 60 ncu --import "/tmp/ncu_${NCU_TAG:-}$case.ncu-rep" --page details 2>&1 | grep -E "$wanted" \
        > "$OUT/ncu_${NCU_TAG:-}$case.txt"
      head -40 "$OUT/ncu_${NCU_TAG:-}$case.txt"
      timeout 60 ncu --import "/tmp/ncu_${NCU_TAG:-}$case.ncu-rep" --page source --print-source sass --csv 2>&1 \
        | gzip > "$OUT/ncu_${NCU_TAG:-}${case}_sass.csv.gz"
    done
    ;;
  *)
    echo "usage: bash benchmarks/device_session.sh check|checkmosaic|sweep|indices|exp2|fma|copywarps|clocks|tiles64|split|run|run64|torch|scaleq|alibi|softcap|softcap2|ncu" >&2; exit 2 ;;
esac
