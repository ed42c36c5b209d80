"""flex attention as Pallas kernels with the Triton lowering (any CUDA GPU from Ampere on; interpret mode on CPU).

The API calls ``attention`` with plain arrays (the BlockMask already unpacked) and static configuration, after
asking ``unsupported_reason`` whether these inputs can be served.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from flexattn_jax.backends.pallas_triton import backward as _backward
from flexattn_jax.backends.pallas_triton import config as _config
from flexattn_jax.backends.pallas_triton import decode as _decode
from flexattn_jax.backends.pallas_triton import vjp as _vjp

__all__ = ["attention", "check_kernel_options", "unsupported_reason", "uses_decode_kernel", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256


def check_kernel_options(kernel_options: Mapping[str, Any] | None) -> None:
    """Checks every key of ``kernel_options`` these kernels read (forward, backward, decode); raises ValueError or
    TypeError naming the key. Keys of other backends (``mosaic_*``) are left to them."""
    _config.check_kernel_options(kernel_options)
    _backward.check_backward_options(kernel_options)
    _decode.check_decode_options(kernel_options)


def unsupported_reason(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    block_size: tuple[int, int],
    num_blocks: tuple[int, int],
    kernel_options: Mapping[str, Any] | None,
) -> str | None:
    """None when ``attention`` serves these inputs; otherwise what is unsupported and what is.

    Invalid ``kernel_options`` raise here (ValueError/TypeError), as they would for any implementation choice.
    """
    _config.check_kernel_options(kernel_options)
    for name, dim in (("query/key head dim E", query.shape[-1]), ("value head dim Ev", value.shape[-1])):
        if dim > MAX_HEAD_DIM:
            return f"pallas_triton supports head dims up to {MAX_HEAD_DIM}, got {name}={dim}"
    return _config.forward_tiles_unsupported_reason(
        kernel_options,
        q_len=query.shape[2],
        kv_len=key.shape[2],
        mask_block_size=tuple(block_size),
        mask_num_blocks=tuple(num_blocks),
    )


def uses_decode_kernel(query, key, *, block_size, num_blocks, kernel_options) -> bool:
    """Whether ``attention`` runs these inputs on the split-KV decode kernel (short queries)."""
    reason = _decode.unsupported_reason(
        query.shape,
        key.shape,
        mask_block_size=tuple(block_size),
        mask_num_blocks=tuple(num_blocks),
        kernel_options=kernel_options,
    )
    return reason is None


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    score_mod: Callable,
    mask_mod: Callable,
    kv_num_blocks: jax.Array,
    kv_indices: jax.Array,
    full_kv_num_blocks: jax.Array | None,
    full_kv_indices: jax.Array | None,
    q_num_blocks: jax.Array | None = None,
    q_indices: jax.Array | None = None,
    full_q_num_blocks: jax.Array | None = None,
    full_q_indices: jax.Array | None = None,
    block_size: tuple[int, int],
    scale: float,
    kernel_options: Mapping[str, Any] | None = None,
    interpret: bool = False,
    with_max_scores: bool = False,
) -> tuple[jax.Array, ...]:
    """flex attention: out [B, Hq, L, Ev] in the query's dtype and lse [B, Hq, L] float32, differentiable; with
    ``with_max_scores`` also each query's maximum modified score [B, Hq, L] float32 (no gradient).

    Arguments as ``flexattn_jax.backends.reference.attention``, with the BlockMask given as its index arrays
    (``kv_num_blocks`` [Bm, Hm, QB], ``kv_indices`` [Bm, Hm, QB, KVB], the full pair or None, and the q-side
    arrays the backward walks, derived from the kv-side ones when None) and its ``block_size``.
    Key and value may have batch size 1, shared by every query batch: the forward kernels read the one copy (the
    backward takes one per batch). Raises ValueError when ``unsupported_reason`` is not None.
    """
    reason = unsupported_reason(
        query,
        key,
        value,
        block_size=block_size,
        num_blocks=tuple(kv_indices.shape[-2:]),
        kernel_options=kernel_options,
    )
    if reason is not None:
        raise ValueError(reason)
    implementation = _vjp.attention
    if uses_decode_kernel(query, key, block_size=block_size, num_blocks=kv_indices.shape[-2:], kernel_options=kernel_options):
        # Short queries (decoding): the split-KV kernel; see decode.py.
        implementation = _decode.attention
    return implementation(
        query,
        key,
        value,
        score_mod=score_mod,
        mask_mod=mask_mod,
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num_blocks,
        full_kv_indices=full_kv_indices,
        q_num_blocks=q_num_blocks,
        q_indices=q_indices,
        full_q_num_blocks=full_q_num_blocks,
        full_q_indices=full_q_indices,
        block_size=block_size,
        scale=scale,
        kernel_options=kernel_options,
        interpret=interpret,
        with_max_scores=with_max_scores,
    )
