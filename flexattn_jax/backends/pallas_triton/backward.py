"""The backward kernels (Pallas, Triton lowering): dK/dV walking the q-side block lists, dQ the kv-side ones.

For one (batch b, query head h), on a tile of queries q_idx [BM, 1] and keys kv_idx [1, BN], with the forward's
lse (natural log; the caller turns the -inf of a row that attends nowhere into +inf, so that its P is 0):

    s   = scale * Q K^T
    m   = score_mod(s, b, h, q_idx, kv_idx)
    P   = exp(m - lse)                    where the position is allowed, else exactly 0
    dP  = dO V^T
    dM  = P * (dP - delta)                delta = rowsum(dO * O) - dlse (the caller folds the lse cotangent in)
    dS  = (dm / ds)^T dM                  JAX autodiff of the score_mod traced on the tile
    dQ  = scale * dS K                    dK = scale * dS^T Q,    dV = P^T dO
    d(captured array) = (dm / d array)^T dM, added into float32 buffers (in the dQ kernel only)

Two kernels by default, as in FlashAttention-2 (Dao, 2023, Algorithm 2), so that dQ, dK and dV are each written by
exactly one program and need no atomics:

* **dK/dV**, gridded over (key tile, key/value head, batch). The program holds one tile of K and V and, for each
  query head of its group (GQA sums the group here, K and V are never repeated), walks the query blocks that visit
  its key block: the partial ones (``q_num_blocks`` / ``q_indices``, mask_mod applied) and the full ones
  (``full_q_num_blocks`` / ``full_q_indices``, no mask_mod). It works on the transposed tile, S^T = K Q^T [BN, BM]
  with q_idx [1, BM] and kv_idx [BN, 1] (the mods are traced for that layout), so that P^T and dS^T are the left
  operands of dV += P^T dO and dK += dS^T Q as they come out of their dots. Key and value of batch 1 shared by
  the query batches (``BackwardConfig.kv_batch_loop``): the program walks every query batch's blocks too, and
  the grid has one batch.
* **dQ**, gridded over (query tile, query head, batch), walks the key blocks of its query block
  (``kv_num_blocks`` / ``kv_indices`` and the full pair) and adds the gradients of the arrays the score_mod closes
  over (a learned bias table, learned ALiBi slopes) into float32 buffers with ``jax.ref.addupdate``, an atomic add on
  the GPU. Arrays the mask_mod closes over (document ids) get no gradient and cost nothing.

Both grids put the tile axis first, and the Triton lowering launches the first axis fastest: the programs in flight
are mostly tiles of one (batch, head) and share, in L2, the rows they all stream (the forward's order; up to 10%
faster forward+backward than batch first, benchmarks/NOTES.md section 22). Adding dQ up in the dK/dV kernel with
atomic adds instead of running the dQ kernel (five dots per block pair instead of seven) measured twice as slow
(section 21), so dQ, dK and dV each have one writer.

A kernel tile lies inside one BlockMask block: the mask's block sizes are multiples of the tiles, so each mask block
is walked as ``block // tile`` consecutive sub-tiles. The caller pads the sequences to whole mask blocks and the head
dims to powers of two; positions past the true lengths are masked by bounds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flexattn_jax.backends._captures import ModProgram
from flexattn_jax.backends._device import num_sms
from flexattn_jax.backends.pallas_triton import _tile
from flexattn_jax.backends.pallas_triton import config as config_lib

__all__ = [
    "BACKWARD_KEYS",
    "BackwardConfig",
    "BlockLists",
    "Mods",
    "Tiling",
    "backward_config",
    "cap_stages_for_captures",
    "check_backward_options",
    "default_backward_config",
    "dkdv",
    "dq",
]

# ------------------------------------------------------------------------------------------- configuration

# kernel_options keys of the backward (PyTorch's names for the tiles): BLOCK_M1 / BLOCK_N1 are the query / key tiles
# of the dK/dV kernel, BLOCK_M2 / BLOCK_N2 those of the dQ kernel.
_TILE_KEYS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
# bwd_num_warps / bwd_num_stages launch both kernels; bwd_dq_num_warps / bwd_dq_num_stages override them for the dQ
# kernel, whose best launch differs from the dK/dV kernel's (benchmarks/NOTES.md section 19).
# bwd_kv_batch_loop (0 or 1; unset: 1 where the dK/dV programs fill the GPU, ``loops_over_query_batches``): key and
# value of batch 1, shared by the query batches, read once by a dK/dV program that adds up every query batch (1), or
# broadcast to the query batch first (0).
BACKWARD_KEYS = (*_TILE_KEYS, "bwd_num_warps", "bwd_num_stages", "bwd_dq_num_warps", "bwd_dq_num_stages",
                 "bwd_kv_batch_loop")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackwardConfig:
    """Static launch configuration of the two backward kernels.

    Attributes:
      block_m1, block_n1: query and key tiles of the dK/dV kernel (it owns a key tile and walks query tiles).
      block_m2, block_n2: query and key tiles of the dQ kernel (it owns a query tile and walks key tiles).
      num_warps, num_stages: Triton's launch parameters of the dK/dV kernel.
      dq_num_warps, dq_num_stages: those of the dQ kernel.
      kv_batch_loop: key and value of batch 1 are given to the kernels as they are, each dK/dV program adding up
        every query batch's contribution (``dkdv``), instead of broadcast to the query batch; None: where those
        programs fill the GPU (``loops_over_query_batches``).
    """

    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int
    dq_num_warps: int
    dq_num_stages: int
    kv_batch_loop: bool | None = None


def default_backward_config(head_dim: int, dtype) -> BackwardConfig:
    """Defaults for a (power-of-two padded) head dim and an input dtype.

    The owned tile is the longer one (the keys of dK/dV, the queries of dQ) and the walked tile short, as in
    FlashAttention-2's backward: the owned tile's float32 accumulators stay in registers. float32 dots run at
    full precision and take twice the memory per element, so their tiles are halved.
    """
    def config(m1, n1, m2, n2, warps, stages, dq_warps=None, dq_stages=None):
        return BackwardConfig(block_m1=m1, block_n1=n1, block_m2=m2, block_n2=n2, num_warps=warps,
                              num_stages=stages, dq_num_warps=dq_warps or warps, dq_num_stages=dq_stages or stages)

    if jnp.dtype(dtype) == jnp.float32:
        if head_dim <= 128:
            return config(32, 64, 64, 32, 4, 1)
        return config(16, 32, 32, 16, 4, 1)
    # Measured on an H200 with each kernel's launch varied apart (benchmarks/NOTES.md section 19).
    if head_dim <= 64:
        return config(32, 64, 128, 64, 4, 3, dq_stages=2)
    if head_dim <= 128:
        # Two warpgroups, as PyTorch FlexAttention's Hopper default: the fastest launch of the sweep, though its
        # dK/dV kernel spills a little (benchmarks/triton_report.py).
        return config(64, 128, 128, 64, 8, 3)
    return config(32, 64, 64, 32, 8, 1)


def check_backward_options(kernel_options: Mapping[str, Any] | None) -> dict[str, int]:
    """Validates the backward's keys of ``kernel_options`` (the others belong to other kernels); returns them.

    Raises:
      ValueError/TypeError naming the key: an unknown ``bwd_*`` key, a non-int value, a tile that is not a power of
      two from 16 to 256, warps not in (1, 2, 4, 8, 16), stages not from 1 to 8.
    """
    if kernel_options is None:
        return {}
    options = {}
    for key, value in kernel_options.items():
        if not isinstance(key, str) or not (key in _TILE_KEYS or key.startswith("bwd_")):
            continue
        if key not in BACKWARD_KEYS:
            raise ValueError(f"kernel_options has an unknown backward key {key!r}; the backward reads {BACKWARD_KEYS}")
        kind = "tile" if key in _TILE_KEYS else key.removeprefix("bwd_").removeprefix("dq_")
        config_lib.check_option_value(key, value, kind=kind)
        if key == "bwd_kv_batch_loop" and value not in (0, 1):
            raise ValueError(f"kernel_options['bwd_kv_batch_loop'] must be 0 or 1, got {value}")
        options[key] = value
    return options


def _fit_tile(key: str, options, default: int, length: int, mask_block: int, mask_blocks: int, axis: str) -> int:
    """The tile for one axis: ``options[key]`` if given (it must divide the mask block), else the largest power of
    two <= default, not much longer than the sequence, dividing the mask block. One mask block along the axis
    imposes nothing (the kernel walks the padded length as that block)."""
    if key in options:
        tile = options[key]
        if mask_blocks > 1 and mask_block % tile:
            raise ValueError(
                f"kernel_options[{key!r}] = {tile} does not divide the BlockMask's {axis} block size {mask_block}; "
                f"use a power of two dividing it, or build the mask with a BLOCK_SIZE that is a multiple of {tile}"
            )
        return tile
    tile = config_lib.fit_tile(default, length, mask_block, mask_blocks)
    if tile is None:
        raise ValueError(
            f"the BlockMask's {axis} block size {mask_block} is not a multiple of {config_lib.MIN_TILE}; the "
            f"pallas_triton kernels need tiles of at least {config_lib.MIN_TILE} rows dividing it (build the mask "
            "with BLOCK_SIZE a multiple of 16, e.g. the default 128)"
        )
    return tile


def backward_config(
    kernel_options: Mapping[str, Any] | None,
    *,
    head_dim: int,
    dtype,
    q_len: int,
    kv_len: int,
    mask_block_size: tuple[int, int],
    mask_num_blocks: tuple[int, int],
) -> BackwardConfig:
    """The backward's config: defaults for the head dim and dtype, overridden by ``kernel_options``, fitted to the
    lengths and the mask's blocks. Raises ValueError/TypeError for bad options or tiles that cannot fit."""
    options = check_backward_options(kernel_options)
    default = default_backward_config(head_dim, dtype)
    q_axis = (q_len, mask_block_size[0], mask_num_blocks[0], "query")
    kv_axis = (kv_len, mask_block_size[1], mask_num_blocks[1], "key")
    return BackwardConfig(
        block_m1=_fit_tile("BLOCK_M1", options, default.block_m1, *q_axis),
        block_n1=_fit_tile("BLOCK_N1", options, default.block_n1, *kv_axis),
        block_m2=_fit_tile("BLOCK_M2", options, default.block_m2, *q_axis),
        block_n2=_fit_tile("BLOCK_N2", options, default.block_n2, *kv_axis),
        num_warps=options.get("bwd_num_warps", default.num_warps),
        num_stages=options.get("bwd_num_stages", default.num_stages),
        dq_num_warps=options.get("bwd_dq_num_warps", options.get("bwd_num_warps", default.dq_num_warps)),
        dq_num_stages=options.get("bwd_dq_num_stages", options.get("bwd_num_stages", default.dq_num_stages)),
        kv_batch_loop=bool(options["bwd_kv_batch_loop"]) if "bwd_kv_batch_loop" in options else None,
    )


