"""flex attention on the Pallas Triton kernels, differentiable: a ``jax.custom_vjp`` whose forward is the forward
kernel and whose backward runs the dK/dV and dQ kernels of ``backward.py``.

The mods are traced here, in the caller's trace, for the tile shape of each kernel (forward, dK/dV, dQ), with one
set of hoisted arrays shared by all three. Those arrays enter the ``custom_vjp`` as primal inputs, so JAX's own
autodiff carries their gradients on to the user's arrays (through any work hoisted out of the kernel, such as
``table * 2``). With ``symbolic_zeros`` the rule knows which inputs are being differentiated: the gradient of an
array the score_mod closes over is computed only when it is floating and differentiated; the mask_mod's arrays (a
mask is piecewise constant) and the BlockMask's index arrays get none, and cost nothing.

The forward keeps (q, k, v, out, lse) and the hoisted arrays; nothing of size L x S is saved or built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from flexattn_jax.backends import _captures
from flexattn_jax.backends._arrays import pad_axis
from flexattn_jax.backends.pallas_triton import _tile, backward
from flexattn_jax.backends.pallas_triton import config as config_lib
from flexattn_jax.backends.pallas_triton.forward import flex_forward, padded_head_dim

__all__ = ["BackwardKernels", "ForwardKernel", "attention"]


class ForwardKernel(Protocol):
    """A forward kernel ``attention`` can differentiate with the Triton backward kernels."""

    tile: tuple  # the tile its mods are traced for, as ``_captures.trace_for_tiles`` takes it

    def __call__(self, q, k, v, score_consts, mask_consts, kv_lists, score_program, mask_program, *,
                 with_max_scores: bool, for_backward: bool):
        """(out, lse), and max_scores with ``with_max_scores``, as ``flex_forward`` returns them; ``kv_lists`` a
        ``backward.BlockLists``. ``for_backward``: the backward kernels will recompute the scores from these
        inputs and take the probabilities as exp(score - lse), so lse must be of the scores they compute."""


class BackwardKernels(Protocol):
    """Backward kernels ``attention`` can run instead of the Triton ones (the Mosaic GPU kernels). They compute
    dQ, dK and dV only: when a gradient of an array the score_mod closes over is wanted, the Triton kernels run."""

    tile: tuple  # the tile their mods are traced for, as ``_captures.trace_for_tiles`` takes it

    def takes_batch_one_kv(self, k_shape, kv_lists: backward.BlockLists) -> bool:
        """Whether ``__call__`` takes key and value of batch 1 (shared by every query batch) as they are, for
        these shapes; otherwise ``_backward`` broadcasts them."""

    def __call__(self, q, k, v, d_out, lse2, delta, kv_lists, q_lists, score_program, score_consts, mask_program,
                 mask_consts):
        """(dq, dk, dv) in the inputs' dtypes, from unpadded arrays; ``lse2`` and ``delta`` as ``_backward``
        computes them. Key and value of batch 1 where ``takes_batch_one_kv`` says so, and dk, dv then too."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
    """Python data carried through the residuals as pytree structure, not as arrays."""

    value: Any


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The backward kernels' tilings and the padded sizes they run on (all static)."""

    dkdv: backward.Tiling
    dq: backward.Tiling
    q_padded: int
    kv_padded: int
    head_dim: int
    value_dim: int
    interpret: bool
    kv_batch_loop: bool = False  # the Triton kernels take key and value of batch 1 as they are (BackwardConfig)


