"""The dense reference against an independent float64 NumPy implementation of every mod of the library."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flexattn_jax as fa
from flexattn_jax.backends import reference
from tests import _helpers
from tests._helpers import MOD_CASES, assert_close, random_qkv


def _numpy_mods(name, B, H, L, S, seed):
    """float64 NumPy versions of the cases in MOD_CASES: (allowed [B,H,L,S] bool, score function)."""
    b = np.arange(B)[:, None, None, None]
    h = np.arange(H)[None, :, None, None]
    q = np.arange(L)[None, None, :, None]
    kv = np.arange(S)[None, None, None, :]
    everywhere = np.ones((B, H, L, S), bool)
    causal = np.broadcast_to(q >= kv, (B, H, L, S))

    def alibi(s, slope):
        return s + slope * (kv - q)

    standard_slopes = 2.0 ** (-8.0 * (h + 1) / H)
    identity = lambda s: s  # noqa: E731
    if name == "noop":
        return everywhere, identity
    if name == "causal":
        return causal, identity
    if name == "sliding_window":
        return np.broadcast_to((q - kv >= 0) & (q - kv < 24), everywhere.shape), identity
    if name == "prefix_lm":
        return np.broadcast_to((kv < S // 4) | (q >= kv), everywhere.shape), identity
    if name == "document_causal":
        q_ids = np.asarray(_helpers._doc_ids(L, seed))
        kv_ids = np.asarray(_helpers._doc_ids(S, seed))
        same = q_ids[:, None] == kv_ids[None, :]
        return causal & same[None, None], identity
    if name == "document_batched":
        q_ids = np.asarray(_helpers._doc_ids(L, seed, B))
        kv_ids = np.asarray(_helpers._doc_ids(S, seed, B))
        same = q_ids[:, :, None] == kv_ids[:, None, :]
        return np.broadcast_to(same[:, None], everywhere.shape), identity
    if name == "dilated":
        return np.broadcast_to((q - kv) % 3 == 0, everywhere.shape), identity
    if name == "alibi":
        return everywhere, lambda s: alibi(s, standard_slopes)
    if name == "alibi_learned_slopes":
        slopes = np.asarray(_helpers._slopes(H, seed), np.float64)[None, :, None, None]
        return causal, lambda s: alibi(s, slopes)
    if name == "softcap_causal":
        return causal, lambda s: 2.0 * np.tanh(s / 2.0)
    if name == "relative_bias_table":
        table = np.asarray(_helpers._rel_table(H, seed), np.float64)
        column = np.clip(q - kv, -8, 8) + 8
        return everywhere, lambda s: s + table[np.broadcast_to(h, s.shape), np.broadcast_to(column, s.shape)]
    if name == "rel_bias":
        return everywhere, lambda s: s + (q - kv)
    if name == "rel_causal_score_mod":
        return everywhere, lambda s: np.where(q >= kv, s + (q - kv), -np.inf)
    if name == "causal_score_mod":
        return everywhere, lambda s: np.where(q >= kv, s, -np.inf)
    if name == "composed":
        allowed = ((q - kv >= 0) & (q - kv < 16)) | ((kv < 8) | (q >= kv))
        return np.broadcast_to(allowed, everywhere.shape), lambda s: 5.0 * np.tanh(alibi(s, standard_slopes) / 5.0)
    raise KeyError(name)


def numpy_attention(q, k, v, allowed, score_fn, scale):
    """float64 attention: out [B,Hq,L,Ev], lse [B,Hq,L]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = score_fn(np.einsum("bhle,bhse->bhls", q, k) * scale)
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - row_max)
    denominator = weights.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denominator[..., None] > 0, (weights @ v) / denominator[..., None], 0.0)
        lse = np.where(denominator > 0, np.log(denominator) + row_max[..., 0], -np.inf)
    return out, lse


