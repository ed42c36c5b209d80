"""The flex-attention forward as a Pallas kernel with the Triton lowering.

Grid (query tiles, batch x query heads). Program (i, bh) owns BLOCK_M queries of one (batch, head) and walks only
the key blocks its BlockMask row lists: first the partial blocks (``kv_num_blocks`` / ``kv_indices``, mask_mod
applied), then the full ones (``full_kv_num_blocks`` / ``full_kv_indices``, mask_mod skipped). A mask block of
KV_BLOCK keys is visited as KV_BLOCK / BLOCK_N key tiles, in one flat loop so that Triton can pipeline it; several
query tiles may share one mask row. Each key tile goes through the steps of ``_tile``: scores, score_mod, mask,
online softmax. Nothing of size L x S exists.

The wrapper pads the head dims to a power of two (Triton values need power-of-two shapes) and the lengths to tile
multiples with zeros; padded keys are masked by bounds, padded queries are computed and dropped. Grouped-query
attention reads key/value head ``h // (Hq // Hkv)`` through the BlockSpec, without repeating K and V.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from flexattn_jax.backends._arrays import pad_axis
from flexattn_jax.backends._captures import ModProgram, SoftmaxScaling, fold_scalings
from flexattn_jax.backends.pallas_triton import _tile
from flexattn_jax.backends.pallas_triton.config import MIN_TILE, Config

__all__ = ["flex_forward", "padded_head_dim"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def padded_head_dim(d: int) -> int:
    """The head dim the kernels compute with: the next power of two, at least 16."""
    return max(MIN_TILE, 1 << (d - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts of one launch, shared by the index maps and the kernel body."""

    q_heads: int
    group: int  # query heads per key/value head
    mask_batch: int  # 1 (broadcast) or the batch size
    mask_heads: int  # 1 (broadcast) or Hq
    block_m: int
    block_n: int
    q_tiles_per_row: int  # query tiles per mask block row; 0 when the mask has a single row
    kv_tiles_per_block: int  # key tiles per mask block (all of the sequence when the mask has a single column)
    kv_block: int  # keys per mask block
    kv_len: int
    kv_pad: int
    clamp_kv: bool  # the last mask block reaches past the padded keys: clamp the load, the bounds mask hides it
    mask_kv_bounds: bool  # some visited key tile reaches past kv_len
    mod_q_max: int | None  # clamp q_idx given to the mods (padded queries) to this, or None
    has_full: bool
    scaling: SoftmaxScaling
    inline_ptx: bool  # _tile.exp2 and _tile.fma as inline PTX (not in interpret mode)
    num_score_consts: int
    num_mask_consts: int
    with_max_scores: bool  # a third output: each row's maximum modified score

    def batch_head(self, bh):
        return _div(bh, self.q_heads), _rem(bh, self.q_heads)

    def mask_row(self, i, bh):
        b, h = self.batch_head(bh)
        mb = b if self.mask_batch > 1 else 0
        mh = h if self.mask_heads > 1 else 0
        row = _div(i, self.q_tiles_per_row) if self.q_tiles_per_row else 0
        return mb, mh, row


# Integer division of non-negative int32 scalars by static ints. (jnp's // and % carry a sign correction whose
# weakly typed literal the Triton lowering of select_n mistypes as a boolean.)
def _div(x, n: int):
    return x if n == 1 else lax.div(x, jnp.int32(n))


def _rem(x, n: int):
    return jnp.int32(0) if n == 1 else lax.rem(x, jnp.int32(n))


