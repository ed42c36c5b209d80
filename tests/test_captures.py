"""Mods with captured arrays, traced for tiles and evaluated through refs inside Pallas kernels (interpret mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl

import flexattn_jax as fa
from flexattn_jax.backends import _captures
from tests._helpers import MOD_CASES, MOD_CASES_BY_NAME

BM, BN = 32, 16
B, H, L, S = 2, 4, 100, 77
# A tile straddling the ends of both sequences, so clamped reads and negative distances both occur.
B_AT, H_AT, Q_START, KV_START = 1, 3, 80, 64


def _tile_args(seed=0):
    s = jax.random.normal(jax.random.key(seed), (BM, BN), jnp.float32)
    q_idx = jnp.minimum(Q_START + jnp.arange(BM, dtype=jnp.int32), L - 1)[:, None]
    kv_idx = jnp.minimum(KV_START + jnp.arange(BN, dtype=jnp.int32), S - 1)[None, :]
    return s, jnp.int32(B_AT), jnp.int32(H_AT), q_idx, kv_idx


def _in_kernel(program, consts, args, with_score: bool):
    """Evaluates program inside a pallas_call (interpret mode), the consts read through refs."""
    n = len(consts)

    def kernel(*refs):
        const_refs, arg_refs, out_ref = refs[:n], refs[n:-1], refs[-1]
        values = [r[...] for r in arg_refs]
        out = program(const_refs, *values)
        out_ref[...] = jnp.broadcast_to(out, (BM, BN)).astype(jnp.float32)

    args = args if with_score else args[1:]
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((BM, BN), jnp.float32), interpret=True)(
        *consts, *args
    )


def _mods(case):
    mask_mod, score_mod = case.build(B, H, L, S, 0)
    return [(m, kind) for m, kind in ((mask_mod, "mask"), (score_mod, "score")) if m is not None]


@pytest.mark.parametrize("case", MOD_CASES, ids=repr)
def test_program_matches_mod_off_kernel(case):
    s, b, h, q_idx, kv_idx = _tile_args()
    for mod, kind in _mods(case):
        if kind == "score":
            program, consts = _captures.trace_score_mod(mod, BM, BN)
            np.testing.assert_allclose(program(consts, s, b, h, q_idx, kv_idx), mod(s, b, h, q_idx, kv_idx), rtol=1e-6, atol=1e-6)
        else:
            program, consts = _captures.trace_mask_mod(mod, BM, BN)
            np.testing.assert_array_equal(
                jnp.broadcast_to(program(consts, b, h, q_idx, kv_idx), (BM, BN)),
                jnp.broadcast_to(mod(b, h, q_idx, kv_idx), (BM, BN)),
            )


CAPTURING = ["document_causal", "document_batched", "alibi_learned_slopes", "relative_bias_table"]


@pytest.mark.parametrize("name", CAPTURING)
def test_captured_arrays_read_through_refs(name):
    args = _tile_args()
    s, b, h, q_idx, kv_idx = args
    for mod, kind in _mods(MOD_CASES_BY_NAME[name]):
        trace = _captures.trace_score_mod if kind == "score" else _captures.trace_mask_mod
        program, consts = trace(mod, BM, BN)
        want = mod(*args) if kind == "score" else mod(b, h, q_idx, kv_idx)
        got = _in_kernel(program, consts, args, kind == "score")
        np.testing.assert_allclose(got, jnp.broadcast_to(want, (BM, BN)).astype(jnp.float32), rtol=1e-6, atol=1e-6)


def test_hoisted_work_scalar_consts_and_fill_mode():
    table = jax.random.normal(jax.random.key(1), (H, 40), jnp.float32)
    offset = jnp.int32(3)
    weights = jnp.arange(5, dtype=jnp.float32)

    def score_mod(score, b, h, q_idx, kv_idx):
        doubled = (table * 2.0)[1]  # hoisted: computed outside the kernel
        column = q_idx - kv_idx + offset  # partly out of range
        bias = jnp.take(doubled, column, mode="fill", fill_value=-1.0)
        extra = jnp.take(weights, kv_idx - 70, mode="fill", fill_value=0.5)  # out of range for most kv_idx
        return score + bias + extra + offset.astype(jnp.float32)

    program, consts = _captures.trace_score_mod(score_mod, BM, BN)
    assert {c.shape for c in consts} == {(), (5,), (40,)}  # the table * 2 row is hoisted, not the table
    args = _tile_args()
    np.testing.assert_allclose(_in_kernel(program, consts, args, True), score_mod(*args), rtol=1e-6, atol=1e-6)


def test_tracers_of_an_outer_jit():
    s, b, h, q_idx, kv_idx = args = _tile_args()

    @jax.jit
    def run(table, ids):
        score_mod = fa.relative_position_bias(table)
        mask_mod = fa.document_mask(ids)
        score_program, score_consts = _captures.trace_score_mod(score_mod, BM, BN)
        mask_program, mask_consts = _captures.trace_mask_mod(mask_mod, BM, BN)
        scores = _in_kernel(score_program, score_consts, args, True)
        allowed = _in_kernel(mask_program, mask_consts, args, False)
        return jnp.where(allowed > 0, scores, 0.0)

    table = jax.random.normal(jax.random.key(2), (H, 17), jnp.float32)
    ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, L)), jnp.int32)
    want_scores = fa.relative_position_bias(table)(s, b, h, q_idx, kv_idx)
    want = jnp.where(fa.document_mask(ids)(b, h, q_idx, kv_idx), want_scores, 0.0)
    np.testing.assert_allclose(run(table, ids), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["relative_bias_table", "alibi_learned_slopes"])
def test_vjp_accumulates_const_gradients(name):
    """Cotangents of gathered values are scattered with addupdate; repeated indices (one table column read by many
    positions) must add up."""
    _, score_mod = MOD_CASES_BY_NAME[name].build(B, H, L, S, 0)
    program, consts = _captures.trace_score_mod(score_mod, BM, BN)
    (const,) = consts
    s, b, h, q_idx, kv_idx = _tile_args()
    d_out = jax.random.normal(jax.random.key(5), (BM, BN), jnp.float32)

    def kernel(const_ref, s_ref, d_out_ref, grad_in_ref, out_ref, d_s_ref, grad_ref):
        del grad_in_ref  # aliased to grad_ref, which starts at zero
        tile_q = jnp.minimum(Q_START + lax.broadcasted_iota(jnp.int32, (BM, 1), 0), L - 1)
        tile_kv = jnp.minimum(KV_START + lax.broadcasted_iota(jnp.int32, (1, BN), 1), S - 1)
        args = (jnp.int32(B_AT), jnp.int32(H_AT), tile_q, tile_kv)
        out, pullback = program.vjp([const_ref], s_ref[...], *args)
        out_ref[...] = out
        d_s_ref[...] = pullback(d_out_ref[...], [grad_ref])

    out, d_s, d_const = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((BM, BN), jnp.float32),
            jax.ShapeDtypeStruct((BM, BN), jnp.float32),
            jax.ShapeDtypeStruct(const.shape, jnp.float32),
        ),
        input_output_aliases={3: 2},
        interpret=True,
    )(const, s, d_out, jnp.zeros(const.shape, jnp.float32))

    def direct(score, c):
        return program([c], score, b, h, q_idx, kv_idx)

    want_out, vjp_fn = jax.vjp(direct, s, const)
    want_d_s, want_d_const = vjp_fn(d_out)
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d_s, want_d_s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d_const, want_d_const, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(want_d_const)).sum() > 0


@pytest.mark.parametrize("replay_reads", [False, True], ids=["reads differentiated", "reads replayed"])
@pytest.mark.parametrize("case", [c for c in MOD_CASES if c.build(B, H, L, S, 0)[1] is not None], ids=repr)
def test_derivative_is_the_scores_gradient(case, replay_reads):
    """The forward-mode derivative (inside a kernel, consts read through refs) against the reference mod's gradient
    at each score alone: the diagonal Jacobian that the Mosaic backward multiplies into P. With ``replay_reads`` the
    reads are made before the differentiated evaluation and replayed into it, as for the Mosaic kernels' vector
    loads."""
    _, score_mod = case.build(B, H, L, S, 0)
    program, consts = _captures.trace_score_mod(score_mod, BM, BN)
    s, b, h, q_idx, kv_idx = _tile_args(seed=3)
    n = len(consts)

    def kernel(*refs):
        const_refs, s_ref, out_ref, derivative_ref = refs[:n], refs[n], refs[n + 1], refs[n + 2]
        tile_q = jnp.minimum(Q_START + lax.broadcasted_iota(jnp.int32, (BM, 1), 0), L - 1)
        tile_kv = jnp.minimum(KV_START + lax.broadcasted_iota(jnp.int32, (1, BN), 1), S - 1)
        args = (jnp.int32(B_AT), jnp.int32(H_AT), tile_q, tile_kv)
        out, derivative = program.derivative(const_refs, s_ref[...], *args, replay_reads=replay_reads)
        out_ref[...] = jnp.broadcast_to(out, (BM, BN)).astype(jnp.float32)
        derivative_ref[...] = jnp.broadcast_to(derivative, (BM, BN)).astype(jnp.float32)

    tile = jax.ShapeDtypeStruct((BM, BN), jnp.float32)
    out, derivative = pl.pallas_call(kernel, out_shape=(tile, tile), interpret=True)(*consts, s)

    def at_one_score(score, qi, kvi):
        return score_mod(score, b, h, qi, kvi)

    grid = lambda f: jax.vmap(jax.vmap(f, (0, None, 0)), (0, 0, None))  # noqa: E731
    want_out = grid(at_one_score)(s, q_idx[:, 0], kv_idx[0])
    want = grid(jax.grad(at_one_score))(s, q_idx[:, 0], kv_idx[0])
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(derivative, want, rtol=1e-5, atol=1e-6)


@jax.custom_jvp
def _halved_gradient(x):
    return x


_halved_gradient.defjvp(lambda primals, tangents: (primals[0], tangents[0] * 0.5))


@jax.custom_vjp
def _straight_through_clip(x):
    return jnp.clip(x, -0.5, 0.5)


_straight_through_clip.defvjp(lambda x: (jnp.clip(x, -0.5, 0.5), None), lambda _, g: (g,))


def test_custom_derivative_rules_are_kept_where_the_mod_is_differentiated():
    """A jax.custom_jvp or custom_vjp function in a score_mod: its rule gives the gradient (vjp; derivative for a
    custom_jvp), not the derivative of its primal body (1 and 0 / 1 here); the value is the body's."""
    bias = jnp.linspace(-1.0, 1.0, BN, dtype=jnp.float32)
    s, b, h, q_idx, kv_idx = _tile_args(seed=4)
    cases = {
        "custom_jvp": (lambda score, b, h, q, kv: _halved_gradient(score) + bias[kv], 0.5),
        "custom_vjp": (lambda score, b, h, q, kv: _straight_through_clip(score + bias[kv]), 1.0),
    }
    for name, (score_mod, slope) in cases.items():
        program, consts = _captures.trace_score_mod(score_mod, BM, BN)
        out, pullback = program.vjp(consts, s, b, h, q_idx, kv_idx)
        np.testing.assert_allclose(out, score_mod(s, b, h, q_idx, kv_idx), rtol=1e-6)
        d_out = jax.random.normal(jax.random.key(5), s.shape)
        np.testing.assert_allclose(pullback(d_out, [None] * len(consts)), slope * d_out, rtol=1e-6, err_msg=name)
    program, consts = _captures.trace_score_mod(cases["custom_jvp"][0], BM, BN)
    np.testing.assert_allclose(program.derivative(consts, s, b, h, q_idx, kv_idx)[1], 0.5)
    program, _ = _captures.trace_score_mod(cases["custom_vjp"][0], BM, BN)
    assert program.calls("custom_vjp_call") and not program.calls("custom_jvp_call")