def numpy_max_scores(q, k, allowed, score_fn, scale):
    """float64 max_scores [B,Hq,L]: each query's largest allowed score, -inf where none is allowed."""
    q, k = (np.asarray(x, np.float64) for x in (q, k))
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    scores = score_fn(np.einsum("bhle,bhse->bhls", q, k) * scale)
    return np.where(allowed, scores, -np.inf).max(-1)


def _build(case, B, H, L, S, seed, block_size=16):
    mask_mod, score_mod = case.build(B, H, L, S, seed)
    block_mask = None if mask_mod is None else fa.create_block_mask(mask_mod, B, H, L, S, BLOCK_SIZE=block_size)
    return block_mask, score_mod


@pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: c.name)
def test_reference_matches_float64_numpy(case):
    B, Hq, Hkv, L, S = 2, 4, 2, 50, 37
    seed = hash(case.name) % 1000
    q, k, v = random_qkv(seed, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=16, Ev=8)
    block_mask, score_mod = _build(case, B, Hq, L, S, seed, block_size=16)
    out, (lse, max_scores) = fa.flex_attention(
        q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True, implementation="reference",
        return_aux=fa.AuxRequest(lse=True, max_scores=True),
    )
    allowed, score_fn = _numpy_mods(case.name, B, Hq, L, S, seed)
    expected_out, expected_lse = numpy_attention(q, k, v, allowed, score_fn, scale=1 / np.sqrt(16))
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32 and max_scores.dtype == jnp.float32
    assert out.shape == (B, Hq, L, 8) and lse.shape == max_scores.shape == (B, Hq, L)
    assert_close(out, expected_out, jnp.float32, "out")
    assert_close(lse, expected_lse, jnp.float32, "lse")
    expected_max = numpy_max_scores(q, k, allowed, score_fn, scale=1 / np.sqrt(16))
    assert_close(max_scores, expected_max, jnp.float32, "max_scores")


@pytest.mark.parametrize("L,S", [(1, 1), (17, 113), (113, 17), (64, 64)])
@pytest.mark.parametrize("block_size", [8, (16, 8), 128])
def test_lengths_and_block_sizes(L, S, block_size):
    q, k, v = random_qkv(L * 1000 + S, B=1, Hq=2, Hkv=1, L=L, S=S, E=8, Ev=4)
    mask = fa.create_block_mask(fa.prefix_lm_mask(3), None, None, L, S, BLOCK_SIZE=block_size)
    out = fa.flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    allowed, score_fn = _numpy_mods("noop", 1, 2, L, S, 0)
    allowed = allowed & ((np.arange(S)[None, :] < 3) | (np.arange(L)[:, None] >= np.arange(S)[None, :]))
    expected, _ = numpy_attention(q, k, v, allowed, score_fn, scale=1 / np.sqrt(8))
    assert_close(out, expected, jnp.float32)


def test_scale_is_applied_before_score_mod():
    q, k, v = random_qkv(3, B=1, Hq=1, Hkv=1, L=9, S=11, E=4, Ev=4)
    seen = {}

    def recording_softcap(score, b, h, q_idx, kv_idx):
        seen["called"] = True
        return 0.7 * jnp.tanh(score / 0.7)

    out = fa.flex_attention(q, k, v, score_mod=recording_softcap, scale=0.3)
    expected, _ = numpy_attention(
        q, k, v, np.ones((1, 1, 9, 11), bool), lambda s: 0.7 * np.tanh(s / 0.7), scale=0.3
    )
    assert seen["called"]
    assert_close(out, expected, jnp.float32)


def test_value_head_dim_differs_and_bf16_output_dtype():
    q, k, v = random_qkv(4, B=1, Hq=2, Hkv=2, L=20, S=30, E=16, Ev=24, dtype=jnp.bfloat16)
    out, lse = fa.flex_attention(q, k, v, return_lse=True)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 2, 20, 24) and lse.dtype == jnp.float32
    expected, _ = numpy_attention(q, k, v, np.ones((1, 2, 20, 30), bool), lambda s: s, 1 / np.sqrt(16))
    assert_close(out, expected, jnp.bfloat16)


