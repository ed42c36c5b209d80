"""What ptxas says of each pallas_mosaic kernel: registers, spills, and its warnings (on a GPU machine).

    python -m benchmarks.ptxas_report [--out DIR]

Compiles the forward (overlapped walk, plain walk, soft-capped causal, head dim 64) and the backward (dQ fused into
the dK/dV kernel, and the separate dQ kernel; causal and soft-capped causal) at small sizes, with Mosaic GPU's dump
switches on, and prints each kernel's ptxas report under the name of the variant that compiled it. A line with
"C7513" means ptxas serialized the kernel's wgmmas (benchmarks/NOTES.md section 12). The PTX of every kernel stays
in DIR.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where the dumps go (default: a temporary directory)")
    parser.add_argument("--only", nargs="+", default=None, help="the variants whose names contain one of these")
    args = parser.parse_args()
    dump = pathlib.Path(args.out or tempfile.mkdtemp(prefix="mosaic_dump_"))
    dump.mkdir(parents=True, exist_ok=True)
    # Read by Mosaic GPU's compiler when each kernel is compiled; set before any is.
    os.environ.update(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=str(dump))

    import jax
    import jax.numpy as jnp

    import flexattn_jax as fa

    B, H, S = 1, 2, 1024
    causal = fa.create_block_mask(fa.causal_mask, None, None, S, S)

    def inputs(head_dim):
        keys = jax.random.split(jax.random.key(0), 3)
        return [jax.random.normal(key, (B, H, S, head_dim), jnp.bfloat16) for key in keys]

    def forward(score_mod=None, block_mask=None, options=None):
        return lambda q, k, v: fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                 implementation="pallas_mosaic", kernel_options=options)

    def gradient(options, score_mod=None):
        attention = forward(score_mod, block_mask=causal, options=options)
        return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))

    variants = [
        ("forward", forward(), 128),  # the overlapped walk, its default here (NOTES.md section 54)
        ("forward plain walk", forward(options={"mosaic_fwd_overlap": 0}), 128),
        ("forward softcap causal", forward(fa.tanh_softcap(30.0), causal), 128),
        # NOTES.md section 74: soft-capping on the overlapped walk (168 registers, no spill)
        ("forward softcap causal overlapped", forward(fa.tanh_softcap(30.0), causal, {"mosaic_fwd_overlap": 1}), 128),
        ("forward D=64", forward(), 64),
        # NOTES.md section 36: ALiBi's index conversion score by score or from float index tiles
        ("forward alibi D=64", forward(fa.generate_alibi_bias(H), options={"mosaic_fwd_float_indices": 0}), 64),
        ("forward alibi float indices D=64",
         forward(fa.generate_alibi_bias(H), options={"mosaic_fwd_float_indices": 1}), 64),
        ("forward alibi float indices", forward(fa.generate_alibi_bias(H), options={"mosaic_fwd_float_indices": 1}),
         128),
        ("backward fused dQ", gradient({"mosaic_bwd_fuse_dq": 1}), 128),
        ("backward dQ kernel", gradient({"mosaic_bwd_fuse_dq": 0}), 128),
        ("backward softcap fused dQ", gradient({"mosaic_bwd_fuse_dq": 1}, fa.tanh_softcap(30.0)), 128),
        ("backward softcap dQ kernel", gradient({"mosaic_bwd_fuse_dq": 0}, fa.tanh_softcap(30.0)), 128),
        # The defaults above follow the score_mod (overlap 2 on the causal mask; with soft-capping overlap 1 without
        # Pallas's barriers, section 73): the others.
        ("backward overlap 0 fused dQ",
         gradient({"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_overlap": 0, "mosaic_bwd_auto_barriers": 1}), 128),
        ("backward overlap 1 fused dQ", gradient({"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_overlap": 1}), 128),
        ("backward overlap 1 softcap fused dQ",
         gradient({"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_overlap": 1}, fa.tanh_softcap(30.0)), 128),
        ("backward overlap 0 softcap fused dQ",
         gradient({"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_overlap": 0, "mosaic_bwd_auto_barriers": 1},
                  fa.tanh_softcap(30.0)), 128),
        ("backward overlap 2 softcap fused dQ",
         gradient({"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_overlap": 2}, fa.tanh_softcap(30.0)), 128),
        ("backward overlap 2 softcap dQ kernel",
         gradient({"mosaic_bwd_fuse_dq": 0, "mosaic_bwd_overlap": 2}, fa.tanh_softcap(30.0)), 128),
    ]
    seen: set[str] = set()
    for name, fn, head_dim in variants:
        if args.only and not any(word in name for word in args.only):
            continue
        jax.block_until_ready(jax.jit(fn)(*inputs(head_dim)))
        reports = sorted(set(p.name for p in dump.glob("*.ptxas")) - seen)
        seen.update(reports)
        for report in reports:
            lines = (dump / report).read_text().splitlines()
            kept = [line for line in lines if "(C7" in line or "registers" in line or "spill" in line]
            print(f"## {name}: {report}")
            print("\n".join(kept) or "(no report)", flush=True)


if __name__ == "__main__":
    main()
