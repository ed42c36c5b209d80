"""flex_attention: validate the arguments, canonicalise them, and choose the implementation."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from flexattn_jax import _validation
from flexattn_jax.backends import pallas_triton, reference
from flexattn_jax.block_mask import BlockMask, noop_mask
from flexattn_jax.mods import identity

__all__ = ["flex_attention", "IMPLEMENTATIONS"]

# Every value `implementation=` accepts; None picks the best one available for the platform and inputs.
IMPLEMENTATIONS = ("reference", "pallas_triton")


def _full_attention_block_mask(q_len: int, kv_len: int) -> BlockMask:
    """A BlockMask visiting every position: one full block covering the whole matrix."""
    one = jnp.ones((1, 1, 1, 1), jnp.bool_)
    return BlockMask.from_block_maps(~one, one, BLOCK_SIZE=(q_len, kv_len), seq_lengths=(q_len, kv_len))


def _choose_implementation(implementation, interpret, query, key, value, block_mask, kernel_options) -> str:
    """The implementation to run, decided from the platform and the inputs alone (never by trying one)."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "reference":
        return "reference"
    on_gpu = jax.default_backend() == "gpu"
    if implementation is None and not (on_gpu or interpret):
        return "reference"
    reason = pallas_triton.unsupported_reason(
        query,
        key,
        value,
        block_size=block_mask.BLOCK_SIZE,
        num_blocks=block_mask.num_blocks,
        kernel_options=kernel_options,
    )
    if implementation is None:
        return "pallas_triton" if reason is None else "reference"
    if reason is not None:
        raise ValueError(f"implementation='pallas_triton' cannot serve these inputs: {reason}")
    if not (on_gpu or interpret):
        raise ValueError(
            f"implementation='pallas_triton' needs a CUDA GPU, but the default backend is {jax.default_backend()!r}; "
            "pass interpret=True to run it in interpret mode on the CPU"
        )
    return "pallas_triton"


def flex_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    implementation: str | None = None,
    interpret: bool = False,
    kernel_options: Mapping[str, Any] | None = None,
):
    """Scaled dot-product attention with a user-defined score_mod and a block-sparse mask.

    Args:
      query: [B, Hq, L, E]; key: [B, Hkv, S, E]; value: [B, Hkv, S, Ev]. float32, bfloat16 or float16, one dtype.
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` applied to each scaled score; None for the
        identity. The indices are int32; h is the query head. It may close over arrays (also traced ones).
      block_mask: a BlockMask from ``create_block_mask``; its ``mask_mod`` decides which positions attend. None
        attends everywhere.
      scale: multiplies q.k before score_mod; defaults to 1 / sqrt(E).
      enable_gqa: allow Hq to be a multiple of Hkv (query head h reads key/value head h // (Hq // Hkv)).
      return_lse: also return the log-sum-exp of the (modified) scores.
      implementation: None for the best available (``"pallas_triton"`` on a GPU, or with ``interpret=True``, when it
        supports the inputs; else ``"reference"``), or one of ``IMPLEMENTATIONS``.
      interpret: run a Pallas implementation in interpret mode (on the CPU).
      kernel_options: kernel tunables (tile sizes, warps, stages); the reference ignores them.

    Returns:
      out [B, Hq, L, Ev] in the query's dtype, and with ``return_lse`` also lse [B, Hq, L] float32 (natural log;
      -inf for a query that attends nowhere, whose output is 0).

    >>> import jax, jax.numpy as jnp, flexattn_jax as fa
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 2, 256, 64))
    >>> mask = fa.create_block_mask(fa.causal_mask, None, None, 256, 256)
    >>> fa.flex_attention(q, k, v, block_mask=mask).shape
    (1, 2, 256, 64)
    """
    _validation.check_qkv(query, key, value, enable_gqa)
    _validation.check_scale(scale)
    if score_mod is None:
        score_mod = identity
    _validation.check_score_mod(score_mod)
    q_len, kv_len = query.shape[2], key.shape[2]
    if block_mask is None:
        block_mask = _full_attention_block_mask(q_len, kv_len)
    else:
        _validation.check_block_mask(block_mask, query, key)
    if kernel_options is not None and not isinstance(kernel_options, Mapping):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])

    implementation = _choose_implementation(implementation, interpret, query, key, value, block_mask, kernel_options)
    mask_mod = block_mask.mask_mod if block_mask.mask_mod is not None else noop_mask
    if implementation == "pallas_triton":
        out, lse = pallas_triton.attention(
            query,
            key,
            value,
            score_mod=score_mod,
            mask_mod=mask_mod,
            kv_num_blocks=block_mask.kv_num_blocks,
            kv_indices=block_mask.kv_indices,
            full_kv_num_blocks=block_mask.full_kv_num_blocks,
            full_kv_indices=block_mask.full_kv_indices,
            q_num_blocks=block_mask.q_num_blocks,
            q_indices=block_mask.q_indices,
            full_q_num_blocks=block_mask.full_q_num_blocks,
            full_q_indices=block_mask.full_q_indices,
            block_size=block_mask.BLOCK_SIZE,
            scale=float(scale),
            kernel_options=kernel_options,
            interpret=interpret,
        )
        return (out, lse) if return_lse else out
    partial_blocks, full_blocks = block_mask.block_maps()
    out, lse = reference.attention(
        query,
        key,
        value,
        score_mod=score_mod,
        mask_mod=mask_mod,
        partial_blocks=partial_blocks,
        full_blocks=full_blocks,
        block_size=block_mask.BLOCK_SIZE,
        scale=float(scale),
    )
    return (out, lse) if return_lse else out
