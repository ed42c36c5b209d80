"""Attention layers built on flex_attention, and what they share.

The layers live in ``flexattn_jax.flax`` (Flax NNX and linen) and ``flexattn_jax.haiku``; this package re-exports only
the framework-independent parts, so importing it imports no neural-network library.
"""

from flexattn_jax.nn._common import (
    ContiguousKVCache,
    KVCache,
    LayerConfig,
    Mods,
    offset_mods,
    rms_norm,
    rotary_embedding,
)

__all__ = ["ContiguousKVCache", "KVCache", "LayerConfig", "Mods", "offset_mods", "rms_norm", "rotary_embedding"]
