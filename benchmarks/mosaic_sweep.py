"""Speed of implementation="pallas_mosaic" under its kernel_options (key tile, pipeline depth, backward kernels).

    python -m benchmarks.mosaic_sweep [--cases noop causal document] [-D 128] [--mode fwd|fwdbwd]
    python -m benchmarks.mosaic_sweep --implementation pallas_triton --mode fwdbwd --configs triton bwd_m64_n128_w8_s3

B=2, H=16, S=8192, bf16 by default; the cases of ``benchmarks.cases``. Each output (or gradient, for ``fwdbwd``)
is checked against pallas_triton's before it is timed. Density-adjusted TFLOP/s (4 B H L S D density, times 3.5
for forward+backward), medians of bursts of back-to-back calls (``benchmarks.timing.time_jax``) over a window as long
as ``benchmarks.run`` times (``--jax-window-ms``: a GPU at its power limit slows down over the first tenths of a
second, NOTES.md section 52).
"""

from __future__ import annotations

import argparse
import contextlib
import re

import jax
import jax.numpy as jnp

import flexattn_jax as fa
from benchmarks import timing
from benchmarks.cases import CASES
from flexattn_jax.backends import _captures
from flexattn_jax.backends.pallas_mosaic import forward as mosaic_forward
from flexattn_jax.backends.pallas_triton import _tile

