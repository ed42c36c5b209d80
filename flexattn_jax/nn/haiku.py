"""Multi-head attention as a Haiku module, computed by flex_attention."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import haiku as hk
import jax
import jax.numpy as jnp

from flexattn_jax.block_mask import BlockMask
from flexattn_jax.nn import _common

__all__ = ["FlexMultiHeadAttention"]


class _DenseGeneral(hk.Module):
    """x [..., *in_shape] -> [..., *out_shape]: the trailing len(in_shape) axes contracted with kernel
    [*in_shape, *out_shape], plus bias [*out_shape]."""

    def __init__(self, out_shape, in_ndim, use_bias, name, *, dtype, param_dtype, kernel_init, bias_init):
        super().__init__(name=name)
        self.out_shape = tuple(out_shape)
        self.in_ndim = in_ndim
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.kernel_init = kernel_init
        self.bias_init = bias_init

    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_ndim :]
        kernel_init = self.kernel_init
        if kernel_init is None:
            # Variance 1 / fan_in (LeCun), fan_in counting every contracted axis.
            kernel_init = hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(math.prod(in_shape)))
        kernel = hk.get_parameter("kernel", in_shape + self.out_shape, self.param_dtype, init=kernel_init)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)
        contracted = tuple(range(x.ndim - self.in_ndim, x.ndim))
        y = jax.lax.dot_general(
            x.astype(dtype), kernel.astype(dtype), ((contracted, tuple(range(self.in_ndim))), ((), ()))
        )
        if self.use_bias:
            bias = hk.get_parameter("bias", self.out_shape, self.param_dtype, init=self.bias_init)
            y = y + bias.astype(dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y


class FlexMultiHeadAttention(hk.Module):
    """Multi-head attention over inputs [batch, length, features], with flex_attention at its core (Haiku).

    The same layer as the Flax ones: ``query/kernel`` [F, Hq, D], ``key/kernel`` and ``value/kernel`` [F, Hkv, D],
    ``out/kernel`` [Hq, D, F_out] (each in a submodule named query, key, value, out, with ``bias`` when enabled),
    and ``query_norm``, ``key_norm`` [D] with ``normalize_qk``. The arguments mean what the NNX module's mean;
    head_dim defaults to features // num_heads and out_features to the input features. kernel_init and bias_init
    are Haiku initialisers; the default kernel initialiser is a truncated normal of variance 1 / fan_in.

    Decoding: with ``hk.transform_with_state``, ``init`` with ``decode=True`` on inputs of the cache's full length
    creates the empty cache as the state ``kv_cache`` (a ``ContiguousKVCache``; any other cache following the
    ``flexattn_jax.nn.KVCache`` protocol may be put in its place); each ``apply(..., decode=True)`` then appends its
    tokens (a prefill, then one at a time) and attends to everything cached, the mods seeing absolute positions.

    >>> import haiku as hk, jax, flexattn_jax as fa
    >>> from flexattn_jax.haiku import FlexMultiHeadAttention
    >>> layer = hk.transform(lambda x: FlexMultiHeadAttention(num_heads=4, mask_mod=fa.causal_mask)(x))
    >>> x = jax.random.normal(jax.random.key(1), (2, 10, 64))
    >>> params = jax.jit(layer.init)(jax.random.key(0), x)
    >>> jax.jit(layer.apply)(params, None, x).shape
    (2, 10, 64)

    Decoding: ``init`` with ``decode=True`` on inputs as long as the cache, a prefill, then one token at a time.

    >>> import functools, jax.numpy as jnp
    >>> def forward(x, decode=False):
    ...     return FlexMultiHeadAttention(num_heads=4, mask_mod=fa.causal_mask)(x, decode=decode)
    >>> layer = hk.without_apply_rng(hk.transform_with_state(forward))
    >>> params, cache = layer.init(jax.random.key(0), jnp.zeros((2, 16, 64)), decode=True)
    >>> full, _ = jax.jit(layer.apply)(params, {}, x)
    >>> step = jax.jit(functools.partial(layer.apply, decode=True))
    >>> prefill, cache = step(params, cache, x[:, :9])
    >>> last, cache = step(params, cache, x[:, 9:])
    >>> bool(jnp.allclose(last, full[:, 9:], atol=1e-5))
    True
    """

    def __init__(
        self,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        out_features: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        use_rope: bool = False,
        rope_theta: float = 10000.0,
        normalize_qk: bool = False,
        score_mod: Callable | None = None,
        mask_mod: Callable | None = None,
        block_mask: BlockMask | None = None,
        mask_varies: tuple[str, ...] = (),
        implementation: str | None = None,
        interpret: bool = False,
        kernel_options: Mapping[str, Any] | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init: Callable | None = None,
        bias_init: Callable = jnp.zeros,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self._settings = dict(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            out_features=out_features,
            use_rope=use_rope,
            rope_theta=rope_theta,
            normalize_qk=normalize_qk,
            score_mod=score_mod,
            mask_mod=mask_mod,
            block_mask=block_mask,
            mask_varies=mask_varies,
            implementation=implementation,
            interpret=interpret,
            kernel_options=kernel_options,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.out_features = out_features
        self.qkv_bias = qkv_bias
        self.out_bias = out_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.kernel_init = kernel_init
        self.bias_init = bias_init

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
          decode: use the KV cache state (see the class docstring). Self-attention only.
        """
        _common.check_inputs(inputs_q, inputs_kv, None)
        in_features = inputs_q.shape[-1]
        config = _common.LayerConfig.create(in_features=in_features, **self._settings)
        mods = _common.resolve_mods(config, score_mod, mask_mod, block_mask)
        if decode and inputs_kv is not None:
            raise ValueError("decode=True is for self-attention; inputs_kv must be None")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv

        # Submodules are made here, in __call__, so their names are query, key, value and out under this module's.
        dense = functools.partial(
            _DenseGeneral,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )
        query = dense((config.num_heads, config.head_dim), 1, self.qkv_bias, "query")(inputs_q)
        key = dense((config.num_kv_heads, config.head_dim), 1, self.qkv_bias, "key")(inputs_kv)
        value = dense((config.num_kv_heads, config.head_dim), 1, self.qkv_bias, "value")(inputs_kv)
        if config.normalize_qk:
            norm_shape = (config.head_dim,)
            query = _common.rms_norm(query, hk.get_parameter("query_norm", norm_shape, self.param_dtype, jnp.ones))
            key = _common.rms_norm(key, hk.get_parameter("key_norm", norm_shape, self.param_dtype, jnp.ones))

        if decode and not hk.running_init():
            cache = hk.get_state("kv_cache")
            if config.use_rope:
                positions = cache.query_positions(inputs_q.shape[1])
                query = _common.rotary_embedding(query, positions, config.rope_theta)
                key = _common.rotary_embedding(key, positions, config.rope_theta)
            cache = cache.append(key, value)
            hk.set_state("kv_cache", cache)
            heads = cache.attend(config, query, mods).astype(query.dtype)
        else:
            if decode:  # initialising: an empty cache as long as the inputs
                empty = _common.ContiguousKVCache.create(
                    inputs_q.shape[0], inputs_q.shape[1], config.num_kv_heads, config.head_dim, key.dtype
                )
                # The cache is a pytree; Haiku asks for a shape and dtype, which the initialiser ignores.
                hk.get_state("kv_cache", (), jnp.int32, init=lambda *_: empty)
            if config.use_rope:
                query = _common.rotary_embedding(query, jnp.arange(query.shape[1]), config.rope_theta)
                key = _common.rotary_embedding(key, jnp.arange(key.shape[1]), config.rope_theta)
            heads = _common.attend(config, query, key, value, mods)
        out_features = in_features if self.out_features is None else self.out_features
        return dense((out_features,), 2, self.out_bias, "out")(heads)
