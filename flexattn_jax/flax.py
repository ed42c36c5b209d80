"""Flax attention layers built on flex_attention: ``FlexMultiHeadAttention`` (NNX) and
``FlexMultiHeadAttentionLinen`` (linen). Needs the ``flax`` extra."""

from flexattn_jax.nn._common import ContiguousKVCache, KVCache
from flexattn_jax.nn.flax_linen import FlexMultiHeadAttentionLinen
from flexattn_jax.nn.flax_nnx import FlexMultiHeadAttention

__all__ = ["FlexMultiHeadAttention", "FlexMultiHeadAttentionLinen", "ContiguousKVCache", "KVCache"]
