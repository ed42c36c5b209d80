"""flex_attention on inputs sharded over batch and heads: one flex_attention per shard, under ``jax.shard_map``.

Attention never mixes batches or heads, so each device runs flex_attention on its own [B / nb, Hq / nh, L, E] slice
with no communication at all. shard_map (rather than relying on XLA's automatic partitioning) is what lets a Pallas
kernel run per shard: a pallas_call has no partitioning rule of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
from jax.sharding import Mesh, PartitionSpec

from flexattn_jax import _validation
from flexattn_jax.api import AuxRequest, attention_results, check_return_aux, flex_attention
from flexattn_jax.block_mask import BlockMask
from flexattn_jax.mods import identity
from flexattn_jax.sharding import _common

__all__ = ["sharded_flex_attention"]


def sharded_flex_attention(
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
    batch_axis: str | tuple[str, ...] | None = None,
    head_axis: str | tuple[str, ...] | None = None,
):
    """flex_attention with the batch sharded over ``batch_axis`` and the heads over ``head_axis`` of ``mesh``.

    Takes the arguments of ``flexattn_jax.flex_attention`` (same meaning, same global shapes) and the mesh axes.
    Each device runs flex_attention on its shard; score_mod and mask_mod see *global* batch and head indices, so
    mods indexing per-batch or per-head arrays behave as on one device. q/k/v and the BlockMask are never gathered:
    the BlockMask's arrays are sharded along its B and H axes where it has them, and replicated where it broadcasts
    (size 1).

    Args:
      query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, implementation, interpret,
        kernel_options, return_aux: as for ``flex_attention``. Key and value of batch 1 (shared by every batch)
        are replicated over ``batch_axis``.
      mesh: the ``jax.sharding.Mesh``. Mesh axes named in neither argument replicate the computation.
      batch_axis: the mesh axis (or tuple of axes) sharding B, or None. B must be divisible by its size.
      head_axis: the mesh axis (or tuple of axes) sharding the heads, or None. Hq and Hkv must both be divisible by
        its size, which keeps each query head with its key/value head under GQA.

    Returns:
      out [B, Hq, L, Ev] sharded as PartitionSpec(batch_axis, head_axis), and with ``return_lse`` also lse
      [B, Hq, L] sharded the same way. With ``return_aux``, ``(out, AuxOutput)`` whose requested lse and max_scores
      [B, Hq, L] are sharded the same way.

    >>> import jax, numpy as np, flexattn_jax as fa
    >>> from flexattn_jax.sharding import sharded_flex_attention
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 4, 64, 16))
    >>> mask = fa.create_block_mask(fa.causal_mask, None, None, 64, 64, BLOCK_SIZE=32)
    >>> sharded_flex_attention(q, k, v, block_mask=mask, mesh=mesh, batch_axis="data").shape
    (2, 4, 64, 16)
    """
    _common.check_mesh(mesh)
    check_return_aux(return_aux, return_lse)
    with_max_scores = return_aux is not None and return_aux.max_scores
    batch_axes = _common.normalize_axes(mesh, batch_axis, "batch_axis")
    head_axes = _common.normalize_axes(mesh, head_axis, "head_axis")
    _common.check_disjoint(batch_axis=batch_axes, head_axis=head_axes)
    _validation.check_qkv(query, key, value, enable_gqa, kv_batch_broadcast=True)
    _validation.check_scale(scale)
    score_mod = identity if score_mod is None else score_mod
    _validation.check_score_mod(score_mod)
    if block_mask is not None:
        _validation.check_block_mask(block_mask, query, key)
    batch, q_heads = query.shape[:2]
    kv_heads = key.shape[1]
    num_batch_shards = _common.axes_size(mesh, batch_axes)
    num_head_shards = _common.axes_size(mesh, head_axes)
    _common.check_divisible(batch, num_batch_shards, "the batch size B", "batch_axis", batch_axes)
    _common.check_divisible(q_heads, num_head_shards, "the query head count Hq", "head_axis", head_axes)
    _common.check_divisible(kv_heads, num_head_shards, "the key/value head count Hkv", "head_axis", head_axes)

    b_spec, h_spec = _common.spec_entry(batch_axes), _common.spec_entry(head_axes)
    qkv_spec = PartitionSpec(b_spec, h_spec, None, None)
    # Key and value of batch 1, shared by every batch, are replicated over the batch axis: each shard's
    # flex_attention shares them with its own batches, and shard_map adds their gradients up across the shards.
    kv_spec = qkv_spec if key.shape[0] == batch else PartitionSpec(None, h_spec, None, None)
    lse_spec = PartitionSpec(b_spec, h_spec, None)
    mask_specs = None if block_mask is None else _common.block_mask_specs(block_mask, batch_axes, head_axes)
    local_batch, local_q_heads = batch // num_batch_shards, q_heads // num_head_shards

    def per_shard(q, k, v, local_mask):
        b_offset = _common.shard_index(batch_axes) * local_batch
        h_offset = _common.shard_index(head_axes) * local_q_heads
        if local_mask is not None:
            local_mask = dataclasses.replace(
                local_mask, mask_mod=_common.global_mask_mod(local_mask.mask_mod, b_offset, h_offset)
            )
        out, aux = flex_attention(
            q,
            k,
            v,
            score_mod=_common.global_score_mod(score_mod, b_offset, h_offset),
            block_mask=local_mask,
            scale=scale,
            enable_gqa=enable_gqa,
            implementation=implementation,
            interpret=interpret,
            kernel_options=kernel_options,
            return_aux=AuxRequest(lse=True, max_scores=with_max_scores),
        )
        return (out, aux.lse, aux.max_scores) if with_max_scores else (out, aux.lse)

    in_specs = (qkv_spec, kv_spec, kv_spec, mask_specs)
    args = _common.place(mesh, (query, key, value, block_mask), in_specs)
    # check_vma=False: a pallas_call's outputs carry no record of the mesh axes they vary over, which shard_map's
    # check would demand. Each shard's result depends on its own inputs only, so nothing is lost.
    out_specs = (qkv_spec, lse_spec, lse_spec) if with_max_scores else (qkv_spec, lse_spec)
    out, lse, *max_scores = jax.shard_map(
        per_shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )(*args)
    return attention_results(out, lse, *max_scores, return_lse=return_lse, return_aux=return_aux)
