"""The backward of implementation="pallas_triton": gradients against the reference's autodiff.

CPU tests run the kernels in interpret mode at tiny sizes; tiles of 16 and mask blocks of 32 so that every kernel
walks several tiles per mask block, with lengths no tile divides. Every loss takes a *random* cotangent of the
output (and of lse where returned), so a gradient that is right only for a sum cannot pass.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.extend
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

import flexattn_jax as fa
from flexattn_jax.backends.pallas_triton import backward, vjp
from flexattn_jax.block_mask import mask_axes
from tests._helpers import MOD_CASES, assert_close, random_qkv

# Small tiles and blocks: several tiles per mask block in every kernel, and lengths (40, 56) no tile divides.
TINY_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16)
MASK_BLOCK = 32
SIZES = dict(B=2, Hq=4, Hkv=2, L=40, S=56, E=32, Ev=16)


def _attention(implementation, q, k, v, score_mod=None, block_mask=None, return_lse=False, kernel_options=None):
    return fa.flex_attention(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        enable_gqa=True,
        return_lse=return_lse,
        implementation=implementation,
        interpret=implementation == "pallas_triton",
        kernel_options=kernel_options if implementation == "pallas_triton" else None,
    )


# Interpret-mode kernels become large XLA programs that run once on tiny inputs: compile them fast, not well.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _grads(implementation, loss, argnums, *args):
    """jit(grad(loss)) for one implementation; ``loss(implementation, *args)``."""
    grad = jax.grad(functools.partial(loss, implementation), argnums=argnums)
    return jax.jit(grad, compiler_options=_FAST_COMPILE)(*args)


def _cotangent(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _block_mask(mask_mod, B, H, L, S, block=MASK_BLOCK):
    return None if mask_mod is None else fa.create_block_mask(mask_mod, B, H, L, S, BLOCK_SIZE=block)


def _case_block_mask(mask_mod, sizes):
    """A library case's BlockMask: per batch (head) where its mask_mod reads b (h), broadcast otherwise."""
    axes = set() if mask_mod is None else mask_axes(mask_mod)
    B = sizes["B"] if "batch" in axes else None
    H = sizes["Hq"] if "head" in axes else None
    return _block_mask(mask_mod, B, H, sizes["L"], sizes["S"])


def _assert_qkv_grads_match(q, k, v, score_mod, block_mask, d_out, kernel_options=TINY_TILES):
    """The gradients of sum(out * d_out) with respect to q, k and v: the kernels' against the reference's."""

    def loss(implementation, q, k, v):
        out = _attention(implementation, q, k, v, score_mod, block_mask, kernel_options=kernel_options)
        return jnp.sum(out.astype(jnp.float32) * d_out)

    grads = _grads("pallas_triton", loss, (0, 1, 2), q, k, v)
    ref_grads = _grads("reference", loss, (0, 1, 2), q, k, v)
    _assert_grads_close(grads, ref_grads, jnp.float32, ("dq", "dk", "dv"))


def _assert_grads_close(grads, ref_grads, dtype, names):
    for g, r, name in zip(grads, ref_grads, names):
        assert_close(g, r, dtype, name=name)


# ------------------------------------------------------------------------------------------ every library mod


@pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: c.name)
def test_gradients_match_reference(case):
    s = SIZES
    q, k, v = random_qkv(1, **s)
    mask_mod, score_mod = case.build(s["B"], s["Hq"], s["L"], s["S"], 0)
    block_mask = _case_block_mask(mask_mod, s)
    _assert_qkv_grads_match(q, k, v, score_mod, block_mask, _cotangent(2, (s["B"], s["Hq"], s["L"], s["Ev"])))


# ------------------------------------------------------------------------------------ arrays the mods capture


@pytest.mark.parametrize("which", ["relative_position_bias", "alibi_bias", "hoisted_work"])
def test_captured_array_gradients(which):
    """Gradients of a learned bias table / learned ALiBi slopes, with mask_mod arrays (document ids) alongside."""
    s = SIZES
    q, k, v = random_qkv(3, **s)
    table = jax.random.normal(jax.random.key(4), (s["Hq"], 2 * 6 + 1), jnp.float32)
    slopes = jax.random.uniform(jax.random.key(5), (s["Hq"],), jnp.float32, 0.05, 0.5)
    make_score_mod = {
        "relative_position_bias": lambda table, slopes: fa.relative_position_bias(table),
        "alibi_bias": lambda table, slopes: fa.alibi_bias(slopes),
        # Work on the captured arrays alone runs outside the kernel; its gradient flows back through JAX autodiff.
        "hoisted_work": lambda table, slopes: fa.compose(
            fa.relative_position_bias(jnp.tanh(table) * 2.0), fa.alibi_bias(slopes**2)
        ),
    }[which]
    doc_ids = jnp.asarray(np.repeat(np.arange(4), 16)[: s["S"]], jnp.int32)
    mask_mod = fa.and_masks(fa.causal_mask, fa.document_mask(doc_ids[: s["L"]], doc_ids))
    block_mask = _block_mask(mask_mod, None, None, s["L"], s["S"])
    d_out = _cotangent(6, (s["B"], s["Hq"], s["L"], s["Ev"]))

    def loss(implementation, q, k, v, table, slopes):
        out = _attention(implementation, q, k, v, make_score_mod(table, slopes), block_mask, kernel_options=TINY_TILES)
        return jnp.sum(out * d_out)

    argnums = (0, 1, 2, 3, 4)
    grads = _grads("pallas_triton", loss, argnums, q, k, v, table, slopes)
    ref_grads = _grads("reference", loss, argnums, q, k, v, table, slopes)
    _assert_grads_close(grads, ref_grads, jnp.float32, ("dq", "dk", "dv", "d_table", "d_slopes"))


