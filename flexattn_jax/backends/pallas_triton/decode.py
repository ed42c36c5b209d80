"""Flex attention for short queries over long key/value sequences (decoding): split-KV ("flash decoding").

A decoding step attends a few queries (one per generated token) to thousands of cached keys. The forward kernel's
grid over query tiles then has one program per (batch, head), which leaves most of a GPU idle. Here:

* **Grid (batch x head groups, splits).** The keys a query row visits (its BlockMask row: partial blocks, then full
  blocks) are cut into ``num_splits`` contiguous shares of key tiles; program (g, s) walks share s with the shared
  steps of ``_tile`` and writes a partial result (normalised output and lse) for its share. A small ``jnp`` merge
  combines the shares through their lse (a row that attends nowhere: output 0, lse -inf, no NaN).
* **Packed query heads.** With a mask that does not vary over heads, the ``group = Hq // Hkv`` query heads sharing a
  key/value head and their L queries form one tile of rows (row r is head ``r // L`` of the group, query
  ``r % L``), padded to at least 16 rows; each key/value tile is read once for the whole group. The mods then see h
  and q_idx as [rows, 1] int32 tiles (not scalars), which any mod written with broadcasting ``jnp`` operations
  accepts. With a mask that varies over heads, each program takes one query head (h is still a tile).
* q_idx is the query's position in the query sequence, as in the forward (0 for a single query); caches shift it
  to absolute positions with their mods (``flexattn_jax.nn.offset_mods``).

Served when L <= ``MAX_DECODE_Q_LEN`` and the BlockMask has a single query block (Q_BLOCK >= L: the default 128
always is); otherwise ``flex_attention`` uses the forward kernel. ``kernel_options`` keys (all optional):

* ``decode_enable``: 0 to use the forward kernel for short queries too (default 1).
* ``decode_num_splits``: shares of the key sequence (default: enough programs to fill the GPU, see
  ``default_num_splits``).
* ``decode_BLOCK_N``: the key tile, a power of two from 16 to 256 dividing the mask's KV_BLOCK (default 128 for
  half precision with head dim <= 128, else 64).
* ``decode_num_warps``, ``decode_num_stages``: Triton's launch parameters (defaults 4 and 2).

``attention`` is differentiable: its backward runs the dK/dV and dQ kernels of ``backward.py`` on the decode
kernel's output and lse. ``flex_decode`` is the kernel alone, and also takes key/value with batch 1 shared by every
query batch (the pool of a paged cache, ``flexattn_jax.paged``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import custom_vjp_primal_tree_values
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from flexattn_jax.backends import _captures
from flexattn_jax.backends._arrays import pad_axis
from flexattn_jax.backends._captures import ModProgram
from flexattn_jax.backends.pallas_triton import _tile, backward
from flexattn_jax.backends.pallas_triton import config as config_lib
from flexattn_jax.backends.pallas_triton import vjp as _vjp
from flexattn_jax.backends.pallas_triton.forward import _div, _rem, padded_head_dim

__all__ = [
    "MAX_DECODE_Q_LEN",
    "DecodeConfig",
    "decode_config",
    "default_num_splits",
    "unsupported_reason",
    "flex_decode",
    "check_decode_options",
    "attention",
]

MAX_DECODE_Q_LEN = 32
DECODE_KEYS = ("decode_enable", "decode_num_splits", "decode_BLOCK_N", "decode_num_warps", "decode_num_stages")
# Programs to aim for: a few per streaming multiprocessor of an H100 (132), so that memory latency is hidden.
# A first guess, to be tuned with benchmarks/run.py's decode suite on the GPU.
_TARGET_PROGRAMS = 4 * 132
_MAX_SPLITS = 64
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Static launch configuration of the decode kernel.

    Attributes:
      rows: rows of the query tile (heads per tile x L, padded to a power of two >= 16).
      block_n: keys per tile.
      num_splits: shares of the key sequence, one program each.
      num_warps, num_stages: Triton's launch parameters.
    """

    rows: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int


