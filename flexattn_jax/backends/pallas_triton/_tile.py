"""The steps every flex-attention kernel takes on one (query tile, key tile): shared by forward, backward and decode.

A kernel reads as

    q_idx, kv_idx = index_tiles(q_start, kv_start, BM, BN)
    s = score_tile(q, k, scale)                                          # scale * q.k, float32
    s = apply_score_mod(score_mod, score_refs, s, b, h, q_idx, kv_idx, fast=...)
    allowed = allowed_tile(mask_mod, mask_refs, b, h, q_idx, kv_idx, is_full_block=..., q_len=..., kv_len=...)
    s = mask_scores(s, allowed)                                          # -inf where not allowed
    state = softmax_update(state, s, v, inline_ptx=...)                  # online softmax, float32
    ...
    out, lse = softmax_finalize(state)

Mods see tiles: b and h int32 scalars, q_idx [BM, 1] and kv_idx [1, BN] int32 global positions, the score [BM, BN]
float32. The online softmax works in base 2 (``exp2(x * LOG2_E) == exp(x)``), the form GPUs evaluate fastest; see
Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018) and Dao et al., FlashAttention (2022).
A row with nothing allowed keeps a running maximum of -inf; subtracting 0 instead of it keeps every exponential
0 (never ``-inf - -inf = NaN``), and finalisation turns its empty sum into output 0 and lse -inf.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pl_triton

from flexattn_jax.backends._captures import ModProgram

__all__ = [
    "LOG2_E",
    "LN_2",
    "SoftmaxState",
    "exp2",
    "fma",
    "index_tiles",
    "dot_precision",
    "score_tile",
    "apply_score_mod",
    "allowed_tile",
    "mask_scores",
    "softmax_init",
    "softmax_update",
    "softmax_finalize",
]

LOG2_E = math.log2(math.e)  # exp(x) == exp2(x * LOG2_E)
LN_2 = math.log(2.0)  # ln(x) == log2(x) * LN_2
_NEG_INF = float("-inf")


class SoftmaxState(NamedTuple):
    """The online-softmax carry of one query tile.

    Attributes:
      acc: float32 [BM, Ev], sum over visited keys of exp2(score * exp_scale - scaled_max) v.
      scaled_max: float32 [BM], the running maximum of the scores times exp_scale, rounded once (-inf while nothing
        is allowed): the shift every exp2 is taken against. It is kept, not recomputed from the maximum, so that a
        rescaling is by exp2 of the difference of two shifts as they were rounded, exactly 1 while the maximum
        stays. exp2(max * exp_scale - shift) is not: contracted into an FMA (on the GPU by ``fma``, on the CPU by
        XLA) it is exp2 of the shift's rounding error at every key tile, and lse drifted by it (benchmarks/NOTES.md
        section 44).
      row_sum: float32 [BM], sum over visited keys of exp2(score * exp_scale - scaled_max).

    ``exp_scale`` is LOG2_E for scores in natural units; a kernel that folds constant factors into it
    (``_captures.SoftmaxScaling``) passes its own, which must be positive.
    """

    acc: jax.Array
    scaled_max: jax.Array
    row_sum: jax.Array


def walk_starts(count, start_of, body, carry):
    """Runs ``carry = body(start_of(t), carry)`` for t in [0, count), each step reading the next step's start.

    The start is carried from one step to the next, so the tiles a step loads are addressed by a loop-carried value
    rather than by a load of the same step. Triton's pipeliner then fetches them ``num_stages - 1`` steps ahead, and
    with 3 stages the next steps' copies stay in flight through the compute; with the start read in place, the
    same loop waited for every copy at its top (``benchmarks/triton_report.py`` shows both, NOTES.md section 26).
    The read after the last step is clamped to it; its value goes unused. ``start_of(0)`` is read even when
    ``count`` is 0, so it must be a valid read then too.
    """
    last = jnp.maximum(count - 1, 0)

    def step(t, state):
        start, carry = state
        return start_of(jnp.minimum(t + 1, last)), body(start, carry)

    return lax.fori_loop(0, count, step, (start_of(jnp.int32(0)), carry))[1]


def index_tiles(q_start, kv_start, block_m: int, block_n: int) -> tuple[jax.Array, jax.Array]:
    """Global positions of a tile: q_idx [BM, 1] and kv_idx [1, BN], int32."""
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
    return q_idx, kv_idx


def dot_precision(dtype) -> lax.Precision:
    """HIGHEST for float32 inputs: the GPU's default float32 dot is TF32 (relative error ~3e-4, over our 2e-5)."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def score_tile(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """scale * q k^T: q [BM, E], k [BN, E] of one dtype -> [BM, BN] float32."""
    s = lax.dot_general(
        q,
        k,
        (((1,), (1,)), ((), ())),
        precision=dot_precision(q.dtype),
        preferred_element_type=jnp.float32,
    )
    return s if scale == 1.0 else s * jnp.float32(scale)