def test_a_captured_value_broadcast_to_the_tile():
    """``jnp.full_like(score, fill)`` of a learned 0-d array, with a different tile in each kernel: the broadcast
    stays in the kernels (hoisted, it would be one tile's shape), and fill's gradient flows."""
    s = SIZES
    q, k, v = random_qkv(8, **s)
    d_out = _cotangent(9, (s["B"], s["Hq"], s["L"], s["Ev"]))
    tiles = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=32)

    def loss(implementation, q, fill):
        def score_mod(score, b, h, q_idx, kv_idx):
            return jnp.where(kv_idx <= q_idx + 3, score, jnp.full_like(score, fill))

        return jnp.sum(_attention(implementation, q, k, v, score_mod, kernel_options=tiles) * d_out)

    fill = jnp.float32(-0.7)
    grads = _grads("pallas_triton", loss, (0, 1), q, fill)
    ref_grads = _grads("reference", loss, (0, 1), q, fill)
    _assert_grads_close(grads, ref_grads, jnp.float32, ("dq", "d_fill"))


def test_custom_derivative_rules_in_a_score_mod():
    """The gradient through a jax.custom_jvp / custom_vjp function in the score_mod follows its rule, as the
    reference's autodiff does, not the derivative of its body."""
    from tests.test_captures import _halved_gradient, _straight_through_clip

    s = SIZES
    q, k, v = random_qkv(10, **s)
    d_out = _cotangent(11, (s["B"], s["Hq"], s["L"], s["Ev"]))
    for score_mod in (lambda score, b, h, q_idx, kv_idx: _halved_gradient(score) + 0.1 * jax.nn.relu(score),
                      lambda score, b, h, q_idx, kv_idx: _straight_through_clip(score)):
        _assert_qkv_grads_match(q, k, v, score_mod, None, d_out)


def test_custom_rules_on_a_scalar_or_a_captured_array_are_inlined():
    """A custom rule called with a value read at a scalar index (table[h]), or closing over a captured array, is
    not elementwise on the tile: the kernels inline it (its rules here are the body's derivative, so the gradients
    are the reference's)."""
    s = SIZES
    q, k, v = random_qkv(12, **s)
    d_out = _cotangent(13, (s["B"], s["Hq"], s["L"], s["Ev"]))
    table = jnp.linspace(0.5, 1.5, s["Hq"], dtype=jnp.float32)

    @jax.custom_vjp
    def product(x, y):
        return x * y

    product.defvjp(lambda x, y: (x * y, (x, y)), lambda saved, g: (g * saved[1], g * saved[0]))

    @jax.custom_jvp
    def shifted(x):
        return x + table[0]

    shifted.defjvp(lambda primals, tangents: (shifted(primals[0]), tangents[0]))

    def loss(implementation, q, table):
        def score_mod(score, b, h, q_idx, kv_idx):
            return product(score, table[h]) + shifted(score)

        return jnp.sum(_attention(implementation, q, k, v, score_mod, kernel_options=TINY_TILES) * d_out)

    grads = _grads("pallas_triton", loss, (0, 1), q, table)
    ref_grads = _grads("reference", loss, (0, 1), q, table)
    _assert_grads_close(grads, ref_grads, jnp.float32, ("dq", "d_table"))


