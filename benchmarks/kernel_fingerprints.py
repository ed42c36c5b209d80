"""Fingerprints of the pallas_mosaic kernels as lowered for an H100, on any machine (no GPU needed).

    python -m benchmarks.kernel_fingerprints before.txt      (then change the code)
    python -m benchmarks.kernel_fingerprints after.txt
    diff before.txt after.txt

Lowers the forward and the gradient over a grid of masks, score_mods, head dims and forward options, and writes
one line per case: a hash of the lowered module in which each Mosaic GPU kernel stands as its MLIR printed without
source locations. The kernels' bytecode, which the module embeds, keeps the line of every operation, so moving code
alone would change it. Identical files say a change to the Python left every kernel of the grid as it was: what a
refactor can show without a GPU, so that earlier gpu tests and timings still hold for it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
_OPTIONS = (None, {"mosaic_fwd_overlap": 0}, {"mosaic_fwd_overlap": 1}, {"mosaic_fwd_row_sum_fold": 1},
            {"mosaic_fwd_anchored_shift": 0})


@contextlib.contextmanager
def _capturing_kernels() -> Iterator[list[str]]:
    """Records the MLIR of every Mosaic GPU kernel lowered inside, without locations, as it is serialized."""
    from jax.experimental.mosaic.gpu import core

    kernels: list[str] = []
    serialize = core._run_serde_pass

    def recording(module, **kwargs):
        if kwargs.get("serialize"):
            # The dump name counts the kernels lowered so far in the process: not a property of the kernel.
            kernels.append(re.sub(r'dump_basename = "[^"]*"', "", module.operation.get_asm(enable_debug_info=False)))
        return serialize(module, **kwargs)

    core._run_serde_pass = recording
    try:
        yield kernels
    finally:
        core._run_serde_pass = serialize


def _cases() -> Iterator[tuple[str, int, Callable, Callable | None, dict | None, str]]:
    import flexattn_jax as fa

    mods = [("noop", fa.noop_mask, None), ("causal", fa.causal_mask, None),
            ("softcap", fa.causal_mask, fa.tanh_softcap(30.0)), ("alibi", fa.causal_mask, fa.generate_alibi_bias(4))]
    for head_dim in (64, 128):
        for name, mask_mod, score_mod in mods:
            for options in _OPTIONS:
                yield f"forward {name} D={head_dim} {options}", head_dim, mask_mod, score_mod, options, "forward"
            yield f"gradient {name} D={head_dim}", head_dim, mask_mod, score_mod, None, "gradient"
        yield f"forward max_scores D={head_dim}", head_dim, fa.causal_mask, None, None, "max_scores"


def _lowered_text(head_dim, mask_mod, score_mod, options, kind) -> str:
    import flexattn_jax as fa
    from flexattn_jax.backends import pallas_mosaic

    B, H, L = 1, 4, 384
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (B, H, L, head_dim), jnp.bfloat16) for key in keys)
    block_mask = fa.create_block_mask(mask_mod, B, None, L, L)

    def attention(q, k, v):
        return pallas_mosaic.attention(
            q, k, v, score_mod=score_mod or fa.identity, mask_mod=block_mask.mask_mod,
            kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices,
            full_kv_num_blocks=block_mask.full_kv_num_blocks, full_kv_indices=block_mask.full_kv_indices,
            block_size=block_mask.BLOCK_SIZE, scale=0.125, kernel_options=options,
            with_max_scores=kind == "max_scores")

    fn = attention
    if kind == "gradient":
        fn = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v)[0].astype(jnp.float32)), argnums=(0, 1, 2))
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        return jax.jit(fn).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()


def fingerprints() -> Iterator[str]:
    """One line a case: the hash, then the case."""
    with _capturing_kernels() as kernels:
        for label, *case in _cases():
            kernels.clear()
            text = _lowered_text(*case)
            if not kernels:
                raise RuntimeError(f"{label}: no Mosaic GPU kernel was lowered")
            # The kernels' bytecode and its hash carry source lines: the printed kernels stand in for them.
            text = re.sub(r'(module|kernel_hash) = "[^"]*"', "", text)
            digest = hashlib.sha256("\n".join([text, *kernels]).encode()).hexdigest()[:16]
            yield f"{digest} {label}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the file the fingerprints go to")
    args = parser.parse_args(argv)
    with open(args.out, "w") as out:
        for line in fingerprints():
            print(line, file=out, flush=True)
            print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
