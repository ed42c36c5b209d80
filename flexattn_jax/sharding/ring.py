"""Ring attention: flex_attention over a sequence sharded across the devices of one mesh axis.

Each of the N devices of the ring keeps its query chunk(s) and, over N steps, sees every key/value chunk: at each
step it attends its queries to the visiting chunk with ``flex_attention(return_lse=True)``, folds the partial result
into a running (output, lse) pair, and passes the chunk on to the next device with ``jax.lax.ppermute`` (issued
before the attention so the transfer can overlap it). Partial results combine exactly through their log-sum-exps:

    lse = log(exp(lse_1) + exp(lse_2)),    out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2

(Liu et al., "Ring Attention with Blockwise Transformers for Near-Infinite Context", 2023). A query's largest score
(``return_aux``'s max_scores) is the largest of its per-chunk maxima; a chunk pair that is skipped or attends
nothing contributes -inf.

The mods see global positions: for the pair (query chunk at offset q0, key chunk at offset k0) flex_attention runs
with ``mask_mod(b, h, q, kv) -> mask_mod(b, h, q + q0, kv + k0)`` (likewise score_mod), and with the block map of that
pair cut out of the global BlockMask. A pair whose block map is empty (a causal mask's future) is skipped.

Load balance: with a causal mask and contiguous chunks, device N-1 attends to N chunks and device 0 to one. With
``load_balance=True`` the sequence is cut into 2N chunks and device i holds chunks i and 2N-1-i (zig-zag), so every
device has the same number of visible chunk pairs. Inputs and outputs stay in natural order: two ppermutes move the
chunks into zig-zag order on entry and two move the outputs back.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from flexattn_jax import _validation
from flexattn_jax.api import AuxRequest, attention_results, check_return_aux, flex_attention
from flexattn_jax.block_mask import BlockMask, noop_mask
from flexattn_jax.mods import identity
from flexattn_jax.sharding import _common

__all__ = ["ring_flex_attention", "merge_partials", "work_per_device"]


def ring_flex_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    implementation: str | None = None,
    interpret: bool = False,
    kernel_options: Mapping[str, Any] | None = None,
    *,
    return_aux: AuxRequest | None = None,
    mesh: Mesh,
    seq_axis: str | tuple[str, ...],
    batch_axis: str | tuple[str, ...] | None = None,
    head_axis: str | tuple[str, ...] | None = None,
    load_balance: bool = True,
):
    """flex_attention with the query and key sequences sharded over ``seq_axis`` of ``mesh`` (ring attention).

    Takes the arguments of ``flexattn_jax.flex_attention`` (same meaning, same global shapes: ``block_mask`` is built
    for the whole sequences) and the mesh axes. Differentiable; usable under ``jax.jit``.

    Args:
      query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, implementation, interpret,
        kernel_options, return_aux: as for ``flex_attention``. Key and value of batch 1 (shared by every batch)
        are replicated over ``batch_axis``.
      mesh: the ``jax.sharding.Mesh``.
      seq_axis: the mesh axis (or tuple of axes) forming the ring, of size N; L and S are sharded over it in
        contiguous pieces.
      batch_axis, head_axis: mesh axes also sharding the batch and the heads (as ``sharded_flex_attention``), or None.
      load_balance: zig-zag the chunks (device i computes on chunks i and 2N-1-i of 2N) so causal masks give every
        device the same work. L and S must be divisible by 2N (by N without it), and each chunk by the BlockMask's
        block size.

    Returns:
      out [B, Hq, L, Ev] sharded as PartitionSpec(batch_axis, head_axis, seq_axis), and with ``return_lse`` also lse
      [B, Hq, L] sharded the same way. With ``return_aux``, ``(out, AuxOutput)`` whose requested lse and max_scores
      [B, Hq, L] are sharded the same way.

    A ring over every device (a causal mask, zig-zag chunks), equal to flex_attention on one device:

    >>> import jax, numpy as np, flexattn_jax as fa
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> from flexattn_jax.sharding import ring_flex_attention
    >>> mesh = Mesh(np.array(jax.devices()), ("seq",))
    >>> x = jax.random.normal(jax.random.key(0), (1, 2, 128, 16))
    >>> x_sharded = jax.device_put(x, NamedSharding(mesh, P(None, None, "seq")))
    >>> mask = fa.create_block_mask(fa.causal_mask, None, None, 128, 128, BLOCK_SIZE=8)
    >>> ring = jax.jit(lambda x: ring_flex_attention(x, x, x, block_mask=mask, mesh=mesh, seq_axis="seq"))
    >>> out = ring(x_sharded)
    >>> out.sharding.is_equivalent_to(x_sharded.sharding, out.ndim)
    True
    >>> bool(np.allclose(out, fa.flex_attention(x, x, x, block_mask=mask), atol=1e-5))
    True
    """
    _common.check_mesh(mesh)
    check_return_aux(return_aux, return_lse)
    with_max_scores = return_aux is not None and return_aux.max_scores
    if seq_axis is None:
        raise ValueError("seq_axis must name the mesh axis (or axes) the sequence is sharded over, got None")
    seq_axes = _common.normalize_axes(mesh, seq_axis, "seq_axis")
    batch_axes = _common.normalize_axes(mesh, batch_axis, "batch_axis")
    head_axes = _common.normalize_axes(mesh, head_axis, "head_axis")
    _common.check_disjoint(seq_axis=seq_axes, batch_axis=batch_axes, head_axis=head_axes)
    if not isinstance(load_balance, bool):
        raise TypeError(f"load_balance must be a bool, got {load_balance!r}")
    _validation.check_qkv(query, key, value, enable_gqa, kv_batch_broadcast=True)
    _validation.check_scale(scale)
    score_mod = identity if score_mod is None else score_mod
    _validation.check_score_mod(score_mod)

    batch, q_heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    ring_size = _common.axes_size(mesh, seq_axes)
    num_batch_shards = _common.axes_size(mesh, batch_axes)
    num_head_shards = _common.axes_size(mesh, head_axes)
    _common.check_divisible(batch, num_batch_shards, "the batch size B", "batch_axis", batch_axes)
    _common.check_divisible(q_heads, num_head_shards, "the query head count Hq", "head_axis", head_axes)
    _common.check_divisible(kv_heads, num_head_shards, "the key/value head count Hkv", "head_axis", head_axes)
    chunks_per_device = 2 if load_balance else 1
    num_chunks = ring_size * chunks_per_device
    how = f"{chunks_per_device} x the ring size {ring_size}" + (" (load_balance=True)" if load_balance else "")
    for what, length in (("the query length L", q_len), ("the key length S", kv_len)):
        if length % num_chunks:
            raise ValueError(f"{what} ({length}) must be divisible by {how} = {num_chunks}; pad the sequence")
    q_chunk, kv_chunk = q_len // num_chunks, kv_len // num_chunks

    if block_mask is None:
        # Attend everywhere: one full block per chunk pair.
        every = jnp.ones((1, 1, num_chunks, num_chunks), jnp.bool_)
        block_mask = BlockMask.from_block_maps(
            ~every, every, BLOCK_SIZE=(q_chunk, kv_chunk), seq_lengths=(q_len, kv_len)
        )
    else:
        _validation.check_block_mask(block_mask, query, key)
    q_block, kv_block = block_mask.BLOCK_SIZE
    if q_chunk % q_block or kv_chunk % kv_block:
        raise ValueError(
            f"the sequence chunks ({q_chunk} queries, {kv_chunk} keys: L={q_len}, S={kv_len} over {num_chunks} "
            f"chunks) must be multiples of the BlockMask's BLOCK_SIZE {block_mask.BLOCK_SIZE}; build the BlockMask "
            "with a block size dividing them"
        )

    # The block maps, with their query-block rows in the order the devices hold the query chunks.
    partial_blocks, full_blocks = block_mask.block_maps()
    q_blocks_per_chunk = q_chunk // q_block
    chunk_order = _chunk_order(ring_size, load_balance)
    rows = (chunk_order[:, None] * q_blocks_per_chunk + np.arange(q_blocks_per_chunk)[None, :]).reshape(-1)
    partial_blocks, full_blocks = (jnp.take(m, jnp.asarray(rows, jnp.int32), axis=2) for m in (partial_blocks, full_blocks))

    b_spec, h_spec, s_spec = (_common.spec_entry(a) for a in (batch_axes, head_axes, seq_axes))
    qkv_spec = PartitionSpec(b_spec, h_spec, s_spec, None)
    # Key and value of batch 1 (shared by every batch) are replicated over the batch axis, and the ring passes the
    # one copy around: B times less traffic than keys and values repeated per batch.
    kv_spec = qkv_spec if key.shape[0] == batch else PartitionSpec(None, h_spec, s_spec, None)
    lse_spec = PartitionSpec(b_spec, h_spec, s_spec)
    mask_b, mask_h = partial_blocks.shape[:2]
    map_spec = PartitionSpec(b_spec if mask_b > 1 else None, h_spec if mask_h > 1 else None, s_spec, None)

    mask_mod = block_mask.mask_mod if block_mask.mask_mod is not None else noop_mask
    local_batch, local_q_heads = batch // num_batch_shards, q_heads // num_head_shards

    def chunk_ids(device):
        """Global numbers of the sequence chunks `device` holds: int32 [chunks_per_device]."""
        return jnp.stack([device] if not load_balance else [device, 2 * ring_size - 1 - device])

    def attend_pair(acc, q, k, v, partial_rows, full_rows, q_chunk_id, kv_chunk_id, b_offset, h_offset):
        """Folds attention of query chunk q to key chunk (k, v) into acc = (out, lse[, max_scores]), unless their
        block map is empty."""
        kv_blocks = kv_chunk // kv_block
        partial = jax.lax.dynamic_slice_in_dim(partial_rows, kv_chunk_id * kv_blocks, kv_blocks, axis=3)
        full = jax.lax.dynamic_slice_in_dim(full_rows, kv_chunk_id * kv_blocks, kv_blocks, axis=3)
        q_offset, kv_offset = q_chunk_id * q_chunk, kv_chunk_id * kv_chunk

        def attend(acc):
            pair_mask = BlockMask.from_block_maps(
                partial,
                full,
                BLOCK_SIZE=(q_block, kv_block),
                mask_mod=_common.global_mask_mod(mask_mod, b_offset, h_offset, q_offset, kv_offset),
                seq_lengths=(q_chunk, kv_chunk),
            )
            out, aux = flex_attention(
                q,
                k,
                v,
                score_mod=_common.global_score_mod(score_mod, b_offset, h_offset, q_offset, kv_offset),
                block_mask=pair_mask,
                scale=scale,
                enable_gqa=enable_gqa,
                implementation=implementation,
                interpret=interpret,
                kernel_options=kernel_options,
                return_aux=AuxRequest(lse=True, max_scores=with_max_scores),
            )
            merged = merge_partials(acc[:2], (out, aux.lse))
            if not with_max_scores:
                return merged
            # Maxima of -inf (nothing attended) stay -inf: a maximum, unlike the lse merge, needs no guard.
            return (*merged, jnp.maximum(acc[2], aux.max_scores))

        return jax.lax.cond(jnp.any(partial | full), attend, lambda acc: acc, acc)

    def per_device(q, k, v, partial_rows, full_rows):
        device = _common.shard_index(seq_axes)
        b_offset = _common.shard_index(batch_axes) * local_batch
        h_offset = _common.shard_index(head_axes) * local_q_heads
        if load_balance:
            q, k, v = (_to_zigzag(x, seq_axes, ring_size, device) for x in (q, k, v))
        # Chunks stacked on a leading axis, so one loop body (one trace of flex_attention) serves every pair.
        q_chunks = _split_chunks(q, chunks_per_device)
        partial_chunks = _split_chunks(partial_rows, chunks_per_device)
        full_chunks = _split_chunks(full_rows, chunks_per_device)
        q_ids = chunk_ids(device)
        acc_shape = (chunks_per_device, *q.shape[:2], q_chunk)
        # (out, lse[, max_scores]) of no keys attended.
        empty = (
            jnp.zeros((*acc_shape, v.shape[-1]), jnp.float32),
            *[jnp.full(acc_shape, -jnp.inf, jnp.float32)] * (2 if with_max_scores else 1),
        )

        def step(carry, t):
            (k, v), accs = carry
            next_kv = _ring_shift((k, v), seq_axes, ring_size)
            kv_ids = chunk_ids((device - t) % ring_size)
            k_chunks, v_chunks = _split_chunks(k, chunks_per_device), _split_chunks(v, chunks_per_device)

            def pair(p, accs):
                i, j = p // chunks_per_device, p % chunks_per_device
                acc = attend_pair(
                    tuple(a[i] for a in accs), q_chunks[i], k_chunks[j], v_chunks[j], partial_chunks[i],
                    full_chunks[i], q_ids[i], kv_ids[j], b_offset, h_offset,
                )
                return tuple(a.at[i].set(x) for a, x in zip(accs, acc))

            if chunks_per_device == 1:
                accs = pair(0, accs)
            else:
                accs = jax.lax.fori_loop(0, chunks_per_device**2, pair, accs)
            return (next_kv, accs), None

        steps = jnp.arange(ring_size, dtype=jnp.int32)
        (_, (out, *stats)), _ = jax.lax.scan(step, ((k, v), empty), steps)
        results = (_join_chunks(out).astype(q.dtype), *map(_join_chunks, stats))
        if load_balance:
            results = tuple(_from_zigzag(x, seq_axes, ring_size, device) for x in results)
        return results

    in_specs = (qkv_spec, kv_spec, kv_spec, map_spec, map_spec)
    args = _common.place(mesh, (query, key, value, partial_blocks, full_blocks), in_specs)
    out_specs = (qkv_spec, lse_spec, lse_spec) if with_max_scores else (qkv_spec, lse_spec)
    # check_vma=False: see sharded_flex_attention.
    out, lse, *max_scores = jax.shard_map(
        per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )(*args)
    return attention_results(out, lse, *max_scores, return_lse=return_lse, return_aux=return_aux)


def work_per_device(block_mask: BlockMask, ring_size: int, load_balance: bool = True) -> np.ndarray:
    """How many blocks (partial or full, summed over batch and heads) each device of the ring attends: [ring_size].

    Host-side, for checking and reporting load balance. The query block count must split into the ring's chunks.

    >>> import flexattn_jax as fa
    >>> mask = fa.create_block_mask(fa.causal_mask, None, None, 64, 64, BLOCK_SIZE=8)
    >>> work_per_device(mask, ring_size=2, load_balance=False).tolist(), work_per_device(mask, 2).tolist()
    ([10, 26], [18, 18])
    """
    visited = np.asarray(block_mask.to_dense())  # [B, H, QB, KVB]
    num_chunks = ring_size * (2 if load_balance else 1)
    if visited.shape[2] % num_chunks:
        raise ValueError(f"the BlockMask's {visited.shape[2]} query blocks do not split into {num_chunks} chunks")
    per_chunk = visited.sum(axis=(0, 1, 3)).reshape(num_chunks, -1).sum(axis=1)
    return per_chunk[_chunk_order(ring_size, load_balance).reshape(ring_size, -1)].sum(axis=1)


# ------------------------------------------------------------------------------------------- merging partials


def merge_partials(a, b):
    """Combines two normalised partial attentions (out [..., L, Ev], lse [..., L]) over disjoint key sets.

    Either lse may be -inf (nothing attended): the other is returned as is; both -inf gives (0, -inf). The
    gradients stay finite in every case, because no exp or log ever sees -inf - -inf or 0.

    >>> import jax.numpy as jnp
    >>> out, lse = merge_partials((jnp.ones((1, 2)), jnp.zeros(1)), (jnp.zeros((1, 2)), jnp.zeros(1)))
    >>> out.tolist(), round(float(lse[0]), 4)  # two equal halves: the mean, and lse log 2
    ([[0.5, 0.5]], 0.6931)
    """
    out_a, lse_a = a
    out_b, lse_b = b
    top = jnp.maximum(lse_a, lse_b)
    # The result does not depend on the shift; a finite, gradient-free one keeps exp's arguments <= 0 and defined.
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    weight_a = jnp.exp(lse_a - shift)
    weight_b = jnp.exp(lse_b - shift)
    total = weight_a + weight_b
    attended = total > 0
    safe_total = jnp.where(attended, total, 1.0)
    lse = jnp.where(attended, jnp.log(safe_total) + shift, -jnp.inf)
    out = (weight_a[..., None] * out_a.astype(jnp.float32) + weight_b[..., None] * out_b.astype(jnp.float32))
    return out / safe_total[..., None], lse


# ------------------------------------------------------------------------------------------ moving the chunks


def _split_chunks(x, num_chunks: int):
    """[B, H, num_chunks * C, ...] -> [num_chunks, B, H, C, ...]."""
    b, h, length = x.shape[:3]
    return jnp.moveaxis(x.reshape(b, h, num_chunks, length // num_chunks, *x.shape[3:]), 2, 0)


def _join_chunks(x):
    """The inverse of _split_chunks."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], *x.shape[4:])


