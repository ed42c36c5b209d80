"""The mod library: mask_mods, score_mods and ways to combine them.

A ``mask_mod(b, h, q_idx, kv_idx) -> bool`` says whether query q_idx may attend to key kv_idx. A
``score_mod(score, b, h, q_idx, kv_idx) -> score`` rewrites the scaled score q.k * scale. The indices are int32.

Every mod here is written with ``jnp`` operations that broadcast, so the same function serves the reference (scalar
indices under ``vmap``) and the kernels (q_idx a [BLOCK_M, 1] tile, kv_idx a [1, BLOCK_N] tile). Factories return
named inner functions so benchmarks and pictures can label them. Mods that close over arrays (document ids, bias
tables, slopes) index them with the indices; the kernels pass such arrays in as inputs.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flexattn_jax import _validation
from flexattn_jax.block_mask import noop_mask

__all__ = [
    "and_masks",
    "or_masks",
    "noop_mask",
    "causal_mask",
    "sliding_window_mask",
    "prefix_lm_mask",
    "document_mask",
    "dilated_mask",
    "identity",
    "compose",
    "causal",
    "rel_bias",
    "rel_causal",
    "generate_alibi_bias",
    "alibi_slopes",
    "alibi_bias",
    "tanh_softcap",
    "relative_position_bias",
]

# ---------------------------------------------------------------------------------------------------- masks


def _check_int_parameter(value, name: str, minimum: int) -> None:
    """value must be an int >= minimum: a Python or NumPy int, or a 0-d integer array, which may be traced (a window
    chosen inside ``jit``) and is then not compared. A float, a bool, None or a string raises here, naming it, rather
    than comparing (or indexing) wrongly later."""
    if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, np.generic):
        if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(f"{name} must be an int, got an array {jnp.dtype(value.dtype).name}{list(value.shape)}")
        if not _validation.is_concrete(value):
            return
    elif not _validation.is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def and_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod allowing a position when every one of ``mask_mods`` allows it (``noop_mask`` if none)."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError("and_masks takes mask_mod callables")
    for mask_mod in mask_mods:
        _validation.check_arity(mask_mod, 4, "each argument of and_masks", "mask_mod(b, h, q_idx, kv_idx)")

    def and_mask(b, h, q_idx, kv_idx):
        result = noop_mask(b, h, q_idx, kv_idx)
        for mask_mod in mask_mods:
            result = result & mask_mod(b, h, q_idx, kv_idx)
        return result

    and_mask.__name__ = "and_" + "_".join(getattr(m, "__name__", "mask") for m in mask_mods)
    and_mask.index_extents = _merged_extents(mask_mods)
    return and_mask


def or_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod allowing a position when any of ``mask_mods`` allows it (allowing nothing if none)."""
    if not all(callable(m) for m in mask_mods):
        raise TypeError("or_masks takes mask_mod callables")
    for mask_mod in mask_mods:
        _validation.check_arity(mask_mod, 4, "each argument of or_masks", "mask_mod(b, h, q_idx, kv_idx)")

    def or_mask(b, h, q_idx, kv_idx):
        result = ~noop_mask(b, h, q_idx, kv_idx)
        for mask_mod in mask_mods:
            result = result | mask_mod(b, h, q_idx, kv_idx)
        return result

    or_mask.__name__ = "or_" + "_".join(getattr(m, "__name__", "mask") for m in mask_mods)
    or_mask.index_extents = _merged_extents(mask_mods)
    return or_mask


def causal_mask(b, h, q_idx, kv_idx):
    """Causal: q_idx >= kv_idx."""
    del b, h
    return q_idx >= kv_idx


def sliding_window_mask(window_size: int, causal: bool = True) -> Callable:
    """Sliding window: 0 <= q_idx - kv_idx < window_size (causal), or |q_idx - kv_idx| < window_size."""
    _check_int_parameter(window_size, "window_size", 1)

    def sliding_window(b, h, q_idx, kv_idx):
        del b, h
        distance = q_idx - kv_idx
        if causal:
            return (distance >= 0) & (distance < window_size)
        return jnp.abs(distance) < window_size

    sliding_window.__name__ = f"sliding_window_{window_size}"
    return sliding_window