def _kernel(*refs, plan: _Plan, score_mod: ModProgram, mask_mod: ModProgram):
    q_ref, k_ref, v_ref, kv_num_ref, kv_idx_ref, *refs = refs
    if plan.has_full:
        full_num_ref, full_idx_ref, *refs = refs
    score_refs = refs[: plan.num_score_consts]
    mask_refs = refs[plan.num_score_consts : plan.num_score_consts + plan.num_mask_consts]
    o_ref, lse_ref, *max_ref = refs[plan.num_score_consts + plan.num_mask_consts :]

    i, bh = pl.program_id(0), pl.program_id(1)
    b, h = plan.batch_head(bh)
    block_m, block_n = plan.block_m, plan.block_n
    q = q_ref[...]
    q_start = i * block_m
    sub = plan.kv_tiles_per_block

    def visit(state, num_ref, idx_ref, is_full_block: bool):
        def start_of(it):
            if sub == 1:
                return idx_ref[it] * plan.kv_block
            return idx_ref[_div(it, sub)] * plan.kv_block + _rem(it, sub) * block_n

        def body(kv_start, state):
            load_start = jnp.minimum(kv_start, plan.kv_pad - block_n) if plan.clamp_kv else kv_start
            rows = pl.ds(pl.multiple_of(load_start, block_n), block_n)
            k = k_ref[rows, :]
            v = v_ref[rows, :]
            q_idx, kv_idx = _tile.index_tiles(q_start, kv_start, block_m, block_n)
            # The mods see in-range positions only; positions past the ends are masked (keys) or dropped (queries).
            mod_q = q_idx if plan.mod_q_max is None else jnp.minimum(q_idx, plan.mod_q_max)
            mod_kv = jnp.minimum(kv_idx, plan.kv_len - 1) if plan.mask_kv_bounds else kv_idx
            scaling = plan.scaling
            s = _tile.score_tile(q, k, scaling.score_scale)
            if scaling.apply_score_mod:
                s = _tile.apply_score_mod(score_mod, score_refs, s, b, h, mod_q, mod_kv, fast=plan.inline_ptx)
            if scaling.value_scale != 1.0:
                s = s * jnp.float32(scaling.value_scale)
            allowed = _tile.allowed_tile(mask_mod, mask_refs, b, h, mod_q, mod_kv, is_full_block=is_full_block)
            if plan.mask_kv_bounds:
                in_bounds = jnp.broadcast_to(kv_idx < plan.kv_len, s.shape)
                allowed = in_bounds if allowed is None else allowed & in_bounds
            s = _tile.mask_scores(s, allowed)
            return _tile.softmax_update(state, s, v, exp_scale=scaling.exp_scale, inline_ptx=plan.inline_ptx)

        return _tile.walk_starts(num_ref[...] * sub, start_of, body, state)

    state = _tile.softmax_init(block_m, v_ref.shape[-1])
    state = visit(state, kv_num_ref, kv_idx_ref, is_full_block=False)
    if plan.has_full:
        state = visit(state, full_num_ref, full_idx_ref, is_full_block=True)
    out, lse = _tile.softmax_finalize(state)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse
    if plan.with_max_scores:
        max_ref[0][...] = _tile.softmax_max_scores(state)


def _whole(x) -> pl.BlockSpec:
    return pl.BlockSpec(x.shape, lambda i, bh: (0,) * len(x.shape))


