"""Multi-head attention as a Flax NNX module, computed by flex_attention."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from flexattn_jax import _validation
from flexattn_jax.block_mask import BlockMask
from flexattn_jax.nn import _common

__all__ = ["FlexMultiHeadAttention"]


class FlexMultiHeadAttention(nnx.Module):
    """Multi-head attention over inputs [batch, length, features], with flex_attention at its core.

    Projects the inputs to Hq query heads and Hkv key/value heads of head_dim features (Hkv < Hq is grouped-query
    attention, Hkv = 1 multi-query), optionally normalises them (RMSNorm per head) and rotates them (rotary
    embedding), attends with a score_mod and a mask, and projects the heads back to out_features.

    Parameters (the names and shapes of Flax's ``nnx.MultiHeadAttention``, so weights copy across): ``query.kernel``
    [F, Hq, D], ``key.kernel`` and ``value.kernel`` [F, Hkv, D], ``out.kernel`` [Hq, D, F_out]; ``*.bias`` with
    the biases; ``query_norm`` and ``key_norm`` [D] with ``normalize_qk``.

    Args:
      in_features: F, the features of the inputs.
      num_heads: Hq.
      num_kv_heads: Hkv, dividing num_heads; defaults to num_heads.
      head_dim: D; defaults to in_features // num_heads.
      out_features: defaults to in_features.
      qkv_bias: add a learned bias to the query, key and value projections.
      out_bias: add a learned bias to the output projection.
      use_rope: rotate queries and keys by their positions (rotary embedding; D must be even).
      rope_theta: the rotary embedding's base wavelength.
      normalize_qk: RMS-normalise queries and keys per head, with a learned scale.
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx)``; a call's own score_mod replaces it.
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, made into a BlockMask for each call's lengths.
      block_mask: a BlockMask for fixed lengths, instead of mask_mod. A call's mask_mod or block_mask replaces
        the construction's mask.
      mask_varies: axes, of ("batch", "head"), to build the BlockMask over in any case; the axes the mask_mod
        reads (b, h) are found from its jaxpr and always used.
      implementation, interpret, kernel_options: forwarded to ``flexattn_jax.flex_attention``.
      dtype: the computation's dtype; None infers it from the inputs and parameters (as Flax does).
      param_dtype: the parameters' dtype.
      kernel_init, bias_init: initialisers of the projections.
      rngs: the random streams for initialisation.

    >>> import jax, jax.numpy as jnp, flexattn_jax as fa
    >>> from flax import nnx
    >>> from flexattn_jax.flax import FlexMultiHeadAttention
    >>> layer = FlexMultiHeadAttention(64, num_heads=4, num_kv_heads=2, use_rope=True,
    ...                                mask_mod=fa.causal_mask, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 10, 64))
    >>> y = nnx.jit(lambda layer, x: layer(x))(layer, x)
    >>> y.shape
    (2, 10, 64)

    Decoding: a prefill, then one token at a time, equal to attention over the whole sequence at once.

    >>> layer.init_cache(batch_size=2, max_length=16)
    >>> step = nnx.jit(lambda layer, x: layer(x, decode=True))
    >>> prefill = step(layer, x[:, :9])
    >>> last = step(layer, x[:, 9:])
    >>> bool(jnp.allclose(last, y[:, 9:], atol=1e-5))
    True
    """

    def __init__(
        self,
        in_features: int,
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
        kernel_init: Callable = nnx.initializers.lecun_normal(),
        bias_init: Callable = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        # LayerConfig allows None (linen and Haiku learn the features at the first call), but NNX creates its
        # parameters here, so it needs them now.
        _validation.check_positive_int(in_features, "in_features")
        config = _common.LayerConfig.create(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            in_features=in_features,
            out_features=out_features,
            use_rope=use_rope,
            rope_theta=rope_theta,
            normalize_qk=normalize_qk,
            score_mod=score_mod,
            mask_mod=mask_mod,
            block_mask=None,  # kept apart: a BlockMask holds arrays, which NNX tracks as data
            mask_varies=mask_varies,
            implementation=implementation,
            interpret=interpret,
            kernel_options=kernel_options,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        _common.check_mask_arguments(mask_mod, block_mask)
        self.config = config
        self.block_mask = nnx.data(block_mask)
        self.in_features = in_features
        self.out_features = in_features if out_features is None else out_features
        self.dtype = dtype
        self.param_dtype = param_dtype

        def projection(heads, use_bias):
            return nnx.LinearGeneral(
                in_features,
                (heads, config.head_dim),
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kernel_init,
                bias_init=bias_init,
                rngs=rngs,
            )

        self.query = projection(config.num_heads, qkv_bias)
        self.key = projection(config.num_kv_heads, qkv_bias)
        self.value = projection(config.num_kv_heads, qkv_bias)
        self.out = nnx.LinearGeneral(
            (config.num_heads, config.head_dim),
            self.out_features,
            axis=(-2, -1),
            use_bias=out_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        if config.normalize_qk:
            self.query_norm = nnx.Param(jnp.ones((config.head_dim,), param_dtype))
            self.key_norm = nnx.Param(jnp.ones((config.head_dim,), param_dtype))
        else:
            self.query_norm = self.key_norm = nnx.data(None)
        self.cache = nnx.data(None)

    def init_cache(self, batch_size: int | None = None, max_length: int | None = None, dtype=None, *,
                   cache: _common.KVCache | None = None) -> None:
        """Creates an empty KV cache for ``decode=True`` calls: batch_size sequences of up to max_length tokens.

        The cache's dtype defaults to the layer's dtype, else param_dtype. Instead of the sizes, ``cache`` may give a
        ready cache following the ``flexattn_jax.nn.KVCache`` protocol (e.g. a paged one); the layer uses it as is.
        """
        if cache is not None:
            if batch_size is not None or max_length is not None or dtype is not None:
                raise ValueError("give either a cache or batch_size, max_length and dtype, not both")
            self.cache = nnx.Cache(cache)
            return
        if batch_size is None or max_length is None:
            raise ValueError("init_cache needs batch_size and max_length (or a cache)")
        if dtype is None:
            dtype = self.dtype if self.dtype is not None else self.param_dtype
        cache = _common.ContiguousKVCache.create(
            batch_size, max_length, self.config.num_kv_heads, self.config.head_dim, dtype
        )
        self.cache = nnx.Cache(cache)

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
          decode: append this step's keys and values to the cache (see ``init_cache``) and attend to everything
            cached; the mods see absolute positions. Self-attention only.
        """
        _common.check_inputs(inputs_q, inputs_kv, self.in_features)
        config = self.config
        if block_mask is None and mask_mod is None and self.block_mask is not None:
            block_mask = self.block_mask
        mods = _common.resolve_mods(config, score_mod, mask_mod, block_mask)
        if decode and inputs_kv is not None:
            raise ValueError("decode=True is for self-attention; inputs_kv must be None")
        if decode and self.cache is None:
            raise ValueError("decode=True needs a cache; call init_cache(batch_size, max_length) first")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv

        query, key, value = self.query(inputs_q), self.key(inputs_kv), self.value(inputs_kv)
        if config.normalize_qk:
            query = _common.rms_norm(query, self.query_norm[...])
            key = _common.rms_norm(key, self.key_norm[...])
        if decode:
            cache = self.cache.get_value()
            if config.use_rope:
                positions = cache.query_positions(inputs_q.shape[1])
                query = _common.rotary_embedding(query, positions, config.rope_theta)
                key = _common.rotary_embedding(key, positions, config.rope_theta)
            cache = cache.append(key, value)
            self.cache.set_value(cache)
            heads = cache.attend(config, query, mods).astype(query.dtype)
        else:
            if config.use_rope:
                query = _common.rotary_embedding(query, jnp.arange(query.shape[1]), config.rope_theta)
                key = _common.rotary_embedding(key, jnp.arange(key.shape[1]), config.rope_theta)
            heads = _common.attend(config, query, key, value, mods)
        return self.out(heads)
