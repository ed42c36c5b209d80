"""What the Flax NNX, Flax linen and Haiku attention layers share.

Nothing here imports a neural-network library. The layers own their parameters and their state; this module owns
the arithmetic around the projections and the rules every layer follows:

* ``LayerConfig``: the validated, framework-independent settings of a layer.
* ``rotary_embedding`` and ``rms_norm``: the optional position embedding and q/k normalisation.
* ``resolve_mods``: which score_mod and mask the call uses (the call's, else the construction's).
* ``attend``: flex_attention over projected [batch, length, heads, head_dim] tensors.
* ``ContiguousKVCache``: the autoregressive cache, following the ``KVCache`` protocol a layer talks to.

Layouts: projected queries are [B, L, Hq, D], keys and values [B, S, Hkv, D] (the layout of Flax's projections);
``attend`` moves the head axis in front of the length axis for ``flex_attention`` and back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from flexattn_jax import _validation
from flexattn_jax.api import IMPLEMENTATIONS, flex_attention
from flexattn_jax.block_mask import (
    DEFAULT_BLOCK_SIZE,
    BlockMask,
    create_block_mask,
    mask_axes,
    noop_mask,
)
from flexattn_jax.mods import identity

__all__ = [
    "LayerConfig",
    "rotary_embedding",
    "rms_norm",
    "resolve_mods",
    "attend",
    "check_inputs",
    "check_mask_arguments",
    "Mods",
    "KVCache",
    "ContiguousKVCache",
    "offset_mods",
    "RMS_NORM_EPSILON",
]

# Added to the mean square before the reciprocal square root of the q/k RMSNorm; the value Flax's RMSNorm uses.
RMS_NORM_EPSILON = 1e-6
# The axes a mask_mod may vary over; ``create_block_mask`` is told to evaluate the mask separately along them.
MASK_AXES = ("batch", "head")


def _is_positive_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0


def _check_dtype(name: str, dtype, allow_none: bool) -> None:
    if dtype is None and allow_none:
        return
    try:
        canonical = jnp.dtype(dtype)
    except TypeError:
        canonical = None
    if canonical not in [jnp.dtype(d) for d in _validation.SUPPORTED_DTYPES]:
        allowed = "float32, bfloat16, float16" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {allowed}, got {dtype!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class LayerConfig:
    """The settings of an attention layer, validated once at construction.

    Attributes:
      num_heads: query heads Hq.
      num_kv_heads: key/value heads Hkv; Hq is a multiple of it (Hkv < Hq is grouped-query attention, 1 multi-query).
      head_dim: features per head D.
      use_rope: apply the rotary position embedding to queries and keys.
      rope_theta: the rotary embedding's base wavelength.
      normalize_qk: RMS-normalise each query and key head (a learned scale per feature).
      score_mod, mask_mod, block_mask: the attention variant given at construction (mask_mod and block_mask
        exclusive); each call may give its own instead.
      mask_varies: axes ("batch", "head") to build the BlockMask over in any case. A mask_mod is turned into a
        BlockMask for each call's lengths, per batch row or head where the mask_mod reads b or h (found from its
        jaxpr, see ``mask_axes``), once for all of them otherwise.
      implementation, interpret, kernel_options: forwarded to ``flex_attention``.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
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

    @classmethod
    def create(
        cls,
        *,
        num_heads,
        num_kv_heads=None,
        head_dim=None,
        in_features=None,
        out_features=None,
        use_rope=False,
        rope_theta=10000.0,
        normalize_qk=False,
        score_mod=None,
        mask_mod=None,
        block_mask=None,
        mask_varies=(),
        implementation=None,
        interpret=False,
        kernel_options=None,
        dtype=None,
        param_dtype=jnp.float32,
    ) -> "LayerConfig":
        """Checks every argument and fills in the defaults: num_kv_heads = num_heads, head_dim =
        in_features // num_heads. ``in_features`` may be None (linen and Haiku learn it at the first call) when
        head_dim is given."""
        if not _is_positive_int(num_heads):
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if num_kv_heads is None:
            num_kv_heads = num_heads
        if not _is_positive_int(num_kv_heads):
            raise ValueError(f"num_kv_heads must be a positive int or None, got {num_kv_heads!r}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        if in_features is not None and not _is_positive_int(in_features):
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if out_features is not None and not _is_positive_int(out_features):
            raise ValueError(f"out_features must be a positive int or None, got {out_features!r}")
        if head_dim is None:
            if in_features is None:
                raise ValueError("head_dim must be given when in_features is not known at construction")
            if in_features % num_heads != 0:
                raise ValueError(
                    f"in_features ({in_features}) must be divisible by num_heads ({num_heads}) when head_dim is not "
                    "given"
                )
            head_dim = in_features // num_heads
        if not _is_positive_int(head_dim):
            raise ValueError(f"head_dim must be a positive int or None, got {head_dim!r}")
        if use_rope and head_dim % 2 != 0:
            raise ValueError(f"the rotary embedding (use_rope=True) needs an even head_dim, got {head_dim}")
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
            raise ValueError(f"rope_theta must be a positive float, got {rope_theta!r}")
        if score_mod is not None:
            _validation.check_score_mod(score_mod)
        check_mask_arguments(mask_mod, block_mask, "")
        mask_varies = _check_mask_varies(mask_varies)
        if implementation is not None and implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
        if kernel_options is not None and not isinstance(kernel_options, Mapping):
            raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
        _check_dtype("dtype", dtype, allow_none=True)
        _check_dtype("param_dtype", param_dtype, allow_none=False)
        return cls(
            num_heads=int(num_heads),
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            use_rope=bool(use_rope),
            rope_theta=float(rope_theta),
            normalize_qk=bool(normalize_qk),
            score_mod=score_mod,
            mask_mod=mask_mod,
            block_mask=block_mask,
            mask_varies=mask_varies,
            implementation=implementation,
            interpret=bool(interpret),
            kernel_options=kernel_options,
        )

    def flex_options(self) -> dict[str, Any]:
        """The keyword arguments forwarded to every ``flex_attention`` call."""
        return dict(
            enable_gqa=self.num_kv_heads != self.num_heads,
            implementation=self.implementation,
            interpret=self.interpret,
            kernel_options=self.kernel_options,
        )


def check_mask_arguments(mask_mod, block_mask, where: str = "") -> None:
    """mask_mod and block_mask are exclusive; each must be what it says."""
    if mask_mod is not None and block_mask is not None:
        raise ValueError(f"give mask_mod or block_mask{where}, not both")
    if mask_mod is not None:
        from flexattn_jax.block_mask import check_mask_mod

        check_mask_mod(mask_mod)
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask (see create_block_mask), got {type(block_mask).__name__}")


def _check_mask_varies(mask_varies) -> tuple[str, ...]:
    if isinstance(mask_varies, str):
        mask_varies = (mask_varies,)
    if not isinstance(mask_varies, (tuple, list)) or any(a not in MASK_AXES for a in mask_varies):
        raise ValueError(f"mask_varies must be a tuple of names from {MASK_AXES}, got {mask_varies!r}")
    return tuple(mask_varies)


# ------------------------------------------------------------------------------------------------- the inputs


def check_inputs(inputs_q, inputs_kv, in_features: int | None) -> None:
    """inputs_q [B, L, F] (and inputs_kv [B, S, F] for cross-attention) must be floating arrays of one batch."""
    for name, x in (("inputs_q", inputs_q), ("inputs_kv", inputs_kv)):
        if x is None:
            continue
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 3:
            raise ValueError(f"{name} must be [batch, length, features], got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got {jnp.dtype(x.dtype).name}")
        if 0 in x.shape:
            raise ValueError(f"{name} must not have an empty axis, got shape {tuple(x.shape)}")
        if in_features is not None and x.shape[-1] != in_features:
            raise ValueError(f"{name} has {x.shape[-1]} features but the layer was built for in_features={in_features}")
    if inputs_kv is not None and inputs_kv.shape[0] != inputs_q.shape[0]:
        raise ValueError(
            f"inputs_q and inputs_kv must have the same batch size, got {inputs_q.shape[0]} and {inputs_kv.shape[0]}"
        )


# ---------------------------------------------------------------------------------- position and normalisation


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotates feature pairs (i, i + D/2) of x [B, L, H, D] by angle position * theta^(-2i/D).

    The rotary position embedding of Su et al., "RoFormer" (2021), in the half-split layout of GPT-NeoX and Flax's
    ``nnx.RoPE``: a query at position m and a key at position n then score q.k as a function of m - n alone.

    Args:
      x: [B, L, H, D] with D even.
      positions: int [L], the absolute position of each of the L rows (a traced offset is fine), or int [B, L]
        when the sequences of the batch are at different positions (a cache with ragged lengths).
      theta: the base wavelength.

    Returns:
      x rotated, in x's dtype (the angles are float32).

    >>> import jax.numpy as jnp, numpy as np
    >>> x = jnp.ones((1, 3, 1, 2))
    >>> np.asarray(rotary_embedding(x, jnp.arange(3), theta=10000.0)[0, :, 0], np.float64).round(3).tolist()
    [[1.0, 1.0], [-0.301, 1.382], [-1.325, 0.493]]
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * (2.0 / x.shape[-1]))
    positions = positions[None] if positions.ndim == 1 else positions  # [1 or B, L]
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [1 or B, L, D/2]
    cos = jnp.cos(angles)[:, :, None, :]  # broadcast over the heads
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float = RMS_NORM_EPSILON) -> jax.Array:
    """x / sqrt(mean(x^2 over the last axis) + epsilon) * scale, computed in float32, returned in x's dtype.

    >>> import jax.numpy as jnp, numpy as np
    >>> np.asarray(rms_norm(jnp.array([[3.0, 4.0]]), jnp.ones(2), epsilon=0.0), np.float64).round(4).tolist()
    [[0.8485, 1.1314]]
    """
    x32 = x.astype(jnp.float32)
    normalized = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + epsilon)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (normalized * scale).astype(x.dtype)