def _padded_length(length: int, block: int, num_blocks: int, tiles) -> int:
    """Whole mask blocks; or, for a single block, the length rounded up to the largest tile (tiles are powers of two,
    so every tile divides it)."""
    if num_blocks > 1:
        return num_blocks * block
    tile = max(tiles)
    return -(-length // tile) * tile


def _backward_tiles(plan) -> list[tuple]:
    """The tiles the backward kernels trace the mods for: the dK/dV kernel's transposed, the dQ kernel's."""
    return [(plan.dkdv.block_m, plan.dkdv.block_n, "transposed"), (plan.dq.block_m, plan.dq.block_n)]


def _plan(bwd: backward.BackwardConfig, q_shape, v_shape, kv_len, block_size, num_blocks, scale, interpret) -> _Plan:
    q_len = q_shape[2]
    q_padded = _padded_length(q_len, block_size[0], num_blocks[0], (bwd.block_m1, bwd.block_m2))
    kv_padded = _padded_length(kv_len, block_size[1], num_blocks[1], (bwd.block_n1, bwd.block_n2))
    # The unit the kernels walk along each axis: the mask block, or the padded length where one block covers it.
    q_block = block_size[0] if num_blocks[0] > 1 else q_padded
    kv_block = block_size[1] if num_blocks[1] > 1 else kv_padded
    common = dict(
        q_block=q_block,
        kv_block=kv_block,
        q_len=q_len,
        kv_len=kv_len,
        scale=scale,
        inline_ptx=not interpret,
    )
    return _Plan(
        dkdv=backward.Tiling(block_m=bwd.block_m1, block_n=bwd.block_n1, num_warps=bwd.num_warps,
                             num_stages=bwd.num_stages, **common),
        dq=backward.Tiling(block_m=bwd.block_m2, block_n=bwd.block_n2, num_warps=bwd.dq_num_warps,
                           num_stages=bwd.dq_num_stages, **common),
        q_padded=q_padded,
        kv_padded=kv_padded,
        head_dim=padded_head_dim(q_shape[3]),
        value_dim=padded_head_dim(v_shape[3]),
        interpret=interpret,
        kv_batch_loop=backward.loops_over_query_batches(bwd, v_shape[1], kv_padded),
    )


def _backward(plan: _Plan, programs, residuals, cotangents, wanted, kernels: BackwardKernels | None = None):
    """Gradients of q, k, v and of the score_mod's hoisted arrays (None where not wanted); on ``kernels`` when
    given and no array's gradient is wanted. Key and value of batch 1, shared by every query batch, go to the
    kernels as they are where they take them (``kernels.takes_batch_one_kv``; the Triton kernels with
    ``bwd_kv_batch_loop``); otherwise they are broadcast, and their gradients are the sums over the batches."""
    q, k, v, *rest = residuals
    *_, kv_lists, _ = rest
    on_kernels = kernels is not None and not any(wanted)
    takes_batch_one = kernels.takes_batch_one_kv(k.shape, kv_lists) if on_kernels else plan.kv_batch_loop
    if k.shape[0] == q.shape[0] or takes_batch_one:
        return _backward_per_batch(plan, programs, residuals, cotangents, wanted, kernels)
    k, v = (jnp.broadcast_to(x, (q.shape[0], *x.shape[1:])) for x in (k, v))
    dq, dk, dv, grads = _backward_per_batch(plan, programs, (q, k, v, *rest), cotangents, wanted, kernels)
    return dq, jnp.sum(dk, axis=0, keepdims=True), jnp.sum(dv, axis=0, keepdims=True), grads


def _backward_per_batch(plan: _Plan, programs, residuals, cotangents, wanted, kernels: BackwardKernels | None):
    """``_backward`` with key and value of the query's batch size, or of batch 1 (see there)."""
    q, k, v, out, lse, score_consts, mask_consts, kv_lists, q_lists = residuals
    d_out, d_lse = cotangents
    f32 = jnp.float32
    if isinstance(d_out, SymbolicZero):
        d_out = jnp.zeros(out.shape, out.dtype)
    # dL/dm = P * (dO.v - dO.out + dlse): the lse cotangent only shifts delta.
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)
    if not isinstance(d_lse, SymbolicZero):
        delta = delta - d_lse.astype(f32)
    # A row that attends nowhere has no gradient, but a loss may send NaN to its lse of -inf (cos(-inf)); its delta
    # must stay finite, or P * (dP - delta) is 0 * NaN where the score_mod's pullback reads it.
    delta = jnp.where(lse == -jnp.inf, jnp.float32(0.0), delta)
    # The kernels take lse in base 2. A row that attends nowhere has lse -inf; +inf makes its P = exp(m - lse)
    # exactly 0, never inf or NaN.
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * jnp.float32(_tile.LOG2_E))
    if kernels is not None and not any(wanted):
        (*_, score_program), (*_, mask_program) = programs
        dq, dk, dv = kernels(
            q, k, v, d_out, lse2, delta, kv_lists, q_lists, score_program, score_consts, mask_program, mask_consts
        )
        return dq, dk, dv, tuple(None for _ in score_consts)

    q_len, e = q.shape[2:]
    kv_len, ev = v.shape[2:]
    q = pad_axis(pad_axis(q, 2, plan.q_padded), 3, plan.head_dim)
    k = pad_axis(pad_axis(k, 2, plan.kv_padded), 3, plan.head_dim)
    v = pad_axis(pad_axis(v, 2, plan.kv_padded), 3, plan.value_dim)
    d_out = pad_axis(pad_axis(d_out.astype(q.dtype), 2, plan.q_padded), 3, plan.value_dim)
    lse2 = pad_axis(lse2, 2, plan.q_padded, jnp.inf)
    delta = pad_axis(delta, 2, plan.q_padded)

    (_, dkdv_score, dq_score, *_), (_, dkdv_mask, dq_mask, *_) = programs
    dkdv_mods = backward.Mods(dkdv_score, score_consts, dkdv_mask, mask_consts)
    dq_mods = backward.Mods(dq_score, score_consts, dq_mask, mask_consts)
    dk, dv = backward.dkdv(q, k, v, d_out, lse2, delta, q_lists, dkdv_mods, plan.dkdv, interpret=plan.interpret)
    dq, grads = backward.dq(
        q, k, v, d_out, lse2, delta, kv_lists, dq_mods, plan.dq, grad_consts=wanted, interpret=plan.interpret
    )
    grads = tuple(None if g is None else g.astype(c.dtype) for g, c in zip(grads, score_consts))
    return dq[:, :, :q_len, :e], dk[:, :, :kv_len, :e], dv[:, :, :kv_len, :ev], grads