def _kernel_output_counts(jaxpr) -> dict[str, int]:
    """{kernel name: number of outputs} of the pallas_calls in a jaxpr (nested jaxprs included)."""
    counts = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            counts[eqn.params["name"]] = len(eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            counts.update(_kernel_output_counts(sub))
    return counts


def test_constant_captures_and_mask_arrays_get_no_gradient_buffers():
    """Captured arrays that are not differentiated (concrete ones, integer document ids) cost no gradient buffer:
    the dQ kernel's only output is dq."""
    s = SIZES
    q, k, v = random_qkv(7, **s)
    score_mod = fa.relative_position_bias(jnp.ones((s["Hq"], 9), jnp.float32))
    ids = jnp.asarray(np.arange(s["S"]) // 20, jnp.int32)
    block_mask = _block_mask(fa.document_mask(ids[: s["L"]], ids), None, None, s["L"], s["S"])

    def loss(q, table):
        score_mod = fa.relative_position_bias(table)
        return jnp.sum(_attention("pallas_triton", q, k, v, score_mod, block_mask, kernel_options=TINY_TILES))

    table = jnp.ones((s["Hq"], 9), jnp.float32)
    counts = _kernel_output_counts(jax.make_jaxpr(jax.grad(loss))(q, table).jaxpr)
    assert counts == {"flex_attention_forward": 2, "flex_attention_dkdv": 2, "flex_attention_dq": 1}
    counts = _kernel_output_counts(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(q, table).jaxpr)
    assert counts["flex_attention_dq"] == 2  # dq and the table's float32 gradient


# ----------------------------------------------------------------------------------- lse, masks, GQA, lengths


@pytest.mark.parametrize("use_out", [True, False], ids=["out_and_lse", "lse_only"])
def test_lse_cotangent(use_out):
    s = dict(SIZES, L=24, S=40)
    q, k, v = random_qkv(8, **s)
    block_mask = _block_mask(fa.prefix_lm_mask(8), None, None, s["L"], s["S"])
    score_mod = fa.tanh_softcap(4.0)
    d_out = _cotangent(9, (s["B"], s["Hq"], s["L"], s["Ev"]))
    d_lse = _cotangent(10, (s["B"], s["Hq"], s["L"]))

    def loss(implementation, q, k, v):
        out, lse = _attention(implementation, q, k, v, score_mod, block_mask, True, TINY_TILES)
        return jnp.sum(lse * d_lse) + (jnp.sum(out * d_out) if use_out else 0.0)

    grads = _grads("pallas_triton", loss, (0, 1, 2), q, k, v)
    ref_grads = _grads("reference", loss, (0, 1, 2), q, k, v)
    _assert_grads_close(grads, ref_grads, jnp.float32, ("dq", "dk", "dv"))


def test_fully_masked_rows_have_finite_zero_gradients():
    """Queries that attend nowhere: output 0, lse -inf; their dq is 0, nothing is NaN, and keys only they could
    see get dk = dv = 0."""
    s = SIZES
    q, k, v = random_qkv(11, **s)

    def mask_mod(b, h, q_idx, kv_idx):
        # Queries 8..19 see nothing; the others see keys up to 30 (so keys 31.. get no gradient), per head shifted.
        return ((q_idx < 8) | (q_idx >= 20)) & (kv_idx <= 30 - h)

    block_mask = _block_mask(mask_mod, None, s["Hq"], s["L"], s["S"])
    table = jax.random.normal(jax.random.key(12), (s["Hq"], 9), jnp.float32)
    d_out = _cotangent(13, (s["B"], s["Hq"], s["L"], s["Ev"]))

    def loss(implementation, q, k, v, table):
        score_mod = fa.relative_position_bias(table)
        out, lse = _attention(implementation, q, k, v, score_mod, block_mask, True, TINY_TILES)
        # lse is -inf on the masked rows: take its cotangent where it is finite.
        return jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    argnums = (0, 1, 2, 3)
    grads = _grads("pallas_triton", loss, argnums, q, k, v, table)
    ref_grads = _grads("reference", loss, argnums, q, k, v, table)
    _assert_grads_close(grads, ref_grads, jnp.float32, ("dq", "dk", "dv", "d_table"))
    dq, dk, dv = grads[:3]
    assert np.all(np.asarray(dq[:, :, 8:20]) == 0)
    assert np.all(np.asarray(dk[:, :, 31:]) == 0) and np.all(np.asarray(dv[:, :, 31:]) == 0)


def test_gqa_with_a_different_mask_per_query_head():
    """dK/dV sum over the query heads of a group, each walking its own BlockMask row; L > S here."""
    s = dict(SIZES, Hq=6, Hkv=2, L=72, S=40)
    q, k, v = random_qkv(14, **s)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= -8 * h) & ((q_idx + b) % 5 != 0)

    block_mask = _block_mask(mask_mod, s["B"], s["Hq"], s["L"], s["S"])
    _assert_qkv_grads_match(q, k, v, fa.rel_bias, block_mask, _cotangent(15, (s["B"], s["Hq"], s["L"], s["Ev"])))


def test_default_tiles_and_odd_head_dims():
    """No kernel_options (tiles fitted to the lengths), head dims that need padding (E=24, Ev=40), one query."""
    for sizes in (dict(B=1, Hq=2, Hkv=1, L=50, S=33, E=24, Ev=40), dict(B=1, Hq=1, Hkv=1, L=1, S=19, E=16, Ev=16)):
        q, k, v = random_qkv(16, **sizes)
        block_mask = fa.create_block_mask(fa.prefix_lm_mask(8), None, None, sizes["L"], sizes["S"], BLOCK_SIZE=64)
        d_out = _cotangent(17, (sizes["B"], sizes["Hq"], sizes["L"], sizes["Ev"]))
        _assert_qkv_grads_match(q, k, v, None, block_mask, d_out, kernel_options=None)


def test_bfloat16():
    s = SIZES
    q, k, v = random_qkv(18, **s, dtype=jnp.bfloat16)
    block_mask = _block_mask(fa.causal_mask, None, None, s["L"], s["S"])
    slopes = jax.random.uniform(jax.random.key(19), (s["Hq"],), jnp.float32, 0.05, 0.5)
    d_out = _cotangent(20, (s["B"], s["Hq"], s["L"], s["Ev"]), jnp.bfloat16)

    def loss(implementation, q, k, v, slopes):
        out = _attention(implementation, q, k, v, fa.alibi_bias(slopes), block_mask, kernel_options=TINY_TILES)
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))

    grads = _grads("pallas_triton", loss, (0, 1, 2, 3), q, k, v, slopes)
    ref_grads = _grads("reference", loss, (0, 1, 2, 3), q, k, v, slopes)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32]
    _assert_grads_close(grads, ref_grads, jnp.bfloat16, ("dq", "dk", "dv", "d_slopes"))