def _chunk_order(ring_size: int, load_balance: bool) -> np.ndarray:
    """The global chunk numbers in the order the devices hold them: [0..N-1], or [0, 2N-1, 1, 2N-2, ...]."""
    if not load_balance:
        return np.arange(ring_size)
    return np.stack([np.arange(ring_size), 2 * ring_size - 1 - np.arange(ring_size)], axis=1).reshape(-1)


def _ring_shift(tree, axes, ring_size: int):
    """Sends every device's arrays to the next device of the ring."""
    if ring_size == 1:
        return tree
    return jax.lax.ppermute(tree, axes, perm=[(i, (i + 1) % ring_size) for i in range(ring_size)])


def _zigzag_owner(chunk: int, ring_size: int) -> int:
    """The device holding global chunk `chunk` (of 2N) in zig-zag order."""
    return chunk if chunk < ring_size else 2 * ring_size - 1 - chunk


def _to_zigzag(x, axes, ring_size: int, device):
    """Natural order (device d holds chunks 2d, 2d+1) -> zig-zag order (chunks d, 2N-1-d), along axis 2.

    Chunks d and 2N-1-d have different parities, so each device receives one even and one odd chunk: one ppermute
    moves the even chunks, one the odd ones.
    """
    if ring_size == 1:
        return x
    first, second = jnp.split(x, 2, axis=2)  # chunks 2d and 2d+1
    even = jax.lax.ppermute(first, axes, [(d, _zigzag_owner(2 * d, ring_size)) for d in range(ring_size)])
    odd = jax.lax.ppermute(second, axes, [(d, _zigzag_owner(2 * d + 1, ring_size)) for d in range(ring_size)])
    low_is_even = device % 2 == 0  # chunk d is the even one when d is even
    return jnp.concatenate([jnp.where(low_is_even, even, odd), jnp.where(low_is_even, odd, even)], axis=2)


def _from_zigzag(x, axes, ring_size: int, device):
    """The inverse of _to_zigzag (along axis 2)."""
    if ring_size == 1:
        return x
    low, high = jnp.split(x, 2, axis=2)  # chunks d and 2N-1-d
    low_is_even = device % 2 == 0
    even, odd = jnp.where(low_is_even, low, high), jnp.where(low_is_even, high, low)

    def even_chunk(d):
        return d if d % 2 == 0 else 2 * ring_size - 1 - d

    def odd_chunk(d):
        return 2 * ring_size - 1 - d if d % 2 == 0 else d

    even = jax.lax.ppermute(even, axes, [(d, even_chunk(d) // 2) for d in range(ring_size)])
    odd = jax.lax.ppermute(odd, axes, [(d, odd_chunk(d) // 2) for d in range(ring_size)])
    return jnp.concatenate([even, odd], axis=2)
