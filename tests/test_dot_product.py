"""dot_product_attention against jax.nn.dot_product_attention itself: outputs, gradients and the residual."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexattn_jax as fa
from tests._helpers import assert_close

B, T, S, N, K, H = 2, 40, 56, 4, 2, 16


def _inputs(seed, batched=True):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (lambda *s: s) if batched else (lambda *s: s[1:])
    q = jax.random.normal(keys[0], shape(B, T, N, H))
    k = jax.random.normal(keys[1], shape(B, S, K, H))
    v = jax.random.normal(keys[2], shape(B, S, K, H))
    return q, k, v, keys[3]


def _random_mask(key, shape):
    """Random, with every query keeping at least one key (jax.nn averages a row it masks wholly; we give 0)."""
    mask = np.array(jax.random.bernoulli(key, 0.6, shape))
    mask[..., np.arange(shape[-2]), np.arange(shape[-2]) % shape[-1]] = True
    return jnp.asarray(mask)


def _case(name, key):
    bias_key, mask_key = jax.random.split(key)
    if name == "plain":
        return {}
    if name == "bias+causal":
        return dict(bias=jax.random.normal(bias_key, (1, N, T, S)), is_causal=True)
    if name == "mask per batch":
        return dict(mask=_random_mask(mask_key, (B, 1, T, S)), scale=0.3)
    if name == "mask per head+bias per batch":
        return dict(mask=_random_mask(mask_key, (1, N, T, S)), bias=jax.random.normal(bias_key, (B, 1, 1, S)))
    if name == "window":
        return dict(local_window_size=(5, 2))
    if name == "lengths+causal":
        return dict(query_seq_lengths=jnp.array([T, 23], jnp.int32), key_value_seq_lengths=jnp.array([31, S], jnp.int32),
                    is_causal=True)
    raise ValueError(name)


CASES = ["plain", "bias+causal", "mask per batch", "mask per head+bias per batch", "window", "lengths+causal"]


@pytest.mark.parametrize("name", CASES)
def test_matches_jax_nn_with_gradients(name):
    q, k, v, key = _inputs(CASES.index(name))
    options = _case(name, key)
    bias = options.pop("bias", None)

    def loss(attention, q, k, v, bias):
        out = attention(q, k, v, bias, **options)
        return jnp.sum(out * jnp.sin(out)), out

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)
    (_, out), grads = grad(fa.dot_product_attention, q, k, v, bias)
    (_, expected), expected_grads = grad(jax.nn.dot_product_attention, q, k, v, bias)
    assert_close(out, expected, jnp.float32)
    for what, got, want in zip(("dq", "dk", "dv", "dbias"), grads, expected_grads):
        if want is not None:
            assert_close(got, want, jnp.float32, what)


def test_the_kernels_serve_it_in_interpret_mode():
    q, k, v, key = _inputs(10)
    options = dict(mask=_random_mask(key, (B, 1, T, S)), bias=jax.random.normal(key, (1, N, 1, S)), is_causal=True,
                   key_value_seq_lengths=jnp.array([S, 30], jnp.int32))
    expected = jax.nn.dot_product_attention(q, k, v, **options)
    got = fa.dot_product_attention(q, k, v, implementation="pallas_triton", interpret=True, **options)
    assert_close(got, expected, jnp.float32)
    grads = jax.grad(lambda k: jnp.sum(fa.dot_product_attention(q, k, v, implementation="pallas_triton",
                                                                interpret=True, **options) ** 2))(k)
    expected_grads = jax.grad(lambda k: jnp.sum(jax.nn.dot_product_attention(q, k, v, **options) ** 2))(k)
    assert_close(grads, expected_grads, jnp.float32, "dk")


def test_without_a_batch_axis_and_with_the_residual():
    q, k, v, key = _inputs(11, batched=False)
    mask = _random_mask(key, (N, T, S))
    out, lse = fa.dot_product_attention(q, k, v, mask=mask, return_residual=True, implementation="xla")
    expected, expected_lse = jax.nn.dot_product_attention(q, k, v, mask=mask, return_residual=True)
    assert out.shape == (T, N, H) and lse.shape == (T, N) and lse.dtype == jnp.float32
    assert_close(out, expected, jnp.float32)
    assert_close(lse, expected_lse, jnp.float32, "lse")


def test_inside_jit_with_traced_masks_and_lengths():
    q, k, v, key = _inputs(12)
    mask = _random_mask(key, (B, N, T, S))
    lengths = jnp.array([17, T], jnp.int32)
    attend = jax.jit(lambda q, mask, lengths: fa.dot_product_attention(q, k, v, mask=mask, query_seq_lengths=lengths))
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask, query_seq_lengths=lengths)
    assert_close(attend(q, mask, lengths), expected, jnp.float32)
    assert not np.asarray(attend(q, mask, lengths))[0, 17:].any()  # padding queries give 0


def test_a_query_with_no_key_gives_zero_and_finite_gradients():
    q, k, v, _ = _inputs(13)
    mask = jnp.ones((1, 1, T, S), bool).at[:, :, 3].set(False)
    out, lse = fa.dot_product_attention(q, k, v, mask=mask, return_residual=True)
    assert not np.asarray(out)[:, 3].any() and np.isneginf(np.asarray(lse)[:, 3]).all()
    grads = jax.grad(lambda q, k: jnp.sum(fa.dot_product_attention(q, k, v, mask=mask) ** 2), argnums=(0, 1))(q, k)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


BAD = [
    (dict(query=jnp.zeros((T, N, H))), ValueError, r"query, key and value must be \[B, T, N, H\]"),
    (dict(mask=jnp.ones((1, 1, T, S), jnp.int32)), TypeError, "mask must be boolean .* an additive mask is a bias"),
    (dict(mask=jnp.ones((T, S), bool)), ValueError, r"mask must have rank 4, broadcastable to \[B, N, T, S\]"),
    (dict(bias=jnp.ones((1, 3, T, S))), ValueError, r"bias must be broadcastable to \[B, N, T, S\] = \(2, 4, 40, 56\), got \(1, 3, 40, 56\)"),
    (dict(query_seq_lengths=jnp.ones((3,), jnp.int32)), ValueError, r"query_seq_lengths must be an integer array \[B=2\]"),
    (dict(local_window_size=(-1, 2)), ValueError, "local_window_size must be a non-negative int"),
    (dict(implementation="cudnn"), ValueError, "implementation='cudnn' is jax.nn.dot_product_attention's"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
]


@pytest.mark.parametrize("override, error, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises_naming_the_argument(override, error, message):
    q, k, v, _ = _inputs(14)
    arguments = dict(query=q, key=k, value=v)
    arguments.update(override)
    with pytest.raises(error, match=message):
        fa.dot_product_attention(**arguments)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bias+causal", "mask per batch", "lengths+causal"])
def test_on_the_gpu_in_bfloat16_with_the_default_kernels(name):
    """Whatever the default chooses on this GPU (the Mosaic kernels, or the Triton kernels for a bias read at a
    computed index), against jax.nn's dense attention in float32 (its bfloat16 path fails under strict dtype
    promotion), gradients included."""
    q, k, v, key = (x.astype(jnp.bfloat16) if i < 3 else x for i, x in enumerate(_inputs(20 + CASES.index(name))))
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 64 - H))) for x in (q, k, v))  # head dim 64
    options = _case(name, key)
    if "bias" in options:
        options["bias"] = options["bias"].astype(jnp.bfloat16)

    def loss(attention, q, k, v):
        out = attention(q, k, v, **options)
        return jnp.sum(out.astype(jnp.float32) * jnp.sin(out.astype(jnp.float32))), out

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (_, out), grads = grad(fa.dot_product_attention, q, k, v)
    if "bias" in options:
        options["bias"] = options["bias"].astype(jnp.float32)
    (_, expected), expected_grads = grad(jax.nn.dot_product_attention, *(x.astype(jnp.float32) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    assert_close(out, expected, jnp.bfloat16)
    for what, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(got, want, jnp.bfloat16, what)
