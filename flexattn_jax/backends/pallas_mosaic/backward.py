"""The flex-attention backward as two Pallas Mosaic GPU kernels for Hopper (sm90): dK/dV and dQ.

The same mathematics as ``pallas_triton.backward`` (FlashAttention-2's backward, Dao 2023, on the BlockMask's lists),
with the forward's Hopper structure: one memory warpgroup streams tiles by TMA into a ring of ``num_stages``
shared-memory slots, two compute warpgroups multiply with wgmma.

* **dK/dV**: a program owns 128 keys of one key/value head (64 per compute warpgroup, K and V resident in shared
  memory) and, for each query head of its group, walks the query blocks that visit its key block (``q_num_blocks`` /
  ``q_indices``, mask_mod applied, then the full pair). The memory warpgroup streams Q, dO, lse and delta tiles of 64
  queries. Each warpgroup computes S^T = K Q^T, so that P^T and dS^T come out of the accumulator in the layout wgmma
  takes as its register operand: dV += P^T dO, dP^T = V dO^T, dK += dS^T Q.
* **dQ** in the same kernel (``Config(fuse_dq=True)``, chosen by default for long walks; FlashAttention-3's
  structure): each dK/dV step also forms that step's contribution dS K to the 64 queries' dQ and adds it into a
  float32 buffer in global memory with a TMA reduce-add.
  The two warpgroups put their dS^T tiles in shared memory; each multiplies the whole [64 queries, 128 keys] dS by
  half of K's columns (at head dim 64, the warpgroups take the whole product on alternate steps). Five matmuls per
  tile pair instead of seven; the order of the additions, and so the last bits of dQ, vary from run to run.
* **dQ** as a kernel of its own (``Config(fuse_dq=False)``, deterministic): a program owns 128 queries of one head
  (Q, dO, lse, delta resident) and walks its key blocks (``kv_num_blocks`` / ``kv_indices`` and the full pair); the
  memory warpgroup streams K and V tiles of 64 keys. S = Q K^T and dP = dO V^T, then dQ += dS K.

Key and value of batch 1, shared by every query batch (``Config.kv_batch_loop``): a dK/dV program walks its key
block's query blocks in every query batch in turn, as it does the query heads of a GQA group, and writes dK and dV
of batch 1; the dQ kernel's copies read batch 0. Neither key and value nor their gradients are copied per batch.

The mods run on whole [64, 64] index tiles, transposed in the dK/dV kernel (q_idx along the columns). A score_mod is
a function of each score alone, so its derivative is one forward-mode pass of JAX autodiff over the traced mod (a
tangent of ones), multiplied into P before the wgmmas that produce dP: dS = (P dm/ds) (dP - delta). Arrays the mods close over are read as in the forward
(``forward.site_load``). Gradients with respect to those arrays need an atomic scatter into a float32 buffer, which
these kernels do not have: when one is wanted the caller runs the Triton backward instead.

Both kernels are launched head by head (the tiles on the grid's fastest axis), so that the programs in flight at
once are those of one or a few heads and read the tiles they stream, and add into the dQ rows, in L2 rather than
in DRAM (benchmarks/NOTES.md section 34).

Sequences are padded to whole 128-row tiles (or mask blocks); queries and keys past the true lengths are masked by
bounds wherever the padding is visited, so that their values (zeros, or a mod's output there) never reach a gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from flexattn_jax.backends._arrays import pad_axis
from flexattn_jax.backends._captures import ModProgram
from flexattn_jax.backends._device import num_sms
from flexattn_jax.backends.pallas_mosaic import forward as _forward

__all__ = ["HEAD_DIMS", "TILE", "Config", "flex_backward", "smem_bytes"]

TILE = 64  # rows per compute warpgroup, and the walked tile: queries (dK/dV) or keys (dQ)
COMPUTE_WARPGROUPS = 2
PROGRAM_ROWS = TILE * COMPUTE_WARPGROUPS  # keys per dK/dV program, queries per dQ program
HEAD_DIMS = (64, 128)
_LOG2_E = math.log2(math.e)


# Registers per thread of each warpgroup (3 x 128 threads share 64K): the memory warpgroup only issues copies, and
# the dK/dV kernel's compute warpgroups hold two [64, D] float32 accumulators beside the step's tiles (ptxas spilled
# them at 232; NOTES.md section 17).
COMPUTE_REGISTERS = 240
MEMORY_REGISTERS = 24
DQ_COLUMNS = 64  # columns of dQ one warpgroup forms per step in the fused kernel
_F32_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))  # 128-byte rows of float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Static launch configuration: ``num_stages`` shared-memory slots of each kernel's streamed ring; ``fuse_dq``:
    dQ accumulated by the dK/dV kernel (True) or computed by a kernel of its own (False, deterministic);
    ``copy_warps``: warps of the memory warpgroup that run its copy loop (``forward.in_copy_warps``);
    ``overlap``: 0, each product of a step waited for before the next is issued (dV's and dP^T's together); 1, the
    dK/dV kernel forms dS^T while dV's product runs and issues dK's behind it, and the dQ kernel forms P while dP's
    product runs; 2, also the dK/dV kernel's dP^T issued beside S^T, running during the softmax;
    ``auto_barriers``: False compiles the dK/dV kernel without the warpgroup barriers Pallas puts around every
    store to shared memory and before every copy out of it (its own barriers order what needs ordering: see
    ``_dkdv_kernel``). None, for either: chosen by the score_mod and the head dim (``default_schedule``);
    ``heads_inner``: the launch order of the programs. False (the default): the tiles of one head are consecutive,
    so that the programs running at once share that head's streamed tiles in L2; True: the batch and the heads vary
    fastest, each program running at once on a different head (the earlier order, kept to measure against:
    benchmarks/NOTES.md section 34);
    ``kv_batch_loop``: where key and value have batch 1 (shared by the query batches), True has each dK/dV program
    add up every query batch's contribution, reading key and value once; False broadcasts them to the query batch
    and adds the per-batch gradients up; None, the first where the dK/dV programs fill the GPU (``loops_over_query_batches``)."""

    num_stages: int = 2
    fuse_dq: bool = True
    copy_warps: int = 4
    overlap: int | None = None
    auto_barriers: bool | None = None
    heads_inner: bool = False
    kv_batch_loop: bool | None = None


