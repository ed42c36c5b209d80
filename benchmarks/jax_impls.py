"""JAX implementations under test: flexattn_jax's, and jax.nn.dot_product_attention (cuDNN, XLA) where it can
express the case. Every builder returns a jitted ``forward(q, k, v)`` on [B, H, L, D] arrays, or None when the
implementation cannot run the case."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import flexattn_jax as fa
from benchmarks.cases import SLIDING_WINDOW, Case

# A dense mask or bias array of more elements than this is not built (it would dominate memory and time).
MAX_DENSE_ELEMENTS = 1 << 31


def flexattn(case: Case, implementation: str, B: int, H: int, L: int, S: int, block_size: int = 128,
             kernel_options=None):
    mask_mod, score_mod, by_head = case.mods(B, H, L, S)
    block_mask = None
    if mask_mod is not None:
        block_mask = fa.create_block_mask(mask_mod, None, H if by_head else None, L, S, BLOCK_SIZE=block_size)

    def forward(q, k, v):
        return fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, implementation=implementation,
                                 kernel_options=kernel_options)

    return jax.jit(forward)


def dot_product_attention(case: Case, implementation: str, B: int, H: int, L: int, S: int):
    """jax.nn.dot_product_attention (layout [B, L, H, D]) wrapped to our [B, H, L, D] layout."""
    kind = case.dense_kind
    if kind is None:
        return None
    mask = bias = None
    kwargs = {}
    if kind == "causal":
        kwargs["is_causal"] = True
    elif kind == "window":
        kwargs.update(is_causal=True, local_window_size=(SLIDING_WINDOW - 1, 0))
    elif kind in ("dense", "bias"):
        if B * H * L * S > MAX_DENSE_ELEMENTS:
            return None
        mask_mod, score_mod, by_head = case.mods(B, H, L, S)
        if kind == "dense":
            mask = fa.create_mask(mask_mod, None, H if by_head else None, L, S)
        else:
            q_idx = jnp.arange(L, dtype=jnp.int32)[:, None]
            kv_idx = jnp.arange(S, dtype=jnp.int32)[None, :]
            bias = jnp.stack(
                [score_mod(jnp.zeros((L, S), jnp.float32), jnp.int32(0), jnp.int32(h), q_idx, kv_idx) for h in range(H)]
            )[None].astype(jnp.bfloat16)

    # The mask or bias is an argument, not a constant baked into the compiled program (gigabytes at 8K tokens).
    @jax.jit
    def attend(q, k, v, mask, bias):
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=implementation, **kwargs)
        return jnp.swapaxes(out, 1, 2)

    return lambda q, k, v: attend(q, k, v, mask, bias)


def forward_backward(forward):
    """A jitted function computing the forward and the gradients w.r.t. q, k, v for a given output cotangent.

    The cotangent comes in the output's dtype, as torch's ``out.backward(do)`` takes it in ``benchmarks.run``: a
    float32 one (the runs before the thirty-second session) would add its conversion, a pass over a float32 array
    of the output's size, to our time and not to torch's."""

    def gradients(q, k, v, cotangent):
        _, pullback = jax.vjp(forward, q, k, v)
        return pullback(cotangent)

    return jax.jit(gradients)