def _lists_to_map(num, indices, num_cols: int):
    """(num [..., R], indices [..., R, C]) -> bool map [..., R, num_cols] of the listed blocks."""
    positions = jax.lax.broadcasted_iota(jnp.int32, indices.shape, indices.ndim - 1)
    listed = positions < num[..., None]
    columns = jax.lax.broadcasted_iota(jnp.int32, (*indices.shape, num_cols), indices.ndim)
    return jnp.any((indices[..., None] == columns) & listed[..., None], axis=-2)


def _map_to_lists(block_map):
    """bool map [..., R, C] -> (num [..., R], indices [..., R, C]): the set columns first, in increasing order."""
    num = jnp.sum(block_map, axis=-1, dtype=jnp.int32)
    indices = jnp.argsort(~block_map, axis=-1, stable=True).astype(jnp.int32)
    return num, indices


def _transpose(kv_lists: backward.BlockLists) -> backward.BlockLists:
    """The q-side block lists (for each key block, the query blocks visiting it) of kv-side ones."""
    num_kv_blocks = kv_lists.indices.shape[-1]

    def transposed(num, indices):
        return _map_to_lists(jnp.swapaxes(_lists_to_map(num, indices, num_kv_blocks), -1, -2))

    num, indices = transposed(kv_lists.num, kv_lists.indices)
    full_num = full_indices = None
    if kv_lists.full_num is not None:
        full_num, full_indices = transposed(kv_lists.full_num, kv_lists.full_indices)
    return backward.BlockLists(num, indices, full_num, full_indices)


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
    forward: ForwardKernel | None = None,
    backward_kernels: BackwardKernels | None = None,
    with_max_scores: bool = False,
) -> tuple[jax.Array, ...]:
    """Differentiable flex attention on the Pallas Triton kernels.

    Args:
      query: [B, Hq, L, E]; key: [B, Hkv, S, E]; value: [B, Hkv, S, Ev]; one dtype; Hq a multiple of Hkv.
      score_mod, mask_mod: the user's mods (they may close over arrays, also tracers of an outer transformation).
      kv_num_blocks ... full_q_indices: the BlockMask's index arrays (see ``BlockMask``); the full pairs may be None.
        The q-side ones (which the dK/dV kernel walks) are derived from the kv-side ones when not given.
      block_size: the BlockMask's (Q_BLOCK, KV_BLOCK).
      scale: multiplies q.k before score_mod.
      kernel_options: tiles, warps and stages of the forward (``BLOCK_M`` ...) and backward (``BLOCK_M1``,
        ``BLOCK_N1``, ``BLOCK_M2``, ``BLOCK_N2``, ``bwd_num_warps``, ``bwd_num_stages``, ``bwd_dq_num_warps``,
        ``bwd_dq_num_stages``) kernels.
      interpret: run the kernels in interpret mode (on the CPU).
      forward: another forward kernel to run instead of the Triton one (the Mosaic GPU kernel); the backward
        kernels only need its (out, lse).
      backward_kernels: other backward kernels to run instead of the Triton ones when no gradient of a captured
        array is wanted (the Mosaic GPU kernels).
      with_max_scores: also return each query's maximum modified score.

    Returns:
      out [B, Hq, L, Ev] in the query's dtype and lse [B, Hq, L] float32 (-inf where a query attends nowhere);
      differentiable with respect to query, key, value and the floating arrays the score_mod closes over. With
      ``with_max_scores`` also max_scores [B, Hq, L] float32 (-inf where a query attends nowhere), which carries no
      gradient (its cotangent is dropped, as PyTorch FlexAttention marks it non-differentiable).

    Raises:
      ValueError/TypeError: bad ``kernel_options``, or tiles that cannot divide the BlockMask's blocks (raised
        here, on the forward call, not when the gradient is first taken).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    num_blocks = kv_indices.shape[-2:]
    block_size = tuple(int(b) for b in block_size)
    head_dim = padded_head_dim(query.shape[3])
    sizes = dict(q_len=q_len, kv_len=kv_len, mask_block_size=block_size, mask_num_blocks=tuple(num_blocks))
    fwd_config = config_lib.forward_config(kernel_options, head_dim=head_dim, dtype=query.dtype, **sizes)
    bwd_config = backward.backward_config(kernel_options, head_dim=head_dim, dtype=query.dtype, **sizes)
    plan = _plan(bwd_config, query.shape, value.shape, kv_len, block_size, num_blocks, scale, interpret)

    # The mods, traced for the forward's, the dK/dV kernel's and the dQ kernel's tiles, with one set of arrays.
    tiles = [
        (fwd_config.block_m, fwd_config.block_n) if forward is None else forward.tile,
        *_backward_tiles(plan),
    ]
    if backward_kernels is not None:
        tiles.append(backward_kernels.tile)
    score_programs, score_consts = _captures.trace_for_tiles(score_mod, tiles, score=True)
    # The Triton kernels' indices lie below the padded lengths (ModProgram.with_index_bound). Not the Mosaic
    # kernels' programs: their index tiles are whole [BM, BN] tiles, where converting both would cost more.
    index_bound = max(plan.q_padded, plan.kv_padded)
    triton_programs = range(0 if forward is None else 1, 3)  # the forward's, the dK/dV kernel's, the dQ kernel's
    score_programs = tuple(
        program.with_index_bound(index_bound) if n in triton_programs else program
        for n, program in enumerate(score_programs)
    )
    mask_programs, mask_consts = _captures.trace_for_tiles(mask_mod, tiles, score=False)
    if score_consts:  # the stages do not change the tiles the mods were traced for
        bwd_config = backward.cap_stages_for_captures(bwd_config, kernel_options)
        plan = _plan(bwd_config, query.shape, value.shape, kv_len, block_size, num_blocks, scale, interpret)
    programs = (score_programs, mask_programs)
    kv_lists = backward.BlockLists(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    if q_num_blocks is None:
        q_lists = _transpose(kv_lists)
    else:
        q_lists = backward.BlockLists(q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)

    def run_forward(q, k, v, score_consts, mask_consts, kv_lists, for_backward):
        if forward is not None:
            return forward(q, k, v, score_consts, mask_consts, kv_lists, score_programs[0], mask_programs[0],
                           with_max_scores=with_max_scores, for_backward=for_backward)
        return flex_forward(
            q,
            k,
            v,
            score_consts,
            mask_consts,
            *kv_lists.arrays_with_none(),
            score_mod=score_programs[0],
            mask_mod=mask_programs[0],
            config=fwd_config,
            mask_block_size=block_size,
            scale=float(scale),
            interpret=interpret,
            with_max_scores=with_max_scores,
        )

    @jax.custom_vjp
    def attend(q, k, v, score_consts, mask_consts, kv_lists, q_lists):
        del q_lists
        return run_forward(q, k, v, score_consts, mask_consts, kv_lists, for_backward=False)

    def attend_fwd(q, k, v, score_consts, mask_consts, kv_lists, q_lists):
        # With symbolic_zeros every leaf arrives as (value, perturbed).
        wanted = tuple(
            bool(c.perturbed) and bool(jnp.issubdtype(c.value.dtype, jnp.inexact)) for c in score_consts
        )
        q, k, v, score_consts, mask_consts, kv_lists, q_lists = custom_vjp_primal_tree_values(
            (q, k, v, score_consts, mask_consts, kv_lists, q_lists)
        )
        outputs = run_forward(q, k, v, score_consts, mask_consts, kv_lists, for_backward=True)
        residuals = (q, k, v, *outputs[:2], score_consts, mask_consts, kv_lists, q_lists, _Static(wanted))
        return outputs, residuals

    def attend_bwd(residuals, cotangents):
        *arrays, wanted = residuals
        # max_scores, when returned, has no gradient: its cotangent is dropped.
        dq, dk, dv, score_grads = _backward(plan, programs, arrays, cotangents[:2], wanted.value, backward_kernels)
        no_gradient = lambda tree: jax.tree.map(lambda _: None, tree)  # noqa: E731
        _, _, _, _, _, _, mask_consts, kv_lists, q_lists = arrays
        return dq, dk, dv, score_grads, no_gradient(mask_consts), no_gradient(kv_lists), no_gradient(q_lists)

    attend.defvjp(attend_fwd, attend_bwd, symbolic_zeros=True)
    return attend(query, key, value, score_consts, mask_consts, kv_lists, q_lists)