# ------------------------------------------------------------------------------------------------ the mods


@dataclasses.dataclass(frozen=True)
class Mods:
    """What one call attends with: a score_mod, and a mask as a mask_mod or a BlockMask (or neither)."""

    score_mod: Callable | None
    mask_mod: Callable | None
    block_mask: BlockMask | None


def resolve_mods(config: LayerConfig, score_mod=None, mask_mod=None, block_mask=None) -> Mods:
    """The call's score_mod replaces the construction's; the call's mask (mask_mod or block_mask) replaces the
    construction's mask."""
    if score_mod is not None:
        _validation.check_score_mod(score_mod)
    else:
        score_mod = config.score_mod
    check_mask_arguments(mask_mod, block_mask, " to the call")
    if mask_mod is None and block_mask is None:
        mask_mod, block_mask = config.mask_mod, config.block_mask
    return Mods(score_mod, mask_mod, block_mask)


def _block_mask_for(config: LayerConfig, mask_mod, batch: int, q_len: int, kv_len: int) -> BlockMask:
    # A mask that reads b or h gets a BlockMask per batch row or head, whether or not mask_varies names the axis:
    # one built for batch 0 / head 0 alone would silently mask the others wrongly.
    axes = set(config.mask_varies) | mask_axes(mask_mod)
    return create_block_mask(
        mask_mod,
        batch if "batch" in axes else None,
        config.num_heads if "head" in axes else None,
        q_len,
        kv_len,
        BLOCK_SIZE=DEFAULT_BLOCK_SIZE,
    )