def check_decode_options(kernel_options: Mapping[str, Any] | None) -> dict[str, int]:
    """The ``decode_*`` keys of ``kernel_options``, checked (ValueError/TypeError naming the key)."""
    options = {}
    for key, value in (kernel_options or {}).items():
        if not isinstance(key, str) or not key.startswith("decode_"):
            continue
        if key not in DECODE_KEYS:
            raise ValueError(f"kernel_options has an unknown decode key {key!r}; the decode kernel reads {DECODE_KEYS}")
        kind = "tile" if key == "decode_BLOCK_N" else key.removeprefix("decode_")
        config_lib.check_option_value(key, value, kind=kind)
        if key == "decode_enable" and value not in (0, 1):
            raise ValueError(f"kernel_options['decode_enable'] must be 0 or 1, got {value}")
        if key == "decode_num_splits" and not 1 <= value <= 1024:
            raise ValueError(f"kernel_options['decode_num_splits'] must be from 1 to 1024, got {value}")
        options[key] = value
    return options


def _heads_per_tile(q_heads: int, kv_heads: int, mask_heads: int) -> int:
    return q_heads // kv_heads if mask_heads == 1 else 1


def _rows(heads_per_tile: int, q_len: int) -> int:
    return max(config_lib.MIN_TILE, 1 << (heads_per_tile * q_len - 1).bit_length())


def unsupported_reason(
    query_shape,
    key_shape,
    *,
    mask_block_size: tuple[int, int],
    mask_num_blocks: tuple[int, int],
    kernel_options: Mapping[str, Any] | None,
) -> str | None:
    """None when the decode kernel serves these inputs (the API then prefers it); otherwise why not."""
    options = check_decode_options(kernel_options)
    if not options.get("decode_enable", 1):
        return "kernel_options['decode_enable'] is 0"
    q_len = query_shape[2]
    if q_len > MAX_DECODE_Q_LEN:
        return f"the decode kernel serves up to {MAX_DECODE_Q_LEN} queries, got L={q_len}"
    if mask_num_blocks[0] != 1:
        return f"the decode kernel needs a BlockMask with a single query block (Q_BLOCK >= L), got {mask_num_blocks[0]}"
    if mask_num_blocks[1] > 1:
        tile = options.get("decode_BLOCK_N", config_lib.MIN_TILE)
        if mask_block_size[1] % tile:
            return f"the BlockMask's KV_BLOCK {mask_block_size[1]} is not a multiple of the key tile {tile}"
    return None