def apply_score_mod(score_mod: ModProgram, score_refs: Sequence, s, b, h, q_idx, kv_idx, *, fast: bool) -> jax.Array:
    """score_mod(s, b, h, q_idx, kv_idx) on a tile, as float32 [BM, BN]; its float32 products used only by a sum
    become ``fma``s (``fast`` as ``fma``'s)."""
    out = score_mod(score_refs, s, b, h, q_idx, kv_idx, fma=functools.partial(fma, fast=fast))
    return jnp.broadcast_to(out, s.shape).astype(jnp.float32)


def allowed_tile(
    mask_mod: ModProgram,
    mask_refs: Sequence,
    b,
    h,
    q_idx,
    kv_idx,
    *,
    is_full_block: bool,
    q_len: int | None = None,
    kv_len: int | None = None,
) -> jax.Array | None:
    """Which positions of the tile attend: bool of the tile's shape (the index tiles' broadcast: [BM, BN], or
    [BN, BM] for transposed ones), or None when all of them do.

    Args:
      mask_mod, mask_refs: the traced mask_mod and its consts' refs.
      is_full_block: static; the tile lies in a full block, so mask_mod is skipped.
      q_len, kv_len: static; positions at or past them are masked (tail tiles). None: no bounds check.
    """
    allowed = None
    if not is_full_block:
        allowed = mask_mod(mask_refs, b, h, q_idx, kv_idx)
    if q_len is not None:
        in_bounds = q_idx < q_len
        allowed = in_bounds if allowed is None else allowed & in_bounds
    if kv_len is not None:
        in_bounds = kv_idx < kv_len
        allowed = in_bounds if allowed is None else allowed & in_bounds
    if allowed is None:
        return None
    return jnp.broadcast_to(allowed, jnp.broadcast_shapes(q_idx.shape, kv_idx.shape))