def loops_over_query_batches(config: BackwardConfig, kv_heads: int, kv_padded: int) -> bool:
    """Whether the dK/dV kernel takes key and value of batch 1 as they are, each program adding up every query batch
    (``BackwardConfig.kv_batch_loop``; unset: where those programs, key tiles times key/value heads, are at least the
    GPU's SMs, since the loop leaves B times fewer of them). Measured on an H100 (benchmarks/NOTES.md section 41):
    full attention 2-6% faster with the loop, causal 6% slower at B=8, S=2048, where the fewer programs balance
    the triangle's uneven walks less well; it also keeps no B copies of key, value and their gradients."""
    if config.kv_batch_loop is not None:
        return config.kv_batch_loop
    return kv_heads * (kv_padded // config.block_n1) >= num_sms()


# Shared memory is the limit on the stages of a score_mod that reads captured arrays: a gather at tile-shaped
# indices (a bias table at q_idx - kv_idx) and the dQ kernel's atomic adds of its gradient go through shared memory.
# With 3 stages the D=128 default's dQ kernel asked for 256 KiB on the H200 (227 KiB available); with 2, the
# Triton release of benchmarks/triton_report.py gives each kernel about 165 KiB. The cap is deliberately broad (any
# captured array, also a scalar read such as slopes[h], and every head dim): what a gather costs in shared memory is
# only known once Triton has compiled the kernel, and a launch that does not fit fails at run time.
CAPTURES_MAX_STAGES = 2


def cap_stages_for_captures(config: BackwardConfig, kernel_options: Mapping[str, Any] | None) -> BackwardConfig:
    """``config`` for a score_mod that closes over arrays: stages the options did not set capped at
    ``CAPTURES_MAX_STAGES``."""
    options = kernel_options or {}
    stages = config.num_stages
    dq_stages = config.dq_num_stages
    if "bwd_num_stages" not in options:
        stages = min(stages, CAPTURES_MAX_STAGES)
    if "bwd_dq_num_stages" not in options and "bwd_num_stages" not in options:
        dq_stages = min(dq_stages, CAPTURES_MAX_STAGES)
    return dataclasses.replace(config, num_stages=stages, dq_num_stages=dq_stages)


# ----------------------------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static sizes of one backward kernel.

    Attributes:
      block_m, block_n: the query and key tile sizes of the kernel (powers of two, at least 16).
      q_block, kv_block: the BlockMask's block sizes, multiples of block_m and block_n; where the mask has a single
        block along an axis, the padded length instead (the one block covers it).
      q_len, kv_len: the true sequence lengths (the arrays are padded to whole blocks).
      scale: multiplies q.k before the score_mod.
      num_warps, num_stages: Triton's launch parameters.
      inline_ptx: ``_tile.exp2`` and ``_tile.fma`` as inline PTX (off in interpret mode).
    """

    block_m: int
    block_n: int
    q_block: int
    kv_block: int
    q_len: int
    kv_len: int
    scale: float
    num_warps: int
    num_stages: int
    inline_ptx: bool

    def __post_init__(self):
        assert self.q_block % self.block_m == 0 and self.kv_block % self.block_n == 0, self


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["num", "indices", "full_num", "full_indices"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class BlockLists:
    """One direction of the BlockMask's index arrays, as the kernel walking it needs them.

    ``num`` is int32 [Bm, Hm, R] and ``indices`` int32 [Bm, Hm, R, C]: row r lists the blocks visited, the first
    ``num[..., r]`` entries counting. The full pair may be None (no full blocks). Bm is 1 or the batch, Hm 1 or the
    number of query heads.
    """

    num: jax.Array
    indices: jax.Array
    full_num: jax.Array | None
    full_indices: jax.Array | None

    def arrays(self) -> tuple[jax.Array, ...]:
        """The arrays present, in order (the full pair left out when None)."""
        full = () if self.full_num is None else (self.full_num, self.full_indices)
        return (self.num, self.indices, *full)

    def arrays_with_none(self) -> tuple[jax.Array | None, ...]:
        return (self.num, self.indices, self.full_num, self.full_indices)


@dataclasses.dataclass(frozen=True, eq=False)
class Mods:
    """The mods traced for one kernel's tiles (static), and the arrays they close over (their refs' contents)."""

    score: ModProgram
    score_consts: tuple[jax.Array, ...]
    mask: ModProgram
    mask_consts: tuple[jax.Array, ...]


# ------------------------------------------------------------------------------------------------ one tile


def _dot(a, b, contract_a: int, contract_b: int):
    """a . b contracting the given axes, float32 accumulation (IEEE float32 for float32 inputs, not TF32)."""
    return lax.dot_general(
        a,
        b,
        (((contract_a,), (contract_b,)), ((), ())),
        precision=_tile.dot_precision(a.dtype),
        preferred_element_type=jnp.float32,
    )


def _sum_to_shape(x, shape):
    """Sums x [BM, BN] down to ``shape``, which broadcasts to it: the adjoint of broadcasting."""
    if len(shape) < x.ndim:
        x = jnp.sum(x, axis=tuple(range(x.ndim - len(shape))))
    axes = tuple(d for d, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _score_gradient_tile(
    s, dp, lse2, delta, b, h, q_idx, kv_idx, *, score, score_refs, mask, mask_refs, masked, tiling, score_grad_refs,
):
    """P and dS of one tile (both float32, of ``s``'s shape); zero wherever the position is not allowed.

    ``s`` = q.k and ``dp`` = dO.v are the tile's raw products, [BM, BN] with q_idx [BM, 1], kv_idx [1, BN], lse2
    and delta [BM, 1]; or all transposed ([BN, BM], q_idx [1, BM], ...), as the dK/dV kernel holds them. ``masked``
    (static): apply mask_mod (a partial block); a full block skips it. Bounds are checked only where a length is
    not a whole number of walked blocks. ``score_grad_refs``: float32 refs receiving the cotangents of the
    score_mod's floating captured arrays (None entries, or None, skip them).
    """
    shape = s.shape
    # Positions past the ends (padding) are masked by bounds; the mods only ever see in-range indices, as in the
    # forward, so a mod that is undefined out of range cannot put NaN into a gradient.
    padded_q = tiling.q_len % tiling.q_block != 0
    padded_kv = tiling.kv_len % tiling.kv_block != 0
    mod_q = jnp.minimum(q_idx, tiling.q_len - 1) if padded_q else q_idx
    mod_kv = jnp.minimum(kv_idx, tiling.kv_len - 1) if padded_kv else kv_idx
    allowed = _tile.allowed_tile(mask, mask_refs, b, h, mod_q, mod_kv, is_full_block=not masked)
    if padded_q or padded_kv:
        in_bounds = jnp.broadcast_to((q_idx < tiling.q_len) & (kv_idx < tiling.kv_len), shape)
        allowed = in_bounds if allowed is None else allowed & in_bounds

    # P = exp(m - lse) = exp2(m * LOG2_E - lse2): exp2 is one fast GPU instruction, and the caller passes lse2.
    if score.is_identity:  # no work, and a gradient of one
        pullback = None
        p = _tile.exp2(_tile.fma(s, float(tiling.scale * _tile.LOG2_E), -lse2, fast=tiling.inline_ptx),
                       fast=tiling.inline_ptx)
    else:
        scaled = s if tiling.scale == 1.0 else s * jnp.float32(tiling.scale)
        m, pullback = score.vjp(score_refs, scaled, b, h, mod_q, mod_kv)
        # A score_mod returning a constant (`return 1.0`) gives a literal, not an array.
        m = jnp.asarray(m, getattr(m, "dtype", jnp.float32))
        m_shape, m_dtype = m.shape, m.dtype
        p = _tile.exp2(_tile.fma(jnp.broadcast_to(m.astype(jnp.float32), shape), _tile.LOG2_E, -lse2,
                                 fast=tiling.inline_ptx), fast=tiling.inline_ptx)
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)

    dm = p * (dp - delta)
    if pullback is None:
        return p, dm
    grad_refs = score_grad_refs if score_grad_refs is not None else [None] * score.num_consts
    ds = pullback(_sum_to_shape(dm, m_shape).astype(m_dtype), grad_refs)
    ds = jnp.broadcast_to(ds.astype(jnp.float32), shape)
    if allowed is not None:
        # The score_mod's derivative may be infinite where it was never used (sqrt at 0): 0 * inf must stay 0.
        ds = jnp.where(allowed, ds, 0.0)
    return p, ds


def _walk(num_ref, indices_ref, row: tuple, block: int, tile: int, body, carry):
    """Runs ``body(start, carry)`` over the tiles of every block listed in ``num_ref[row]`` / ``indices_ref[row]``
    (``row`` a tuple of indices); each block of ``block`` positions is ``block // tile`` consecutive tiles.

    Each step reads the next tile's start and carries it (``_tile.walk_starts``), so that Triton's pipeliner can
    fetch the tiles ahead of the compute."""
    sub_tiles = block // tile
    count = num_ref[row] * sub_tiles

    def start_of(t):
        if sub_tiles == 1:
            return indices_ref[(*row, t)] * block
        return indices_ref[(*row, lax.div(t, jnp.int32(sub_tiles)))] * block + lax.rem(t, jnp.int32(sub_tiles)) * tile

    return _tile.walk_starts(count, start_of, lambda start, carry: body(pl.multiple_of(start, tile), carry), carry)


def _split_refs(refs, counts: Sequence[int]):
    """The kernel's refs cut into consecutive groups of the given sizes."""
    out, i = [], 0
    for n in counts:
        out.append(refs[i : i + n])
        i += n
    return out


# --------------------------------------------------------------------------------------------- dK and dV


def _dkdv_kernel(*refs, mods_static, tiling: Tiling, group: int, batches: int, mask_batch: int, has_full: bool,
                 mask_per_head: bool, counts):
    """One key tile's dK and dV, added up over the query heads of its group and, where key and value have batch 1
    and ``batches`` > 1, over every query batch (the query-side blocks then hold the whole batch)."""
    score, mask = mods_static
    (q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref), lists, score_refs, mask_refs, (dk_ref, dv_ref) = _split_refs(
        refs, counts
    )
    j, kv_head, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn = tiling.block_m, tiling.block_n
    kv_start = j * bn
    kv_block = lax.div(kv_start, jnp.int32(tiling.kv_block))
    k = k_ref[...]
    v = v_ref[...]

    def for_head(j, carry):
        g = lax.rem(j, jnp.int32(group)) if group > 1 else jnp.int32(0)
        row = g if mask_per_head else 0
        if batches > 1:  # one program for every query batch: the blocks hold them all
            qb = lax.div(j, jnp.int32(group))
            lead, row = (qb, g), (qb if mask_batch > 1 else 0, row)
        else:
            qb, lead, row = b, (g,), (row,)
        h = kv_head * group + g

        def visit(masked):
            def body(q_start, carry):
                dk, dv = carry
                rows = pl.ds(q_start, bm)
                q = q_ref[(*lead, rows, slice(None))]
                d_out = do_ref[(*lead, rows, slice(None))]
                # The tile transposed, S^T = K Q^T [BN, BM], so that P^T and dS^T, the left operands of dV and
                # dK, come out of their dots as they are (a register tile as the left operand of a transposed
                # dot would be re-laid out through shared memory at every step).
                q_idx, kv_idx = _tile.index_tiles(kv_start, q_start, bn, bm)[::-1]
                p_t, ds_t = _score_gradient_tile(
                    _dot(k, q, 1, 1), _dot(v, d_out, 1, 1), lse2_ref[(*lead, rows)][None, :],
                    delta_ref[(*lead, rows)][None, :], qb, h, q_idx, kv_idx, score=score, score_refs=score_refs,
                    mask=mask, mask_refs=mask_refs, masked=masked, tiling=tiling, score_grad_refs=None,
                )
                ds_t = ds_t.astype(q.dtype)
                dv = dv + _dot(p_t.astype(d_out.dtype), d_out, 1, 0)
                dk = dk + _dot(ds_t, q, 1, 0)
                return dk, dv

            return body

        carry = _walk(lists[0], lists[1], (*row, kv_block), tiling.q_block, bm, visit(True), carry)
        if has_full:
            carry = _walk(lists[2], lists[3], (*row, kv_block), tiling.q_block, bm, visit(False), carry)
        return carry

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if group * batches == 1:
        dk, dv = for_head(jnp.int32(0), carry)
    else:
        # int32 bounds: an int32 index under jax_enable_x64 too.
        dk, dv = lax.fori_loop(jnp.int32(0), jnp.int32(group * batches), for_head, carry)
    dk_ref[...] = (dk * tiling.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def dkdv(q, k, v, d_out, lse2, delta, q_lists: BlockLists, mods: Mods, tiling: Tiling, *, interpret: bool):
    """dK and dV (in k's and v's dtypes) from the padded inputs.

    Args:
      q: [B, Hq, Lp, E]; k: [B, Hkv, Sp, E]; v: [B, Hkv, Sp, Ev]; d_out: [B, Hq, Lp, Ev]. Lp and Sp are whole
        numbers of walked blocks, E and Ev powers of two. Key and value may have batch 1 (shared by the query
        batches): each program then adds up every query batch's contribution, and dK and dV have batch 1.
      lse2: [B, Hq, Lp] float32, the forward's lse in base 2 (lse * LOG2_E), +inf where a row attends nowhere.
      delta: [B, Hq, Lp] float32, rowsum(dO * O) - dlse.
      q_lists: the q-side block lists (``q_num_blocks`` ... ``full_q_indices``).
      mods: the mods traced for [block_m, block_n] tiles.
    """
    batch, q_heads, q_padded, e = q.shape
    kv_batch, kv_heads, kv_padded, ev = k.shape[0], k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    batches = batch // kv_batch  # query batches per program: B where key and value are shared, else 1
    mask_batch, mask_heads = q_lists.num.shape[:2]
    mask_per_head = mask_heads > 1
    mask_group = group if mask_per_head else 1
    bn = tiling.block_n
    # Where a program adds up every query batch, the query-side blocks take the whole batch (block index 0).
    q_lead = None if batches == 1 else batch
    list_lead = None if batches == 1 else mask_batch

    def list_index(b, hk, *rest):
        return (b if mask_batch > 1 and batches == 1 else 0, hk if mask_per_head else 0, *rest)

    num_spec = pl.BlockSpec((list_lead, mask_group, q_lists.num.shape[2]), lambda j, hk, b: list_index(b, hk, 0))
    indices_spec = pl.BlockSpec(
        (list_lead, mask_group, *q_lists.indices.shape[2:]), lambda j, hk, b: list_index(b, hk, 0, 0)
    )
    has_full = q_lists.full_num is not None
    list_specs = [num_spec, indices_spec] * (2 if has_full else 1)
    in_specs = [
        pl.BlockSpec((q_lead, group, q_padded, e), lambda j, hk, b: (b, hk, 0, 0)),
        pl.BlockSpec((None, None, bn, e), lambda j, hk, b: (b, hk, j, 0)),
        pl.BlockSpec((None, None, bn, ev), lambda j, hk, b: (b, hk, j, 0)),
        pl.BlockSpec((q_lead, group, q_padded, ev), lambda j, hk, b: (b, hk, 0, 0)),
        pl.BlockSpec((q_lead, group, q_padded), lambda j, hk, b: (b, hk, 0)),
        pl.BlockSpec((q_lead, group, q_padded), lambda j, hk, b: (b, hk, 0)),
        *list_specs,
        *[pl.no_block_spec] * (len(mods.score_consts) + len(mods.mask_consts)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, bn, e), lambda j, hk, b: (b, hk, j, 0)),
        pl.BlockSpec((None, None, bn, ev), lambda j, hk, b: (b, hk, j, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    lists = q_lists.arrays()
    inputs = [q, k, v, d_out, lse2, delta, *lists, *mods.score_consts, *mods.mask_consts]
    counts = (6, len(lists), len(mods.score_consts), len(mods.mask_consts), 2)
    kernel = functools.partial(
        _dkdv_kernel,
        mods_static=(mods.score, mods.mask),
        tiling=tiling,
        group=group,
        batches=batches,
        mask_batch=mask_batch,
        has_full=has_full,
        mask_per_head=mask_per_head,
        counts=counts,
    )
    return pl.pallas_call(
        kernel,
        grid=(kv_padded // bn, kv_heads, kv_batch),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="flex_attention_dkdv",
    )(*inputs)


# ---------------------------------------------------------------------------------------------------- dQ


def _dq_kernel(*refs, mods_static, tiling: Tiling, has_full: bool, counts, grad_slots):
    score, mask = mods_static
    (q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref), lists, score_refs, mask_refs, _zeros, outs = _split_refs(
        refs, counts
    )
    dq_ref, grad_refs = outs[0], outs[1:]
    # One gradient ref per score const: the buffer of a floating const that needs its gradient, else None.
    score_grad_refs = [None if slot is None else grad_refs[slot] for slot in grad_slots]
    i, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn = tiling.block_m, tiling.block_n
    q_start = i * bm
    q_block = lax.div(q_start, jnp.int32(tiling.q_block))
    q = q_ref[...]
    d_out = do_ref[...]
    lse2 = lse2_ref[...][:, None]
    delta = delta_ref[...][:, None]

    def visit(masked):
        def body(kv_start, dq):
            cols = pl.ds(kv_start, bn)
            k = k_ref[cols, :]
            q_idx, kv_idx = _tile.index_tiles(q_start, kv_start, bm, bn)
            _, ds = _score_gradient_tile(
                _dot(q, k, 1, 1), _dot(d_out, v_ref[cols, :], 1, 1), lse2, delta, b, h, q_idx, kv_idx,
                score=score, score_refs=score_refs, mask=mask, mask_refs=mask_refs, masked=masked,
                tiling=tiling, score_grad_refs=score_grad_refs,
            )
            return dq + _dot(ds.astype(k.dtype), k, 1, 0)

        return body

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = _walk(lists[0], lists[1], (q_block,), tiling.kv_block, bn, visit(True), dq)
    if has_full:
        dq = _walk(lists[2], lists[3], (q_block,), tiling.kv_block, bn, visit(False), dq)
    dq_ref[...] = (dq * tiling.scale).astype(dq_ref.dtype)


def dq(
    q, k, v, d_out, lse2, delta, kv_lists: BlockLists, mods: Mods, tiling: Tiling, *, grad_consts: Sequence[bool],
    interpret: bool,
):
    """dQ (in q's dtype) from the padded inputs, and the float32 gradients of the score_mod's captured arrays.

    Args:
      q, k, v, d_out, lse2, delta: as for ``dkdv``.
      kv_lists: the kv-side block lists (``kv_num_blocks`` ... ``full_kv_indices``).
      mods: the mods traced for [block_m, block_n] tiles.
      grad_consts: for each of ``mods.score_consts``, whether its gradient is wanted (it must be floating).

    Returns:
      (dq, grads): grads has one float32 array per score const, of its shape, or None where not wanted.
    """
    batch, q_heads, q_padded, e = q.shape
    kv_heads, kv_padded, ev = k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    mask_batch, mask_heads = kv_lists.num.shape[:2]
    bm = tiling.block_m

    def kv_b(b):  # key and value of batch 1 are read by every query batch
        return b if k.shape[0] == batch else 0

    def list_index(b, h, *rest):
        return (b if mask_batch > 1 else 0, h if mask_heads > 1 else 0, *rest)

    num_spec = pl.BlockSpec((None, None, kv_lists.num.shape[2]), lambda i, h, b: list_index(b, h, 0))
    indices_spec = pl.BlockSpec((None, None, *kv_lists.indices.shape[2:]), lambda i, h, b: list_index(b, h, 0, 0))
    has_full = kv_lists.full_num is not None
    lists = kv_lists.arrays()

    wanted = [c for c, want in zip(mods.score_consts, grad_consts) if want]
    grad_slots, slot = [], 0
    for want in grad_consts:
        grad_slots.append(slot if want else None)
        slot += bool(want)
    zeros = [jnp.zeros(c.shape, jnp.float32) for c in wanted]

    in_specs = [
        pl.BlockSpec((None, None, bm, e), lambda i, h, b: (b, h, i, 0)),
        pl.BlockSpec((None, None, kv_padded, e), lambda i, h, b: (kv_b(b), h // group, 0, 0)),
        pl.BlockSpec((None, None, kv_padded, ev), lambda i, h, b: (kv_b(b), h // group, 0, 0)),
        pl.BlockSpec((None, None, bm, ev), lambda i, h, b: (b, h, i, 0)),
        pl.BlockSpec((None, None, bm), lambda i, h, b: (b, h, i)),
        pl.BlockSpec((None, None, bm), lambda i, h, b: (b, h, i)),
        *[num_spec, indices_spec] * (2 if has_full else 1),
        *[pl.no_block_spec] * (len(mods.score_consts) + len(mods.mask_consts) + len(zeros)),
    ]
    out_specs = [pl.BlockSpec((None, None, bm, e), lambda i, h, b: (b, h, i, 0)), *[pl.no_block_spec] * len(zeros)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), *[jax.ShapeDtypeStruct(z.shape, z.dtype) for z in zeros]]
    inputs = (q, k, v, d_out, lse2, delta, *lists, *mods.score_consts, *mods.mask_consts, *zeros)
    first_zero = len(inputs) - len(zeros)
    counts = (6, len(lists), len(mods.score_consts), len(mods.mask_consts), len(zeros), 1 + len(zeros))
    kernel = functools.partial(
        _dq_kernel,
        mods_static=(mods.score, mods.mask),
        tiling=tiling,
        has_full=has_full,
        counts=counts,
        grad_slots=tuple(grad_slots),
    )
    dq_out, *grads = pl.pallas_call(
        kernel,
        grid=(q_padded // bm, q_heads, batch),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        # The gradient buffers start as the zeros passed in, and every program adds into them.
        input_output_aliases={first_zero + n: 1 + n for n in range(len(zeros))},
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="flex_attention_dq",
    )(*inputs)
    grads = iter(grads)
    return dq_out, [next(grads) if want else None for want in grad_consts]
