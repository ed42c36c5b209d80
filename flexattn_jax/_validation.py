"""Argument checks shared by the API and the layers. Everything here runs on shapes, before any tracing of kernels."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _describe(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def check_qkv(query, key, value, enable_gqa: bool, kv_batch_broadcast: bool = False) -> None:
    """Checks ranks, dtypes, batch sizes, head counts and head dims of query [B, Hq, L, E], key [B, Hkv, S, E],
    value [B, Hkv, S, Ev]; with ``kv_batch_broadcast``, key and value may have batch size 1 (shared by every
    batch)."""
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
    kv_batches = (b, 1) if kv_batch_broadcast else (b,)
    if key.shape[0] not in kv_batches or value.shape[0] != key.shape[0]:
        shared = " (or key and value a batch size of 1, shared by every batch)" if kv_batch_broadcast else ""
        raise ValueError(
            f"query, key and value must have the same batch size{shared}, got {b}, {key.shape[0]} and "
            f"{value.shape[0]}"
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
    check_arity(score_mod, 5, "score_mod", "score_mod(score, b, h, q_idx, kv_idx)")
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
    """The BlockMask must be built for these lengths and broadcast over this batch and these query heads, its eight
    index arrays int32 of the shapes those imply (a mask assembled by hand, or changed with ``dataclasses.replace``,
    is checked as one ``create_block_mask`` built), and its mask_mod must not read b (h) where it holds one block map
    for several batches (heads): the map was built for batch (head) 0 alone."""
    from flexattn_jax.block_mask import BlockMask, check_mask_mod, mask_axes

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask (see create_block_mask), got {type(block_mask).__name__}")
    check_mask_mod(block_mask.mask_mod, "block_mask.mask_mod")
    b, hq, q_len, _ = query.shape
    kv_len = key.shape[2]
    check_extents(block_mask.mask_mod, "block_mask.mask_mod", batch=b, head=hq, q=q_len, kv=kv_len)
    block_size = block_mask.BLOCK_SIZE
    if not (
        isinstance(block_size, tuple)
        and len(block_size) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block_size)
    ):
        raise ValueError(
            f"block_mask.BLOCK_SIZE must be a (Q_BLOCK, KV_BLOCK) tuple of positive ints, got {block_size!r}"
        )
    if tuple(block_mask.seq_lengths) != (q_len, kv_len):
        longer = block_mask.seq_lengths[0] >= q_len and block_mask.seq_lengths[1] >= kv_len
        cut = f", or cut this one to them with block_mask.adjust({q_len}, {kv_len})" if longer else ""
        raise ValueError(
            f"block_mask was built for (Q_LEN, KV_LEN) = {tuple(block_mask.seq_lengths)} but query and key have "
            f"L={q_len}, S={kv_len}; build it with create_block_mask(..., Q_LEN={q_len}, KV_LEN={kv_len}){cut}"
        )
    if getattr(block_mask.kv_num_blocks, "ndim", None) != 3:
        raise ValueError(
            f"block_mask.kv_num_blocks must be [B, H, QB], got {getattr(block_mask.kv_num_blocks, 'shape', None)}"
        )
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    if mb not in (1, b):
        raise ValueError(f"block_mask has batch size {mb}; expected 1 or the query's batch size {b}")
    if mh not in (1, hq):
        raise ValueError(f"block_mask has {mh} heads; expected 1 or the query's head count Hq={hq}")
    q_block, kv_block = block_size
    qb, kvb = -(-q_len // q_block), -(-kv_len // kv_block)
    if tuple(block_mask.kv_indices.shape[2:]) != (qb, kvb):
        raise ValueError(
            f"block_mask has {tuple(block_mask.kv_indices.shape[2:])} (query, key) blocks; BLOCK_SIZE "
            f"{block_mask.BLOCK_SIZE} with L={q_len}, S={kv_len} needs {(qb, kvb)}"
        )
    full_names = ("full_kv_num_blocks", "full_kv_indices", "full_q_num_blocks", "full_q_indices")
    given = {name: getattr(block_mask, name) is not None for name in full_names}
    if len(set(given.values())) > 1:
        got = ", ".join(f"{name}={'an array' if g else 'None'}" for name, g in given.items())
        raise ValueError(f"block_mask's four full-block arrays must all be arrays or all be None; got {got}")
    expected = {
        "kv_num_blocks": (mb, mh, qb),
        "kv_indices": (mb, mh, qb, kvb),
        "q_num_blocks": (mb, mh, kvb),
        "q_indices": (mb, mh, kvb, qb),
    }
    if all(given.values()):
        expected.update({f"full_{name}": expected[name] for name in list(expected)})
    for name, shape in expected.items():
        array = getattr(block_mask, name)
        if tuple(getattr(array, "shape", ())) != shape or jnp.dtype(getattr(array, "dtype", None)) != jnp.int32:
            got = _describe(array) if hasattr(array, "dtype") else type(array).__name__
            raise ValueError(f"block_mask.{name} must be int32{list(shape)}, got {got}")
    # One block map for several batches (heads) was built for batch (head) 0: partial blocks of the others would
    # evaluate a mask_mod that differs from the one their blocks were classified with.
    broadcast = {"batch": mb == 1 < b, "head": mh == 1 < hq}
    if any(broadcast.values()):
        read = mask_axes(block_mask.mask_mod) & {axis for axis, yes in broadcast.items() if yes}
        if read:
            axis = sorted(read)[0]
            letter, size, arg = ("b", b, "B") if axis == "batch" else ("h", hq, "H")
            raise ValueError(
                f"block_mask's mask_mod reads {letter} but the mask holds one block map for all {size} "
                f"{'batches' if axis == 'batch' else 'heads'} of the query (it was built with {arg}=None or 1, "
                f"so for {axis} 0 alone); build it with create_block_mask(mask_mod, {arg}={size}, ...)"
            )


def is_int(value) -> bool:
    """A Python or NumPy integer, and not a bool: Python counts True as 1, so B=True would pass for a batch of one."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive_int(value, name: str) -> int:
    """value must be a positive int (Python or NumPy, not a bool); returns it as a Python int."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def is_concrete(x) -> bool:
    """Whether x's values can be read on the host (not under jit, vmap or grad)."""
    return not isinstance(x, jax.core.Tracer)