def _to_heads_first(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 1, 2)


def attend(config: LayerConfig, query: jax.Array, key: jax.Array, value: jax.Array, mods: Mods) -> jax.Array:
    """flex_attention of query [B, L, Hq, D] over key, value [B, S, Hkv, D]; returns [B, L, Hq, D].

    A mask_mod becomes a BlockMask for these lengths; a BlockMask is used as given.
    """
    batch, q_len = query.shape[:2]
    kv_len = key.shape[1]
    block_mask = mods.block_mask
    if mods.mask_mod is not None:
        block_mask = _block_mask_for(config, mods.mask_mod, batch, q_len, kv_len)
    out = flex_attention(
        _to_heads_first(query),
        _to_heads_first(key),
        _to_heads_first(value),
        score_mod=mods.score_mod,
        block_mask=block_mask,
        **config.flex_options(),
    )
    return _to_heads_first(out)


# ------------------------------------------------------------------------------------------------- KV caches


class KVCache(Protocol):
    """What a layer asks of an autoregressive key/value cache; the interface a new cache (e.g. a paged one) follows.

    Implementations are immutable pytrees (register them with ``jax.tree_util``): ``append`` returns a new cache,
    which the layer stores in its framework's state (an ``nnx.Cache`` variable, linen's ``cache`` collection), so a
    cache passes through ``jit`` and ``scan`` like any array. A decoding step of L new tokens (L > 1 for a prefill,
    then 1 per generated token) runs::

        positions = cache.query_positions(L)            # int32 [L] or [B, L]: absolute positions of the new tokens
        (rotate q and k by these positions)
        cache = cache.append(k, v)                      # k, v [B, L, Hkv, D]
        out = cache.attend(config, q, mods)             # q [B, L, Hq, D] -> [B, L, Hq, Dv]

    ``attend`` attends the L most recently appended positions to every position cached so far (and to nothing past
    the current length), calling the mods with absolute positions (q_idx counts from the start of the sequence, not
    of the step); ``offset_mods`` builds such mods. ``config`` carries the head counts and the keyword arguments for
    ``flex_attention`` (``config.flex_options()``); ``mods`` the call's score_mod and mask_mod (``mods.block_mask``
    is set only when the caller gave a BlockMask, which a cache may refuse).

    The layer never looks inside the cache: ``ContiguousKVCache`` is one implementation; the NNX layer takes any
    other through ``init_cache(cache=...)``, and linen's through the ``cache`` collection (variable ``kv_cache``).
    """

    def query_positions(self, num_new: int) -> jax.Array:
        """int32 [num_new] (one set for the batch) or [B, num_new] (per sequence, for ragged lengths): the absolute
        positions the next ``num_new`` appended tokens will take."""
        ...

    def append(self, key: jax.Array, value: jax.Array) -> "KVCache":
        """A new cache holding key, value [B, L, Hkv, D] after the positions cached so far."""
        ...

    def attend(self, config: LayerConfig, query: jax.Array, mods: Mods) -> jax.Array:
        """flex_attention of query [B, L, Hq, D] (the last L appended positions) over the cache: [B, L, Hq, Dv]."""
        ...


