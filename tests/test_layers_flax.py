"""The Flax attention layers (NNX and linen): equal to explicit projections + flex_attention, to Flax's own attention
for plain causal attention, to each other with copied parameters; decoding with the KV cache equal to full
recomputation; jit, grad, scan and remat; and the errors bad configurations raise."""

from __future__ import annotations

import dataclasses
import doctest
import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import flexattn_jax as fa  # noqa: E402
from flexattn_jax.flax import FlexMultiHeadAttention, FlexMultiHeadAttentionLinen  # noqa: E402
from flexattn_jax.nn import _common, flax_linen, flax_nnx  # noqa: E402
from tests._helpers import assert_close  # noqa: E402
from tests._layer_cases import (  # noqa: E402
    B,
    CONFIGS,
    D,
    F,
    F_OUT,
    HKV,
    HQ,
    L,
    abstract,
    build_nnx,
    complex_rotary,
    explicit_attention,
    explicit_for,
    jit_call,
    linen_twin,
    nnx_params,
    random_inputs,
    random_params,
    set_nnx_params,
)

# ------------------------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nnx_equals_explicit_projections_and_flex_attention(name):
    layer = build_nnx(name)
    x = random_inputs(10)
    expected = jax.jit(explicit_for, static_argnums=0)(name, nnx_params(layer), x)
    assert_close(nnx.jit(lambda m, x: m(x))(layer, x), expected, jnp.float32)


