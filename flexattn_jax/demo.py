"""The README's demo: the library's masks as block maps, flex_attention with each, checked against the reference.

    python -m flexattn_jax.demo [--length 1024] [--heads 4] [--head-dim 64]

Runs on whatever JAX finds: the Pallas kernels on a GPU, the dense reference on a CPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import flexattn_jax as fa


def _variants(length: int, heads: int):
    """(name, mask_mod or None, score_mod or None) for each mod of the library."""
    documents = np.repeat(np.arange(7), np.diff(np.linspace(0, length, 8).astype(int)))
    return [
        ("full (noop)", None, None),
        ("causal", fa.causal_mask, None),
        ("sliding window 256", fa.sliding_window_mask(256), None),
        ("prefix LM (L/4)", fa.prefix_lm_mask(length // 4), None),
        ("document (7 docs), causal", fa.and_masks(fa.causal_mask, fa.document_mask(jnp.asarray(documents))), None),
        ("dilated 4, causal", fa.and_masks(fa.causal_mask, fa.dilated_mask(4)), None),
        ("ALiBi", None, fa.generate_alibi_bias(heads)),
        ("softcap 30, causal", fa.causal_mask, fa.tanh_softcap(30.0)),
        ("relative bias table", None, fa.relative_position_bias(0.1 * jnp.ones((heads, 33)))),
    ]


def _time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args(argv)

    length, heads = args.length, args.heads
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, heads, length, args.head_dim), jnp.float32) for key in keys)
    print(f"flexattn_jax {fa.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          f"B=1, H={heads}, L=S={length}, D={args.head_dim}, float32\n")

    rows = []
    for name, mask_mod, score_mod in _variants(length, heads):
        block_mask = None
        if mask_mod is not None:
            block_mask = fa.create_block_mask(mask_mod, None, None, length, length, BLOCK_SIZE=args.block_size)
            print(f"{name}:\n{block_mask.to_string(grid_size=16, limit=1)}\n")
        best = jax.jit(lambda q, k, v: fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask))
        ref = jax.jit(
            lambda q, k, v: fa.flex_attention(
                q, k, v, score_mod=score_mod, block_mask=block_mask, implementation="reference"
            )
        )
        out, expected = best(q, k, v), ref(q, k, v)
        error = float(jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected))
        sparsity = block_mask.sparsity() if block_mask is not None else 0.0
        rows.append((name, sparsity, error, _time(best, q, k, v), _time(ref, q, k, v)))

    header = f"{'variant':<28} {'blocks skipped':>14} {'rel. error':>11} {'default ms':>11} {'reference ms':>13}"
    print(header)
    print("-" * len(header))
    for name, sparsity, error, best_ms, ref_ms in rows:
        print(f"{name:<28} {sparsity:>13.1f}% {error:>11.1e} {best_ms:>11.2f} {ref_ms:>13.2f}")
    worst = max(row[2] for row in rows)
    print(f"\nlargest relative error against the reference: {worst:.1e} ({'ok' if worst < 2e-5 else 'TOO LARGE'})")


if __name__ == "__main__":
    main()