def test_check_grads_numerically():
    """Reverse-mode gradients against finite differences (float32: loose eps and tolerances)."""
    q, k, v = random_qkv(21, B=1, Hq=2, Hkv=1, L=20, S=24, E=16, Ev=16)
    block_mask = _block_mask(fa.causal_mask, None, None, 20, 24, block=16)
    table = jax.random.normal(jax.random.key(22), (2, 5), jnp.float32)

    def attend(q, k, v, table):
        out = _attention(
            "pallas_triton", q, k, v, fa.relative_position_bias(table), block_mask, kernel_options=TINY_TILES
        )
        return out

    jax.test_util.check_grads(jax.jit(attend), (q, k, v, table), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------- composition


def test_vmap_of_grad():
    s = dict(SIZES, B=1, Hq=2, Hkv=1)
    qs, ks, vs = (jnp.stack(x) for x in zip(random_qkv(23, **s), random_qkv(24, **s), random_qkv(25, **s)))
    block_mask = _block_mask(fa.sliding_window_mask(20), None, None, s["L"], s["S"])
    d_out = _cotangent(26, (s["B"], s["Hq"], s["L"], s["Ev"]))

    def loss(implementation, q, k, v):
        return jnp.sum(_attention(implementation, q, k, v, fa.rel_causal, block_mask, kernel_options=TINY_TILES) * d_out)

    def vmapped_grads(implementation):
        grad = jax.grad(functools.partial(loss, implementation), argnums=(0, 1, 2))
        return jax.jit(jax.vmap(grad), compiler_options=_FAST_COMPILE)(qs, ks, vs)

    grads, ref_grads = vmapped_grads("pallas_triton"), vmapped_grads("reference")
    _assert_grads_close(grads, ref_grads, jnp.float32, ("dq", "dk", "dv"))


def test_scan_over_checkpointed_layers():
    """A training step's shape: lax.scan over layers, each jax.checkpoint-ed, grad of jit, with per-layer learned
    bias tables and the block mask passed through jit as an argument."""
    B, H, L, D, layers = 1, 2, 40, 16, 2
    x = jax.random.normal(jax.random.key(27), (B, H, L, D), jnp.float32)
    params = {
        "w": jax.random.normal(jax.random.key(28), (layers, 3, D), jnp.float32),
        "table": jax.random.normal(jax.random.key(29), (layers, H, 9), jnp.float32) * 0.3,
    }
    block_mask = _block_mask(fa.causal_mask, None, None, L, L)

    def forward(implementation, params, x, block_mask):
        def layer(x, p):
            q, k, v = (x * p["w"][i].reshape(1, 1, 1, D) for i in range(3))
            out = _attention(
                implementation, q, k, v, fa.relative_position_bias(p["table"]), block_mask, kernel_options=TINY_TILES
            )
            return x + out, None

        x, _ = jax.lax.scan(jax.checkpoint(layer), x, params)
        return jnp.sum(jnp.sin(x))

    grads = _grads("pallas_triton", forward, 0, params, x, block_mask)
    ref_grads = _grads("reference", forward, 0, params, x, block_mask)
    assert_close(grads["w"], ref_grads["w"], jnp.float32, name="d_w")
    assert_close(grads["table"], ref_grads["table"], jnp.float32, name="d_table")


# ------------------------------------------------------------------------------------------------ plumbing


def test_q_side_block_lists_derived_from_kv_side():
    """The dK/dV kernel's lists, derived from the kv-side arrays, equal the BlockMask's own q-side arrays."""
    ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 5, 200)), jnp.int32)
    for mask_mod in (fa.causal_mask, fa.and_masks(fa.causal_mask, fa.document_mask(ids)), fa.sliding_window_mask(40)):
        bm = fa.create_block_mask(mask_mod, None, None, 200, 200, BLOCK_SIZE=32)
        lists = vjp._transpose(backward.BlockLists(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices))
        for got, want in zip(
            lists.arrays(), (bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)
        ):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(BLOCK_M1=24), "BLOCK_M1.*power of two"),
        (dict(BLOCK_N2=8), "BLOCK_N2.*power of two"),
        (dict(BLOCK_N1=64), "BLOCK_N1.*does not divide"),
        (dict(bwd_num_warps=3), "bwd_num_warps"),
        (dict(bwd_num_stages=0), "bwd_num_stages"),
        (dict(bwd_dq_num_warps=3), "bwd_dq_num_warps"),
        (dict(bwd_dq_num_stages=9), "bwd_dq_num_stages"),
        (dict(bwd_block=16), "unknown backward key 'bwd_block'"),
        (dict(BLOCK_M2=32.0), "BLOCK_M2.*must be an int"),
    ],
)
def test_bad_backward_options_raise_on_the_forward_call(options, match):
    q, k, v = random_qkv(30, **SIZES)
    block_mask = _block_mask(fa.causal_mask, None, None, SIZES["L"], SIZES["S"])
    with pytest.raises((ValueError, TypeError), match=match):
        jax.eval_shape(lambda q: _attention("pallas_triton", q, k, v, None, block_mask, kernel_options=options), q)


