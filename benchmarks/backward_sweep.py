"""Forward and forward+backward speed of implementation="pallas_triton" under a few backward tilings.

    python -m benchmarks.backward_sweep [--masks causal noop] [--configs default m32_n128 ...]

B=2, H=16, S=8192, D=128, bf16 by default. TFLOP/s are density-adjusted: forward FLOPs = 4 B H L S D density, and
forward+backward counts the backward as 2.5 times the forward (3.5 in all), as in PERF_TARGETS.md. Times are
medians of 20 runs after 3 warm-up runs, each synchronised with block_until_ready.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import flexattn_jax as fa

MASKS = {"causal": fa.causal_mask, "noop": None}
# Backward tilings to compare: (dK/dV query tile, dK/dV key tile, dQ query tile, dQ key tile, warps, stages).
CONFIGS = {
    "default": {},
    "m32_n128_w4_s3": dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=3),
    "m64_n128_w4_s2": dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, bwd_num_warps=4, bwd_num_stages=2),
    "m64_n64_w4_s3": dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, bwd_num_warps=4, bwd_num_stages=3),
    "m32_n64_w4_s3": dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, bwd_num_warps=4, bwd_num_stages=3),
    "m64_n128_w8_s3": dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, bwd_num_warps=8, bwd_num_stages=3),
}


def _median_ms(fn, args, warmup=3, runs=20) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", nargs="+", default=list(MASKS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("-B", type=int, default=2)
    parser.add_argument("-H", type=int, default=16)
    parser.add_argument("-S", type=int, default=8192)
    parser.add_argument("-D", type=int, default=128)
    args = parser.parse_args()
    B, H, S, D = args.B, args.H, args.S, args.D
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in keys)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, B={B} H={H} S={S} D={D} bf16")
    for mask_name in args.masks:
        mask_mod = MASKS[mask_name]
        block_mask = None if mask_mod is None else fa.create_block_mask(mask_mod, None, None, S, S)
        density = 1.0 if mask_mod is None else (S * (S + 1) / 2) / S**2
        flops = 4 * B * H * S * S * D * density

        def forward(q, k, v, options=None):
            return fa.flex_attention(q, k, v, block_mask=block_mask, implementation="pallas_triton", kernel_options=options)

        fwd = jax.jit(forward)
        start = time.perf_counter()
        jax.block_until_ready(fwd(q, k, v))
        first = time.perf_counter() - start
        ms = _median_ms(fwd, (q, k, v))
        print(f"{mask_name:8s} forward                 {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s  (first call {first:.1f} s)")
        for config_name in args.configs:
            options = CONFIGS[config_name] or None

            def loss(q, k, v, options=options):
                return jnp.sum(forward(q, k, v, options).astype(jnp.float32) * d_out.astype(jnp.float32))

            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            try:
                start = time.perf_counter()
                jax.block_until_ready(step(q, k, v))
                first = time.perf_counter() - start
                ms = _median_ms(step, (q, k, v))
            except Exception as error:  # a tiling that does not fit this GPU: report and go on
                print(f"{mask_name:8s} fwd+bwd {config_name:16s} failed: {type(error).__name__}: {str(error)[:200]}")
                continue
            print(
                f"{mask_name:8s} fwd+bwd {config_name:16s}{ms:8.3f} ms {3.5 * flops / ms / 1e9:7.1f} TFLOP/s  "
                f"(first call {first:.1f} s)"
            )


if __name__ == "__main__":
    main()