CONFIGS = {
    "n128_s2": dict(mosaic_block_n=128, mosaic_num_stages=2),
    "n128_s3": dict(mosaic_block_n=128, mosaic_num_stages=3),
    "n64_s2": dict(mosaic_block_n=64, mosaic_num_stages=2),
    "n64_s3": dict(mosaic_block_n=64, mosaic_num_stages=3),
    "n64_s4": dict(mosaic_block_n=64, mosaic_num_stages=4),
    "overlap": dict(mosaic_fwd_overlap=1),  # 128-key tiles, 2 stages, softmax overlapping the warpgroup's own P V
    "no_overlap": dict(mosaic_fwd_overlap=0),
    "q_buffers_1": dict(mosaic_fwd_q_buffers=1),  # one query tile per warpgroup: fetched at each item's start
    "q_buffers_2": dict(mosaic_fwd_q_buffers=2),
    # the memory warpgroups' copy loops in one warp or in all four, forward and backward alike (NOTES.md section 31)
    "copy_warps_1": dict(mosaic_fwd_copy_warps=1, mosaic_bwd_copy_warps=1),
    "copy_warps_4": dict(mosaic_fwd_copy_warps=4, mosaic_bwd_copy_warps=4),
    "bwd_copy_warps_1": dict(mosaic_bwd_copy_warps=1),
    "bwd_copy_warps_4": dict(mosaic_bwd_copy_warps=4),
    # the backward's schedule (NOTES.md section 33), both knobs named, since the default follows the score_mod:
    # overlap 0, 1 or 2, with Pallas's automatic barriers in the dK/dV kernel or without ("nab")
    "bwd_overlap_0": dict(mosaic_bwd_overlap=0, mosaic_bwd_auto_barriers=1),
    "bwd_overlap_1": dict(mosaic_bwd_overlap=1, mosaic_bwd_auto_barriers=1),
    "bwd_overlap_2": dict(mosaic_bwd_overlap=2, mosaic_bwd_auto_barriers=1),
    "bwd_no_auto_barriers": dict(mosaic_bwd_overlap=0, mosaic_bwd_auto_barriers=0),
    "bwd_overlap_1_nab": dict(mosaic_bwd_overlap=1, mosaic_bwd_auto_barriers=0),
    "bwd_overlap_2_nab": dict(mosaic_bwd_overlap=2, mosaic_bwd_auto_barriers=0),
    # NOTES.md section 34: the backward's programs launched head by head (the default) or with the batch and heads
    # innermost (the earlier order).
    "bwd_heads_inner": dict(mosaic_bwd_heads_inner=1),
    "bwd_heads_inner_fused": dict(mosaic_bwd_heads_inner=1, mosaic_bwd_fuse_dq=1),
    # NOTES.md section 36: the score_mod's index conversions from float index tiles (the default) or score by score
    "fwd_float_indices": dict(mosaic_fwd_float_indices=1),
    "fwd_int_indices": dict(mosaic_fwd_float_indices=0),
    # NOTES.md section 40: the scale multiplied into each query tile once per item, or into every score
    "scaled_queries": dict(mosaic_fwd_scale_queries=1),
    "scaled_scores": dict(mosaic_fwd_scale_queries=0),
    # NOTES.md section 43: soft-capping's softmax against the cap (the default) or the running maximum
    "fixed_max": dict(mosaic_fwd_fixed_max=1),
    "running_max": dict(mosaic_fwd_fixed_max=0),
    # NOTES.md section 46: with the fixed maximum, exp2 of the last 0 to 128 key columns from the FMA units' cubic
    **{f"exp2_fma_{columns}": dict(mosaic_fwd_exp2_fma=columns) for columns in range(0, 129, 16)},
    # NOTES.md section 48: the row sums reduced across threads at every key tile or once per item
    "row_sum_fold": dict(mosaic_fwd_row_sum_fold=1),
    "row_sum_each_tile": dict(mosaic_fwd_row_sum_fold=0),
    "exp2_fma_64_fold": dict(mosaic_fwd_exp2_fma=64, mosaic_fwd_row_sum_fold=1),
    # soft-capping at D=128 on the overlapped walk (section 68): the special-function unit's work a score at the
    # tensor cores' time a score, and some exp2 moved off it
    **{f"overlap_exp2_fma_{columns}": dict(mosaic_fwd_overlap=1, mosaic_fwd_exp2_fma=columns) for columns in (16, 32)},
    # NOTES.md section 59: the row maxima by column halves (the default) or by Mosaic GPU's reduction; two bounds on
    # what the running maximum costs (see _traced_as): no rescaling of the accumulator (wrong results), a fixed shift
    # (right on these inputs only); all three on the running maximum
    "max_tree": dict(mosaic_fwd_max_tree=1, mosaic_fwd_anchored_shift=0),
    "max_chain": dict(mosaic_fwd_max_tree=0, mosaic_fwd_anchored_shift=0),
    "no_rescale": dict(mosaic_fwd_anchored_shift=0),
    "fixed_shift_10": dict(),
    # NOTES.md section 60: the first key tile's maxima shift the whole walk (the default), or the running maximum;
    # and the anchored walk with every certificate failing, so that every item runs again (its worst case)
    "anchored": dict(mosaic_fwd_anchored_shift=1),
    "running": dict(mosaic_fwd_anchored_shift=0),
    "repair_all": dict(mosaic_fwd_anchored_shift=1),
    # NOTES.md section 61: the repair launch's cost where nothing fails: every program reading each of its items'
    # flags (as before the gate), or no repair at all (a bound, wrong where a certificate fails)
    "repair_ungated": dict(mosaic_fwd_anchored_shift=1),
    "no_repair": dict(mosaic_fwd_anchored_shift=1),
    # and the first tile's maxima replaced by a constant (the peeled step and the certificate kept; a bound)
    "anchor_constant": dict(mosaic_fwd_anchored_shift=1),
    # forward+backward: the Mosaic GPU backward (its default; dQ fused into the dK/dV kernel; or a dQ kernel of its
    # own with 2 or 3 stages) against the Triton one, on the Mosaic forward
    "bwd_mosaic": dict(),
    "bwd_fused_dq": dict(mosaic_bwd_fuse_dq=1),
    "bwd_dq_kernel": dict(mosaic_bwd_fuse_dq=0),
    "bwd_dq_kernel_s3": dict(mosaic_bwd_fuse_dq=0, mosaic_bwd_num_stages=3),
    "bwd_triton": dict(mosaic_backward=0),
    "bwd_mosaic_overlap": dict(mosaic_fwd_overlap=1),
    # --implementation pallas_triton: its defaults, and backward tilings (dK/dV query x key tile, warps, stages)
    "triton": dict(),
    "bwd_m32_n64_w4_s3": dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=3),
    "bwd_m64_n64_w4_s3": dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, bwd_num_warps=4, bwd_num_stages=3),
    "bwd_m32_n128_w4_s3": dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, bwd_num_warps=4,
                               bwd_num_stages=3),
    "bwd_m64_n128_w8_s3": dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, bwd_num_warps=8,
                               bwd_num_stages=3),
    "bwd_m64_n128_w4_s2": dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, bwd_num_warps=4,
                               bwd_num_stages=2),
    # Two warpgroups: per thread half the accumulators, no spills in benchmarks.triton_report (NOTES.md section 18)
    "bwd_m32_n64_w8_s3": dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, bwd_num_warps=8, bwd_num_stages=3),
    "bwd_m64_n64_w8_s2": dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, bwd_num_warps=8, bwd_num_stages=2),
    "bwd_m64_n128_w8_s2": dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, bwd_num_warps=8,
                               bwd_num_stages=2),
    "fwd_w8": dict(num_warps=8),  # the Triton forward with two warpgroups (its default tiles)
    "defaults": dict(),  # any implementation's defaults
    # The defaults, with the mods' index arithmetic evaluated as written (see _traced_as)
    "int_indices": dict(),
    # The defaults, with every exp2 of the Triton kernels through libdevice (see _traced_as)
    "libdevice_exp2": dict(),
    # The defaults, with the Mosaic forward's exp2 polynomial as before section 50, or of degree 2 (see _traced_as)
    "exp2_shift_first": dict(),
    "exp2_shift_first_80": dict(mosaic_fwd_exp2_fma=80),
    "exp2_quadratic": dict(),
    # The defaults, with the Triton kernels' multiply-adds as a multiply and an add (see _traced_as)
    "separate_mul_add": dict(),
}
# The Triton backward's two kernels launched apart: "kv<M1>x<N1>w<warps>s<stages>_q<M2>x<N2>w<warps>s<stages>", e.g.
# kv64x128w8s3_q64x32w4s3 (dK/dV kernel 64 queries x 128 keys on 8 warps, 3 stages; dQ kernel 64 x 32 on 4, 3).
_SPLIT_BACKWARD = re.compile(r"kv(\d+)x(\d+)w(\d+)s(\d+)_q(\d+)x(\d+)w(\d+)s(\d+)")
# The Triton forward's launch: "fwd<M>x<N>w<warps>s<stages>", e.g. fwd128x64w4s3.
_FORWARD = re.compile(r"fwd(\d+)x(\d+)w(\d+)s(\d+)")