def test_backward_launch_options_reach_each_kernel():
    """bwd_num_warps / bwd_num_stages launch both kernels; the bwd_dq_ keys override them for the dQ kernel."""
    shape = dict(head_dim=128, dtype=jnp.bfloat16, q_len=1024, kv_len=1024, mask_block_size=(128, 128),
                 mask_num_blocks=(8, 8))
    both = backward.backward_config(dict(bwd_num_warps=2, bwd_num_stages=1), **shape)
    assert (both.num_warps, both.num_stages, both.dq_num_warps, both.dq_num_stages) == (2, 1, 2, 1)
    apart = backward.backward_config(dict(bwd_num_warps=2, bwd_dq_num_warps=8, bwd_dq_num_stages=4), **shape)
    default = backward.default_backward_config(128, jnp.bfloat16)
    assert (apart.num_warps, apart.num_stages) == (2, default.num_stages)
    assert (apart.dq_num_warps, apart.dq_num_stages) == (8, 4)
    plan = vjp._plan(apart, (1, 2, 1024, 128), (1, 2, 1024, 128), 1024, (128, 128), (8, 8), 1.0, False)
    assert (plan.dkdv.num_warps, plan.dkdv.num_stages) == (2, default.num_stages)
    assert (plan.dq.num_warps, plan.dq.num_stages) == (8, 4)


def test_every_program_id_is_read_right():
    """The grids are (tiles, heads, batch): with GQA, a mask and a score_mod that differ per query head and per
    batch, the gradients match the reference only if each kernel reads every program id as the axis it is. Three
    batches against two key/value heads, so that no two grid axes have the same extent."""
    s = dict(SIZES, B=3)
    q, k, v = random_qkv(31, **s)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 3, (s["B"], s["S"])).cumsum(axis=1) // 20, jnp.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (ids[b, q_idx] == ids[b, kv_idx]) & (kv_idx <= q_idx + 2 * h)

    block_mask = _block_mask(mask_mod, s["B"], s["Hq"], s["L"], s["S"])
    score_mod = fa.generate_alibi_bias(s["Hq"])
    _assert_qkv_grads_match(q, k, v, score_mod, block_mask, _cotangent(32, (s["B"], s["Hq"], s["L"], s["Ev"])))


# ---------------------------------------------------------------------------------------------- CUDA lowering

_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")


def _kernel_attention(q, k, v, score_mod, block_mask, scale, kernel_options=None):
    """The Triton kernels' differentiable attention on a BlockMask's arrays (vjp.attention: no platform check, so
    it lowers for CUDA on a CPU)."""
    return vjp.attention(
        q, k, v, score_mod=score_mod, mask_mod=block_mask.mask_mod,
        kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices,
        full_kv_num_blocks=block_mask.full_kv_num_blocks, full_kv_indices=block_mask.full_kv_indices,
        q_num_blocks=block_mask.q_num_blocks, q_indices=block_mask.q_indices,
        full_q_num_blocks=block_mask.full_q_num_blocks, full_q_indices=block_mask.full_q_indices,
        block_size=block_mask.BLOCK_SIZE, scale=scale, kernel_options=kernel_options,
    )


