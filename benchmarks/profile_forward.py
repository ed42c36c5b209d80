"""A few calls of one case (forward, or forward and backward), ours and PyTorch's, for a profiler (NOTES.md §27).

    ncu --clock-control none --kernel-name regex:'flex_attention_forward|triton_tem' -o prof \
        python3 -m benchmarks.profile_forward --case noop -D 64

B=2, H=16, S=8192, bf16, the cases of ``benchmarks.cases``; ours is ``--implementation``'s, PyTorch's is
FlexAttention's or SDPA's (``--torch``). Each implementation is compiled and run once (the warm-up), then
``--calls`` more times; nothing is timed here: the profiler reads the kernels' launches
(registers, shared memory, occupancy), their instruction mix and their SASS.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks import jax_impls
from benchmarks.cases import CASES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="noop", choices=sorted(CASES))
    parser.add_argument("-D", type=int, default=64)
    parser.add_argument("-B", type=int, default=2)
    parser.add_argument("-S", type=int, default=8192)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--implementation", default="pallas_triton")
    parser.add_argument("--torch", choices=("flex", "sdpa", "none"), default="flex",
                        help="PyTorch's kernel to run beside ours: FlexAttention, SDPA (noop and causal), or none")
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd",
                        help="fwdbwd: the forward and the gradients w.r.t. q, k, v, so the backward's kernels run too")
    parser.add_argument("--kernel-options", type=json.loads, default=None,
                        help='kernel_options for ours, as JSON: \'{"mosaic_bwd_fuse_dq": 1}\'')
    args = parser.parse_args()
    B, H, S, D = args.B, 16, args.S, args.D
    case = CASES[args.case]
    q, k, v = (jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 3))
    forward = jax_impls.flexattn(case, args.implementation, B, H, S, S, kernel_options=args.kernel_options)
    ours = forward
    if args.mode == "fwdbwd":
        cotangent = jax.random.normal(jax.random.key(1), (B, H, S, D), jnp.bfloat16)
        gradients = jax_impls.forward_backward(forward)
        ours = lambda q, k, v: gradients(q, k, v, cotangent)  # noqa: E731
    for _ in range(1 + args.calls):
        jax.block_until_ready(ours(q, k, v))
    print(f"ran {args.implementation} {args.case} D={D} {args.mode} {1 + args.calls} times", flush=True)
    if args.torch == "none":
        return
    import torch

    from benchmarks import torch_impls

    qt, kt, vt = (torch_impls.from_jax(x) for x in (q, k, v))
    theirs = torch_impls.flex(case, B, H, S, S) if args.torch == "flex" else torch_impls.sdpa(case)
    if theirs is None:
        raise SystemExit(f"torch {args.torch} cannot run {args.case}")
    if args.mode == "fwdbwd":
        qt, kt, vt = (x.detach().requires_grad_() for x in (qt, kt, vt))
        dot = torch_impls.from_jax(cotangent.astype(q.dtype))
    for _ in range(1 + args.calls):
        out = theirs(qt, kt, vt)
        if args.mode == "fwdbwd":
            out.backward(dot)
    torch.cuda.synchronize()
    print(f"ran torch {args.torch} {args.case} D={D} {args.mode} {1 + args.calls} times", flush=True)


if __name__ == "__main__":
    main()