def test_differentiable_marks_floating_consts():
    mask_mod = fa.document_mask(jnp.zeros((L,), jnp.int32))
    assert _captures.trace_mask_mod(mask_mod, BM, BN)[0].differentiable == (False,)
    score_mod = fa.alibi_bias(jnp.ones((H,), jnp.float32))
    assert _captures.trace_score_mod(score_mod, BM, BN)[0].differentiable == (True,)


def test_errors_name_the_mod_and_the_fix():
    def indexes_computed_array(score, b, h, q_idx, kv_idx):
        return score + jnp.arange(8, dtype=jnp.float32)[h]

    with pytest.raises(ValueError, match="indexes_computed_array.*close over it"):
        _captures.trace_score_mod(indexes_computed_array, BM, BN)

    table = jnp.ones((H, 17), jnp.float32)

    def indexes_twice(score, b, h, q_idx, kv_idx):
        return score + table[h][jnp.clip(q_idx - kv_idx, 0, 16)]

    with pytest.raises(ValueError, match="indexes_twice.*one indexing expression"):
        _captures.trace_score_mod(indexes_twice, BM, BN)

    flags = jnp.array([True, False])

    def captured_in_cond(b, h, q_idx, kv_idx):
        return lax.cond(h > 0, lambda f: f[0] & (q_idx >= kv_idx), lambda f: f[1] | (q_idx >= kv_idx), flags)

    with pytest.raises(ValueError, match="captured_in_cond.*control flow"):
        _captures.trace_mask_mod(captured_in_cond, BM, BN)

    def returns_int(b, h, q_idx, kv_idx):
        return q_idx - kv_idx

    with pytest.raises(TypeError, match=r"mask_mod 'returns_int' must return a boolean.*int32\[32, 16\]"):
        _captures.trace_mask_mod(returns_int, BM, BN)

    def wrong_shape(score, b, h, q_idx, kv_idx):
        return jnp.zeros((3,), jnp.float32)

    with pytest.raises(TypeError, match=r"score_mod 'wrong_shape'.*float32\[3\]"):
        _captures.trace_score_mod(wrong_shape, BM, BN)


