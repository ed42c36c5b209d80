"""How far soft-capping's output moves when its tanh is computed in float16 (NOTES.md section 40), on the CPU.

    python -m benchmarks.tanh_precision [-D 64] [-L 1024] [--cap 30]

Causal soft-capped attention on bfloat16 inputs, P rounded to bfloat16 before it multiplies V as the kernels do.
Prints the output's relative error against float64 for: tanh exact in float32; tanh within tanh.approx.f32's error
bound (2^-10.99, what the Mosaic forward computes now); the argument and result rounded to float16 with
tanh.approx.f16x2's bound (2^-10.7, ``mosaic_fwd_tanh_f16``); and, for scale, the rounding of the exact output to
bfloat16. The approximations' errors are drawn uniformly within their bounds, a pessimistic stand-in for the
instructions' own.
"""

from __future__ import annotations

import argparse

import numpy as np


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest bfloat16 (ties to even), held in float32."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-D", type=int, default=64)
    parser.add_argument("-L", type=int, default=1024)
    parser.add_argument("-H", type=int, default=4)
    parser.add_argument("--cap", type=float, default=30.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q, k, v = (to_bfloat16(rng.standard_normal((args.H, args.L, args.D))) for _ in range(3))
    scores = np.einsum("hqd,hkd->hqk", q, k) / np.sqrt(args.D)
    causal = np.tril(np.ones((args.L, args.L), bool))

    def attention(t):
        logits = np.where(causal, args.cap * t, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return np.einsum("hqk,hkd->hqd", to_bfloat16(p / p.sum(-1, keepdims=True)), v)

    def within(t, bound):
        return t * (1 + rng.uniform(-1, 1, t.shape) * bound)

    x = scores / args.cap
    reference = attention(np.tanh(x.astype(np.float64)))
    half = np.tanh(x.astype(np.float16).astype(np.float32)).astype(np.float16).astype(np.float32)
    cases = {
        "tanh in float32": attention(np.tanh(x).astype(np.float32)),
        "tanh.approx.f32's bound": attention(within(np.tanh(x).astype(np.float32), 2**-10.99)),
        "float16 with tanh.approx.f16x2's bound": attention(within(half, 2**-10.7)),
        "the exact output rounded to bfloat16": to_bfloat16(reference),
    }
    print(f"| tanh (D={args.D}, L={args.L}, cap {args.cap}) | output's relative error |\n|---|---|")
    for name, out in cases.items():
        print(f"| {name} | {np.linalg.norm(out - reference) / np.linalg.norm(reference):.2e} |")


if __name__ == "__main__":
    main()
