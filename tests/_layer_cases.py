"""The layer configurations, random parameters and the explicit computation the layer tests compare against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flexattn_jax as fa
from flexattn_jax.flax import FlexMultiHeadAttention, FlexMultiHeadAttentionLinen

# Every axis a different size: batch 2, length 13, features 24, 4 query heads, 2 kv heads, head_dim 6, out 20.
B, L, F, HQ, HKV, D, F_OUT = 2, 13, 24, 4, 2, 6, 20


# Random values come from NumPy: every eager JAX operation on a new shape costs a compilation on the CPU.


def random_inputs(seed, shape=(B, L, F), dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32).astype(dtype))


def random_params(shapes, seed):
    """Random parameters of the given shapes: kernels normal / sqrt(fan-in), biases normal, norm scales 1 +- 0.3."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        values = rng.standard_normal(s.shape, np.float32)
        if "kernel" in name:
            values = values / np.sqrt(s.shape[-3] if s.ndim == 4 else s.shape[0])  # a scanned stack leads with layers
        elif "norm" in name:
            values = 1.0 + 0.3 * values
        return jnp.asarray(values.astype(s.dtype))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def abstract(make):
    """An NNX module built without running its initialisers; set_nnx_params fills it."""
    return nnx.eval_shape(make)


def jit_call(layer, *inputs, **kwargs):
    """The NNX layer's output under nnx.jit: one compilation rather than an op-by-op dispatch."""
    return nnx.jit(lambda m, *xs: m(*xs, **kwargs))(layer, *inputs)


def nnx_params(module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def set_nnx_params(module, params: dict) -> None:
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)


def complex_rotary(x, positions, theta=10000.0):
    """Rotary embedding as a complex multiplication: pair (x_i, x_{i + D/2}) times exp(i position theta^(-2i/D))."""
    half = x.shape[-1] // 2
    pairs = jax.lax.complex(x[..., :half], x[..., half:])
    frequencies = theta ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
    angles = jnp.asarray(positions, jnp.float32)[:, None] * frequencies[None, :]
    rotated = pairs * jax.lax.complex(jnp.cos(angles), jnp.sin(angles))[None, :, None, :]
    return jnp.concatenate([jnp.real(rotated), jnp.imag(rotated)], axis=-1)


def explicit_attention(params, x, *, num_heads, num_kv_heads, use_rope=False, normalize_qk=False, score_mod=None,
                       block_mask=None):
    """The layer written out: projections, optional RMSNorm and rotary embedding, flex_attention, output projection."""

    def project(name, inputs):
        y = jnp.einsum("blf,fhd->blhd", inputs, params[name]["kernel"])
        if "bias" in params[name]:
            y = y + params[name]["bias"][None, None]
        return y

    q, k, v = project("query", x), project("key", x), project("value", x)
    if normalize_qk:
        def norm(y, scale):
            return y / jnp.sqrt(jnp.mean(y**2, axis=-1, keepdims=True) + 1e-6) * scale[None, None, None]

        q, k = norm(q, params["query_norm"]), norm(k, params["key_norm"])
    if use_rope:
        q, k = complex_rotary(q, np.arange(x.shape[1])), complex_rotary(k, np.arange(x.shape[1]))
    heads = fa.flex_attention(
        q.transpose(0, 2, 1, 3),
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        score_mod=score_mod,
        block_mask=block_mask,
        enable_gqa=num_heads != num_kv_heads,
    )
    y = jnp.einsum("bhld,hdo->blo", heads, params["out"]["kernel"])
    if "bias" in params["out"]:
        y = y + params["out"]["bias"][None, None]
    return y


def document_ids(seed, batch=B, length=L):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.sort(rng.integers(0, 3, size=(batch, length)), axis=-1), jnp.int32)


# Layer settings by name; CONFIG_MASKS gives each its mask_mod.
CONFIGS = {
    "causal": dict(num_kv_heads=HQ),
    "gqa_rope_norm_bias_alibi": dict(
        num_kv_heads=HKV, use_rope=True, normalize_qk=True, qkv_bias=True, out_bias=True,
        score_mod=fa.generate_alibi_bias(HQ),
    ),
    "mqa_softcap_window": dict(num_kv_heads=1, use_rope=True, score_mod=fa.tanh_softcap(3.0)),
}
CONFIG_MASKS = {
    "causal": fa.causal_mask,
    "gqa_rope_norm_bias_alibi": fa.and_masks(fa.causal_mask, fa.document_mask(document_ids(3))),
    "mqa_softcap_window": fa.sliding_window_mask(5),
}


def build_nnx(name, seed=0, **overrides):
    settings = dict(head_dim=D, out_features=F_OUT, mask_mod=CONFIG_MASKS[name], **CONFIGS[name])
    if name == "gqa_rope_norm_bias_alibi":
        settings["mask_varies"] = ("batch",)
    settings.update(overrides)
    layer = abstract(lambda: FlexMultiHeadAttention(F, HQ, rngs=nnx.Rngs(seed), **settings))
    set_nnx_params(layer, random_params(nnx_params(layer), seed + 1))
    return layer


def explicit_for(name, params, x):
    settings = CONFIGS[name]
    block_mask = fa.create_block_mask(CONFIG_MASKS[name], x.shape[0], None, x.shape[1], x.shape[1])
    return explicit_attention(
        params, x, num_heads=HQ, num_kv_heads=settings["num_kv_heads"], use_rope=settings.get("use_rope", False),
        normalize_qk=settings.get("normalize_qk", False), score_mod=settings.get("score_mod"), block_mask=block_mask,
    )


def linen_twin(name, **overrides):
    settings = dict(head_dim=D, out_features=F_OUT, mask_mod=CONFIG_MASKS[name], **CONFIGS[name])
    if name == "gqa_rope_norm_bias_alibi":
        settings["mask_varies"] = ("batch",)
    settings.update(overrides)
    return FlexMultiHeadAttentionLinen(HQ, **settings)