def options_of(config: str) -> dict:
    """kernel_options of a configuration name: an entry of CONFIGS, a forward or split-backward name (above)."""
    forward = _FORWARD.fullmatch(config)
    if forward is not None:
        return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), map(int, forward.groups())))
    split = _SPLIT_BACKWARD.fullmatch(config)
    if split is None:
        return CONFIGS[config]
    m1, n1, warps, stages, m2, n2, dq_warps, dq_stages = map(int, split.groups())
    return dict(BLOCK_M1=m1, BLOCK_N1=n1, bwd_num_warps=warps, bwd_num_stages=stages, BLOCK_M2=m2, BLOCK_N2=n2,
                bwd_dq_num_warps=dq_warps, bwd_dq_num_stages=dq_stages)


@contextlib.contextmanager
def _traced_as(config: str):
    """Traces a configuration the way an earlier kernel was, to time both in one call: "int_indices", the mods
    without ``ModProgram.with_index_bound`` (NOTES.md section 25: float32(kv_idx - q_idx) converted per score, not
    per index vector); "libdevice_exp2", the Triton kernels' exp2 through libdevice's ``__nv_exp2f``, not PTX's
    flush-to-zero instruction (section 28); "separate_mul_add", ``_tile.fma`` as a multiply and an add, which XLA
    compiles to two instructions (section 29); "exp2_shift_first", the Mosaic forward's ``exp2_polynomial`` rounding
    its argument after the fixed shift is subtracted, two adds more (section 50); "exp2_quadratic", its polynomial
    a quadratic (relative error 1.7e-3, an experiment: not precise enough for float16's P); "no_rescale" and
    "fixed_shift_10", section 59's bounds (the Mosaic forward without its accumulator's rescaling, which is wrong, or
    with exp2 against a fixed shift of 10, right only where no scaled score exceeds it, as on these inputs);
    "repair_all", section 60's anchored walk with every row's certificate failing; "repair_ungated", section 61's
    repair launch without its gate (every program reads each of its items' flags); "no_repair", the anchored walk
    without the repair (a bound); "anchor_constant", the anchored walk with every row's anchor 7 in place of its
    first tile's maximum (a bound, right on these inputs only, and only where no item runs again)."""
    if config == "int_indices":
        patched, name, replacement = _captures.ModProgram, "with_index_bound", lambda self, index_bound: self
    elif config == "libdevice_exp2":
        patched, name = _tile, "exp2"
        fast_exp2 = _tile.exp2
        replacement = lambda x, *, fast: fast_exp2(x, fast=False)  # noqa: E731
    elif config.startswith("exp2_shift_first"):
        patched, name = mosaic_forward, "exp2_polynomial"
        rounding_the_shift = mosaic_forward.exp2_polynomial
        replacement = lambda y, scale, shift: rounding_the_shift(  # noqa: E731
            y * jnp.float32(scale) - jnp.float32(shift), 1.0, 0)
    elif config == "exp2_quadratic":  # 2**f on [-1/2, 1/2], relative error fitted as for the cubic
        patched, name, replacement = mosaic_forward, "_EXP2_COEFFICIENTS", (0.23840183, 0.70339494, 1.00044095)
    elif config == "no_rescale":  # an upper bound on what rescaling only when needed could gain
        patched, name, replacement = mosaic_forward, "rescaled", lambda acc, correction: acc
    elif config == "fixed_shift_10":  # the running maximum's whole cost: exp2 against 10 (scores here reach ~8)
        patched, name, replacement = mosaic_forward, "fixed_shift_of", lambda *args: 10
    elif config == "repair_all":  # the anchored walk's worst case: every item runs twice
        patched, name = mosaic_forward, "anchor_certificate"
        replacement = lambda row_max, row_sum, num_steps, plan: row_sum < 0  # noqa: E731
    elif config == "repair_ungated":  # section 61: the gate always open
        patched, name = mosaic_forward, "repair_gate"
        replacement = lambda needs: jnp.ones((1,), jnp.int32)  # noqa: E731
    elif config == "no_repair":  # section 61: neither the flags' reduction nor the repair launch
        patched, name = mosaic_forward, "repair_failed_items"
        replacement = lambda repair_launch, inputs, out, lse, q_len: (out, lse)  # noqa: E731
    elif config == "anchor_constant":  # section 61: each row's anchor 7, exp2 against 10 at log2(e) (scores reach ~8)
        patched, name = mosaic_forward, "row_maximum"
        replacement = lambda y, *, tree: jnp.full((y.shape[0],), 7.0, jnp.float32)  # noqa: E731
    elif config == "separate_mul_add":
        patched, name = _tile, "fma"
        fast_fma = _tile.fma
        replacement = lambda a, b, c, *, fast: fast_fma(a, b, c, fast=False)  # noqa: E731
    else:
        yield
        return
    original = getattr(patched, name)
    setattr(patched, name, replacement)
    try:
        yield
    finally:
        setattr(patched, name, original)