def derivative_is_one(score_mod: ModProgram, score_consts: Sequence[jax.Array]) -> bool:
    """The score_mod's derivative with respect to the score is 1 everywhere: no score_mod, or one that adds to the
    score (ALiBi, a relative bias), whose forward-mode tangent passes through unchanged."""
    if score_mod.is_identity:
        return True
    tile = jax.ShapeDtypeStruct((TILE, TILE), jnp.float32)
    indices = jax.ShapeDtypeStruct((TILE, TILE), jnp.int32)

    def derivative(consts, score, ones, q_idx, kv_idx):
        return score_mod.derivative(consts, score, jnp.int32(0), jnp.int32(0), q_idx, kv_idx, ones=ones)[1]

    consts = [jax.ShapeDtypeStruct(jnp.shape(c), c.dtype) for c in score_consts]
    jaxpr = jax.make_jaxpr(derivative)(consts, tile, tile, indices, indices).jaxpr
    return jaxpr.outvars[0] is jaxpr.invars[len(consts) + 1]


def default_schedule(score_mod: ModProgram, score_consts: Sequence[jax.Array], head_dim: int) -> tuple[int, bool]:
    """(overlap, auto_barriers) where the options leave them unset. Overlap 2 without automatic barriers measured
    0-9% faster than overlap 0 with them on full, causal, ALiBi and document attention, but 10% slower on
    soft-capping, whose derivative (from tanh) the dK/dV kernel keeps beside P, and where ptxas spilled 40% more
    (benchmarks/NOTES.md section 33). For a score_mod whose derivative is not 1, overlap 1 without the barriers
    measured 1-3% faster than overlap 0 with them at head dims 64 and 128 (sections 70 and 73); head dims above
    128, not measured, keep overlap 0 with the barriers."""
    if derivative_is_one(score_mod, score_consts):
        return 2, False
    return (1, False) if head_dim <= 128 else (0, True)