def _fully_masked_setup():
    # Queries 0..3 see nothing (strictly-after-window keys only), and every query of batch 1 head 0 is masked.
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < q_idx - 3) & ~((b == 1) & (h == 0))

    q, k, v = random_qkv(5, B=2, Hq=2, Hkv=2, L=20, S=20, E=8, Ev=8)
    block_mask = fa.create_block_mask(mask_mod, 2, 2, 20, 20, BLOCK_SIZE=8)
    return q, k, v, block_mask


def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_finite_gradients():
    q, k, v, block_mask = _fully_masked_setup()
    out, lse = fa.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
    assert np.all(np.asarray(out[:, :, :4]) == 0) and np.all(np.asarray(lse[:, :, :4]) == -np.inf)
    assert np.all(np.asarray(out[1, 0]) == 0) and np.all(np.asarray(lse[1, 0]) == -np.inf)
    assert np.all(np.isfinite(np.asarray(lse[0, 0, 4:])))

    cotangent = jax.random.normal(jax.random.key(9), out.shape)

    def loss(q, k, v):
        out, lse = fa.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
        return jnp.sum(out * cotangent) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0][:, :, :4]) == 0)
    assert np.all(np.asarray(grads[0][1, 0]) == 0)


def test_fully_masked_rows_have_max_scores_minus_inf():
    q, k, v, block_mask = _fully_masked_setup()
    _, aux = fa.flex_attention(q, k, v, block_mask=block_mask, return_aux=fa.AuxRequest(max_scores=True))
    max_scores = np.asarray(aux.max_scores)
    assert np.all(max_scores[:, :, :4] == -np.inf) and np.all(max_scores[1, 0] == -np.inf)
    assert np.all(np.isfinite(max_scores[0, 0, 4:]))


def test_gradients_of_lse_of_fully_masked_rows_are_finite():
    q, k, v, block_mask = _fully_masked_setup()
    grads = jax.grad(
        lambda q: jnp.sum(jnp.exp(fa.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)[1]))
    )(q)
    assert np.all(np.isfinite(np.asarray(grads)))


