"""The dense reference: the specification every kernel is tested against, and the fallback off-GPU.

Written for one (batch, head) and lifted with ``jax.vmap``; score_mod and mask_mod receive scalar int32 indices,
exactly as users write them. Scores, softmax and the weighted sum are float32 at the highest matmul precision.
Memory is O(L x S) per (batch, head): this is a definition, not a fast path.

For query q of batch b and head h, with keys 0 <= s < S:

    score[s]   = score_mod(scale * <q, k[s]>, b, h, q, s)
    allowed[s] = full_block(q, s) or (partial_block(q, s) and mask_mod(b, h, q, s))
    lse        = log(sum over allowed s of exp(score[s]))          (-inf when nothing is allowed)
    out        = sum over allowed s of exp(score[s] - lse) v[s]    (0 when nothing is allowed)
    max_scores = max over allowed s of score[s]                    (-inf when nothing is allowed)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["attention"]


def _one_head(q, k, v, b, h, partial_blocks, full_blocks, *, score_mod, mask_mod, block_size, scale):
    """q [L, E], k [S, E], v [S, Ev]; partial/full_blocks [QB, KVB] bool. Returns out [L, Ev], lse [L] and
    max_scores [L], float32."""
    q_len, kv_len = q.shape[0], k.shape[0]
    q_idx = jnp.arange(q_len, dtype=jnp.int32)
    kv_idx = jnp.arange(kv_len, dtype=jnp.int32)

    scores = jnp.einsum("le,se->ls", q, k, precision=jax.lax.Precision.HIGHEST) * scale
    over_kv = jax.vmap(score_mod, in_axes=(0, None, None, None, 0))
    # The softmax is float32 whatever the score_mod returns (score.astype(bf16), a float64 table under x64), as in
    # the kernels.
    scores = jax.vmap(over_kv, in_axes=(0, None, None, 0, None))(scores, b, h, q_idx, kv_idx).astype(jnp.float32)

    allowed_by_mod = jax.vmap(jax.vmap(mask_mod, (None, None, None, 0)), (None, None, 0, None))(b, h, q_idx, kv_idx)
    q_block, kv_block = block_size
    in_partial = partial_blocks[q_idx // q_block][:, kv_idx // kv_block]
    in_full = full_blocks[q_idx // q_block][:, kv_idx // kv_block]
    allowed = in_full | (in_partial & allowed_by_mod)

    scores = jnp.where(allowed, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    max_scores = row_max[:, 0]
    # A row with nothing allowed has max -inf; subtracting 0 instead keeps exp(-inf) = 0 and gradients finite.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - jax.lax.stop_gradient(row_max))
    denominator = jnp.sum(weights, axis=-1)
    has_any = denominator > 0
    safe_denominator = jnp.where(has_any, denominator, 1.0)
    out = jnp.einsum("ls,sd->ld", weights, v, precision=jax.lax.Precision.HIGHEST) / safe_denominator[:, None]
    lse = jnp.where(has_any, jnp.log(safe_denominator) + jax.lax.stop_gradient(row_max[:, 0]), -jnp.inf)
    return out, lse, max_scores


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    score_mod: Callable,
    mask_mod: Callable,
    partial_blocks: jax.Array,
    full_blocks: jax.Array,
    block_size: tuple[int, int],
    scale: float,
    with_max_scores: bool = False,
) -> tuple[jax.Array, ...]:
    """Dense flex attention.

    Args:
      query: [B, Hq, L, E]; key: [B, Hkv, S, E]; value: [B, Hkv, S, Ev], with Hq a multiple of Hkv (query head h
        reads key/value head h // (Hq // Hkv)).
      score_mod, mask_mod: the user's mods (scalar indices).
      partial_blocks, full_blocks: bool block maps [B or 1, Hq or 1, QB, KVB].
      block_size: (Q_BLOCK, KV_BLOCK) of the maps.
      scale: multiplies q.k before score_mod.
      with_max_scores: also return each query's maximum modified score.

    Returns:
      out [B, Hq, L, Ev] in the query's dtype and lse [B, Hq, L] float32; with ``with_max_scores`` also max_scores
      [B, Hq, L] float32 (differentiable here, as a maximum is; ``flex_attention`` stops its gradient).
    """
    batch, q_heads = query.shape[:2]
    group = q_heads // key.shape[1]
    f32 = jnp.float32
    layout = _ExplicitLayout.of(query)
    if layout is not None and group > 1:
        # Repeating a head-sharded axis has no sharding rule: repeat whole head axes, reshard below.
        key, value = layout.by_batch(key), layout.by_batch(value)
    key, value = key.astype(f32), value.astype(f32)
    if group > 1:
        key = jnp.repeat(key, group, axis=1)
        value = jnp.repeat(value, group, axis=1)
    partial_blocks = jnp.broadcast_to(partial_blocks, (batch, q_heads, *partial_blocks.shape[2:]))
    full_blocks = jnp.broadcast_to(full_blocks, (batch, q_heads, *full_blocks.shape[2:]))
    if layout is not None:
        query, key, value, partial_blocks, full_blocks = (
            layout.by_batch_head(x) for x in (query, key, value, partial_blocks, full_blocks)
        )

    def per_head(q, k, v, b, h, partial, full):
        return _one_head(
            q, k, v, b, h, partial, full, score_mod=score_mod, mask_mod=mask_mod, block_size=block_size, scale=scale
        )

    heads = jnp.arange(q_heads, dtype=jnp.int32)
    batches = jnp.arange(batch, dtype=jnp.int32)
    if layout is not None:
        heads, batches = layout.vector(heads, 1), layout.vector(batches, 0)
    over_heads = jax.vmap(per_head, in_axes=(0, 0, 0, None, 0, 0, 0))
    over_batch = jax.vmap(over_heads, in_axes=(0, 0, 0, 0, None, 0, 0))
    out, lse, max_scores = over_batch(query.astype(f32), key, value, batches, heads, partial_blocks, full_blocks)
    out = out.astype(query.dtype)
    results = (out, lse, max_scores) if with_max_scores else (out, lse)
    if layout is not None:
        results = tuple(layout.restore(x) for x in results)
    return results


class _ExplicitLayout:
    """Inputs sharded over a mesh with Explicit axes: the dense computation runs sharded over batch and heads only.

    Explicit sharding types every operation; a sequence-sharded [L, S] score matrix is an illegal result, and vmap
    needs its mapped arguments sharded alike. So every per-(batch, head) input is resharded to the query's batch and
    head axes with whole sequences (gathering a sharded sequence), and the outputs go back to the query's layout.
    The kernels, and ``flexattn_jax.sharding.ring_flex_attention`` for long sequences, avoid the gather.
    """

    def __init__(self, sharding):
        self.sharding = sharding
        self.spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))

    @classmethod
    def of(cls, query) -> "_ExplicitLayout | None":
        sharding = getattr(jax.typeof(query), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or not mesh.axis_names:
            return None
        if not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
            return None
        if all(axis is None for axis in sharding.spec):
            return None
        return cls(sharding)

    def _to(self, x, spec):
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec(*spec)))

    def by_batch_head(self, x):
        return self._to(x, (self.spec[0], self.spec[1]) + (None,) * (x.ndim - 2))

    def by_batch(self, x):
        return self._to(x, (self.spec[0],) + (None,) * (x.ndim - 1))

    def vector(self, x, dim: int):
        return self._to(x, (self.spec[dim],))

    def restore(self, x):
        return self._to(x, self.spec[: x.ndim])
