"""Multi-device flex_attention: sharded batch and heads, and ring attention over a sequence-sharded mesh axis.

Batch and heads
---------------
Attention never mixes batches or heads, so sharding them needs no communication. Give the mesh and the axes::

    import jax, numpy as np, flexattn_jax as fa
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flexattn_jax.sharding import sharded_flex_attention

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    q = jax.device_put(q, NamedSharding(mesh, P("data", "model")))   # [B, Hq, L, E]; k, v likewise
    mask = fa.create_block_mask(fa.causal_mask, None, None, L, L)

    @jax.jit
    def attend(q, k, v):
        return sharded_flex_attention(q, k, v, block_mask=mask, mesh=mesh, batch_axis="data", head_axis="model")

The output is sharded as P("data", "model"). The arguments are flex_attention's; score_mod and mask_mod see global
batch and head indices. With GQA, Hq and Hkv must both be divisible by the head axis.

Context parallelism (ring attention)
------------------------------------
For sequences that do not fit one device, shard the sequence axis and pass KV chunks around the ring::

    from flexattn_jax.sharding import ring_flex_attention

    mesh = Mesh(np.array(jax.devices()), ("seq",))
    q = jax.device_put(q, NamedSharding(mesh, P(None, None, "seq")))   # k, v likewise
    mask = fa.create_block_mask(fa.causal_mask, None, None, L, L, BLOCK_SIZE=128)   # for the whole sequence
    out = jax.jit(lambda q, k, v: ring_flex_attention(q, k, v, block_mask=mask, mesh=mesh, seq_axis="seq"))(q, k, v)

Inputs and output stay in natural sequence order, sharded in contiguous pieces along ``seq_axis``. The mods see
global positions. With ``load_balance=True`` (the default) each of the N devices computes on sequence chunks i and
2N-1-i (zig-zag), so a causal mask gives every device the same work; the sequence lengths must then be divisible by
2N, and each chunk by the BlockMask's block size. Chunk pairs the BlockMask leaves empty (a causal mask's future)
are skipped. ``batch_axis`` and ``head_axis`` may shard the batch and heads at the same time.

Both functions are differentiable and work under ``jax.jit``, with any ``implementation=`` of flex_attention.
"""

from flexattn_jax.sharding.batch_head import sharded_flex_attention
from flexattn_jax.sharding.ring import ring_flex_attention

__all__ = ["sharded_flex_attention", "ring_flex_attention"]