def test_transposed_tiles_trace_the_same_mod():
    """The dK/dV kernels' layout: score [BN, BM], q_idx [1, BM], kv_idx [BN, 1]; the program evaluates the mod on
    the transposed tile, and a wrong layout or a result for the untransposed tile is refused."""
    _, score_mod = MOD_CASES_BY_NAME["relative_bias_table"].build(B, H, L, S, 0)
    s, b, h, q_idx, kv_idx = _tile_args()
    program, consts = _captures.trace_score_mod(score_mod, BM, BN, "transposed")
    assert program.out_aval.shape == (BN, BM)
    np.testing.assert_allclose(program(consts, s.T, b, h, q_idx.T, kv_idx.T), score_mod(s, b, h, q_idx, kv_idx).T,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="tile layout must be one of"):
        _captures.tile_avals(BM, BN, score=True, layout="columns")

    def untransposed(score, b, h, q_idx, kv_idx):
        return jnp.zeros((BM, BN), jnp.float32)

    with pytest.raises(TypeError, match=r"broadcastable to the tile \[16, 32\] for q_idx \[1, 32\]"):
        _captures.trace_score_mod(untransposed, BM, BN, "transposed")


@pytest.mark.parametrize(
    "score_mod, factors, equations",
    [
        (fa.tanh_softcap(30.0), (1 / 30.0, 30.0), 1),  # tanh alone is left
        (lambda score, b, h, q_idx, kv_idx: 2.0 * (score * 0.5) / 4.0, (0.25, 1.0), 0),
        (lambda score, b, h, q_idx, kv_idx: jnp.tanh(score) * -2.0, (1.0, 1.0), 2),  # a negative factor moves the max
        (lambda score, b, h, q_idx, kv_idx: score * 3.0 + score, (1.0, 1.0), 2),  # the score used twice
        (fa.identity, (1.0, 1.0), 0),
    ],
    ids=["softcap", "chain", "negative", "reused", "identity"],
)
def test_peel_scalings_keeps_the_mod(score_mod, factors, equations):
    (program,), consts = _captures.trace_for_tiles(score_mod, [(BM, BN)], score=True)
    peeled, in_factor, out_factor = _captures.peel_scalings(program)
    assert (in_factor, out_factor) == pytest.approx(factors)
    assert len(peeled.jaxpr.eqns) == equations
    s, *indices = _tile_args(3)
    s = s * 20.0
    want = jnp.broadcast_to(program(consts, s, *indices), (BM, BN))
    got = out_factor * jnp.broadcast_to(peeled(consts, s * in_factor, *indices), (BM, BN))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fold_scalings_keeps_the_exp_scale_positive():
    log2_e = float(np.log2(np.e))

    def fold(score_mod, scale):
        (program,), _ = _captures.trace_for_tiles(score_mod, [(BM, BN)], score=True)
        return _captures.fold_scalings(program, scale)[1]

    assert fold(fa.identity, 0.5) == _captures.SoftmaxScaling(False, 1.0, 1.0, pytest.approx(0.5 * log2_e))
    assert fold(fa.identity, -0.5) == _captures.SoftmaxScaling(False, 1.0, pytest.approx(-0.5 * log2_e), 1.0)
    assert fold(fa.tanh_softcap(20.0), 0.5) == _captures.SoftmaxScaling(
        True, pytest.approx(0.5 / 20.0), 1.0, pytest.approx(20.0 * log2_e)
    )