def _grad_lowered_for_cuda(loss, *args) -> str:
    """The text of jax.grad(loss) with respect to every argument, lowered for an (abstract) H100."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        return grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()



@pytest.mark.parametrize("which", ["causal_relative_table", "document_softcap_gqa"])
def test_backward_lowers_to_triton_for_cuda(which):
    """jax.grad of a loss lowers for an (abstract) H100: the forward, dK/dV and dQ kernels become Triton calls."""
    B, Hq, Hkv, L, S, D = 1, 4, 2, 256, 384, 64
    sd = jax.ShapeDtypeStruct
    args = (sd((B, Hq, L, D), jnp.bfloat16), sd((B, Hkv, S, D), jnp.bfloat16), sd((B, Hkv, S, D), jnp.bfloat16))
    table = sd((Hq, 33), jnp.float32)
    if which == "causal_relative_table":
        mask_mod, make_score_mod = fa.causal_mask, fa.relative_position_bias
    else:
        ids = jnp.asarray(np.arange(S) // 100, jnp.int32)
        mask_mod = fa.and_masks(fa.causal_mask, fa.document_mask(ids[:L], ids))
        make_score_mod = lambda table: fa.tanh_softcap(30.0)  # noqa: E731
    block_mask = fa.create_block_mask(mask_mod, None, None, L, S)

    def loss(q, k, v, table):
        out, _ = _kernel_attention(q, k, v, make_score_mod(table), block_mask, D**-0.5)
        return jnp.sum(out.astype(jnp.float32))

    assert _grad_lowered_for_cuda(loss, *args, table).count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("Hkv", [2, 4], ids=["gqa", "mha"])
def test_key_and_value_of_batch_one_lower_for_cuda_with_the_batch_loop(Hkv):
    """With ``bwd_kv_batch_loop`` the dK/dV kernel takes key and value of batch 1 and the whole query batch, and
    dQ's kernel reads batch 0: the gradient lowers to three Triton calls and makes no [B, ...] copy of either."""
    B, Hq, L, S, D = 3, 4, 256, 384, 64
    sd = jax.ShapeDtypeStruct
    args = (sd((B, Hq, L, D), jnp.bfloat16), sd((1, Hkv, S, D), jnp.bfloat16), sd((1, Hkv, S, D), jnp.bfloat16))
    block_mask = fa.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + 64 * b, B, None, L, S)

    def loss(q, k, v):
        out, _ = _kernel_attention(q, k, v, fa.tanh_softcap(30.0), block_mask, D**-0.5,
                                   kernel_options={"bwd_kv_batch_loop": 1})
        return jnp.sum(out.astype(jnp.float32))

    text = _grad_lowered_for_cuda(loss, *args)
    assert text.count("__gpu$xla.gpu.triton") == 3
    copy = rf"stablehlo\.broadcast_in_dim [^\n]*tensor<1x{Hkv}x\d+x{D}xbf16>\) -> tensor<{B}x{Hkv}x"
    assert not re.search(copy, text)

    # Without the loop the backward does copy them (the check above could fail).
    def loss_broadcast(q, k, v):
        out, _ = _kernel_attention(q, k, v, fa.tanh_softcap(30.0), block_mask, D**-0.5)
        return jnp.sum(out.astype(jnp.float32))

    assert re.search(copy, _grad_lowered_for_cuda(loss_broadcast, *args))


def test_the_batch_loop_is_the_default_where_the_dkdv_programs_fill_the_gpu():
    """Unset, bwd_kv_batch_loop follows the dK/dV programs the loop leaves (key tiles times key/value heads) against
    the GPU's SMs (132 without one); set, it is taken as given."""
    from flexattn_jax.backends._device import num_sms

    config = backward.default_backward_config(128, jnp.bfloat16)
    filling = -(-num_sms() // 16) * config.block_n1  # the fewest keys whose 16 heads' programs fill the GPU
    assert backward.loops_over_query_batches(config, 16, 8192)
    assert backward.loops_over_query_batches(config, 16, filling)
    assert not backward.loops_over_query_batches(config, 16, filling - config.block_n1)
    assert not backward.loops_over_query_batches(config, 2, 384)
    for value in (0, 1):
        given = backward.backward_config({"bwd_kv_batch_loop": value}, head_dim=128, dtype=jnp.bfloat16, q_len=8192,
                                         kv_len=8192, mask_block_size=(128, 128), mask_num_blocks=(64, 64))
        assert backward.loops_over_query_batches(given, 16, 8192) is bool(value)
        assert backward.loops_over_query_batches(given, 2, 384) is bool(value)


def test_custom_derivative_rules_lower_for_cuda():
    """A score_mod's jax.custom_jvp and custom_vjp rules, applied inside the backward kernels, lower to Triton."""
    from tests.test_captures import _halved_gradient, _straight_through_clip

    B, Hq, Hkv, L, S, D = 1, 4, 2, 256, 384, 64
    sd = jax.ShapeDtypeStruct
    args = (sd((B, Hq, L, D), jnp.bfloat16), sd((B, Hkv, S, D), jnp.bfloat16), sd((B, Hkv, S, D), jnp.bfloat16))
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, L, S)
    for score_mod in (lambda score, b, h, q_idx, kv_idx: _halved_gradient(score),
                      lambda score, b, h, q_idx, kv_idx: _straight_through_clip(score)):

        def loss(q, k, v, table):
            out, _ = _kernel_attention(q, k, v, score_mod, block_mask, D**-0.5)
            return jnp.sum(out.astype(jnp.float32))

        assert _grad_lowered_for_cuda(loss, *args, sd((Hq, 33), jnp.float32)).count("__gpu$xla.gpu.triton") == 3