def flex_forward(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_consts: Sequence[jax.Array],
    mask_consts: Sequence[jax.Array],
    kv_num_blocks: jax.Array,
    kv_indices: jax.Array,
    full_kv_num_blocks: jax.Array | None,
    full_kv_indices: jax.Array | None,
    *,
    score_mod: ModProgram,
    mask_mod: ModProgram,
    config: Config,
    mask_block_size: tuple[int, int],
    scale: float,
    interpret: bool = False,
    with_max_scores: bool = False,
) -> tuple[jax.Array, ...]:
    """The forward kernel on plain arrays.

    Args:
      query [B, Hq, L, E], key [B, Hkv, S, E], value [B, Hkv, S, Ev]: one dtype; Hq a multiple of Hkv. Key and
        value may have batch 1, read by every query batch.
      score_consts, mask_consts: the arrays ``trace_for_tiles`` hoisted for ``score_mod`` and ``mask_mod``.
      kv_num_blocks [Bm, Hm, QB], kv_indices [Bm, Hm, QB, KVB]: the BlockMask's partial blocks (Bm in {1, B},
        Hm in {1, Hq}); full_kv_num_blocks / full_kv_indices: its full blocks, or None.
      score_mod, mask_mod: programs traced for tiles (config.block_m, config.block_n).
      config: tiles and launch parameters (see ``config.forward_config``).
      mask_block_size: the BlockMask's (Q_BLOCK, KV_BLOCK).
      scale: multiplies q.k before score_mod.
      interpret: run in Pallas interpret mode (CPU).
      with_max_scores: also return each query's maximum modified score.

    Returns:
      out [B, Hq, L, Ev] in the query's dtype, lse [B, Hq, L] float32 (natural log; -inf and out 0 where a query
      attends nowhere), and with ``with_max_scores`` max_scores [B, Hq, L] float32 (-inf where it attends nowhere).
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len, value_dim = key.shape[1], key.shape[2], value.shape[3]
    block_m, block_n = config.block_m, config.block_n
    mask_q_block, mask_kv_block = mask_block_size
    num_q_blocks, num_kv_blocks = kv_indices.shape[-2:]
    mask_batch, mask_heads = kv_num_blocks.shape[:2]
    assert num_q_blocks == 1 or mask_q_block % block_m == 0, (mask_block_size, config)
    assert num_kv_blocks == 1 or mask_kv_block % block_n == 0, (mask_block_size, config)

    q_pad = _cdiv(q_len, block_m) * block_m
    kv_pad = _cdiv(kv_len, block_n) * block_n
    head_pad, value_pad = padded_head_dim(head_dim), padded_head_dim(value_dim)
    query = pad_axis(pad_axis(query, 2, q_pad), 3, head_pad)
    key = pad_axis(pad_axis(key, 2, kv_pad), 3, head_pad)
    value = pad_axis(pad_axis(value, 2, kv_pad), 3, value_pad)

    if num_kv_blocks == 1:
        kv_tiles_per_block, kv_block_stride = kv_pad // block_n, kv_pad
    else:
        kv_tiles_per_block, kv_block_stride = mask_kv_block // block_n, mask_kv_block
    visited_end = kv_block_stride * num_kv_blocks if num_kv_blocks > 1 else kv_pad
    has_full = full_kv_num_blocks is not None
    # Literal factors around the score_mod (soft-capping's cap and 1 / cap) join the kernel's own multiplies.
    score_mod, scaling = fold_scalings(score_mod, scale)
    plan = _Plan(
        q_heads=q_heads,
        group=q_heads // kv_heads,
        mask_batch=mask_batch,
        mask_heads=mask_heads,
        block_m=block_m,
        block_n=block_n,
        q_tiles_per_row=0 if num_q_blocks == 1 else mask_q_block // block_m,
        kv_tiles_per_block=kv_tiles_per_block,
        kv_block=kv_block_stride,
        kv_len=kv_len,
        kv_pad=kv_pad,
        clamp_kv=visited_end > kv_pad,
        mask_kv_bounds=visited_end > kv_len,
        mod_q_max=q_len - 1 if q_pad > q_len else None,
        has_full=has_full,
        scaling=scaling,
        inline_ptx=not interpret,
        num_score_consts=len(score_consts),
        num_mask_consts=len(mask_consts),
        with_max_scores=with_max_scores,
    )

    def q_map(i, bh):
        b, h = plan.batch_head(bh)
        return b, h, i, 0

    shared_kv = key.shape[0] == 1 < batch  # key and value of batch 1, read by every query batch

    def kv_map(i, bh):
        b, h = plan.batch_head(bh)
        return (0 if shared_kv else b), _div(h, plan.group), 0, 0

    def num_map(i, bh):
        return plan.mask_row(i, bh)

    def idx_map(i, bh):
        return (*plan.mask_row(i, bh), 0)

    def lse_map(i, bh):
        b, h = plan.batch_head(bh)
        return b, h, i

    in_specs = [
        pl.BlockSpec((None, None, block_m, head_pad), q_map),
        pl.BlockSpec((None, None, kv_pad, head_pad), kv_map),
        pl.BlockSpec((None, None, kv_pad, value_pad), kv_map),
        pl.BlockSpec((None, None, None), num_map),
        pl.BlockSpec((None, None, None, num_kv_blocks), idx_map),
    ]
    inputs = [query, key, value, kv_num_blocks, kv_indices]
    if has_full:
        in_specs += in_specs[-2:]
        inputs += [full_kv_num_blocks, full_kv_indices]
    consts = [*score_consts, *mask_consts]
    in_specs += [_whole(c) for c in consts]
    inputs += consts

    kernel = functools.partial(_kernel, plan=plan, score_mod=score_mod, mask_mod=mask_mod)
    row_stats = 2 if with_max_scores else 1  # lse, and max_scores when asked for
    out, lse, *max_scores = pl.pallas_call(
        kernel,
        grid=(q_pad // block_m, batch * q_heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, block_m, value_pad), q_map),
            *[pl.BlockSpec((None, None, block_m), lse_map)] * row_stats,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, q_heads, q_pad, value_pad), query.dtype),
            *[jax.ShapeDtypeStruct((batch, q_heads, q_pad), jnp.float32)] * row_stats,
        ],
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="flex_attention_forward",
    )(*inputs)
    if q_pad != q_len or value_pad != value_dim:
        out = out[:, :, :q_len, :value_dim]
    if q_pad != q_len:
        lse, *max_scores = (x[:, :, :q_len] for x in (lse, *max_scores))
    return (out, lse, *max_scores)
