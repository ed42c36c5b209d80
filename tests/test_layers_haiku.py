"""The Haiku attention layer: equal to the NNX layer with copied parameters (outputs and gradients), to explicit
projections + flex_attention, decoding equal to full recomputation, and the errors bad configurations raise."""

from __future__ import annotations

import doctest
import functools

import jax
import jax.numpy as jnp
import pytest

hk = pytest.importorskip("haiku")
pytest.importorskip("flax")

import flexattn_jax as fa  # noqa: E402
from flexattn_jax.haiku import FlexMultiHeadAttention  # noqa: E402
from flexattn_jax.nn import haiku as haiku_layer  # noqa: E402
from tests._helpers import assert_close  # noqa: E402
from tests._layer_cases import (  # noqa: E402
    B,
    CONFIG_MASKS,
    CONFIGS,
    D,
    F,
    F_OUT,
    HQ,
    L,
    build_nnx,
    explicit_attention,
    jit_call,
    nnx_params,
    random_inputs,
    random_params,
)
from flax import nnx  # noqa: E402

NAME = "flex_multi_head_attention"


def haiku_settings(name, **overrides):
    settings = dict(head_dim=D, out_features=F_OUT, mask_mod=CONFIG_MASKS[name], **CONFIGS[name])
    if name == "gqa_rope_norm_bias_alibi":
        settings["mask_varies"] = ("batch",)
    settings.update(overrides)
    return settings


def to_haiku(params: dict) -> dict:
    """NNX / linen parameters {"query": {"kernel": ..}, "query_norm": .., ..} -> Haiku's {module: {name: ..}}."""
    converted = {}
    for key, value in params.items():
        if isinstance(value, dict):
            converted[f"{NAME}/{key}"] = dict(value)
        else:
            converted.setdefault(NAME, {})[key] = value
    return converted


def from_haiku(params: dict) -> dict:
    flat = {}
    for module, values in params.items():
        if module == NAME:
            flat.update(values)
        else:
            flat[module.split("/")[-1]] = dict(values)
    return flat


@pytest.mark.parametrize("name", ["gqa_rope_norm_bias_alibi", "mqa_softcap_window"])
def test_haiku_equals_nnx_with_copied_parameters(name):
    nnx_layer = build_nnx(name)
    settings = haiku_settings(name)
    layer = hk.without_apply_rng(hk.transform(lambda x: FlexMultiHeadAttention(HQ, **settings)(x)))
    x = random_inputs(30)
    params = nnx_params(nnx_layer)
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
    assert jax.tree.map(lambda s: s.shape, from_haiku(shapes)) == jax.tree.map(lambda p: p.shape, params)
    assert_close(jax.jit(layer.apply)(to_haiku(params), x), jit_call(nnx_layer, x), jnp.float32)


def test_haiku_gradients_equal_nnx_gradients():
    name = "gqa_rope_norm_bias_alibi"
    nnx_layer = build_nnx(name)
    settings = haiku_settings(name)
    layer = hk.without_apply_rng(hk.transform(lambda x: FlexMultiHeadAttention(HQ, **settings)(x)))
    x = random_inputs(31)
    cotangent = random_inputs(32, (B, L, F_OUT))
    grad_haiku = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) * cotangent)))(to_haiku(nnx_params(nnx_layer)))
    grad_nnx = nnx.to_pure_dict(nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * cotangent)))(nnx_layer))
    for path, g in jax.tree_util.tree_leaves_with_path(grad_nnx):
        got = from_haiku(grad_haiku)
        for entry in path:
            got = got[entry.key]
        assert_close(got, g, jnp.float32, f"d {jax.tree_util.keystr(path)}")


def test_haiku_per_call_mods_equal_explicit():
    window = fa.sliding_window_mask(4, causal=False)
    layer = hk.without_apply_rng(hk.transform(
        lambda x: FlexMultiHeadAttention(HQ, num_kv_heads=1, head_dim=D, qkv_bias=True)(
            x, score_mod=fa.rel_bias, mask_mod=window)))
    x = random_inputs(33)
    params = random_params(jax.eval_shape(layer.init, jax.random.key(0), x), 34)
    block_mask = fa.create_block_mask(window, None, None, L, L)
    expected = jax.jit(lambda p, x: explicit_attention(from_haiku(p), x, num_heads=HQ, num_kv_heads=1,
                                                       score_mod=fa.rel_bias, block_mask=block_mask))(params, x)
    assert_close(jax.jit(layer.apply)(params, x), expected, jnp.float32)


def test_haiku_decode_matches_full_recomputation():
    settings = haiku_settings("gqa_rope_norm_bias_alibi", mask_mod=fa.sliding_window_mask(5), mask_varies=())

    def forward(x, decode=False):
        return FlexMultiHeadAttention(HQ, **settings)(x, decode=decode)

    layer = hk.without_apply_rng(hk.transform_with_state(forward))
    x = random_inputs(35, (B, 11, F))
    params_shape, state_shape = jax.eval_shape(functools.partial(layer.init, decode=True), jax.random.key(0),
                                               jnp.zeros((B, 16, F)))
    params = random_params(params_shape, 36)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_shape)
    full, _ = jax.jit(layer.apply)(params, {}, x)
    step = jax.jit(functools.partial(layer.apply, decode=True))
    outputs = []
    for start, stop in [(0, 6)] + [(t, t + 1) for t in range(6, 11)]:
        out, state = step(params, state, x[:, start:stop])
        outputs.append(out)
    assert int(state[NAME]["kv_cache"].length) == 11
    assert_close(jnp.concatenate(outputs, axis=1), full, jnp.float32)


def _init(x_shape=(B, L, F), **settings):
    layer = hk.transform(lambda x: FlexMultiHeadAttention(**settings)(x))
    return lambda: layer.init(jax.random.key(0), random_inputs(0, x_shape))


INVALID = [
    ("kv heads do not divide", _init(num_heads=6, num_kv_heads=4), ValueError,
     r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"),
    ("features not divisible", _init(num_heads=5), ValueError,
     r"in_features \(24\) must be divisible by num_heads \(5\) when head_dim is not given"),
    ("odd head_dim with rope", _init(num_heads=4, head_dim=5, use_rope=True), ValueError,
     r"needs an even head_dim, got 5"),
    ("unknown implementation", _init(num_heads=4, implementation="mosaic"), ValueError,
     r"implementation must be None or one of"),
    ("inputs of rank 2", _init((L, F), num_heads=4), ValueError,
     r"inputs_q must be \[batch, length, features\], got shape \(13, 24\)"),
    ("integer inputs", lambda: hk.transform(lambda x: FlexMultiHeadAttention(4)(x)).init(
        jax.random.key(0), jnp.ones((B, L, F), jnp.int32)), TypeError, r"inputs_q must be a floating array, got int32"),
]


@pytest.mark.parametrize("build, error, message", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_configurations_and_shapes_raise(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_docstring_examples():
    result = doctest.testmod(haiku_layer, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