@pytest.mark.parametrize("case_name", ["causal", "alibi", "softcap_causal", "document_causal"])
def test_reference_gradients_numerically(case_name):
    case = _helpers.MOD_CASES_BY_NAME[case_name]
    q, k, v = random_qkv(6, B=1, Hq=2, Hkv=1, L=12, S=10, E=4, Ev=4)
    block_mask, score_mod = _build(case, 1, 2, 12, 10, 6, block_size=4)

    def f(q, k, v):
        return fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)

    check_grads(f, (q, k, v), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


def test_gradient_through_captured_table_matches_numpy_finite_differences():
    q, k, v = random_qkv(7, B=1, Hq=2, Hkv=2, L=9, S=13, E=8, Ev=4)
    table = jax.random.normal(jax.random.key(8), (2, 9))
    cotangent = jax.random.normal(jax.random.key(10), (1, 2, 9, 4))

    def loss(table):
        out = fa.flex_attention(q, k, v, score_mod=fa.relative_position_bias(table))
        return jnp.sum(out * cotangent)

    grad = np.asarray(jax.jit(jax.grad(loss))(table), np.float64)

    def numpy_loss(table):
        column = np.clip(np.arange(9)[:, None] - np.arange(13)[None, :], -4, 4) + 4
        out, _ = numpy_attention(
            q, k, v, np.ones((1, 2, 9, 13), bool), lambda s: s + table[np.arange(2)[:, None, None], column][None],
            1 / np.sqrt(8),
        )
        return np.sum(out * np.asarray(cotangent, np.float64))

    table64 = np.asarray(table, np.float64)
    numeric = np.zeros_like(table64)
    for index in np.ndindex(table64.shape):
        step = np.zeros_like(table64)
        step[index] = 1e-6
        numeric[index] = (numpy_loss(table64 + step) - numpy_loss(table64 - step)) / 2e-6
    assert_close(grad, numeric, jnp.float32, "d table", factor=50)  # f32 autodiff vs f64 differences


def test_captured_tracers_of_an_outer_jit():
    q, k, v = random_qkv(11, B=2, Hq=2, Hkv=2, L=16, S=16, E=8, Ev=8)
    doc_ids = jnp.asarray([0] * 5 + [1] * 7 + [2] * 4, jnp.int32)

    @jax.jit
    def run(q, k, v, doc_ids, slopes):
        mask = fa.create_block_mask(fa.document_mask(doc_ids), None, None, 16, 16, BLOCK_SIZE=4)
        return fa.flex_attention(q, k, v, score_mod=fa.alibi_bias(slopes), block_mask=mask)

    slopes = jnp.asarray([0.25, 0.5], jnp.float32)
    out = run(q, k, v, doc_ids, slopes)
    d = np.asarray(doc_ids)
    allowed = np.broadcast_to(d[:, None] == d[None, :], (2, 2, 16, 16))
    h = np.arange(2)[None, :, None, None]
    bias = np.asarray(slopes, np.float64)[h] * (np.arange(16)[None, :] - np.arange(16)[:, None])
    expected, _ = numpy_attention(q, k, v, allowed, lambda s: s + bias, 1 / np.sqrt(8))
    assert_close(out, expected, jnp.float32)


def test_block_mask_as_jit_argument_does_not_recompile():
    q, k, v = random_qkv(12, B=1, Hq=2, Hkv=2, L=32, S=32, E=8, Ev=8)
    traces = []

    @jax.jit
    def run(q, k, v, block_mask):
        traces.append(1)
        return fa.flex_attention(q, k, v, block_mask=block_mask)

    first = fa.create_block_mask(fa.sliding_window_mask(4), None, None, 32, 32, BLOCK_SIZE=8)
    second = fa.BlockMask.from_block_maps(
        first.block_maps()[0][:, :, ::-1], first.block_maps()[1], BLOCK_SIZE=8, mask_mod=first.mask_mod,
        seq_lengths=(32, 32),
    )
    out1 = run(q, k, v, first)
    out2 = run(q, k, v, second)
    assert len(traces) == 1
    assert_close(out1, fa.flex_attention(q, k, v, block_mask=first), jnp.float32)
    assert_close(out2, fa.flex_attention(q, k, v, block_mask=second), jnp.float32)


def test_vmap_over_an_extra_leading_axis():
    q, k, v = random_qkv(13, B=3, Hq=2, Hkv=2, L=10, S=12, E=8, Ev=8)
    stacked = [x.reshape(3, 1, *x.shape[1:]) for x in (q, k, v)]
    mask = fa.create_block_mask(fa.causal_mask, None, None, 10, 12, BLOCK_SIZE=4)
    out = jax.vmap(lambda q, k, v: fa.flex_attention(q, k, v, block_mask=mask))(*stacked)
    assert_close(out.reshape(q.shape[0], *out.shape[2:]), fa.flex_attention(q, k, v, block_mask=mask), jnp.float32)


def test_reference_backend_takes_plain_arrays():
    q, k, v = random_qkv(14, B=1, Hq=1, Hkv=1, L=4, S=4, E=4, Ev=4)
    partial = jnp.zeros((1, 1, 1, 1), bool)
    full = jnp.ones((1, 1, 1, 1), bool)
    out, lse = reference.attention(
        q, k, v, score_mod=fa.identity, mask_mod=fa.noop_mask, partial_blocks=partial, full_blocks=full,
        block_size=(4, 4), scale=0.5,
    )
    expected, expected_lse = numpy_attention(q, k, v, np.ones((1, 1, 4, 4), bool), lambda s: s, 0.5)
    assert_close(out, expected, jnp.float32)
    assert_close(lse, expected_lse, jnp.float32)


def test_the_softmax_is_float32_whatever_the_score_mod_returns():
    # score.astype(bf16) in the score_mod: the scores are rounded, but the softmax and lse stay float32.
    q, k, v = (jax.random.normal(key, (1, 2, 32, 16)) for key in jax.random.split(jax.random.key(50), 3))

    def rounded(score, b, h, q_idx, kv_idx):
        return score.astype(jnp.bfloat16)

    out, lse = fa.flex_attention(q, k, v, score_mod=rounded, return_lse=True, implementation="reference")
    assert lse.dtype == jnp.float32
    scores = (np.einsum("bhle,bhse->bhls", np.float64(q), np.float64(k)) / 4.0)
    scores = np.float64(jnp.asarray(scores, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhls,bhsd->bhld", weights / weights.sum(-1, keepdims=True), np.float64(v))
    expected_lse = np.log(np.exp(scores).sum(-1))
    assert np.linalg.norm(np.asarray(out) - expected) / np.linalg.norm(expected) < 2e-5
    assert np.linalg.norm(np.asarray(lse) - expected_lse) / np.linalg.norm(expected_lse) < 2e-5


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: fa.tanh_softcap(float("nan")), ValueError, "cap must be a positive finite number, got nan"),
        (lambda: fa.tanh_softcap(float("inf")), ValueError, "cap must be a positive finite number, got inf"),
        (lambda: fa.tanh_softcap(0.0), ValueError, "cap must be a positive finite number"),
        (lambda: fa.tanh_softcap(None), TypeError, "cap must be a positive finite number, got NoneType"),
        (lambda: fa.alibi_slopes(0), ValueError, "num_heads must be a positive int, got 0"),
        (lambda: fa.alibi_slopes(2.5), ValueError, "num_heads must be a positive int, got 2.5"),
        (lambda: fa.generate_alibi_bias(2.5), ValueError, "num_heads must be a positive int, got 2.5"),
        (lambda: fa.generate_alibi_bias(True), ValueError, "num_heads must be a positive int, got True"),
        (lambda: fa.alibi_bias(jnp.ones((0,))), ValueError, "slopes must hold one slope per head"),
        (lambda: fa.sliding_window_mask(2.5), TypeError, "window_size must be an int, got float 2.5"),
        (lambda: fa.sliding_window_mask("3"), TypeError, "window_size must be an int, got str '3'"),
        (lambda: fa.sliding_window_mask(True), TypeError, "window_size must be an int, got bool"),
        (lambda: fa.sliding_window_mask(0), ValueError, "window_size must be >= 1, got 0"),
        (lambda: fa.sliding_window_mask(jnp.float32(3.0)), TypeError, "window_size must be an int"),
        (lambda: fa.sliding_window_mask(jnp.array(0)), ValueError, "window_size must be >= 1, got 0"),
        (lambda: fa.dilated_mask(1.5), TypeError, "dilation must be an int, got float 1.5"),
        (lambda: fa.prefix_lm_mask(None), TypeError, "prefix_length must be an int, got NoneType"),
        (lambda: fa.prefix_lm_mask(-1), ValueError, "prefix_length must be >= 0, got -1"),
    ],
)
def test_mod_factories_check_their_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_mask_factories_take_a_window_traced_inside_jit():
    @jax.jit
    def masks(window, prefix):
        return fa.create_mask(fa.and_masks(fa.sliding_window_mask(window), fa.prefix_lm_mask(prefix)), None, None, 6, 6)

    expected = fa.create_mask(fa.and_masks(fa.sliding_window_mask(2), fa.prefix_lm_mask(1)), None, None, 6, 6)
    np.testing.assert_array_equal(np.asarray(masks(jnp.int32(2), jnp.int32(1))), np.asarray(expected))
    np.testing.assert_array_equal(
        np.asarray(fa.create_mask(fa.dilated_mask(np.int64(2)), None, None, 4, 4)[0, 0]),
        (np.arange(4)[:, None] - np.arange(4)[None, :]) % 2 == 0,
    )