def is_real(value) -> bool:
    """A Python or NumPy real number, and not a bool (nor an array: a traced value cannot set a kernel constant)."""
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_scale(scale) -> float | None:
    """scale must be None or a finite real number (``is_real``); returns it as a Python float."""
    if scale is None:
        return None
    if not is_real(scale):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {float(scale)}")
    return float(scale)


_EXTENT_AXES = {"batch": "batch size", "head": "query head count", "q": "query length", "kv": "key length"}


def check_extents(mod: Callable, name: str, **sizes: int | None) -> None:
    """A library mod closing over arrays (``document_mask``'s ids, ``alibi_bias``'s slopes, a bias table) records in
    ``index_extents`` how far along each axis (batch, head, q, kv) they reach; a read past the end would be clamped by
    JAX into a silently wrong mask or bias. Raises ValueError where a size given here exceeds one."""
    extents = getattr(mod, "index_extents", None) or {}
    for axis, size in sizes.items():
        if size is None or axis not in extents:
            continue
        extent, what = extents[axis]
        if size > extent:
            raise ValueError(
                f"{name} reads {what}, which covers a {_EXTENT_AXES[axis]} of {extent}, but the "
                f"{_EXTENT_AXES[axis]} here is {size}"
            )


def check_flags(**flags) -> None:
    """Each flag must be a bool: ``"no"`` would otherwise count as True."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def arity_error(fn: Callable, count: int) -> str | None:
    """Why ``fn`` cannot take ``count`` positional arguments, or None when it can or Python cannot tell (some
    callables have no signature)."""
    try:
        parameters = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        parameters.bind(*range(count))
    except TypeError as e:
        return str(e)
    return None


def check_arity(fn: Callable, count: int, name: str, signature: str) -> None:
    """``fn`` must accept ``count`` positional arguments (where Python can tell)."""
    error = arity_error(fn, count)
    if error is not None:
        raise TypeError(f"{name} must be a callable {signature}, taking {count} positional arguments: {error}")


# PyTorch FlexAttention's kernel_options that name a knob of ours differently: theirs -> ours.
_PYTORCH_OPTION_NAMES = {
    "fwd_BLOCK_M": "BLOCK_M",
    "fwd_BLOCK_N": "BLOCK_N",
    "fwd_num_warps": "num_warps",
    "fwd_num_stages": "num_stages",
    "bwd_BLOCK_M1": "BLOCK_M1",
    "bwd_BLOCK_N1": "BLOCK_N1",
    "bwd_BLOCK_M2": "BLOCK_M2",
    "bwd_BLOCK_N2": "BLOCK_N2",
}
# PyTorch's boolean hints that permit a shortcut our kernels do not need or take; accepted, with no effect:
# fully masked rows are always safe here, the block lists are read as lists whatever their order, the scale is
# applied to the float32 scores (folded into exp2 where the score_mod allows), never to q in its input dtype, which
# is what PRESCALE_QK trades accuracy for, and the Mosaic kernels always copy by TMA while the Triton kernels never
# do.
_PYTORCH_HINTS = ("ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "PRESCALE_QK", "USE_TMA")


def pytorch_kernel_options(kernel_options):
    """``kernel_options`` with PyTorch FlexAttention's keys put in our terms, before each backend checks its keys.

    ``fwd_*`` and ``bwd_BLOCK_*`` are the forward's and backward's tiles and launch settings (given with our name
    too, the two must agree); ``FORCE_USE_FLEX_ATTENTION=True`` keeps short queries off the decode kernel
    (``decode_enable=0``); the hints ``ROWS_GUARANTEED_SAFE``, ``BLOCKS_ARE_CONTIGUOUS``, ``PRESCALE_QK`` and
    ``USE_TMA`` must be bools and change nothing; ``BACKEND`` other than ``"AUTO"`` is refused for
    ``implementation=``, which chooses the kernels here."""
    if not isinstance(kernel_options, Mapping):
        return kernel_options  # None, or a wrong type, which the backends' checks name
    options = {}
    renamed = {}
    for key, value in kernel_options.items():
        if key in _PYTORCH_HINTS or key == "FORCE_USE_FLEX_ATTENTION":
            check_flags(**{f"kernel_options[{key!r}]": value})
            if key == "FORCE_USE_FLEX_ATTENTION" and value:
                renamed["decode_enable"] = (key, 0)
            continue
        if key == "BACKEND":
            if value != "AUTO":
                raise ValueError(
                    f"kernel_options['BACKEND'] = {value!r} is PyTorch's choice of kernels; here choose them with "
                    f"flex_attention(..., implementation=...), one of 'reference', 'pallas_triton', 'pallas_mosaic' "
                    "(only 'AUTO' is accepted as a key)"
                )
            continue
        if key in _PYTORCH_OPTION_NAMES:
            renamed[_PYTORCH_OPTION_NAMES[key]] = (key, value)
            continue
        options[key] = value
    for ours, (theirs, value) in renamed.items():
        if ours in options and options[ours] != value:
            raise ValueError(
                f"kernel_options gives {theirs}={value!r} (PyTorch's name) and {ours}={options[ours]!r}, which name "
                "the same setting"
            )
        options[ours] = value
    return options