_MODE_CONFIGS = {"fwd": ["n128_s2", "n128_s3", "n64_s2", "n64_s3", "n64_s4"],
                 "fwdbwd": ["bwd_mosaic", "bwd_dq_kernel", "bwd_triton"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["noop", "causal", "document"])
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd")
    parser.add_argument("--configs", nargs="+", default=None, help=f"from {list(CONFIGS)} fwd... or kv..._q... (the Triton kernels' launches)")
    parser.add_argument("--implementation", default="pallas_mosaic", choices=("pallas_mosaic", "pallas_triton"))
    parser.add_argument("-B", type=int, default=2)
    parser.add_argument("-H", type=int, default=16)
    parser.add_argument("-S", type=int, default=8192)
    parser.add_argument("-D", type=int, default=128)
    parser.add_argument("--wrt", choices=("qkv", "q", "kv"), default="qkv",
                        help="fwdbwd: the gradients taken. XLA drops a kernel whose outputs go unused, so q times the "
                             "forward and the dQ kernel, kv the forward and the dK/dV kernel")
    parser.add_argument("--ms", action="store_true", help="print milliseconds instead of TFLOP/s")
    parser.add_argument("--timer", choices=("burst", "unrolled"), default="burst",
                        help="burst: timing.time_jax (calls dispatched back to back); unrolled: "
                             "timing.time_jax_unrolled (eight calls in one program, no host work between them)")
    parser.add_argument("--jax-window-ms", type=float, default=timing.TORCH_REP_MS,
                        help="burst timer: time each cell over at least this long, after a warm-up in proportion, as "
                             "benchmarks.run does (0: ten bursts after three calls, the sweeps before the "
                             "twenty-seventh session)")
    args = parser.parse_args()
    B, H, S, D = args.B, args.H, args.S, args.D
    configs = args.configs or _MODE_CONFIGS[args.mode]
    backward = args.mode == "fwdbwd"
    keys = jax.random.split(jax.random.key(0), 6)
    sets = [tuple(jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in keys[i : i + 3]) for i in (0, 3)]
    if args.timer == "unrolled":  # eight different input sets: XLA would merge calls on the same arguments
        more = jax.random.split(jax.random.key(2), 18)
        unrolled_sets = sets + [tuple(jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in more[i : i + 3])
                                for i in range(0, 18, 3)]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, B={B} H={H} S={S} D={D} bf16, {args.mode}"
          f"{'' if args.wrt == 'qkv' else ' of ' + args.wrt}, {args.implementation}, {'ms' if args.ms else 'TFLOP/s'}, "
          f"{args.timer} timer" + (f", {args.jax_window_ms:.0f} ms window" if args.timer == "burst" else ""))
    print("| case | " + " | ".join(configs) + " |")
    cotangent = jax.random.normal(jax.random.key(1), (B, H, S, D), jnp.bfloat16)
    for name in args.cases:
        case = CASES[name]
        mask_mod, score_mod, by_head = case.mods(B, H, S, S)
        block_mask = None
        density = 1.0
        if mask_mod is not None:
            block_mask = fa.create_block_mask(mask_mod, None, H if by_head else None, S, S)
            density = float(jnp.mean(fa.create_mask(mask_mod, None, H if by_head else None, S, S)))

        def run(implementation, options, q, k, v):
            return fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                     implementation=implementation, kernel_options=options)

        def program(implementation, options):
            if not backward:
                return jax.jit(lambda q, k, v: run(implementation, options, q, k, v))
            return jax.jit(jax.grad(
                lambda q, k, v: jnp.vdot(run(implementation, options, q, k, v).astype(jnp.float32), cotangent),
                argnums={"qkv": (0, 1, 2), "q": (0,), "kv": (1, 2)}[args.wrt],
            ))

        def relative_error(got, want):
            return max(
                float(jnp.linalg.norm((g - w).astype(jnp.float32)) / jnp.linalg.norm(w.astype(jnp.float32)))
                for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
            )

        check = program("pallas_triton", None)(*sets[0])

        def cell_of(config: str) -> str:
            step = program(args.implementation, options_of(config))
            try:
                out = step(*sets[0])
            except (ValueError, jax.errors.JaxRuntimeError) as error:  # a configuration this shape cannot take
                # (refused before tracing, or out of shared memory when launched): the row goes on
                return f"refused: {str(error).splitlines()[0][:60]}"
            error = relative_error(out, check)
            if args.timer == "burst":
                ms = timing.time_jax(step, sets, runs=10, **timing.load_window(args.jax_window_ms))
            else:
                ms = timing.time_jax_unrolled(step, unrolled_sets)
            tflops = 4 * B * H * S * S * D * density * (3.5 if backward else 1.0) / ms / 1e9
            cell = (f"{ms:.3f}" if args.ms else f"{tflops:.0f}") + ("" if error < 1e-2 else f" (error {error:.1e})")
            if args.wrt != "qkv":  # the kernels XLA kept, to show which ones the time covers
                kept = sorted(set(re.findall(r"flex_attention_([a-z]+)", step.lower(*sets[0]).compile().as_text())))
                cell += f" [{' '.join(kept)}]"
            return cell

        cells = []
        for config in configs:
            with _traced_as(config):  # every trace of this configuration
                cells.append(cell_of(config))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