def prefix_lm_mask(prefix_length: int) -> Callable:
    """Prefix LM: kv_idx < prefix_length (bidirectional prefix) or q_idx >= kv_idx (causal after it)."""
    _check_int_parameter(prefix_length, "prefix_length", 0)

    def prefix_lm(b, h, q_idx, kv_idx):
        del b, h
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)

    prefix_lm.__name__ = f"prefix_lm_{prefix_length}"
    return prefix_lm


def document_mask(document_ids: jax.Array, kv_document_ids: jax.Array | None = None) -> Callable:
    """Document (segment) masking for packed sequences: ids[q_idx] == kv_ids[kv_idx].

    Args:
      document_ids: int [Q_LEN] (shared by the batch) or [B, Q_LEN], the document each query belongs to.
      kv_document_ids: the same for the keys when they differ from the queries (L != S); defaults to document_ids.

    Combine with ``causal_mask`` through ``and_masks`` for causal attention within each document.
    """
    q_ids = jnp.asarray(document_ids)
    kv_ids = q_ids if kv_document_ids is None else jnp.asarray(kv_document_ids)
    for name, ids in (("document_ids", q_ids), ("kv_document_ids", kv_ids)):
        if ids.ndim not in (1, 2) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array [LEN] or [B, LEN], got {ids.dtype}{list(ids.shape)}")
    if q_ids.ndim != kv_ids.ndim:
        raise ValueError(f"document_ids and kv_document_ids must both be 1-D or both 2-D, got {q_ids.shape} and {kv_ids.shape}")

    def document(b, h, q_idx, kv_idx):
        del h
        if q_ids.ndim == 1:
            return q_ids[q_idx] == kv_ids[kv_idx]
        return q_ids[b, q_idx] == kv_ids[b, kv_idx]

    document.index_extents = {
        "q": (q_ids.shape[-1], f"document ids {list(q_ids.shape)}"),
        "kv": (kv_ids.shape[-1], f"document ids {list(kv_ids.shape)}"),
    }
    if q_ids.ndim == 2:
        document.index_extents["batch"] = (min(q_ids.shape[0], kv_ids.shape[0]), f"document ids {list(q_ids.shape)}")
    return document


def dilated_mask(dilation: int) -> Callable:
    """Dilated (strided) attention: (q_idx - kv_idx) % dilation == 0, i.e. every dilation-th key."""
    _check_int_parameter(dilation, "dilation", 1)

    def dilated(b, h, q_idx, kv_idx):
        del b, h
        return (q_idx - kv_idx) % dilation == 0

    dilated.__name__ = f"dilated_{dilation}"
    return dilated


# ----------------------------------------------------------------------------------------------- score mods


def identity(score, b, h, q_idx, kv_idx):
    """The identity score_mod: score."""
    del b, h, q_idx, kv_idx
    return score