def _index_mods():
    slopes = jnp.linspace(0.1, 0.9, H)
    return {
        "alibi": fa.generate_alibi_bias(H),
        "alibi_learned_slopes": fa.alibi_bias(slopes),
        "sum_of_indices": lambda score, b, h, q_idx, kv_idx: score + (q_idx + kv_idx).astype(jnp.float32) * 0.25,
        # A difference of something else than two indices is left alone.
        "scaled_difference": lambda score, b, h, q_idx, kv_idx: score + (2 * kv_idx - q_idx).astype(jnp.float32),
    }


@pytest.mark.parametrize("name", list(_index_mods()))
def test_index_bound_converts_index_vectors_with_the_same_bits(name):
    """with_index_bound: float32(q_idx -/+ kv_idx) is formed from the converted [BM, 1] and [1, BN] index vectors,
    bit for bit the value of the tile's conversion; the score's cotangent alike. The tile-shaped conversion is gone (counted in
    the evaluation's jaxpr) where the mod converts a sum or difference of the two indices."""
    mod = _index_mods()[name]
    program, consts = _captures.trace_score_mod(mod, BM, BN)
    bounded = program.with_index_bound(1 << 24)
    assert bounded.exact_indices and not program.with_index_bound((1 << 24) + 1).exact_indices
    s, b, h, _, _ = _tile_args()
    # Large indices near the bound, where a float32 ulp is 1: the two evaluations must still agree exactly.
    q_idx = ((1 << 24) - 1 - jnp.arange(BM, dtype=jnp.int32) * 977)[:, None]
    kv_idx = jnp.arange(BN, dtype=jnp.int32)[None, :] * 1_000_003 % (1 << 24)
    for args in [(s, b, h, *_tile_args()[3:]), (s, b, h, q_idx, kv_idx)]:
        np.testing.assert_array_equal(bounded(consts, *args), program(consts, *args))
        out, pullback = bounded.vjp(consts, *args)
        np.testing.assert_array_equal(out, program(consts, *args))
        np.testing.assert_array_equal(pullback(jnp.ones_like(out), [None] * len(consts)), jnp.ones_like(out))

    def tile_conversions(p):
        jaxpr = jax.make_jaxpr(lambda *a: p(consts, *a))(*_tile_args()).jaxpr
        return sum(e.primitive.name == "convert_element_type" and e.outvars[0].aval.shape == (BM, BN)
                   and jnp.issubdtype(e.invars[0].aval.dtype, jnp.integer) for e in jaxpr.eqns)

    assert tile_conversions(program) == 1
    assert tile_conversions(bounded) == (1 if name == "scaled_difference" else 0)


