"""dot_product_attention: ``jax.nn.dot_product_attention``'s signature and layout, run by ``flex_attention``.

A model written against ``jax.nn.dot_product_attention`` (inputs [B, T, N, H], a bias, a boolean mask, causal, a
local window, per-batch lengths) swaps in this function and gets the block-sparse kernels: its masks become one
BlockMask, so blocks they rule out are skipped, and its bias becomes a score_mod.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from flexattn_jax import _validation, api
from flexattn_jax.block_mask import DEFAULT_BLOCK_SIZE, create_block_mask

__all__ = ["dot_product_attention"]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    interpret: bool = False,
    kernel_options: Mapping[str, Any] | None = None,
):
    """Scaled dot-product attention as ``jax.nn.dot_product_attention`` takes it, run by ``flex_attention``.

    Args:
      query: [B, T, N, H], or [T, N, H] without a batch axis.
      key, value: [B, S, K, H] ([S, K, H]); N a multiple of K (grouped-query attention when they differ).
      bias: added to the scaled scores; 4-D and broadcastable to [B, N, T, S] ([N, T, S] without a batch axis).
        Differentiable. Read at a computed index, so ``pallas_mosaic`` hands it to ``pallas_triton``.
      mask: boolean, True where a score takes part; shaped as bias.
      scale: multiplies q.k; None is 1 / sqrt(H).
      is_causal: query t attends keys s <= t (aligned at the first position, as jax.nn's when T != S).
      query_seq_lengths, key_value_seq_lengths: int [B]: queries at or past the first are padding (their output is
        0), keys at or past the second are never attended.
      local_window_size: (left, right), or one int for both: query t attends keys from t - left to t + right.
      implementation: None for the best available, ``"xla"`` (jax.nn's name for the dense one: our
        ``"reference"``), or one of ``flexattn_jax.IMPLEMENTATIONS``.
      return_residual: also return the log-sum-exp of each query's scores, [B, T, N] ([T, N]), float32.
      interpret, kernel_options: as ``flex_attention``'s.

    Returns:
      The output, shaped as query, and with ``return_residual`` the log-sum-exp.

    One difference from jax.nn: a query that no key may attend (all masked, outside its window) gets output 0 and
    a log-sum-exp of -inf, as everywhere in this library, where jax.nn averages the values it masked.
    """
    _validation.check_flags(is_causal=is_causal, return_residual=return_residual)
    arrays = {"query": query, "key": key, "value": value}
    for name, x in arrays.items():
        if not hasattr(x, "shape") or not hasattr(x, "ndim"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    batched = query.ndim == 4
    if query.ndim not in (3, 4) or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            "query, key and value must be [B, T, N, H], [B, S, K, H] and [B, S, K, H] (or all three without B), got "
            f"shapes {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if not batched:
        query, key, value = query[None], key[None], value[None]
    b, t, n, _ = query.shape
    s = key.shape[1]
    layout = "[B, N, T, S]" if batched else "[N, T, S]"
    bias = _broadcastable(bias, "bias", layout, (b, n, t, s), batched, boolean=False)
    mask = _broadcastable(mask, "mask", layout, (b, n, t, s), batched, boolean=True)
    q_lengths = _lengths(query_seq_lengths, "query_seq_lengths", b, batched)
    kv_lengths = _lengths(key_value_seq_lengths, "key_value_seq_lengths", b, batched)
    window = _window(local_window_size)
    if implementation == "cudnn":
        raise ValueError(
            "implementation='cudnn' is jax.nn.dot_product_attention's; here implementation is None, 'xla' (the dense "
            f"reference) or one of {api.IMPLEMENTATIONS}"
        )
    implementation = "reference" if implementation == "xla" else implementation

    # [B, T, N, H] -> [B, N, T, H], the layout of flex_attention.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
    block_mask = _block_mask(mask, is_causal, window, q_lengths, kv_lengths, (b, n, t, s))
    score_mod = None if bias is None else _bias_score_mod(bias)
    out, lse = api.flex_attention(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=n != k.shape[1],
        return_lse=True, implementation=implementation, interpret=interpret, kernel_options=kernel_options,
    )
    out = jnp.swapaxes(out, 1, 2)
    lse = jnp.swapaxes(lse, 1, 2)
    if not batched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out


def _broadcastable(x, name: str, layout: str, full: tuple[int, int, int, int], batched: bool, boolean: bool):
    """x as a 4-D array broadcastable to ``full`` [B, N, T, S], or None."""
    if x is None:
        return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    x = jnp.asarray(x)
    if x.ndim != (4 if batched else 3):
        raise ValueError(f"{name} must have rank {4 if batched else 3}, broadcastable to {layout}, got {tuple(x.shape)}")
    if not batched:
        x = x[None]
    if any(d not in (1, f) for d, f in zip(x.shape, full)):
        raise ValueError(f"{name} must be broadcastable to {layout} = {full if batched else full[1:]}, got {tuple(x.shape if batched else x.shape[1:])}")
    if boolean and x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be boolean (True where a score takes part; an additive mask is a bias), got {x.dtype}")
    if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got {x.dtype}")
    return x


def _lengths(lengths, name: str, b: int, batched: bool):
    if lengths is None:
        return None
    if not batched:
        raise ValueError(f"{name} needs a batch axis: query, key and value [B, T, N, H]")
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array [B={b}], got {lengths.dtype}{list(lengths.shape)}")
    return lengths.astype(jnp.int32)


def _window(local_window_size):
    if local_window_size is None:
        return None
    if _validation.is_int(local_window_size):
        local_window_size = (local_window_size, local_window_size)
    if (
        not isinstance(local_window_size, (tuple, list))
        or len(local_window_size) != 2
        or not all(_validation.is_int(w) and w >= 0 for w in local_window_size)
    ):
        raise ValueError(
            f"local_window_size must be a non-negative int or a (left, right) pair of them, got {local_window_size!r}"
        )
    return int(local_window_size[0]), int(local_window_size[1])


def _at(x: jax.Array, b, h, q_idx, kv_idx):
    """x [B|1, N|1, T|1, S|1] read at the indices, an axis of one read at 0 (broadcast)."""
    indices = [i if size > 1 else jnp.zeros_like(i) for i, size in zip((b, h, q_idx, kv_idx), x.shape)]
    return x[tuple(indices)]


def _block_mask(mask, is_causal, window, q_lengths, kv_lengths, sizes):
    """The BlockMask of every mask argument together, or None where there is none."""
    if mask is None and not is_causal and window is None and q_lengths is None and kv_lengths is None:
        return None
    b, n, t, s = sizes

    def allowed(batch, head, q_idx, kv_idx):
        keep = jnp.ones_like(q_idx, dtype=jnp.bool_)
        if mask is not None:
            keep &= _at(mask, batch, head, q_idx, kv_idx)
        if is_causal:
            keep &= kv_idx <= q_idx
        if window is not None:
            keep &= (kv_idx >= q_idx - window[0]) & (kv_idx <= q_idx + window[1])
        if q_lengths is not None:
            keep &= q_idx < q_lengths[batch]
        if kv_lengths is not None:
            keep &= kv_idx < kv_lengths[batch]
        return keep

    per_batch = q_lengths is not None or kv_lengths is not None or (mask is not None and mask.shape[0] > 1)
    per_head = mask is not None and mask.shape[1] > 1
    return create_block_mask(
        allowed, b if per_batch else None, n if per_head else None, t, s, BLOCK_SIZE=DEFAULT_BLOCK_SIZE
    )


def _bias_score_mod(bias: jax.Array):
    def add_bias(score, b, h, q_idx, kv_idx):
        return score + _at(bias, b, h, q_idx, kv_idx).astype(jnp.float32)

    return add_bias
