"""Multi-head attention as a Flax linen module, computed by flex_attention."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from flexattn_jax.block_mask import BlockMask
from flexattn_jax.nn import _common

__all__ = ["FlexMultiHeadAttentionLinen"]


class FlexMultiHeadAttentionLinen(nn.Module):
    """Multi-head attention over inputs [batch, length, features], with flex_attention at its core (linen).

    The same layer as the NNX ``FlexMultiHeadAttention``, with the same parameter names and shapes (those of linen's
    ``MultiHeadDotProductAttention``): ``query/kernel`` [F, Hq, D], ``key/kernel`` and ``value/kernel``
    [F, Hkv, D], ``out/kernel`` [Hq, D, F_out], the biases when enabled, ``query_norm`` and ``key_norm`` [D] with
    ``normalize_qk``. The attributes mean what the NNX module's arguments mean; head_dim defaults to
    features // num_heads and out_features to the input features.

    Decoding follows linen's convention: ``init`` with ``decode=True`` on inputs of the cache's full length creates
    the ``cache`` collection (empty); then each ``apply(..., decode=True, mutable=["cache"])`` appends its tokens
    (a prefill, then one at a time) and attends to everything cached, the mods seeing absolute positions.

    >>> import functools, jax, jax.numpy as jnp, flexattn_jax as fa
    >>> from flexattn_jax.flax import FlexMultiHeadAttentionLinen
    >>> layer = FlexMultiHeadAttentionLinen(num_heads=4, num_kv_heads=2, mask_mod=fa.causal_mask)
    >>> x = jax.random.normal(jax.random.key(1), (2, 10, 64))
    >>> variables = jax.jit(functools.partial(layer.init, decode=True))(jax.random.key(0), x)
    >>> params, cache = variables["params"], variables["cache"]  # the cache has room for x's 10 tokens
    >>> y = jax.jit(layer.apply)({"params": params}, x)
    >>> y.shape
    (2, 10, 64)

    Decoding:

    >>> @jax.jit
    ... def step(cache, tokens):
    ...     out, state = layer.apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"])
    ...     return out, state["cache"]
    >>> prefill, cache = step(cache, x[:, :9])
    >>> last, cache = step(cache, x[:, 9:])
    >>> bool(jnp.allclose(last, y[:, 9:], atol=1e-5))
    True
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    use_rope: bool = False
    rope_theta: float = 10000.0
    normalize_qk: bool = False
    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    block_mask: BlockMask | None = None
    mask_varies: tuple[str, ...] = ()
    implementation: str | None = None
    interpret: bool = False
    kernel_options: Mapping[str, Any] | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    def _config(self, in_features: int) -> _common.LayerConfig:
        return _common.LayerConfig.create(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            in_features=in_features,
            out_features=self.out_features,
            use_rope=self.use_rope,
            rope_theta=self.rope_theta,
            normalize_qk=self.normalize_qk,
            score_mod=self.score_mod,
            mask_mod=self.mask_mod,
            block_mask=self.block_mask,
            mask_varies=self.mask_varies,
            implementation=self.implementation,
            interpret=self.interpret,
            kernel_options=self.kernel_options,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        score_mod: Callable | None = None,
        mask_mod: Callable | None = None,
        block_mask: BlockMask | None = None,
        decode: bool = False,
    ) -> jax.Array:
        """Attention of inputs_q [B, L, F] to inputs_kv [B, S, F] (itself when None); returns [B, L, out_features].

        Args:
          score_mod, mask_mod, block_mask: this call's variant, replacing the construction's score_mod and mask.
          decode: use the ``cache`` collection (see the class docstring). Self-attention only.
        """
        _common.check_inputs(inputs_q, inputs_kv, None)
        in_features = inputs_q.shape[-1]
        config = self._config(in_features)
        mods = _common.resolve_mods(config, score_mod, mask_mod, block_mask)
        if decode and inputs_kv is not None:
            raise ValueError("decode=True is for self-attention; inputs_kv must be None")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv

        def projection(heads, name):
            return nn.DenseGeneral(
                (heads, config.head_dim),
                use_bias=self.qkv_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                name=name,
            )

        query = projection(config.num_heads, "query")(inputs_q)
        key = projection(config.num_kv_heads, "key")(inputs_kv)
        value = projection(config.num_kv_heads, "value")(inputs_kv)
        if config.normalize_qk:
            ones = nn.initializers.ones_init()
            query = _common.rms_norm(query, self.param("query_norm", ones, (config.head_dim,), self.param_dtype))
            key = _common.rms_norm(key, self.param("key_norm", ones, (config.head_dim,), self.param_dtype))

        decoding = False
        if decode:
            decoding = self.has_variable("cache", "kv_cache")  # False while init creates the cache
            batch, max_length = inputs_q.shape[:2]
            cache_variable = self.variable(
                "cache",
                "kv_cache",
                _common.ContiguousKVCache.create,
                batch,
                max_length,
                config.num_kv_heads,
                config.head_dim,
                key.dtype,
            )
        if decoding:
            cache = cache_variable.value
            if config.use_rope:
                positions = cache.query_positions(inputs_q.shape[1])
                query = _common.rotary_embedding(query, positions, config.rope_theta)
                key = _common.rotary_embedding(key, positions, config.rope_theta)
            cache = cache.append(key, value)
            cache_variable.value = cache
            heads = cache.attend(config, query, mods).astype(query.dtype)
        else:
            if config.use_rope:
                query = _common.rotary_embedding(query, jnp.arange(query.shape[1]), config.rope_theta)
                key = _common.rotary_embedding(key, jnp.arange(key.shape[1]), config.rope_theta)
            heads = _common.attend(config, query, key, value, mods)
        out_features = in_features if self.out_features is None else self.out_features
        return nn.DenseGeneral(
            out_features,
            axis=(-2, -1),
            use_bias=self.out_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            name="out",
        )(heads)