def test_a_mask_reading_b_is_built_per_batch_row_without_mask_varies():
    # Row 0 is one document, row 1 four: blocks full in row 0 are partial or empty in row 1, so a BlockMask built
    # from row 0 alone would give row 1 attention across its documents.
    length = 256
    ids = jnp.asarray(np.stack([np.zeros(length), np.arange(length) // 64]).astype(np.int32))
    mask_mod = fa.and_masks(fa.causal_mask, fa.document_mask(ids))
    layer = build_nnx("causal", mask_mod=mask_mod, mask_varies=())
    x = random_inputs(10, (2, length, F))
    block_mask = fa.create_block_mask(mask_mod, 2, None, length, length)
    expected = explicit_attention(nnx_params(layer), x, num_heads=HQ, num_kv_heads=HQ, block_mask=block_mask)
    assert_close(nnx.jit(lambda m, x: m(x))(layer, x), expected, jnp.float32)


def test_mask_axes_reads_the_mask_mods_dependencies():
    from flexattn_jax.nn._common import mask_axes

    ids = jnp.zeros((2, 16), jnp.int32)
    assert mask_axes(fa.causal_mask) == frozenset()
    assert mask_axes(fa.document_mask(ids)) == {"batch"}
    assert mask_axes(lambda b, h, q, kv: (q - kv) < 4 * (h + 1)) == {"head"}
    assert mask_axes(fa.and_masks(fa.document_mask(ids), lambda b, h, q, kv: h > 0)) == {"batch", "head"}


def test_nnx_gradients_equal_explicit_gradients():
    """Gradients with respect to every parameter and the inputs, against a random cotangent."""
    name = "gqa_rope_norm_bias_alibi"
    layer = build_nnx(name)
    x = random_inputs(10)
    params = nnx_params(layer)
    cotangent = random_inputs(11, (B, L, F_OUT))
    grad_layer = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * cotangent), argnums=(0, 1)))(layer, x)
    grad_explicit = jax.jit(jax.grad(lambda p, x: jnp.sum(explicit_for(name, p, x) * cotangent), argnums=(0, 1)))(
        params, x)
    assert_close(grad_layer[1], grad_explicit[1], jnp.float32, "d inputs")
    layer_grads = nnx.to_pure_dict(grad_layer[0])
    assert jax.tree.structure(layer_grads) == jax.tree.structure(grad_explicit[0])
    for path, g in jax.tree_util.tree_leaves_with_path(grad_explicit[0]):
        got = layer_grads
        for entry in path:
            got = got[entry.key]
        assert_close(got, g, jnp.float32, f"d {jax.tree_util.keystr(path)}")

    # linen's twin with the same parameters, under jax.jit and jax.grad.
    linen_layer = linen_twin(name)
    grad_linen = jax.jit(jax.grad(lambda p: jnp.sum(linen_layer.apply({"params": p}, x) * cotangent)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grad_explicit[0]):
        got = grad_linen
        for entry in path:
            got = got[entry.key]
        assert_close(got, g, jnp.float32, f"linen d {jax.tree_util.keystr(path)}")


def test_call_mods_replace_the_constructions():
    layer = build_nnx("causal")
    x = random_inputs(12)
    params = nnx_params(layer)
    window = fa.sliding_window_mask(3, causal=False)
    block_mask = fa.create_block_mask(window, None, None, L, L)
    expected = jax.jit(lambda p, x: explicit_attention(p, x, num_heads=HQ, num_kv_heads=HQ, score_mod=fa.rel_bias,
                                                       block_mask=block_mask))(params, x)
    per_call_mask_mod = jit_call(layer, x, score_mod=fa.rel_bias, mask_mod=window)
    assert_close(per_call_mask_mod, expected, jnp.float32, "per-call mask_mod")
    per_call_block_mask = jit_call(layer, x, score_mod=fa.rel_bias, block_mask=block_mask)
    assert_close(per_call_block_mask, expected, jnp.float32, "per-call BlockMask")
    at_construction = FlexMultiHeadAttention(F, HQ, head_dim=D, out_features=F_OUT, block_mask=block_mask,
                                             score_mod=fa.rel_bias, rngs=nnx.Rngs(0))
    set_nnx_params(at_construction, params)
    assert_close(jit_call(at_construction, x), expected, jnp.float32, "BlockMask at construction")


def test_cross_attention_equals_explicit():
    layer = abstract(lambda: FlexMultiHeadAttention(F, HQ, num_kv_heads=HKV, head_dim=D, out_features=F_OUT,
                                                    rngs=nnx.Rngs(0)))
    set_nnx_params(layer, random_params(nnx_params(layer), 5))
    x, memory = random_inputs(13), random_inputs(14, (B, 7, F))

    @jax.jit
    def expected(params, x, memory):
        def project(name, inputs):
            return jnp.einsum("blf,fhd->bhld", inputs, params[name]["kernel"])

        heads = fa.flex_attention(project("query", x), project("key", memory), project("value", memory),
                                  enable_gqa=True)
        return jnp.einsum("bhld,hdo->blo", heads, params["out"]["kernel"])

    assert_close(jit_call(layer, x, memory), expected(nnx_params(layer), x, memory), jnp.float32)


def test_nnx_equals_flax_multi_head_attention_for_causal_attention():
    ours = abstract(lambda: FlexMultiHeadAttention(F, HQ, head_dim=D, out_features=F_OUT, qkv_bias=True,
                                                   out_bias=True, mask_mod=fa.causal_mask, rngs=nnx.Rngs(0)))
    theirs = abstract(lambda: nnx.MultiHeadAttention(HQ, F, qkv_features=HQ * D, out_features=F_OUT, decode=False,
                                                     rngs=nnx.Rngs(1)))
    set_nnx_params(theirs, random_params(nnx_params(theirs), 2))
    set_nnx_params(ours, nnx_params(theirs))
    x = random_inputs(15)
    assert_close(jit_call(ours, x), jit_call(theirs, x, mask=nnx.make_causal_mask(jnp.ones((B, L)))), jnp.float32)


def test_linen_equals_flax_multi_head_dot_product_attention_for_causal_attention():
    ours = FlexMultiHeadAttentionLinen(HQ, head_dim=D, out_features=F_OUT, qkv_bias=True, out_bias=True,
                                       mask_mod=fa.causal_mask)
    theirs = nn.MultiHeadDotProductAttention(HQ, qkv_features=HQ * D, out_features=F_OUT)
    x = random_inputs(16)
    params = random_params(jax.eval_shape(theirs.init, jax.random.key(0), x)["params"], 3)
    mask = nn.make_causal_mask(jnp.ones((B, L)))
    expected = jax.jit(lambda p, x: theirs.apply({"params": p}, x, mask=mask))(params, x)
    assert jax.tree.structure(jax.eval_shape(ours.init, jax.random.key(0), x)["params"]) == jax.tree.structure(params)
    assert_close(jax.jit(ours.apply)({"params": params}, x), expected, jnp.float32)


@pytest.mark.parametrize("name", ["gqa_rope_norm_bias_alibi", "mqa_softcap_window"])
def test_linen_equals_nnx_with_copied_parameters(name):
    nnx_layer = build_nnx(name)
    linen_layer = linen_twin(name)
    x = random_inputs(17)
    params = nnx_params(nnx_layer)
    shapes = jax.eval_shape(linen_layer.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda p: p.shape, params)
    assert_close(jax.jit(linen_layer.apply)({"params": params}, x), jit_call(nnx_layer, x), jnp.float32)


def test_rotary_embedding_matches_flax_rope():
    x = random_inputs(18, (B, L, HQ, 8))
    positions = jnp.arange(3, 3 + L)
    rope = nnx.RoPE(theta=500.0)

    @jax.jit
    def rotate_three_ways(x, positions):
        ours = _common.rotary_embedding(x, positions, theta=500.0)
        # nnx.RoPE rotates [..., length, features]; put the heads before the length.
        theirs = rope(x.transpose(0, 2, 1, 3), positions.astype(jnp.float32)).transpose(0, 2, 1, 3)
        return ours, theirs, complex_rotary(x, positions, theta=500.0)

    ours, theirs, complex_form = rotate_three_ways(x, positions)
    assert_close(ours, theirs, jnp.float32)
    assert_close(ours, complex_form, jnp.float32)


def test_bfloat16_layer_matches_float32_within_the_contract():
    layer = build_nnx("gqa_rope_norm_bias_alibi")
    low = build_nnx("gqa_rope_norm_bias_alibi", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    set_nnx_params(low, nnx_params(layer))
    x = random_inputs(19)
    out = jit_call(low, random_inputs(19, dtype=jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert_close(out, jit_call(layer, x), jnp.bfloat16, factor=2.0)


# ------------------------------------------------------------------------------------------------ decoding


DECODE_MASK = fa.sliding_window_mask(6)


def test_nnx_decode_matches_full_recomputation():
    layer = build_nnx("gqa_rope_norm_bias_alibi", mask_mod=DECODE_MASK, mask_varies=())
    x = random_inputs(20, (B, 11, F))
    full = jit_call(layer, x)
    layer.init_cache(batch_size=B, max_length=16)
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outputs = [step(layer, x[:, :5])] + [step(layer, x[:, t : t + 1]) for t in range(5, 11)]
    assert int(layer.cache.get_value().length) == 11
    assert_close(jnp.concatenate(outputs, axis=1), full, jnp.float32)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inner", "steps"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _CountingCache:
    """A KVCache of its own (counting its appends around a contiguous one): the layer needs only the protocol."""

    inner: _common.ContiguousKVCache
    steps: jax.Array

    def query_positions(self, num_new):
        return self.inner.query_positions(num_new)

    def append(self, key, value):
        return _CountingCache(self.inner.append(key, value), self.steps + 1)

    def attend(self, config, query, mods):
        return self.inner.attend(config, query, mods)


def test_nnx_decode_with_a_cache_of_its_own():
    layer = build_nnx("mqa_softcap_window")
    x = random_inputs(22, (B, 6, F))
    full = jit_call(layer, x)
    inner = _common.ContiguousKVCache.create(B, 8, num_kv_heads=1, head_dim=D)
    layer.init_cache(cache=_CountingCache(inner, jnp.zeros((), jnp.int32)))
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outputs = [step(layer, x[:, :4]), step(layer, x[:, 4:5]), step(layer, x[:, 5:6])]
    assert int(layer.cache.get_value().steps) == 3
    assert_close(jnp.concatenate(outputs, axis=1), full, jnp.float32)
    with pytest.raises(ValueError, match="either a cache or batch_size"):
        layer.init_cache(B, 8, cache=inner)


def test_linen_decode_matches_full_recomputation():
    layer = linen_twin("mqa_softcap_window", score_mod=fa.generate_alibi_bias(HQ), mask_mod=DECODE_MASK)
    x = random_inputs(21, (B, 11, F))
    params = random_params(jax.eval_shape(layer.init, jax.random.key(0), x)["params"], 4)
    full = jax.jit(layer.apply)({"params": params}, x)
    init_cache = functools.partial(layer.init, decode=True)
    cache_shapes = jax.eval_shape(init_cache, jax.random.key(0), jnp.zeros((B, 16, F)))["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

    @jax.jit
    def step(cache, tokens):
        out, state = layer.apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"])
        return out, state["cache"]

    outputs = []
    for start, stop in [(0, 4)] + [(t, t + 1) for t in range(4, 11)]:
        out, cache = step(cache, x[:, start:stop])
        outputs.append(out)
    assert_close(jnp.concatenate(outputs, axis=1), full, jnp.float32)


def test_pallas_triton_through_the_layer_matches_reference():
    """implementation="pallas_triton" (interpret mode on the CPU) through the layer: outputs and gradients, then a
    prefill and two decoding steps, against the same layer on the reference implementation."""
    name = "gqa_rope_norm_bias_alibi"
    reference = build_nnx(name)
    pallas = build_nnx(name, implementation="pallas_triton", interpret=True)
    x = random_inputs(40)
    cotangent = random_inputs(41, (B, L, F_OUT))

    def loss(m, x):
        return jnp.sum(m(x) * cotangent)

    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
    (pallas_params, pallas_x), (ref_params, ref_x) = grad(pallas, x), grad(reference, x)
    assert_close(jit_call(pallas, x), jit_call(reference, x), jnp.float32, "out")
    assert_close(pallas_x, ref_x, jnp.float32, "d inputs")
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(pallas_params)),
                                 jax.tree.leaves(nnx.to_pure_dict(ref_params))):
        assert_close(got, want, jnp.float32, f"d {jax.tree_util.keystr(path)}")

    decoder = build_nnx(name, mask_mod=DECODE_MASK, mask_varies=(), implementation="pallas_triton", interpret=True)
    full = jit_call(build_nnx(name, mask_mod=DECODE_MASK, mask_varies=()), x[:, :7])
    decoder.init_cache(batch_size=B, max_length=16)
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outputs = [step(decoder, x[:, :5]), step(decoder, x[:, 5:6]), step(decoder, x[:, 6:7])]
    assert_close(jnp.concatenate(outputs, axis=1), full, jnp.float32, "decode")


# ------------------------------------------------------------------------------------ transformations


NUM_LAYERS = 3


@jax.jit
def explicit_stack(stacked_params, x):
    """NUM_LAYERS residual causal GQA layers with the rotary embedding, one after the other."""
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, L, L)
    for i in range(NUM_LAYERS):
        layer_params = jax.tree.map(lambda p: p[i], stacked_params)
        x = x + explicit_attention(layer_params, x, num_heads=HQ, num_kv_heads=HKV, use_rope=True,
                                   block_mask=block_mask)
    return x


def test_nnx_scan_and_remat_over_layers():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make_stack(key):
        return FlexMultiHeadAttention(F, HQ, num_kv_heads=HKV, use_rope=True, mask_mod=fa.causal_mask,
                                      rngs=nnx.Rngs(key))

    stack = abstract(lambda: make_stack(jax.random.split(jax.random.key(0), NUM_LAYERS)))
    set_nnx_params(stack, random_params(nnx_params(stack), 6))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    @nnx.remat
    def apply_stack(layer, x):
        return x + layer(x)

    x = random_inputs(24)
    assert_close(nnx.jit(apply_stack)(stack, x), explicit_stack(nnx_params(stack), x), jnp.float32)
    grads = nnx.jit(nnx.grad(lambda s: jnp.sum(apply_stack(s, x) ** 2)))(stack)
    assert all(bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


class _Residual(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + FlexMultiHeadAttentionLinen(HQ, num_kv_heads=HKV, use_rope=True, mask_mod=fa.causal_mask)(x), None


def test_linen_scan_and_remat_over_layers():
    stack = nn.scan(nn.remat(_Residual), variable_axes={"params": 0}, split_rngs={"params": True},
                    length=NUM_LAYERS)()
    x = random_inputs(25)
    params = random_params(jax.eval_shape(stack.init, jax.random.key(0), x, None)["params"], 7)
    out, _ = jax.jit(stack.apply)({"params": params}, x, None)
    assert_close(out, explicit_stack(params["FlexMultiHeadAttentionLinen_0"], x), jnp.float32)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(stack.apply({"params": p}, x, None)[0] ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------------------------ errors


def _nnx(**kwargs):
    settings = dict(in_features=F, num_heads=HQ)
    settings.update(kwargs)
    return lambda: FlexMultiHeadAttention(**settings, rngs=nnx.Rngs(0))


def _nnx_call(call_kwargs, x_shape=(B, L, F), cache=False, **kwargs):
    def run():
        layer = abstract(_nnx(**kwargs))
        if cache:
            layer.init_cache(B, 16)
        return jit_call(layer, random_inputs(0, x_shape), **call_kwargs)

    return run


def _linen(call_shape=(B, L, F), **kwargs):
    return lambda: FlexMultiHeadAttentionLinen(**kwargs).init(jax.random.key(0), random_inputs(0, call_shape))


INVALID = [
    ("kv heads do not divide", _nnx(num_heads=6, num_kv_heads=4), ValueError,
     r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"),
    ("zero heads", _nnx(num_heads=0), ValueError, r"num_heads must be a positive int, got 0"),
    ("no in_features", _nnx(in_features=None, head_dim=8), ValueError, r"in_features must be a positive int, got None"),
    ("features not divisible", _nnx(in_features=10, num_heads=3), ValueError,
     r"in_features \(10\) must be divisible by num_heads \(3\) when head_dim is not given"),
    ("odd head_dim with rope", _nnx(head_dim=7, use_rope=True), ValueError,
     r"rotary embedding \(use_rope=True\) needs an even head_dim, got 7"),
    ("negative head_dim", _nnx(head_dim=-2), ValueError, r"head_dim must be a positive int or None, got -2"),
    ("unknown implementation", _nnx(implementation="cuda"), ValueError,
     r"implementation must be None or one of \('reference',.*got 'cuda'"),
    ("mask_mod and block_mask", _nnx(mask_mod=fa.causal_mask,
                                     block_mask=fa.create_block_mask(fa.causal_mask, None, None, L, L)),
     ValueError, r"give mask_mod or block_mask, not both"),
    ("mask_mod not boolean", _nnx(mask_mod=lambda b, h, q, kv: q - kv), TypeError,
     r"mask_mod must return a boolean scalar"),
    ("score_mod not callable", _nnx(score_mod=3.0), TypeError, r"score_mod must be a callable"),
    ("unknown mask axis", _nnx(mask_varies=("time",)), ValueError,
     r"mask_varies must be a tuple of names from \('batch', 'head'\), got \('time',\)"),
    ("integer dtype", _nnx(dtype=jnp.int32), TypeError, r"dtype must be float32, bfloat16, float16 or None"),
    ("kernel_options not a dict", _nnx(kernel_options=[("BLOCK_M", 64)]), TypeError,
     r"kernel_options must be a dict or None, got list"),
    ("inputs of rank 2", _nnx_call({}, x_shape=(L, F)), ValueError,
     r"inputs_q must be \[batch, length, features\], got shape \(13, 24\)"),
    ("wrong feature count", _nnx_call({}, x_shape=(B, L, 16)), ValueError,
     r"inputs_q has 16 features but the layer was built for in_features=24"),
    ("both masks in the call", _nnx_call(dict(mask_mod=fa.causal_mask,
                                              block_mask=fa.create_block_mask(fa.causal_mask, None, None, L, L))),
     ValueError, r"give mask_mod or block_mask to the call, not both"),
    ("BlockMask of other lengths", _nnx_call(dict(block_mask=fa.create_block_mask(fa.causal_mask, None, None, 8, 8))),
     ValueError, r"block_mask was built for \(Q_LEN, KV_LEN\) = \(8, 8\) but query and key have L=13, S=13"),
    ("decode without a cache", _nnx_call(dict(decode=True)), ValueError,
     r"decode=True needs a cache; call init_cache\(batch_size, max_length\) first"),
    ("decode with a BlockMask", _nnx_call(dict(decode=True,
                                               block_mask=fa.create_block_mask(fa.causal_mask, None, None, L, L)),
                                          cache=True),
     ValueError, r"a BlockMask is built for fixed lengths and cannot follow a growing cache"),
    ("decode past max_length", _nnx_call(dict(decode=True), x_shape=(B, 20, F), cache=True), ValueError,
     r"cannot append 20 positions to a cache of max_length 16"),
    ("decode with another batch", _nnx_call(dict(decode=True), x_shape=(3, 4, F), cache=True), ValueError,
     r"the cache holds batch 2"),
    ("linen kv heads do not divide", _linen(num_heads=6, num_kv_heads=4), ValueError,
     r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"),
    ("linen features not divisible", _linen(num_heads=5), ValueError,
     r"in_features \(24\) must be divisible by num_heads \(5\)"),
    ("linen inputs of rank 4", _linen(call_shape=(B, 1, L, F), num_heads=4), ValueError,
     r"inputs_q must be \[batch, length, features\], got shape \(2, 1, 13, 24\)"),
]


@pytest.mark.parametrize("build, error, message", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_configurations_and_shapes_raise(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_cross_attention_decode_and_batch_mismatch_raise():
    layer = _nnx()()
    with pytest.raises(ValueError, match=r"inputs_q and inputs_kv must have the same batch size, got 2 and 3"):
        layer(random_inputs(0), random_inputs(1, (3, 5, F)))
    layer.init_cache(B, 16)
    with pytest.raises(ValueError, match=r"decode=True is for self-attention; inputs_kv must be None"):
        layer(random_inputs(0), random_inputs(1), decode=True)


# -------------------------------------------------------------------------------------------- packaging


def test_import_flexattn_jax_imports_no_framework():
    code = (
        "import sys, flexattn_jax, flexattn_jax.nn\n"
        "loaded = sorted(m for m in ('flax', 'optax', 'haiku') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("module", [_common, flax_nnx, flax_linen], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