def _largest_array(hlo_text: str) -> tuple[int, str]:
    """The element count and type of the largest tensor in a lowered program's text."""
    shapes = set(re.findall(r"tensor<((?:\d+x)+)[a-z]", hlo_text))
    return max((int(np.prod([int(d) for d in dims.rstrip("x").split("x")])), dims) for dims in shapes)


def test_forward_and_backward_hold_no_array_of_queries_times_keys():
    """No array of L x S elements anywhere in the program of the forward and all its gradients: the scores and
    probabilities live only in the kernels' tiles. L x S here is 8 times the largest input."""
    B, Hq, Hkv, L, S, D = 1, 2, 1, 512, 640, 32
    sd = jax.ShapeDtypeStruct
    args = (sd((B, Hq, L, D), jnp.bfloat16), sd((B, Hkv, S, D), jnp.bfloat16), sd((B, Hkv, S, D), jnp.bfloat16),
            sd((Hq, 2 * S - 1), jnp.float32))
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, L, S)

    def loss(q, k, v, table):
        out, lse = _kernel_attention(q, k, v, fa.relative_position_bias(table), block_mask, D**-0.5)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    text = _grad_lowered_for_cuda(loss, *args)
    assert text.count("__gpu$xla.gpu.triton") == 3
    elements, dims = _largest_array(text)
    assert elements < L * S // 4, f"an array of shape {dims} ({elements} elements) against L x S = {L * S}"
    # The check could fail: the reference's program of the same loss holds the [B, H, L, S] scores.
    reference = jax.jit(jax.grad(
        lambda q, k, v, table: jnp.sum(fa.flex_attention(
            q, k, v, fa.relative_position_bias(table), block_mask, enable_gqa=True,
            implementation="reference").astype(jnp.float32)),
        argnums=(0, 1, 2, 3))).trace(*args).lower()
    assert _largest_array(reference.as_text())[0] >= B * Hq * L * S


@pytest.mark.gpu
def test_gpu_forward_and_backward_temporary_memory_holds_no_scores():
    """On the GPU, the compiled forward+backward's temporary buffers at L = S = 8192 stay under half of one L x S
    array in bfloat16 (64 MiB; the inputs are 2 MiB each): the scores exist only in the kernels' tiles."""
    B, H, L, D = 1, 2, 8192, 64
    q, k, v = random_qkv(41, B=B, Hq=H, Hkv=H, L=L, S=L, E=D, Ev=D, dtype=jnp.bfloat16)
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, L, L)

    def loss(q, k, v):
        out = fa.flex_attention(q, k, v, block_mask=block_mask, implementation="pallas_triton")
        return jnp.sum(out.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    temporary = compiled.memory_analysis().temp_size_in_bytes
    assert temporary < L * L * 2 // 2, f"{temporary} bytes of temporaries against {L * L * 2} for L x S bfloat16"


@pytest.mark.parametrize(
    "captures, options, stages",
    [(False, None, 3), (True, None, 2), (True, {"bwd_num_stages": 3}, 3), (True, {"bwd_dq_num_stages": 3}, (2, 3))],
    ids=["no_captures", "captures", "captures_stages_set", "captures_dq_stages_set"],
)
def test_captured_arrays_cap_the_default_backward_stages_at_two(captures, options, stages):
    """At D=128 the default's 3 stages ran out of shared memory on the GPU with a bias table's gathers and the dQ
    kernel's atomic adds (256 KiB asked, 227 available): with captures the defaults drop to 2; set stages stay."""
    L, D = 256, 128
    sd = jax.ShapeDtypeStruct
    args = (sd((1, 2, L, D), jnp.bfloat16),) * 3
    table = sd((2, 2 * L - 1), jnp.float32)
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, L, L)

    def loss(q, k, v, table):
        score_mod = fa.relative_position_bias(table) if captures else fa.identity
        out, _ = _kernel_attention(q, k, v, score_mod, block_mask, D**-0.5, kernel_options=options)
        return jnp.sum(out.astype(jnp.float32))

    text = _grad_lowered_for_cuda(loss, *args, table)
    launched = dict(re.findall(r'name = "flex_attention_(dkdv|dq)", num_stages = (\d+)', text))
    dkdv_stages, dq_stages = stages if isinstance(stages, tuple) else (stages, stages)
    assert launched == {"dkdv": str(dkdv_stages), "dq": str(dq_stages)}


