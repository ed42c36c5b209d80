"""Forward speed of implementation="pallas_mosaic" under its kernel_options (key tile, pipeline depth).

    python -m benchmarks.mosaic_sweep [--cases noop causal document] [-D 128]

B=2, H=16, S=8192, bf16 by default; the cases of ``benchmarks.cases``. Each output is checked against the
pallas_triton forward before it is timed. Density-adjusted TFLOP/s (4 B H L S D density), medians of bursts of
back-to-back calls (``benchmarks.timing.time_jax``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import flexattn_jax as fa
from benchmarks import timing
from benchmarks.cases import CASES

CONFIGS = {
    "n128_s2": dict(mosaic_block_n=128, mosaic_num_stages=2),
    "n128_s3": dict(mosaic_block_n=128, mosaic_num_stages=3),
    "n64_s2": dict(mosaic_block_n=64, mosaic_num_stages=2),
    "n64_s3": dict(mosaic_block_n=64, mosaic_num_stages=3),
    "n64_s4": dict(mosaic_block_n=64, mosaic_num_stages=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["noop", "causal", "document"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("-B", type=int, default=2)
    parser.add_argument("-H", type=int, default=16)
    parser.add_argument("-S", type=int, default=8192)
    parser.add_argument("-D", type=int, default=128)
    args = parser.parse_args()
    B, H, S, D = args.B, args.H, args.S, args.D
    keys = jax.random.split(jax.random.key(0), 6)
    sets = [tuple(jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in keys[i : i + 3]) for i in (0, 3)]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, B={B} H={H} S={S} D={D} bf16")
    print("| case | " + " | ".join(args.configs) + " |")
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

        check = jax.jit(lambda q, k, v: run("pallas_triton", None, q, k, v))(*sets[0])
        cells = []
        for config in args.configs:
            forward = jax.jit(lambda q, k, v, options=CONFIGS[config]: run("pallas_mosaic", options, q, k, v))
            try:
                out = forward(*sets[0])
            except ValueError as error:  # a configuration this shape cannot take (shared memory)
                cells.append(f"refused: {str(error).splitlines()[0][:60]}")
                continue
            error = float(jnp.linalg.norm((out - check).astype(jnp.float32)) / jnp.linalg.norm(check.astype(jnp.float32)))
            ms = timing.time_jax(forward, sets, runs=10)
            tflops = 4 * B * H * S * S * D * density / ms / 1e9
            cells.append(f"{tflops:.0f}" + ("" if error < 1e-2 else f" (error {error:.1e})"))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