def _float_index_mods():
    return {
        **_index_mods(),
        "kv_idx_alone": lambda score, b, h, q_idx, kv_idx: score + kv_idx.astype(jnp.float32) * 0.5,
        "q_minus_kv": lambda score, b, h, q_idx, kv_idx: score - (q_idx - kv_idx).astype(jnp.float32) * 0.125,
    }


_FLOAT_INDEX_USES = {
    "alibi": {(-1, 1)}, "alibi_learned_slopes": {(-1, 1)}, "sum_of_indices": {(1, 1)}, "scaled_difference": set(),
    "kv_idx_alone": {(0, 1)}, "q_minus_kv": {(1, -1)},
}


@pytest.mark.parametrize("name", list(_float_index_mods()))
def test_float_index_hook_serves_the_conversions_of_index_expressions(name):
    """With whole-tile indices (the Mosaic GPU kernels' layout), a ``float_indices`` hook builds float32(q_idx),
    float32(kv_idx), their sum or either difference as a converted corner plus float offsets within the tile (as
    ``pallas_mosaic.forward.IndexTiles`` does): bit for bit the tile's own conversion, near 2^23 too; other
    conversions are left to the program."""
    mod = _float_index_mods()[name]
    program, consts = _captures.trace_score_mod(mod, BM, BN, layout="full")
    assert program.float_index_uses() == frozenset()  # not without the bound
    bounded = program.with_index_bound(1 << 23)
    assert bounded.float_index_uses() == _FLOAT_INDEX_USES[name]
    s = jax.random.normal(jax.random.key(3), (BM, BN), jnp.float32)
    rows = lax.broadcasted_iota(jnp.int32, (BM, BN), 0)
    columns = lax.broadcasted_iota(jnp.int32, (BM, BN), 1)
    for q_base, first_key in [(Q_START, KV_START), ((1 << 23) - BM, (1 << 23) - 3 * BN), (0, (1 << 23) - BN)]:
        asked = []

        def float_indices(q_sign, kv_sign):
            asked.append((q_sign, kv_sign))
            offsets = (q_sign * rows + kv_sign * columns).astype(jnp.float32)
            return jnp.float32(q_sign * q_base + kv_sign * first_key) + offsets

        args = (s, jnp.int32(B_AT), jnp.int32(H_AT), q_base + rows, first_key + columns)
        got = bounded(consts, *args, float_indices=float_indices)
        np.testing.assert_array_equal(got, program(consts, *args))
        assert set(asked) == _FLOAT_INDEX_USES[name]