def mask_scores(s: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """s where allowed, else -inf."""
    if allowed is None:
        return s
    return jnp.where(allowed, s, jnp.float32(_NEG_INF))


def softmax_init(block_m: int, value_dim: int) -> SoftmaxState:
    return SoftmaxState(
        acc=jnp.zeros((block_m, value_dim), jnp.float32),
        scaled_max=jnp.full((block_m,), _NEG_INF, jnp.float32),
        row_sum=jnp.zeros((block_m,), jnp.float32),
    )


def exp2(x: jax.Array, *, fast: bool) -> jax.Array:
    """2**x of a float32 tile.

    ``fast``: PTX's ``ex2.approx.ftz.f32``, one MUFU instruction per element. ``jnp.exp2`` lowers to libdevice's
    ``__nv_exp2f``, which XLA links without flush-to-zero (its modules carry nvvm-reflect-ftz 0): the same
    approximate instruction plus, per element, a range test and two predicated multiplies that keep results under
    2**-126 subnormal (`benchmarks.triton_report --ftz 0`: 466 -> 667 instructions per key tile of the D=64
    forward). A softmax weight under 2**-126 of its row's maximum is 0 to float32 sums either way. Interpret mode
    cannot run inline assembly: ``fast=False`` there.
    """
    if not fast:
        return jnp.exp2(x)
    [y] = pl_triton.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;",
        args=[x],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return y


def fma(a, b, c, *, fast: bool) -> jax.Array:
    """``a * b + c`` of float32 values (arrays broadcasting together, or a Python float ``b``), rounded once.

    ``fast``: PTX's ``fma.rn.f32``, one FFMA per element. Written as ``a * b + c``, the product and the sum stay two
    instructions on the GPU: XLA compiles Triton kernels without floating-point contraction, so ptxas may not fuse
    them (benchmarks/NOTES.md section 29). A Python float ``b`` becomes the instruction's immediate operand.
    Interpret mode cannot run inline assembly: ``fast=False`` there computes ``a * b + c``.
    """
    if not fast:
        return a * (jnp.float32(b) if isinstance(b, float) else b) + c
    if isinstance(b, float):
        bits = struct.unpack("<I", struct.pack("<f", b))[0]
        asm, args, constraints = f"fma.rn.f32 $0, $1, 0f{bits:08X}, $2;", [a, c], "=f,f,f"
    else:
        asm, args, constraints = "fma.rn.f32 $0, $1, $2, $3;", [a, b, c], "=f,f,f,f"
    shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in args))
    [y] = pl_triton.elementwise_inline_asm(
        asm,
        args=[jnp.broadcast_to(jnp.asarray(x, jnp.float32), shape) for x in args],
        constraints=constraints,
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)],
    )
    return y


def softmax_update(state: SoftmaxState, s: jax.Array, v: jax.Array, *, exp_scale: float = LOG2_E,
                   inline_ptx: bool) -> SoftmaxState:
    """Folds one tile into the state: s [BM, BN] float32 scores (-inf where masked), v [BN, Ev]; ``inline_ptx``:
    ``exp2``'s and ``fma``'s ``fast``."""
    exp_scale = float(exp_scale)
    # The maximum is taken before scaling (rounding is monotonic: the largest rounded product is the rounded product
    # of the largest), so each score costs one FMA below.
    scaled_max = jnp.maximum(state.scaled_max, jnp.max(s, axis=1) * jnp.float32(exp_scale))
    # While a row has seen nothing allowed its maximum is -inf; exponentiate against 0 so exp2 gives 0, not NaN.
    shift = jnp.where(scaled_max == _NEG_INF, jnp.float32(0.0), scaled_max)
    # A previous maximum of -inf gives exp2(-inf) = 0.
    correction = exp2(state.scaled_max - shift, fast=inline_ptx)
    p = exp2(fma(s, exp_scale, -shift[:, None], fast=inline_ptx), fast=inline_ptx)
    row_sum = fma(state.row_sum, correction, jnp.sum(p, axis=1), fast=inline_ptx)
    pv = lax.dot_general(
        p.astype(v.dtype),
        v,
        (((1,), (0,)), ((), ())),
        precision=dot_precision(v.dtype),
        preferred_element_type=jnp.float32,
    )
    acc = state.acc * correction[:, None] + pv
    return SoftmaxState(acc, scaled_max, row_sum)


def softmax_max_scores(state: SoftmaxState) -> jax.Array:
    """The row maxima of the modified scores [BM] float32, in the score_mod's own units; -inf where nothing is
    allowed. The state's maximum is of the value whose exp2(value * exp_scale) is exp(score), times exp_scale: the
    score is that times ln 2."""
    has_any = state.row_sum > 0
    return jnp.where(has_any, state.scaled_max * jnp.float32(LN_2), jnp.float32(_NEG_INF))


def softmax_finalize(state: SoftmaxState) -> tuple[jax.Array, jax.Array]:
    """(out [BM, Ev] float32, lse [BM] float32 natural log); a row with nothing allowed gets 0 and -inf."""
    has_any = state.row_sum > 0
    safe_sum = jnp.where(has_any, state.row_sum, jnp.float32(1.0))
    out = state.acc / safe_sum[:, None]
    lse = jnp.where(has_any, (state.scaled_max + jnp.log2(safe_sum)) * jnp.float32(LN_2), jnp.float32(_NEG_INF))
    return out, lse
