"""Times the pallas_triton forward on a GPU and prints density-adjusted TFLOP/s.

FLOP model (as PERF_TARGETS.md): forward FLOPs = 4 * B * H * L * S * D * density, density = the fraction of
(query, key) pairs the mask allows. Time: median of ``--iters`` runs after warm-up, ``block_until_ready``.

    python benchmarks/pallas_triton_forward.py                      # causal, B=2 H=16 S=8192 D=128 bf16
    python benchmarks/pallas_triton_forward.py --sweep              # also a few tile configurations
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import flexattn_jax as fa
from benchmarks.cases import document_ids

SWEEP = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
]


def masks(seq_len: int, heads: int):
    return {
        "noop": (None, None),
        "document": (fa.and_masks(fa.causal_mask, fa.document_mask(jnp.asarray(document_ids(seq_len)))), None),
        "causal": (fa.causal_mask, None),
        "sliding_window": (fa.sliding_window_mask(1024), None),
        "alibi": (None, fa.generate_alibi_bias(heads)),
        "softcap": (fa.causal_mask, fa.tanh_softcap(30.0)),
    }


def time_forward(q, k, v, mask_mod, score_mod, kernel_options, iters: int):
    seq_len = q.shape[2]
    block_mask = None
    density = 1.0
    if mask_mod is not None:
        block_mask = fa.create_block_mask(mask_mod, None, None, seq_len, seq_len, BLOCK_SIZE=128)
        # Density from every 8th query row (exact enough for these masks).
        rows = np.arange(0, seq_len, 8)
        allowed = jax.vmap(lambda qi: mask_mod(0, 0, qi, jnp.arange(seq_len, dtype=jnp.int32)))(
            jnp.asarray(rows, jnp.int32)
        )
        density = float(np.asarray(allowed).mean())

    @jax.jit
    def forward(q, k, v, block_mask):
        return fa.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, implementation="pallas_triton",
            kernel_options=kernel_options,
        )

    start = time.perf_counter()
    forward(q, k, v, block_mask).block_until_ready()
    compile_s = time.perf_counter() - start
    for _ in range(3):
        forward(q, k, v, block_mask).block_until_ready()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        forward(q, k, v, block_mask).block_until_ready()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    b, h, l, d = q.shape
    flops = 4 * b * h * l * k.shape[2] * d * density
    return flops / median / 1e12, median, compile_s, density


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--masks", default="causal")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    print(f"# {datetime.date.today()} {jax.devices()[0].device_kind} jax {jax.__version__}")
    print(f"# B={args.batch} H={args.heads} L=S={args.seq} D={args.dim} bf16; TFLOP/s = 4 B H L S D density / time")
    key = jax.random.key(0)
    shape = (args.batch, args.heads, args.seq, args.dim)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) for i in range(3))
    table = masks(args.seq, args.heads)
    for name in args.masks.split(","):
        mask_mod, score_mod = table[name]
        for options in [None] + (SWEEP if args.sweep else []):
            try:
                tflops, median, compile_s, density = time_forward(q, k, v, mask_mod, score_mod, options, args.iters)
                print(
                    f"{name:15s} density={density:.4f} options={options} {tflops:7.1f} TFLOP/s "
                    f"({median * 1e3:.3f} ms, first call {compile_s:.1f} s)",
                    flush=True,
                )
            except Exception as error:  # noqa: BLE001 - a configuration that fails to compile is reported, not fatal
                print(f"{name:15s} options={options} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)


if __name__ == "__main__":
    main()
