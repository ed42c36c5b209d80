"""Forward+backward of key and value of batch 1 shared by B query batches (NOTES.md section 39).

    python -m benchmarks.shared_kv [-B 8] [-H 16] [-S 2048] [-D 128] [--cases noop causal]
                                   [--implementation pallas_mosaic]

Times the gradient with respect to q, k and v with the backward's batch loop on (``mosaic_bwd_kv_batch_loop`` 1 on
pallas_mosaic, ``bwd_kv_batch_loop`` 1 on pallas_triton: each dK/dV program adds up every query batch, key and
value and their gradients never copied per batch) and off (broadcast to B, the per-batch gradients summed), after
checking that the two agree. Milliseconds, medians of bursts (``benchmarks.timing``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import flexattn_jax as fa
from benchmarks import timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-B", type=int, default=8)
    parser.add_argument("-H", type=int, default=16)
    parser.add_argument("-S", type=int, default=2048)
    parser.add_argument("-D", type=int, default=128)
    parser.add_argument("--cases", nargs="+", default=["noop", "causal"], choices=("noop", "causal"))
    parser.add_argument("--implementation", default="pallas_mosaic", choices=("pallas_mosaic", "pallas_triton"))
    args = parser.parse_args()
    option = {"pallas_mosaic": "mosaic_bwd_kv_batch_loop", "pallas_triton": "bwd_kv_batch_loop"}[args.implementation]
    B, H, S, D = args.B, args.H, args.S, args.D
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, H, S, D), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, H, S, D), jnp.bfloat16) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], (B, H, S, D), jnp.float32)
    print(f"| case | {args.implementation} B={B} H={H} S={S} D={D}: {option} 1 (ms) | 0 (ms) |\n|---|---|---|")
    for case in args.cases:
        block_mask = fa.create_block_mask(fa.causal_mask, None, None, S, S) if case == "causal" else None
        times = []
        grads = []
        for loop in (1, 0):
            options = {option: loop}

            def loss(q, k, v, options=options):
                out = fa.flex_attention(q, k, v, block_mask=block_mask, implementation=args.implementation,
                                        kernel_options=options)
                return jnp.sum(out.astype(jnp.float32) * cotangent)

            gradient = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            grads.append(gradient(q, k, v))
            times.append(timing.time_jax(gradient, [(q, k, v)]))
        for name, a, b in zip("qkv", *grads):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            error = np.linalg.norm(a - b) / np.linalg.norm(b)
            assert error < 1e-2, f"d{name}: loop and broadcast differ by {error:.2e}"
        print(f"| {case} | {times[0]:.3f} | {times[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