def _product_used_twice(score, b, h, q_idx, kv_idx):
    square = score * score
    return (square + 1.0) * square


def _contraction_mods():
    return {
        # x * y + z with the product on either side, and x * y - z: one fma each
        "alibi": (fa.generate_alibi_bias(H), 1),
        "product_first": (lambda score, b, h, q_idx, kv_idx: score * 0.5 + kv_idx.astype(jnp.float32), 1),
        "product_minus": (lambda score, b, h, q_idx, kv_idx: score * 0.5 - q_idx.astype(jnp.float32), 1),
        # z - x * y and a product used twice are left as they are
        "product_subtracted": (lambda score, b, h, q_idx, kv_idx: score - 0.5 * kv_idx.astype(jnp.float32), 0),
        "product_used_twice": (_product_used_twice, 0),
        "no_product": (fa.identity, 0),
    }


@pytest.mark.parametrize("name", list(_contraction_mods()))
def test_products_used_by_a_sum_go_through_fma(name):
    """ModProgram's ``fma``: a float32 product used only by a sum is evaluated as fma(x, y, +-z), with the mod's
    value; other products are left alone. The Triton kernels pass PTX's fma.rn.f32 here (XLA does not contract
    their multiplies and adds by itself; benchmarks/NOTES.md section 29)."""
    mod, expected_calls = _contraction_mods()[name]
    program, consts = _captures.trace_score_mod(mod, BM, BN)
    calls = []

    def fma(a, b, c):
        calls.append((jnp.shape(a), jnp.shape(b), jnp.shape(c)))
        return a * b + c

    args = _tile_args(seed=3)
    got = program(consts, *args, fma=fma)
    assert len(calls) == expected_calls, calls
    np.testing.assert_allclose(got, mod(*args), rtol=1e-6, atol=1e-6)
    # Inside a kernel, the Triton forward's own fma (interpret mode: a * b + c) gives the same.
    from flexattn_jax.backends.pallas_triton import _tile

    in_kernel = _in_kernel(lambda refs, *a: program(refs, *a, fma=functools.partial(_tile.fma, fast=False)),
                           consts, args, True)
    np.testing.assert_allclose(in_kernel, jnp.broadcast_to(mod(*args), (BM, BN)), rtol=1e-6, atol=1e-6)
