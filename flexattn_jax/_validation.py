"""Argument checks shared by the API and the layers. Everything here runs on shapes, before any tracing of kernels."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _describe(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def check_qkv(query, key, value, enable_gqa: bool) -> None:
    """Checks ranks, dtypes, batch sizes, head counts and head dims of query [B, Hq, L, E], key [B, Hkv, S, E],
    value [B, Hkv, S, Ev]."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            layout = {"query": "[B, Hq, L, E]", "key": "[B, Hkv, S, E]", "value": "[B, Hkv, S, Ev]"}[name]
            raise ValueError(f"{name} must have rank 4, {layout}, got shape {tuple(x.shape)}")
        if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {jnp.dtype(x.dtype).name}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must have one dtype, got {jnp.dtype(query.dtype).name}, "
            f"{jnp.dtype(key.dtype).name} and {jnp.dtype(value.dtype).name}"
        )
    b, hq, _, e = query.shape
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(
            f"query, key and value must have the same batch size, got {b}, {key.shape[0]} and {value.shape[0]}"
        )
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same number of heads, got {key.shape[1]} and {value.shape[1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(
            f"key and value must have the same sequence length, got key {_describe(key)} and value {_describe(value)}"
        )
    if key.shape[3] != e:
        raise ValueError(f"query and key must have the same head dim E, got query E={e} and key E={key.shape[3]}")
    hkv = key.shape[1]
    if hq != hkv:
        if not enable_gqa:
            raise ValueError(
                f"query has Hq={hq} heads but key/value have Hkv={hkv}; pass enable_gqa=True for grouped-query "
                "attention"
            )
        if hq % hkv != 0:
            raise ValueError(f"with enable_gqa=True, Hq ({hq}) must be a multiple of Hkv ({hkv})")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if 0 in x.shape:
            raise ValueError(f"{name} must not have an empty axis, got shape {tuple(x.shape)}")


def check_score_mod(score_mod: Callable) -> None:
    """score_mod(score, b, h, q_idx, kv_idx) must return a floating scalar for scalar float32/int32 arguments."""
    if not callable(score_mod):
        raise TypeError(f"score_mod must be a callable score_mod(score, b, h, q_idx, kv_idx), got {score_mod!r}")
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    out = jax.eval_shape(score_mod, f32, i32, i32, i32, i32)
    if (
        not isinstance(out, jax.ShapeDtypeStruct)
        or out.shape != ()
        or not jnp.issubdtype(out.dtype, jnp.floating)
    ):
        got = f"{jnp.dtype(out.dtype).name}{list(out.shape)}" if isinstance(out, jax.ShapeDtypeStruct) else repr(out)
        raise TypeError(f"score_mod must return a floating scalar score for a scalar float32 score, got {got}")


def check_block_mask(block_mask, query, key) -> None:
    """The BlockMask must be built for these lengths and broadcast over this batch and these query heads."""
    from flexattn_jax.block_mask import BlockMask, check_mask_mod

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask (see create_block_mask), got {type(block_mask).__name__}")
    check_mask_mod(block_mask.mask_mod, "block_mask.mask_mod")
    b, hq, q_len, _ = query.shape
    kv_len = key.shape[2]
    if tuple(block_mask.seq_lengths) != (q_len, kv_len):
        raise ValueError(
            f"block_mask was built for (Q_LEN, KV_LEN) = {tuple(block_mask.seq_lengths)} but query and key have "
            f"L={q_len}, S={kv_len}; build it with create_block_mask(..., Q_LEN={q_len}, KV_LEN={kv_len})"
        )
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    if mb not in (1, b):
        raise ValueError(f"block_mask has batch size {mb}; expected 1 or the query's batch size {b}")
    if mh not in (1, hq):
        raise ValueError(f"block_mask has {mh} heads; expected 1 or the query's head count Hq={hq}")
    q_block, kv_block = block_mask.BLOCK_SIZE
    expected = (-(-q_len // q_block), -(-kv_len // kv_block))
    if tuple(block_mask.kv_indices.shape[2:]) != expected:
        raise ValueError(
            f"block_mask has {tuple(block_mask.kv_indices.shape[2:])} (query, key) blocks; BLOCK_SIZE "
            f"{block_mask.BLOCK_SIZE} with L={q_len}, S={kv_len} needs {expected}"
        )
    expected_q_side = (mb, mh, expected[1], expected[0])
    if tuple(block_mask.q_indices.shape) != expected_q_side:
        raise ValueError(
            f"block_mask.q_indices has shape {tuple(block_mask.q_indices.shape)}, expected {expected_q_side}"
        )


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