def offset_mods(mods: Mods, q_offset: jax.Array, kv_length: jax.Array) -> tuple[Callable, Callable]:
    """(score_mod, mask_mod) for a step whose first query sits at absolute position q_offset, attending to keys
    cached at positions [0, kv_length).

    The user's mods see q_idx + q_offset; positions at or past kv_length are masked. q_offset and kv_length may be
    traced int32 scalars (the mods capture them).
    """
    score_mod = identity if mods.score_mod is None else mods.score_mod
    mask_mod = noop_mask if mods.mask_mod is None else mods.mask_mod

    def score_at_absolute_position(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx + q_offset, kv_idx)

    def mask_at_absolute_position(b, h, q_idx, kv_idx):
        return (kv_idx < kv_length) & mask_mod(b, h, q_idx + q_offset, kv_idx)

    score_at_absolute_position.__name__ = f"offset_{getattr(score_mod, '__name__', 'score_mod')}"
    mask_at_absolute_position.__name__ = f"offset_{getattr(mask_mod, '__name__', 'mask_mod')}"
    return score_at_absolute_position, mask_at_absolute_position


@functools.partial(jax.tree_util.register_dataclass, data_fields=["key", "value", "length"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ContiguousKVCache:
    """Keys and values of every sequence in the batch, stored contiguously up to a fixed capacity.

    Attributes:
      key: [B, Hkv, MAX_LENGTH, D], position p of each sequence at [:, :, p]; the head-first layout
        ``flex_attention`` reads, so a step copies only the new tokens.
      value: [B, Hkv, MAX_LENGTH, Dv].
      length: int32 scalar, how many positions are filled (the same for every sequence of the batch).

    Appending past MAX_LENGTH cannot be detected under ``jit``; it overwrites the last positions. Size the cache
    for the prompt plus every generated token.

    >>> cache = ContiguousKVCache.create(batch_size=2, max_length=16, num_kv_heads=1, head_dim=4)
    >>> cache = cache.append(jnp.ones((2, 5, 1, 4)), jnp.ones((2, 5, 1, 4)))
    >>> int(cache.length), cache.query_positions(1).tolist()
    (5, [5])
    """

    key: jax.Array
    value: jax.Array
    length: jax.Array

    @classmethod
    def create(
        cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
    ) -> "ContiguousKVCache":
        """An empty cache (zeros, length 0)."""
        for name, value in (
            ("batch_size", batch_size),
            ("max_length", max_length),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_dtype("dtype", dtype, allow_none=False)
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.key.shape[2]

    def query_positions(self, num_new: int) -> jax.Array:
        return self.length + jnp.arange(num_new, dtype=jnp.int32)

    def append(self, key: jax.Array, value: jax.Array) -> "ContiguousKVCache":
        """Writes key, value [B, L, Hkv, D] at positions [length, length + L)."""
        batch, _, max_length, head_dim = self.key.shape
        expected = (batch, key.shape[1], self.key.shape[1], head_dim)
        if key.shape != expected or value.shape != expected[:3] + (self.value.shape[-1],):
            raise ValueError(
                f"the cache holds batch {batch}, {self.key.shape[1]} kv heads of dim {head_dim}; the new keys and "
                f"values must be [B, L, Hkv, D] = {expected}, got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        if key.shape[1] > max_length:
            raise ValueError(f"cannot append {key.shape[1]} positions to a cache of max_length {max_length}")
        start = (0, 0, self.length, 0)
        new_key = jax.lax.dynamic_update_slice(self.key, _to_heads_first(key).astype(self.key.dtype), start)
        new_value = jax.lax.dynamic_update_slice(self.value, _to_heads_first(value).astype(self.value.dtype), start)
        return ContiguousKVCache(new_key, new_value, self.length + key.shape[1])

    def attend(self, config: LayerConfig, query: jax.Array, mods: Mods) -> jax.Array:
        """Attends query [B, L, Hq, D], the last L appended positions, to the cache; returns [B, L, Hq, Dv]."""
        if mods.block_mask is not None:
            raise ValueError(
                "a BlockMask is built for fixed lengths and cannot follow a growing cache; give a mask_mod for "
                "decoding (it sees absolute positions)"
            )
        batch, q_len = query.shape[:2]
        q_offset = self.length - q_len
        score_mod, mask_mod = offset_mods(mods, q_offset, self.length)
        block_mask = _block_mask_for(config, mask_mod, batch, q_len, self.max_length)
        out = flex_attention(
            _to_heads_first(query).astype(self.key.dtype),
            self.key,
            self.value,
            score_mod=score_mod,
            block_mask=block_mask,
            **config.flex_options(),
        )
        return _to_heads_first(out)
