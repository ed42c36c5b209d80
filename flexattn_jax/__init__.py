"""flexattn_jax: FlexAttention for JAX.

Write an attention variant as a ``score_mod(score, b, h, q_idx, kv_idx)`` or a ``mask_mod(b, h, q_idx, kv_idx)``;
``flex_attention`` runs it as a block-sparse fused kernel on GPU and as a dense reference elsewhere.
"""

from flexattn_jax.api import IMPLEMENTATIONS, AuxOutput, AuxRequest, Choice, explain_implementation, flex_attention
from flexattn_jax.dot_product import dot_product_attention
from flexattn_jax.block_mask import (
    DEFAULT_BLOCK_SIZE,
    BlockMask,
    convert_block_mask_to_mask,
    convert_mask_to_block_mask,
    create_block_mask,
    create_block_mask_from_dense,
    create_mask,
    noop_mask,
)
from flexattn_jax.mods import (
    alibi_bias,
    alibi_slopes,
    and_masks,
    causal,
    causal_mask,
    compose,
    dilated_mask,
    document_mask,
    generate_alibi_bias,
    identity,
    or_masks,
    prefix_lm_mask,
    rel_bias,
    rel_causal,
    relative_position_bias,
    sliding_window_mask,
    tanh_softcap,
)

from flexattn_jax.paged import PagedKVCache

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "AuxOutput",
    "AuxRequest",
    "Choice",
    "explain_implementation",
    "flex_attention",
    "dot_product_attention",
    "PagedKVCache",
    "DEFAULT_BLOCK_SIZE",
    "BlockMask",
    "convert_block_mask_to_mask",
    "convert_mask_to_block_mask",
    "create_block_mask",
    "create_block_mask_from_dense",
    "create_mask",
    "noop_mask",
    "alibi_bias",
    "alibi_slopes",
    "and_masks",
    "causal",
    "causal_mask",
    "compose",
    "dilated_mask",
    "document_mask",
    "generate_alibi_bias",
    "identity",
    "or_masks",
    "prefix_lm_mask",
    "rel_bias",
    "rel_causal",
    "relative_position_bias",
    "sliding_window_mask",
    "tanh_softcap",
]