def default_num_splits(programs: int, kv_tiles: int) -> int:
    """Shares of the key sequence: enough programs for ``_TARGET_PROGRAMS``, at least 2 key tiles per share."""
    splits = -(-_TARGET_PROGRAMS // max(1, programs))
    return int(max(1, min(splits, kv_tiles // 2, _MAX_SPLITS)))


def decode_config(
    kernel_options: Mapping[str, Any] | None,
    *,
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    dtype,
    mask_heads: int,
    mask_block_size: tuple[int, int],
    mask_num_blocks: tuple[int, int],
) -> DecodeConfig:
    """The decode kernel's configuration: defaults overridden by ``kernel_options``, fitted to the mask."""
    options = check_decode_options(kernel_options)
    half = jnp.dtype(dtype) != jnp.float32
    default_n = 128 if half and head_dim <= 128 else 64
    if "decode_BLOCK_N" in options:
        block_n = options["decode_BLOCK_N"]
    else:
        block_n = config_lib.fit_tile(default_n, kv_len, mask_block_size[1], mask_num_blocks[1])
        if block_n is None:
            raise ValueError(f"no key tile of at least {config_lib.MIN_TILE} divides KV_BLOCK {mask_block_size[1]}")
    kv_pad = -(-kv_len // block_n) * block_n
    kv_tiles = mask_num_blocks[1] * (mask_block_size[1] // block_n) if mask_num_blocks[1] > 1 else kv_pad // block_n
    hpt = _heads_per_tile(q_heads, kv_heads, mask_heads)
    programs = batch * (q_heads // hpt)
    return DecodeConfig(
        rows=_rows(hpt, q_len),
        block_n=block_n,
        num_splits=min(options.get("decode_num_splits") or default_num_splits(programs, kv_tiles), kv_tiles),
        num_warps=options.get("decode_num_warps", 4),
        num_stages=options.get("decode_num_stages", 2),
    )


# ------------------------------------------------------------------------------------------------- the kernel


@dataclasses.dataclass(frozen=True)
class _Plan:
    q_len: int
    heads_per_tile: int
    head_groups: int  # Hq // heads_per_tile
    tiles_per_kv_head: int  # group // heads_per_tile: programs (head groups) per key/value head
    kv_batch: int  # 1 (shared by every query batch) or the batch size
    mask_batch: int
    mask_heads: int
    rows: int
    block_n: int
    num_splits: int
    kv_tiles_per_block: int
    kv_block: int
    kv_len: int
    kv_pad: int
    clamp_kv: bool
    mask_kv_bounds: bool
    has_full: bool
    scale: float
    inline_ptx: bool  # _tile.exp2 and _tile.fma as inline PTX (not in interpret mode)
    num_score_consts: int
    num_mask_consts: int
    with_max_scores: bool  # a third output: each row's maximum score

    def batch_group(self, bg):
        return _div(bg, self.head_groups), _rem(bg, self.head_groups)

    def mask_row(self, bg):
        b, hg = self.batch_group(bg)
        return (b if self.mask_batch > 1 else 0), (hg if self.mask_heads > 1 else 0), 0


def _row_heads_and_queries(plan: _Plan, hg):
    """h [rows, 1] (query head) and q_idx [rows, 1] (query position) of each row; padding rows repeat the last."""
    rows, q_len = plan.rows, plan.q_len
    r = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    r = jnp.minimum(r, jnp.int32(plan.heads_per_tile * q_len - 1))
    if q_len == 1:
        g, q_idx = r, jnp.zeros((rows, 1), jnp.int32)
    else:
        divisor = jnp.full((rows, 1), q_len, jnp.int32)
        g, q_idx = lax.div(r, divisor), lax.rem(r, divisor)
    return hg * plan.heads_per_tile + g, q_idx


def _kernel(*refs, plan: _Plan, score_mod: ModProgram, mask_mod: ModProgram):
    q_ref, k_ref, v_ref, kv_num_ref, kv_idx_ref, *refs = refs
    if plan.has_full:
        full_num_ref, full_idx_ref, *refs = refs
    score_refs = refs[: plan.num_score_consts]
    mask_refs = refs[plan.num_score_consts : plan.num_score_consts + plan.num_mask_consts]
    o_ref, lse_ref, *max_ref = refs[plan.num_score_consts + plan.num_mask_consts :]

    bg, split = pl.program_id(0), pl.program_id(1)
    b, hg = plan.batch_group(bg)
    h, q_idx = _row_heads_and_queries(plan, hg)
    block_n, sub = plan.block_n, plan.kv_tiles_per_block
    q = q_ref[...]

    # This program's share of the row's key tiles: partial tiles are numbered [0, num_partial), full ones after.
    num_partial = kv_num_ref[...] * sub
    total = num_partial + full_num_ref[...] * sub if plan.has_full else num_partial
    chunk = _div(total + (plan.num_splits - 1), plan.num_splits)
    lo = split * chunk
    hi = jnp.minimum(lo + chunk, total)

    def visit(state, idx_ref, start, stop, is_full_block: bool):
        def start_of(t):
            # Clamped to the row: a program past the row's last tile runs no step, but the walk still reads one.
            it = jnp.minimum(start + t, idx_ref.shape[-1] * sub - 1)
            if sub == 1:
                return idx_ref[it] * plan.kv_block
            return idx_ref[_div(it, sub)] * plan.kv_block + _rem(it, sub) * block_n

        def body(kv_start, state):
            load_start = jnp.minimum(kv_start, plan.kv_pad - block_n) if plan.clamp_kv else kv_start
            rows = pl.ds(pl.multiple_of(load_start, block_n), block_n)
            k = k_ref[rows, :]
            v = v_ref[rows, :]
            kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
            mod_kv = jnp.minimum(kv_idx, plan.kv_len - 1) if plan.mask_kv_bounds else kv_idx
            s = _tile.score_tile(q, k, plan.scale)
            s = _tile.apply_score_mod(score_mod, score_refs, s, b, h, q_idx, mod_kv, fast=plan.inline_ptx)
            allowed = _tile.allowed_tile(mask_mod, mask_refs, b, h, q_idx, mod_kv, is_full_block=is_full_block)
            if plan.mask_kv_bounds:
                in_bounds = jnp.broadcast_to(kv_idx < plan.kv_len, s.shape)
                allowed = in_bounds if allowed is None else allowed & in_bounds
            s = _tile.mask_scores(s, allowed)
            return _tile.softmax_update(state, s, v, inline_ptx=plan.inline_ptx)

        return _tile.walk_starts(jnp.maximum(stop - start, 0), start_of, body, state)

    state = _tile.softmax_init(plan.rows, v_ref.shape[-1])
    state = visit(state, kv_idx_ref, lo, jnp.minimum(hi, num_partial), is_full_block=False)
    if plan.has_full:
        start = jnp.maximum(lo, num_partial) - num_partial
        state = visit(state, full_idx_ref, start, hi - num_partial, is_full_block=True)
    out, lse = _tile.softmax_finalize(state)
    o_ref[...] = out
    lse_ref[...] = lse
    if plan.with_max_scores:
        max_ref[0][...] = _tile.softmax_max_scores(state)


def _trace_mods(score_mod: Callable, mask_mod: Callable, rows: int, block_n: int):
    """The mods traced for the decode tile: b a scalar, h and q_idx [rows, 1], kv_idx [1, block_n]."""
    i32 = jnp.int32
    index_avals = (
        jax.ShapeDtypeStruct((), i32),
        jax.ShapeDtypeStruct((rows, 1), i32),
        jax.ShapeDtypeStruct((rows, 1), i32),
        jax.ShapeDtypeStruct((1, block_n), i32),
    )
    score_avals = (jax.ShapeDtypeStruct((rows, block_n), jnp.float32), *index_avals)
    score_program, score_consts = _captures.trace_mod(score_mod, score_avals, name="score_mod")
    _captures._check_out(score_program, rows, block_n, floating=True)
    mask_program, mask_consts = _captures.trace_mod(mask_mod, index_avals, name="mask_mod")
    _captures._check_out(mask_program, rows, block_n, floating=False)
    return (score_program, score_consts), (mask_program, mask_consts)


def _merge(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Combines per-share results out [..., S, R, Ev], lse [..., S, R] (float32) into [..., R, Ev] and [..., R]."""
    top = jnp.max(lse, axis=-2)
    shift = jnp.where(top == _NEG_INF, jnp.float32(0.0), top)
    weights = jnp.exp(lse - shift[..., None, :])  # 0 for a share that saw nothing
    total = jnp.sum(weights, axis=-2)
    has_any = total > 0
    safe = jnp.where(has_any, total, jnp.float32(1.0))
    merged = jnp.sum(weights[..., None] * out, axis=-3) / safe[..., None]
    merged_lse = jnp.where(has_any, shift + jnp.log(safe), jnp.float32(_NEG_INF))
    return merged, merged_lse


def flex_decode(
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
    block_size: tuple[int, int],
    scale: float,
    kernel_options: Mapping[str, Any] | None = None,
    interpret: bool = False,
    traced: tuple | None = None,
    with_max_scores: bool = False,
    no_gradient: str | None = None,
) -> tuple[jax.Array, ...]:
    """The decode kernel and the merge of its shares (not differentiable; see ``attention``).

    Args:
      query [B, Hq, L, E] with L <= MAX_DECODE_Q_LEN; key [Bk, Hkv, S, E], value [Bk, Hkv, S, Ev] with Bk = B, or
        Bk = 1 for key/value shared by every batch (the BlockMask's rows then say which keys each batch visits).
      score_mod, mask_mod: the user's mods; kv_num_blocks ... full_kv_indices, block_size: the BlockMask (one query
        block); scale, kernel_options, interpret: as ``flex_attention``.
      traced: the mods already traced by ``_trace_mods`` (with their consts), or None to trace them here.
      with_max_scores: also return each query's maximum modified score.
      no_gradient: for a direct caller, the ValueError's message when a gradient is taken through this call, with
        respect to query, key, value or an array the mods close over (Pallas would fail on an assertion).

    Returns:
      out [B, Hq, L, Ev] in the query's dtype, lse [B, Hq, L] float32, and with ``with_max_scores`` max_scores
      [B, Hq, L] float32 (-inf where a query attends nowhere).
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_batch, kv_heads, kv_len, value_dim = key.shape[0], key.shape[1], key.shape[2], value.shape[3]
    assert kv_batch in (1, batch) and q_heads % kv_heads == 0, (query.shape, key.shape)
    mask_batch, mask_heads = kv_num_blocks.shape[:2]
    num_blocks = tuple(kv_indices.shape[-2:])
    reason = unsupported_reason(
        query.shape, key.shape, mask_block_size=block_size, mask_num_blocks=num_blocks, kernel_options=kernel_options
    )
    if reason is not None:
        raise ValueError(reason)
    head_pad, value_pad = padded_head_dim(head_dim), padded_head_dim(value_dim)
    config = decode_config(
        kernel_options,
        batch=batch,
        q_heads=q_heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_pad,
        dtype=query.dtype,
        mask_heads=mask_heads,
        mask_block_size=tuple(block_size),
        mask_num_blocks=num_blocks,
    )
    if traced is None:
        traced = _trace_mods(score_mod, mask_mod, config.rows, config.block_n)
    (score_program, score_consts), (mask_program, mask_consts) = traced
    if no_gradient is not None:
        query, key, value = (_not_differentiated(x, no_gradient) for x in (query, key, value))
        score_consts = [_not_differentiated(c, no_gradient) for c in score_consts]
        mask_consts = [_not_differentiated(c, no_gradient) for c in mask_consts]

    hpt = _heads_per_tile(q_heads, kv_heads, mask_heads)
    head_groups = q_heads // hpt
    rows, block_n = config.rows, config.block_n
    kv_pad = -(-kv_len // block_n) * block_n
    if num_blocks[1] == 1:
        kv_tiles_per_block, kv_block_stride = kv_pad // block_n, kv_pad
    else:
        kv_tiles_per_block, kv_block_stride = block_size[1] // block_n, block_size[1]
    visited_end = kv_block_stride * num_blocks[1] if num_blocks[1] > 1 else kv_pad
    has_full = full_kv_num_blocks is not None
    plan = _Plan(
        q_len=q_len,
        heads_per_tile=hpt,
        head_groups=head_groups,
        tiles_per_kv_head=(q_heads // kv_heads) // hpt,
        kv_batch=kv_batch,
        mask_batch=mask_batch,
        mask_heads=mask_heads,
        rows=rows,
        block_n=block_n,
        num_splits=config.num_splits,
        kv_tiles_per_block=kv_tiles_per_block,
        kv_block=kv_block_stride,
        kv_len=kv_len,
        kv_pad=kv_pad,
        clamp_kv=visited_end > kv_pad,
        mask_kv_bounds=visited_end > kv_len,
        has_full=has_full,
        scale=float(scale),
        inline_ptx=not interpret,
        num_score_consts=len(score_consts),
        num_mask_consts=len(mask_consts),
        with_max_scores=with_max_scores,
    )

    # Queries packed into row tiles: [B, head groups, heads per tile * L, E], padded to `rows` and `head_pad`.
    packed = query.reshape(batch, head_groups, hpt * q_len, head_dim)
    packed = pad_axis(pad_axis(packed, 2, rows), 3, head_pad)
    key = pad_axis(pad_axis(key, 2, kv_pad), 3, head_pad)
    value = pad_axis(pad_axis(value, 2, kv_pad), 3, value_pad)

    def q_map(bg, s):
        b, hg = plan.batch_group(bg)
        return b, hg, 0, 0

    def kv_map(bg, s):
        b, hg = plan.batch_group(bg)
        return (b if plan.kv_batch > 1 else 0), _div(hg, plan.tiles_per_kv_head), 0, 0

    def num_map(bg, s):
        return plan.mask_row(bg)

    def idx_map(bg, s):
        return (*plan.mask_row(bg), 0)

    def out_map(bg, s):
        b, hg = plan.batch_group(bg)
        return b, hg, s, 0, 0

    def lse_map(bg, s):
        b, hg = plan.batch_group(bg)
        return b, hg, s, 0

    def whole(x):
        return pl.BlockSpec(x.shape, lambda bg, s: (0,) * len(x.shape))

    in_specs = [
        pl.BlockSpec((None, None, rows, head_pad), q_map),
        pl.BlockSpec((None, None, kv_pad, head_pad), kv_map),
        pl.BlockSpec((None, None, kv_pad, value_pad), kv_map),
        pl.BlockSpec((None, None, None), num_map),
        pl.BlockSpec((None, None, None, num_blocks[1]), idx_map),
    ]
    inputs = [packed, key, value, kv_num_blocks, kv_indices]
    if has_full:
        in_specs += in_specs[-2:]
        inputs += [full_kv_num_blocks, full_kv_indices]
    consts = [*score_consts, *mask_consts]
    in_specs += [whole(c) for c in consts]
    inputs += consts

    kernel = functools.partial(_kernel, plan=plan, score_mod=score_program, mask_mod=mask_program)
    splits = config.num_splits
    row_stats = 2 if with_max_scores else 1  # lse, and max_scores when asked for
    out, lse, *max_scores = pl.pallas_call(
        kernel,
        grid=(batch * head_groups, splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, rows, value_pad), out_map),
            *[pl.BlockSpec((None, None, None, rows), lse_map)] * row_stats,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, head_groups, splits, rows, value_pad), jnp.float32),
            *[jax.ShapeDtypeStruct((batch, head_groups, splits, rows), jnp.float32)] * row_stats,
        ],
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="flex_attention_decode",
    )(*inputs)
    out, lse = _merge(out, lse)
    # A share that saw nothing has maximum -inf, so the row's is the largest of its shares'.
    max_scores = [jnp.max(m, axis=-2) for m in max_scores]
    real = hpt * q_len
    out = out[:, :, :real, :value_dim].reshape(batch, q_heads, q_len, value_dim).astype(query.dtype)
    lse, *max_scores = (x[:, :, :real].reshape(batch, q_heads, q_len) for x in (lse, *max_scores))
    return (out, lse, *max_scores)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _not_differentiated(x, message):
    """x itself; differentiating through it raises ValueError(message)."""
    del message
    return x


@_not_differentiated.defjvp
def _not_differentiated_jvp(message, primals, tangents):
    raise ValueError(message)


# ----------------------------------------------------------------------------------- differentiable wrapper


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
    """Differentiable decode attention: arguments and results as ``pallas_triton.vjp.attention``.

    The forward is ``flex_decode``; the backward runs ``backward.py``'s dK/dV and dQ kernels on its output and lse,
    with the mods traced a second time for their tiles (the hoisted arrays of that tracing carry the gradients of
    the arrays the score_mod closes over).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    num_blocks = tuple(kv_indices.shape[-2:])
    block_size = tuple(int(b) for b in block_size)
    head_dim = padded_head_dim(query.shape[3])
    sizes = dict(q_len=q_len, kv_len=kv_len, mask_block_size=block_size, mask_num_blocks=num_blocks)
    dconfig = decode_config(
        kernel_options,
        batch=query.shape[0],
        q_heads=query.shape[1],
        kv_heads=key.shape[1],
        head_dim=head_dim,
        dtype=query.dtype,
        mask_heads=kv_num_blocks.shape[1],
        q_len=q_len,
        kv_len=kv_len,
        mask_block_size=block_size,
        mask_num_blocks=num_blocks,
    )
    bwd_config = backward.backward_config(kernel_options, head_dim=head_dim, dtype=query.dtype, **sizes)
    plan = _vjp._plan(bwd_config, query.shape, value.shape, kv_len, block_size, num_blocks, scale, interpret)
    (score_program, score_consts), (mask_program, mask_consts) = _trace_mods(
        score_mod, mask_mod, dconfig.rows, dconfig.block_n
    )
    tiles = _vjp._backward_tiles(plan)
    bwd_score_programs, bwd_score_consts = _captures.trace_for_tiles(score_mod, tiles, score=True)
    bwd_mask_programs, bwd_mask_consts = _captures.trace_for_tiles(mask_mod, tiles, score=False)
    programs = ((None, *bwd_score_programs), (None, *bwd_mask_programs))
    kv_lists = backward.BlockLists(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    if q_num_blocks is None:
        q_lists = _vjp._transpose(kv_lists)
    else:
        q_lists = backward.BlockLists(q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)

    def run_forward(q, k, v, consts, kv_lists):
        return flex_decode(
            q,
            k,
            v,
            score_mod=score_mod,
            mask_mod=mask_mod,
            kv_num_blocks=kv_lists.num,
            kv_indices=kv_lists.indices,
            full_kv_num_blocks=kv_lists.full_num,
            full_kv_indices=kv_lists.full_indices,
            block_size=block_size,
            scale=scale,
            kernel_options=kernel_options,
            interpret=interpret,
            traced=((score_program, consts[0]), (mask_program, consts[1])),
            with_max_scores=with_max_scores,
        )

    @jax.custom_vjp
    def attend(q, k, v, consts, bwd_score_consts, bwd_mask_consts, kv_lists, q_lists):
        del bwd_score_consts, bwd_mask_consts, q_lists
        return run_forward(q, k, v, consts, kv_lists)

    def attend_fwd(q, k, v, consts, bwd_score_consts, bwd_mask_consts, kv_lists, q_lists):
        wanted = tuple(
            bool(c.perturbed) and bool(jnp.issubdtype(c.value.dtype, jnp.inexact)) for c in bwd_score_consts
        )
        q, k, v, consts, bwd_score_consts, bwd_mask_consts, kv_lists, q_lists = custom_vjp_primal_tree_values(
            (q, k, v, consts, bwd_score_consts, bwd_mask_consts, kv_lists, q_lists)
        )
        outputs = run_forward(q, k, v, consts, kv_lists)
        residuals = (q, k, v, *outputs[:2], bwd_score_consts, bwd_mask_consts, kv_lists, q_lists)
        return outputs, (residuals, _vjp._Static(wanted), consts)

    def attend_bwd(saved, cotangents):
        residuals, wanted, consts = saved
        # max_scores, when returned, has no gradient: its cotangent is dropped.
        dq, dk, dv, score_grads = _vjp._backward(plan, programs, residuals, cotangents[:2], wanted.value)
        none = lambda tree: jax.tree.map(lambda _: None, tree)  # noqa: E731
        _, _, _, _, _, _, bwd_mask_consts, kv_lists, q_lists = residuals
        return dq, dk, dv, none(consts), score_grads, none(bwd_mask_consts), none(kv_lists), none(q_lists)

    attend.defvjp(attend_fwd, attend_bwd, symbolic_zeros=True)
    return attend(query, key, value, (score_consts, mask_consts), bwd_score_consts, bwd_mask_consts, kv_lists, q_lists)