def compose(*score_mods: Callable) -> Callable:
    """Composes score_mods right to left: ``compose(f, g)(s, ...) == f(g(s, ...), ...)``."""
    if not score_mods:
        return identity
    if not all(callable(f) for f in score_mods):
        raise TypeError("compose takes score_mod callables")
    for score_mod in score_mods:
        _validation.check_arity(score_mod, 5, "each argument of compose", "score_mod(score, b, h, q_idx, kv_idx)")

    def compose2(f, g):
        def composed(score, b, h, q_idx, kv_idx):
            return f(g(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)

        composed.__name__ = f"{getattr(f, '__name__', 'f')}_of_{getattr(g, '__name__', 'g')}"
        return composed

    if len(score_mods) == 1:
        return score_mods[0]
    composed = functools.reduce(compose2, score_mods)
    composed.index_extents = _merged_extents(score_mods)
    return composed


def _merged_extents(mods) -> dict:
    """The tightest of the mods' ``index_extents`` on each axis (see ``_validation.check_extents``)."""
    merged = {}
    for mod in mods:
        for axis, (extent, what) in (getattr(mod, "index_extents", None) or {}).items():
            if axis not in merged or extent < merged[axis][0]:
                merged[axis] = (extent, what)
    return merged


def causal(score, b, h, q_idx, kv_idx):
    """Causal as a score_mod: score where q_idx >= kv_idx, else -inf. (A causal BlockMask is faster.)"""
    del b, h
    return jnp.where(q_idx >= kv_idx, score, -jnp.inf)


def rel_bias(score, b, h, q_idx, kv_idx):
    """Relative-position bias: score + (q_idx - kv_idx)."""
    del b, h
    return score + (q_idx - kv_idx).astype(score.dtype)


def rel_causal(score, b, h, q_idx, kv_idx):
    """Causal with relative-position bias: score + (q_idx - kv_idx) where q_idx >= kv_idx, else -inf."""
    del b, h
    return jnp.where(q_idx >= kv_idx, score + (q_idx - kv_idx).astype(score.dtype), -jnp.inf)


def generate_alibi_bias(num_heads: int) -> Callable:
    """ALiBi: score + slope_h * (kv_idx - q_idx), slope_h = 2^(-8 (h + 1) / num_heads), as PyTorch's flex-attention
    module and attention-gym define it.

    The slopes are computed from h, so nothing is captured. For a power-of-two num_heads they are those of Press et
    al., "Train Short, Test Long" (2022); for other head counts the paper interleaves two geometric sequences
    instead: give such slopes to ``alibi_bias``.
    """
    num_heads = _validation.check_positive_int(num_heads, "num_heads")

    def alibi(score, b, h, q_idx, kv_idx):
        del b
        slope = jnp.exp2(-(h + 1).astype(jnp.float32) * (8.0 / num_heads))
        return score + (slope * (kv_idx - q_idx).astype(jnp.float32)).astype(score.dtype)

    return alibi


def alibi_slopes(num_heads: int) -> jax.Array:
    """``generate_alibi_bias``'s slopes as a float32 array [num_heads]: 2^(-8 (h + 1) / num_heads) (the paper's
    for a power-of-two num_heads)."""
    num_heads = _validation.check_positive_int(num_heads, "num_heads")
    return jnp.exp2(-(jnp.arange(num_heads, dtype=jnp.float32) + 1.0) * (8.0 / num_heads))


def alibi_bias(slopes: jax.Array) -> Callable:
    """ALiBi with given (e.g. learned) slopes [H]: score + slopes[h] * (kv_idx - q_idx). Differentiable in slopes."""
    slopes = jnp.asarray(slopes)
    if slopes.ndim != 1:
        raise ValueError(f"slopes must be [num_heads], got shape {slopes.shape}")
    if slopes.shape[0] == 0:
        raise ValueError("slopes must hold one slope per head, got an empty array")

    def alibi(score, b, h, q_idx, kv_idx):
        del b
        return score + slopes[h].astype(score.dtype) * (kv_idx - q_idx).astype(score.dtype)

    alibi.index_extents = {"head": (slopes.shape[0], f"slopes {list(slopes.shape)}")}
    return alibi


def tanh_softcap(cap: float) -> Callable:
    """Soft-capping: cap * tanh(score / cap), bounding scores to (-cap, cap) (as in Gemma 2)."""
    # A cap of inf or NaN turns every score NaN (inf * tanh(s / inf) is inf * 0).
    if not _validation.is_real(cap):
        raise TypeError(f"cap must be a positive finite number, got {type(cap).__name__} {cap!r}")
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"cap must be a positive finite number, got {cap}")

    def softcap(score, b, h, q_idx, kv_idx):
        del b, h, q_idx, kv_idx
        return cap * jnp.tanh(score / cap)

    softcap.__name__ = f"softcap_{cap:g}"
    return softcap


def relative_position_bias(table: jax.Array) -> Callable:
    """A learned relative-position bias: score + table[h, clip(q_idx - kv_idx, -D, D) + D].

    Args:
      table: [num_heads, 2 D + 1] float; column D + d holds the bias of a query d positions after its key.
        Distances beyond D share the end columns. Differentiable in table.
    """
    table = jnp.asarray(table)
    if table.ndim != 2 or table.shape[1] % 2 != 1:
        raise ValueError(f"table must be [num_heads, 2 * max_distance + 1], got shape {table.shape}")
    max_distance = table.shape[1] // 2

    def relative_bias(score, b, h, q_idx, kv_idx):
        del b
        column = jnp.clip(q_idx - kv_idx, -max_distance, max_distance) + max_distance
        return score + table[h, column].astype(score.dtype)

    relative_bias.index_extents = {"head": (table.shape[0], f"a bias table {list(table.shape)}")}
    return relative_bias