def smem_bytes(head_dim: int, num_stages: int, fuse_dq: bool = True) -> int:
    """Shared memory of the largest kernel (the unfused two have the same resident and streamed tile sizes)."""
    tile = TILE * head_dim * 2  # one bf16 [64, D] tile
    resident = 2 * COMPUTE_WARPGROUPS * tile
    streamed = num_stages * (2 * tile + 2 * TILE * 4)
    fused = 0
    if fuse_dq:
        # Two [128 keys, 64 queries] bf16 dS^T buffers, one [64, 64] float32 dQ staging tile per warpgroup.
        fused = 2 * PROGRAM_ROWS * TILE * 2 + COMPUTE_WARPGROUPS * TILE * DQ_COLUMNS * 4
    return resident + streamed + fused


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts of one backward launch."""

    group: int  # query heads per key/value head
    # Query batches whose gradients one dK/dV program adds up: the query batch size where key and value have batch
    # 1 and are read once (``loops_over_query_batches``), else 1 (the program's batch is the grid's).
    batches_per_kv: int
    mask_batch: int
    mask_heads: int
    q_block: int  # queries per mask block (the padded length when the mask has one row of blocks)
    kv_block: int
    q_len: int
    kv_len: int
    q_padded: int
    kv_padded: int
    has_full: bool
    apply_score_mod: bool
    apply_mask_mod: bool
    scale: float
    num_score_consts: int
    num_mask_consts: int
    num_stages: int
    copy_warps: int
    overlap: int
    dtype: jnp.dtype
    score_sites: tuple
    mask_sites: tuple

    @property
    def q_bounds(self) -> bool:
        return self.q_padded > self.q_len

    @property
    def kv_bounds(self) -> bool:
        return self.kv_padded > self.kv_len


def _split(refs, plan: _Plan, num_lists: int):
    lists = list(refs[:num_lists]) + [None] * (4 - num_lists)
    refs = refs[num_lists:]
    score_refs = refs[: plan.num_score_consts]
    mask_refs = refs[plan.num_score_consts : plan.num_score_consts + plan.num_mask_consts]
    return lists, score_refs, mask_refs, refs[plan.num_score_consts + plan.num_mask_consts :]


def _probabilities(s, lse2, b, h, *, plan: _Plan, mods, const_refs, masked: bool, q_start, kv_start,
                   transposed: bool):
    """P of one tile from the raw scores ``s`` = q.k (float32 [64, 64] in the wgmma layout, [keys, queries] when
    ``transposed``; its first query ``q_start``, first key ``kv_start``), and the factor that turns dP - delta into
    dS: ``(p, p_grad)``, both zero wherever the position is masked or out of bounds.

    ``lse2`` is broadcast to the tile (+inf where a row attends nowhere). ``p_grad`` is P times the score_mod's
    derivative, dm/ds (P itself for no score_mod): dS = (dm/ds) P (dP - delta). It is formed here, before the
    wgmmas that produce dP, so that what stays live across them is one float32 tile, not P and whatever the mod's
    derivative would keep (soft-capping's tanh, the mask): the dK/dV kernel's registers are that tight.
    """
    score_mod, mask_mod = mods
    score_refs, mask_refs = const_refs
    shape = s.shape
    q_axis = 1 if transposed else 0
    q_idx = q_start + plgpu.broadcasted_iota(jnp.int32, shape, q_axis, layout=plgpu.Layout.WGMMA)
    kv_idx = kv_start + plgpu.broadcasted_iota(jnp.int32, shape, 1 - q_axis, layout=plgpu.Layout.WGMMA)
    derivative = None
    if plan.apply_score_mod:
        load = _forward.site_load(plan.score_sites, score_refs, q_start, kv_start, shape, transposed=transposed)
        ones = plgpu.layout_cast(jnp.full(shape, 1.0, jnp.float32), plgpu.Layout.WGMMA)
        # Row and column reads are vector loads, which jax.jvp cannot differentiate: made first, then replayed.
        vector_reads = any(site.along_indices for site in plan.score_sites)
        m, derivative = score_mod.derivative(score_refs[: score_mod.num_consts], s * jnp.float32(plan.scale), b, h,
                                             q_idx, kv_idx, ones=ones, load=load, replay_reads=vector_reads)
        s2 = _forward.as_tile(m, shape, jnp.float32) * jnp.float32(_LOG2_E)
    else:
        s2 = s * jnp.float32(plan.scale * _LOG2_E)
    p = jnp.exp2(s2 - lse2)
    allowed = None
    if masked and plan.apply_mask_mod:
        load = _forward.site_load(plan.mask_sites, mask_refs, q_start, kv_start, shape, transposed=transposed)
        allowed = _forward.as_tile(mask_mod(mask_refs[: mask_mod.num_consts], b, h, q_idx, kv_idx, load=load), shape,
                                   jnp.bool_)
    if plan.q_bounds:
        allowed = q_idx < plan.q_len if allowed is None else allowed & (q_idx < plan.q_len)
    if plan.kv_bounds:
        allowed = kv_idx < plan.kv_len if allowed is None else allowed & (kv_idx < plan.kv_len)
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
    if derivative is None:
        return p, p
    p_grad = p * _forward.as_tile(derivative, shape, jnp.float32)
    # Where a position was never used the mod's derivative may be infinite (sqrt at 0): keep 0 * inf out.
    return p, (p_grad if allowed is None else jnp.where(allowed, p_grad, 0.0))


def _copy_resident(sources, buffers, index: tuple, barriers, wg):
    """TMA-copies ``source[index]`` into each of this warpgroup's resident ``buffers`` and waits for all of them;
    copy n arrives on barrier ``n * COMPUTE_WARPGROUPS + wg``."""
    for n, (source, buffer) in enumerate(zip(sources, buffers)):
        plgpu.copy_gmem_to_smem(source.at[index], buffer, barriers.at[n * COMPUTE_WARPGROUPS + wg])
    for n in range(len(sources)):
        plgpu.barrier_wait(barriers.at[n * COMPUTE_WARPGROUPS + wg])


# --------------------------------------------------------------------------------------------- dK and dV


def _dkdv_kernel(*refs, plan: _Plan, score_mod: ModProgram, mask_mod: ModProgram, num_lists: int, fuse_dq: bool):
    """The dK/dV kernel, dQ fused or not.

    Compiled without Pallas's automatic barriers by default (``Config.auto_barriers``), which would put a warpgroup
    barrier before and after each store to shared memory and before each copy out of it: with dQ fused, eight per
    step. What they would order is ordered here otherwise. Shared memory that a store overwrites is read only by
    wgmmas and TMA copies, never by plain loads: the dS^T buffer of a parity was last read by the dQ products of
    two steps back, which both warpgroups waited for before arriving on the other parity's ``ds_ready``, which
    this warpgroup has since waited on; a warpgroup's dQ staging tile was last read by its previous reduce-add,
    which ``wait_smem_to_gmem`` awaits (with a barrier) before the store; K and V are overwritten by the gradients
    only after the ``done`` barrier. Each store is followed by ``commit_smem``, whose proxy fence and barrier make
    it visible to the wgmma or the copy that reads it.
    """
    q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *refs = refs
    list_refs, score_refs, mask_refs, outs = _split(refs, plan, num_lists)
    dq_ref, dk_ref, dv_ref = outs if fuse_dq else (None, *outs)
    stages, dtype = plan.num_stages, plan.dtype
    head_dim = q_ref.shape[-1]
    dq_chunks = head_dim // DQ_COLUMNS  # column chunks of a step's dQ, one per warpgroup (or one for both)
    kv_tile, kv_head, kv_b = lax.axis_index("kv"), lax.axis_index("heads"), lax.axis_index("batch")
    kv_row = lax.div(kv_tile * PROGRAM_ROWS, jnp.int32(plan.kv_block))

    def head(j):
        """The j-th (query batch, query head) whose gradients this program adds up, and its walk."""
        g = lax.rem(j, jnp.int32(plan.group)) if plan.group > 1 else jnp.int32(0)
        b = lax.div(j, jnp.int32(plan.group)) if plan.batches_per_kv > 1 else kv_b
        h = kv_head * plan.group + g
        mb = b if plan.mask_batch > 1 else jnp.int32(0)
        mh = h if plan.mask_heads > 1 else jnp.int32(0)
        walk = _forward.BlockWalk(list_refs, mb, mh, kv_row, block=plan.q_block, tile=TILE, has_full=plan.has_full)
        return b, h, walk

    def over_heads(fn, carry):
        """fn(b, h, lists, carry) for each query head of the group (in each query batch, where key and value are
        shared by them); a single one is no loop."""
        count = plan.group * plan.batches_per_kv
        if count == 1:
            return fn(*head(jnp.int32(0)), carry)
        return lax.fori_loop(jnp.int32(0), jnp.int32(count), lambda j, c: fn(*head(j), c), carry)

    def body(resident, ring, resident_ready, ready, consumed, fused):
        k_all, v_all = resident
        q_ring, do_ring, lse_ring, delta_ring = ring
        q_ready, do_ready, lse_ready, delta_ready = ready
        ds_all, dq_stage, ds_ready, done = fused if fuse_dq else (None,) * 4
        wg = lax.axis_index("wg")

        @pl.when(wg < COMPUTE_WARPGROUPS)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            own = pl.ds(wg * TILE, TILE)
            k_own, v_own = k_all.at[own], v_all.at[own]
            kv_base = kv_tile * PROGRAM_ROWS + wg * TILE
            rows = pl.ds(kv_base, TILE)
            _copy_resident((k_ref, v_ref), (k_own, v_own), (kv_b, kv_head, rows), resident_ready, wg)
            wgmma_layout = plgpu.Layout.WGMMA
            zeros_tile = plgpu.layout_cast(jnp.full((TILE, TILE), 0.0, jnp.float32), wgmma_layout)
            column = plgpu.Layout.WGMMA.reduce(0)

            def for_head(b, h, lists, carry):
                dk, dv, base = carry

                def step_fn(step, carry, *, masked: bool):
                    dk, dv = carry
                    count = base + step
                    slot = lax.rem(count, jnp.int32(stages))
                    q_start = lists.start(step)
                    parity = lax.rem(count, jnp.int32(2))
                    plgpu.barrier_wait(q_ready.at[slot])

                    def issue_s_t(s_ref):
                        plgpu.wgmma(s_ref, k_own, q_ring.at[slot].transpose((1, 0)))

                    def issue_dp_t(dp_ref):
                        plgpu.wgmma(dp_ref, v_own, do_ring.at[slot].transpose((1, 0)))

                    def issue_dv(dv_ref, p_t):
                        plgpu.wgmma(dv_ref, p_t.astype(dtype), do_ring.at[slot])

                    def probabilities(s_t):
                        plgpu.barrier_wait(lse_ready.at[slot])
                        lse2 = lax.broadcast_in_dim(plgpu.load(lse_ring.at[slot], layout=column), (TILE, TILE), (1,))
                        return _probabilities(
                            s_t, lse2, b, h, plan=plan, mods=(score_mod, mask_mod),
                            const_refs=(score_refs, mask_refs), masked=masked, q_start=q_start, kv_start=kv_base,
                            transposed=True,
                        )

                    def gradient_of_scores(p_grad_t, dp_t):
                        """dS^T in the input dtype; with dQ fused, also put in shared memory for both warpgroups."""
                        plgpu.barrier_wait(delta_ready.at[slot])
                        delta = plgpu.load(delta_ring.at[slot], layout=column)
                        ds_t = (p_grad_t * (dp_t - lax.broadcast_in_dim(delta, (TILE, TILE), (1,)))).astype(dtype)
                        if fuse_dq:
                            ds_all.at[parity, own][...] = ds_t
                            plgpu.commit_smem()
                            plgpu.barrier_arrive(ds_ready.at[parity])
                        return ds_t

                    if plan.overlap == 0:
                        # Each product waited for before the next step: S^T; dV and dP^T (two wgmmas, one wait); dK.
                        def st(s_ref):
                            issue_s_t(s_ref)
                            return s_ref[...]

                        p_t, p_grad_t = probabilities(pl.run_scoped(st, plgpu.ACC((TILE, TILE), jnp.float32)))
                        plgpu.barrier_wait(do_ready.at[slot])

                        def dv_dp(refs):
                            dv_ref, dp_ref = refs
                            issue_dv(dv_ref, p_t)
                            issue_dp_t(dp_ref)

                        dv, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros_tile)))
                        ds_t = gradient_of_scores(p_grad_t, dp_t)

                        def dk_fn(acc_ref):
                            plgpu.wgmma(acc_ref, ds_t, q_ring.at[slot])

                        dk = pl.run_state(dk_fn)(plgpu.ACC.init(dk))
                    else:
                        # Each product waited for only where its result is needed (wgmma groups complete in the
                        # order issued): dV's product runs while dS^T is formed, and dK's is issued behind it.
                        # With overlap 2, dP^T is also issued beside S^T and runs during the softmax.
                        def products(refs):
                            s_ref, dp_ref, dv_ref, dk_ref = refs
                            issue_s_t(s_ref)
                            if plan.overlap == 2:
                                plgpu.barrier_wait(do_ready.at[slot])
                                issue_dp_t(dp_ref)
                                p_t, p_grad_t = probabilities(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))
                                issue_dv(dv_ref, p_t)
                            else:
                                p_t, p_grad_t = probabilities(plgpu.wgmma_accumulator_load(s_ref, wait_n=0))
                                plgpu.barrier_wait(do_ready.at[slot])
                                issue_dp_t(dp_ref)
                                issue_dv(dv_ref, p_t)
                            ds_t = gradient_of_scores(p_grad_t, plgpu.wgmma_accumulator_load(dp_ref, wait_n=1))
                            plgpu.wgmma(dk_ref, ds_t, q_ring.at[slot])

                        accumulators = (zeros_tile, zeros_tile, dv, dk)
                        _, _, dv, dk = pl.run_state(products)(tuple(map(plgpu.ACC.init, accumulators)))
                    plgpu.barrier_arrive(consumed.at[slot])
                    if fuse_dq:
                        plgpu.barrier_wait(ds_ready.at[parity])
                        _accumulate_dq(ds_all.at[parity], k_all, dq_stage.at[wg], dq_ref.at[b, h, pl.ds(q_start, TILE)],
                                       chunk=lax.rem(wg + count, jnp.int32(2)), num_chunks=dq_chunks)
                    return dk, dv

                carry = lax.fori_loop(0, lists.num_partial, functools.partial(step_fn, masked=True), (dk, dv))
                if plan.has_full:
                    carry = lax.fori_loop(
                        lists.num_partial, lists.num_steps, functools.partial(step_fn, masked=False), carry
                    )
                return (*carry, base + lists.num_steps)

            acc = plgpu.layout_cast(jnp.full((TILE, head_dim), 0.0, jnp.float32), wgmma_layout)
            dk, dv, _ = over_heads(for_head, (acc, acc, jnp.int32(0)))
            if fuse_dq:
                # The other warpgroup's last dQ product may still read this warpgroup's keys.
                plgpu.barrier_arrive(done)
                plgpu.barrier_wait(done)
            # K and V are no longer needed: stage the gradients through their buffers.
            k_own[...] = (dk * jnp.float32(plan.scale)).astype(dtype)
            v_own[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_own, dk_ref.at[kv_b, kv_head, rows])
            plgpu.copy_smem_to_gmem(v_own, dv_ref.at[kv_b, kv_head, rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WARPGROUPS)
        def _memory():
            plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

            def for_head(b, h, lists, base):
                @pl.loop(0, lists.num_steps)
                def _(step):
                    count = base + step
                    slot = lax.rem(count, jnp.int32(stages))
                    rows = pl.ds(lists.start(step), TILE)

                    # A slot's first use needs no wait; later ones wait until both compute warpgroups are done.
                    @pl.when(count >= stages)
                    def _():
                        plgpu.barrier_wait(consumed.at[slot])

                    plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_ring.at[slot], q_ready.at[slot])
                    plgpu.copy_gmem_to_smem(lse2_ref.at[b, h, rows], lse_ring.at[slot], lse_ready.at[slot])
                    plgpu.copy_gmem_to_smem(do_ref.at[b, h, rows], do_ring.at[slot], do_ready.at[slot])
                    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_ring.at[slot], delta_ready.at[slot])

                return base + lists.num_steps

            _forward.in_copy_warps(lambda: over_heads(for_head, jnp.int32(0)), plan.copy_warps)

    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    tile = (TILE, head_dim)
    fused = ()
    if fuse_dq:
        fused = (
            plgpu.SMEM((2, PROGRAM_ROWS, TILE), dtype, transforms=transforms),
            plgpu.SMEM((COMPUTE_WARPGROUPS, TILE, DQ_COLUMNS), jnp.float32, transforms=_F32_TRANSFORMS),
            plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=2),
            plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
        )
    pl.run_scoped(
        body,
        (
            plgpu.SMEM((PROGRAM_ROWS, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((PROGRAM_ROWS, head_dim), dtype, transforms=transforms),
        ),
        (
            plgpu.SMEM((stages, *tile), dtype, transforms=transforms),
            plgpu.SMEM((stages, *tile), dtype, transforms=transforms),
            plgpu.SMEM((stages, TILE), jnp.float32),
            plgpu.SMEM((stages, TILE), jnp.float32),
        ),
        plgpu.Barrier(num_barriers=2 * COMPUTE_WARPGROUPS),
        (plgpu.Barrier(num_barriers=stages),) * 4,
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),
        fused,
        collective_axes="wg",
    )


def _accumulate_dq(ds_t_ref, k_all, stage, dq_rows, *, chunk, num_chunks: int):
    """Adds dS K for one step's 64 queries into the float32 dQ in global memory (``dq_rows``: [64, D]).

    ``ds_t_ref`` holds both warpgroups' dS^T ([128 keys, 64 queries]), ``k_all`` the program's 128 keys. This
    warpgroup forms the columns ``chunk`` of the product: with two chunks (head dim 128) each warpgroup takes one;
    with one (head dim 64) the warpgroup whose ``chunk`` is 0 takes it, which alternates from step to step. (Issuing
    this product together with dK's, one wait for both, measured 8% slower at head dim 128: NOTES.md section 11.)
    """

    def accumulate():
        columns = pl.ds(chunk * DQ_COLUMNS, DQ_COLUMNS)

        def product(acc_ref):
            plgpu.wgmma(acc_ref, ds_t_ref.transpose((1, 0)), k_all.at[:, columns])
            return acc_ref[...]

        dq = pl.run_scoped(product, plgpu.ACC((TILE, DQ_COLUMNS), jnp.float32))
        # The previous step's reduce-add must have read the staging tile before it is overwritten.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        stage[...] = dq
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, dq_rows.at[:, columns], reduction_op="add")

    if num_chunks == COMPUTE_WARPGROUPS:
        accumulate()
    else:
        pl.when(chunk == 0)(accumulate)


# ---------------------------------------------------------------------------------------------------- dQ


def _dq_kernel(*refs, plan: _Plan, score_mod: ModProgram, mask_mod: ModProgram, num_lists: int):
    q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, *refs = refs
    list_refs, score_refs, mask_refs, (dq_ref,) = _split(refs, plan, num_lists)
    stages, dtype = plan.num_stages, plan.dtype
    head_dim = q_ref.shape[-1]
    q_tile, h, b = lax.axis_index("q"), lax.axis_index("heads"), lax.axis_index("batch")
    kv_head = lax.div(h, jnp.int32(plan.group)) if plan.group > 1 else h
    kv_b = jnp.int32(0) if plan.batches_per_kv > 1 else b  # key and value of batch 1, read by every query batch
    mb = b if plan.mask_batch > 1 else jnp.int32(0)
    mh = h if plan.mask_heads > 1 else jnp.int32(0)
    q_row = lax.div(q_tile * PROGRAM_ROWS, jnp.int32(plan.q_block))

    def lists():
        return _forward.BlockWalk(list_refs, mb, mh, q_row, block=plan.kv_block, tile=TILE, has_full=plan.has_full)

    def body(resident, ring, resident_ready, ready, consumed):
        q_own2, do_own2, lse_own2, delta_own2 = resident
        k_ring, v_ring = ring
        k_ready, v_ready = ready
        k_consumed, v_consumed = consumed
        wg = lax.axis_index("wg")

        @pl.when(wg < COMPUTE_WARPGROUPS)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            q_own, do_own = q_own2.at[wg], do_own2.at[wg]
            q_base = q_tile * PROGRAM_ROWS + wg * TILE
            rows = pl.ds(q_base, TILE)
            _copy_resident(
                (q_ref, do_ref, lse2_ref, delta_ref), (q_own, do_own, lse_own2.at[wg], delta_own2.at[wg]),
                (b, h, rows), resident_ready, wg,
            )
            wgmma_layout = plgpu.Layout.WGMMA
            row = plgpu.Layout.WGMMA.reduce(1)
            lse2 = lax.broadcast_in_dim(plgpu.load(lse_own2.at[wg], layout=row), (TILE, TILE), (0,))
            delta = lax.broadcast_in_dim(plgpu.load(delta_own2.at[wg], layout=row), (TILE, TILE), (0,))
            zeros_tile = plgpu.layout_cast(jnp.full((TILE, TILE), 0.0, jnp.float32), wgmma_layout)
            walk = lists()

            def step_fn(step, dq, *, masked: bool):
                slot = lax.rem(step, jnp.int32(stages))
                kv_start = walk.start(step)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])

                def probabilities(s):
                    return _probabilities(
                        s, lse2, b, h, plan=plan, mods=(score_mod, mask_mod),
                        const_refs=(score_refs, mask_refs), masked=masked, q_start=q_base, kv_start=kv_start,
                        transposed=False,
                    )

                def s_dp(s_ref, dp_ref):
                    # Two wgmmas; with overlap, P is formed while the second (dP) runs.
                    plgpu.wgmma(s_ref, q_own, k_ring.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, do_own, v_ring.at[slot].transpose((1, 0)))
                    if plan.overlap:
                        p, p_grad = probabilities(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))
                        return p, p_grad, dp_ref[...]
                    return s_ref[...], dp_ref[...]

                accumulator = plgpu.ACC((TILE, TILE), jnp.float32)
                if plan.overlap:
                    p, p_grad, dp = pl.run_scoped(s_dp, accumulator, accumulator)
                else:
                    s, dp = pl.run_scoped(s_dp, accumulator, accumulator)
                    p, p_grad = probabilities(s)
                plgpu.barrier_arrive(v_consumed.at[slot])
                ds = p_grad * (dp - delta)

                def dq_fn(acc_ref):
                    plgpu.wgmma(acc_ref, ds.astype(dtype), k_ring.at[slot])

                dq = pl.run_state(dq_fn)(plgpu.ACC.init(dq))
                plgpu.barrier_arrive(k_consumed.at[slot])
                return dq

            dq = plgpu.layout_cast(jnp.full((TILE, head_dim), 0.0, jnp.float32), wgmma_layout)
            dq = lax.fori_loop(0, walk.num_partial, functools.partial(step_fn, masked=True), dq)
            if plan.has_full:
                dq = lax.fori_loop(walk.num_partial, walk.num_steps, functools.partial(step_fn, masked=False), dq)
            # Q is no longer needed: stage dQ through its buffer.
            q_own[...] = (dq * jnp.float32(plan.scale)).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_own, dq_ref.at[b, h, rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WARPGROUPS)
        def _memory():
            plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
            _forward.in_copy_warps(
                lambda: _forward.stream_key_values(
                    k_ref, v_ref, (kv_b, kv_head), k_ring, v_ring, ready, consumed, walk=lists(), base=None,
                    stages=stages,
                ),
                plan.copy_warps,
            )

    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    tile = (TILE, head_dim)
    pl.run_scoped(
        body,
        (
            plgpu.SMEM((COMPUTE_WARPGROUPS, *tile), dtype, transforms=transforms),
            plgpu.SMEM((COMPUTE_WARPGROUPS, *tile), dtype, transforms=transforms),
            plgpu.SMEM((COMPUTE_WARPGROUPS, TILE), jnp.float32),
            plgpu.SMEM((COMPUTE_WARPGROUPS, TILE), jnp.float32),
        ),
        (
            plgpu.SMEM((stages, *tile), dtype, transforms=transforms),
            plgpu.SMEM((stages, *tile), dtype, transforms=transforms),
        ),
        plgpu.Barrier(num_barriers=4 * COMPUTE_WARPGROUPS),
        (plgpu.Barrier(num_barriers=stages),) * 2,
        (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
        collective_axes="wg",
    )


# ------------------------------------------------------------------------------------------------ wrapper


def loops_over_query_batches(config: Config, kv_heads: int, kv_len: int, kv_block_size: int,
                             num_kv_blocks: int) -> bool:
    """Whether ``flex_backward`` takes key and value of batch 1 as they are, each dK/dV program adding up every
    query batch (``Config.kv_batch_loop``; unset: where those programs, key tiles times key/value heads, are at least
    the GPU's SMs, since the loop leaves B times fewer of them). Otherwise the caller broadcasts them to the query
    batch and adds the per-batch gradients up."""
    if config.kv_batch_loop is not None:
        return config.kv_batch_loop
    kv_padded, _ = _padded(kv_len, kv_block_size, num_kv_blocks)
    return kv_heads * (kv_padded // PROGRAM_ROWS) >= num_sms()


def _padded(length: int, block: int, num_blocks: int) -> tuple[int, int]:
    """(padded length, walked block): whole mask blocks, or one block of the length rounded up to PROGRAM_ROWS."""
    if num_blocks > 1:
        return num_blocks * block, block
    padded = -(-length // PROGRAM_ROWS) * PROGRAM_ROWS
    return padded, padded


def flex_backward(
    q, k, v, d_out, lse2, delta, kv_lists, q_lists, *, score_mod: ModProgram, score_consts: Sequence[jax.Array],
    mask_mod: ModProgram, mask_consts: Sequence[jax.Array], mask_block_size: tuple[int, int], scale: float,
    config: Config,
):
    """dQ, dK, dV (in the inputs' dtypes) on plain arrays.

    Args:
      q [B, Hq, L, E], k [B, Hkv, S, E], v [B, Hkv, S, E], d_out [B, Hq, L, E]: bfloat16 or float16, E in
        ``HEAD_DIMS``; Hq a multiple of Hkv. Key and value may have batch 1, shared by every query batch, where
        ``loops_over_query_batches`` says so: each dK/dV program then adds up every query batch's contribution,
        and dK and dV (of batch 1) are the sums over the query batches.
      lse2 [B, Hq, L] float32: the forward's lse in base 2, +inf where a row attends nowhere.
      delta [B, Hq, L] float32: rowsum(dO * O) - dlse.
      kv_lists, q_lists: the BlockMask's kv-side and q-side lists (``pallas_triton.backward.BlockLists``). Its
        Q_BLOCK and KV_BLOCK are multiples of 128 where it has more than one block along the axis.
      score_mod, mask_mod: programs traced for whole [64, 64] tiles; their arrays are read at scalar indices or
        with q_idx / kv_idx plus an offset (``forward.analyze_reads``).
      mask_block_size: the BlockMask's (Q_BLOCK, KV_BLOCK).
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    num_q_blocks, num_kv_blocks = kv_lists.indices.shape[-2:]
    q_padded, q_block = _padded(q_len, mask_block_size[0], num_q_blocks)
    kv_padded, kv_block = _padded(kv_len, mask_block_size[1], num_kv_blocks)
    kv_batch = k.shape[0]
    assert kv_batch == batch or loops_over_query_batches(config, kv_heads, kv_len, mask_block_size[1],
                                                         num_kv_blocks), (k.shape, q.shape, config)
    assert q_block % PROGRAM_ROWS == 0 and kv_block % PROGRAM_ROWS == 0, (mask_block_size, q_len, kv_len)
    score_sites, problem = _forward.analyze_reads(score_mod, TILE)
    assert problem is None, problem
    mask_sites, problem = _forward.analyze_reads(mask_mod, TILE)
    assert problem is None, problem
    has_full = kv_lists.full_num is not None
    overlap, auto_barriers = config.overlap, config.auto_barriers
    if overlap is None or auto_barriers is None:
        default_overlap, default_auto_barriers = default_schedule(score_mod, score_consts, head_dim)
        overlap = default_overlap if overlap is None else overlap
        auto_barriers = default_auto_barriers if auto_barriers is None else auto_barriers
    score_consts, score_sites = _forward.walked_consts(score_mod, score_consts, score_sites, q_padded, kv_padded)
    mask_consts, mask_sites = _forward.walked_consts(mask_mod, mask_consts, mask_sites, q_padded, kv_padded)
    plan = _Plan(
        group=q_heads // kv_heads,
        batches_per_kv=batch // kv_batch,
        mask_batch=kv_lists.num.shape[0],
        mask_heads=kv_lists.num.shape[1],
        q_block=q_block,
        kv_block=kv_block,
        q_len=q_len,
        kv_len=kv_len,
        q_padded=q_padded,
        kv_padded=kv_padded,
        has_full=has_full,
        apply_score_mod=not score_mod.is_identity,
        apply_mask_mod=not _forward.is_everywhere(mask_mod),
        scale=float(scale),
        num_score_consts=len(score_consts),
        num_mask_consts=len(mask_consts),
        num_stages=config.num_stages,
        copy_warps=config.copy_warps,
        overlap=overlap,
        dtype=jnp.dtype(q.dtype),
        score_sites=score_sites,
        mask_sites=mask_sites,
    )
    q = pad_axis(q, 2, q_padded)
    d_out = pad_axis(d_out.astype(q.dtype), 2, q_padded)
    # Padded queries attend nowhere: P = exp2(m - inf) = 0.
    lse2 = pad_axis(lse2, 2, q_padded, jnp.inf)
    delta = pad_axis(delta, 2, q_padded)
    k = pad_axis(k, 2, kv_padded)
    v = pad_axis(v, 2, kv_padded)
    dense = (q, k, v, d_out, lse2, delta)
    consts = (*score_consts, *mask_consts)
    common = dict(num_threads=COMPUTE_WARPGROUPS + 1, thread_name="wg")

    def launch(tiles: int, heads: int, tile_name: str, batch: int = batch) -> dict:
        """The grid: Pallas runs its last axis fastest. With the tiles last, the programs in flight at once are
        those of one or a few heads, and each tile they stream (Q, dO or K, V, and the dQ rows) is read from DRAM
        once and then from L2; with the batch last, each is a different head's and every program streams its own."""
        if config.heads_inner:
            return dict(grid=(tiles, heads, batch), grid_names=(tile_name, "heads", "batch"))
        return dict(grid=(batch, heads, tiles), grid_names=("batch", "heads", tile_name))

    q_side = tuple(a.astype(jnp.int32) for a in q_lists.arrays())
    dkdv = plgpu.kernel(
        functools.partial(_dkdv_kernel, plan=plan, score_mod=score_mod, mask_mod=mask_mod, num_lists=len(q_side),
                          fuse_dq=config.fuse_dq),
        out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        **launch(kv_padded // PROGRAM_ROWS, kv_heads, "kv", kv_batch),
        kernel_name="flex_attention_dkdv_mosaic",  # what profilers list it as
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=not auto_barriers),
        **common,
    )
    if config.fuse_dq:
        # The kernel adds into this buffer in place (a mutable array input); every program adds, none initialises.
        dq_sum = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
        dk, dv = dkdv(*dense, *q_side, *consts, dq_sum)
        dq = (dq_sum[...] * jnp.float32(plan.scale)).astype(q.dtype)
        return dq[:, :, :q_len], dk[:, :, :kv_len], dv[:, :, :kv_len]
    dk, dv = dkdv(*dense, *q_side, *consts)

    kv_side = tuple(a.astype(jnp.int32) for a in kv_lists.arrays())
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, plan=plan, score_mod=score_mod, mask_mod=mask_mod, num_lists=len(kv_side)),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **launch(q_padded // PROGRAM_ROWS, q_heads, "q"),
        kernel_name="flex_attention_dq_mosaic",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **common,
    )(*dense, *kv_side, *consts)
    return dq[:, :, :q_len], dk[:, :, :kv_len], dv[:, :, :kv_len]