# --------------------------------------------------------------------------------------- GPU, realistic sizes


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name, dtype, head_dim",
    [
        ("causal", jnp.bfloat16, 128),
        ("document_causal", jnp.float32, 64),
        ("relative_bias_table", jnp.bfloat16, 64),
        ("relative_bias_table", jnp.bfloat16, 128),
        ("alibi_learned_slopes", jnp.float32, 128),
    ],
)
def test_gpu_gradients_at_realistic_sizes(name, dtype, head_dim):
    """On the GPU with the default tiles: GQA, lengths no tile divides, and the captured arrays' gradients (the
    atomic adds of many programs into one table)."""
    from tests._helpers import _rel_table, _slopes, MOD_CASES_BY_NAME

    B, Hq, Hkv, L, S = 2, 8, 2, 1000, 1100
    q, k, v = random_qkv(31, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=head_dim, Ev=head_dim, dtype=dtype)
    d_out = _cotangent(32, (B, Hq, L, head_dim), dtype)
    mask_mod, _ = MOD_CASES_BY_NAME[name].build(B, Hq, L, S, 0)
    block_mask = None if mask_mod is None else fa.create_block_mask(mask_mod, None, None, L, S)
    captured = {"relative_bias_table": _rel_table(Hq, 0), "alibi_learned_slopes": _slopes(Hq, 0)}.get(name)
    make_score_mod = {
        "relative_bias_table": fa.relative_position_bias,
        "alibi_learned_slopes": fa.alibi_bias,
    }.get(name, lambda _: None)

    def loss(implementation, q, k, v, captured):
        out = fa.flex_attention(
            q, k, v, make_score_mod(captured), block_mask, enable_gqa=True, implementation=implementation
        )
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))

    argnums = (0, 1, 2) if captured is None else (0, 1, 2, 3)
    grads = jax.jit(jax.grad(functools.partial(loss, "pallas_triton"), argnums))(q, k, v, captured)
    ref_grads = jax.jit(jax.grad(functools.partial(loss, "reference"), argnums))(q, k, v, captured)
    _assert_grads_close(grads, ref_grads, dtype, ("dq", "dk", "dv", "d_captured"))


# ------------------------------------------------------------------------------------------- edge cases of use


def test_captured_array_gradient_stays_finite_where_a_loss_sends_nan_to_an_empty_row():
    # Rows q % 3 == 1 attend nowhere (lse -inf) inside visited partial blocks; where(isfinite(lse), cos(lse), 0)
    # sends them a NaN cotangent. No gradient may turn NaN: the table's came from 0 * NaN in its pullback.
    s = dict(SIZES, L=48, S=48)
    q, k, v = random_qkv(40, **s)
    table = jax.random.normal(jax.random.key(41), (s["Hq"], 2 * s["S"] + 1)) * 0.3
    block_mask = _block_mask(lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx % 3 != 1), None, None,
                             s["L"], s["S"])

    def loss(implementation, q, table):
        def biased(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx - kv_idx + s["S"]]

        out, lse = _attention(implementation, q, k, v, biased, block_mask, return_lse=True,
                              kernel_options=TINY_TILES)
        return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.cos(lse), 0.0))

    grads = jax.grad(functools.partial(loss, "pallas_triton"), argnums=(0, 1))(q, table)
    ref_grads = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1))(q, table)
    for name, grad, ref in zip(("dq", "d table"), grads, ref_grads):
        assert np.isfinite(np.asarray(grad)).all(), name
        assert_close(grad, ref, jnp.float32, name)


def test_a_score_mod_returning_a_constant_is_differentiated():
    s = SIZES
    q, k, v = random_qkv(42, **s)
    for constant in (lambda score, b, h, q_idx, kv_idx: 1.0, lambda score, b, h, q_idx, kv_idx: jnp.float32(2.0)):
        _assert_qkv_grads_match(q, k, v, constant, None, _cotangent(43, (s["B"], s["Hq"], s["L"], s["Ev"])))


def test_gradients_with_x64_enabled():
    # Python ints become int64 under x64; the kernels' index arithmetic must stay int32.
    s = SIZES
    with jax.enable_x64(True):
        q, k, v = random_qkv(44, **s)
        block_mask = _block_mask(fa.causal_mask, None, None, s["L"], s["S"])
        _assert_qkv_grads_match(q, k, v, fa.rel_bias, block_mask, _cotangent(45, (s["B"], s["Hq"], s["L"], s["Ev"])))
