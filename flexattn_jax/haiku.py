"""A Haiku attention layer built on flex_attention: ``FlexMultiHeadAttention``. Needs the ``haiku`` extra."""

from flexattn_jax.nn.haiku import FlexMultiHeadAttention

__all__ = ["FlexMultiHeadAttention"]
