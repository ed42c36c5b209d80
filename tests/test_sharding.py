"""Multi-device flex_attention on the 8 CPU devices of conftest: batch/head sharding and ring attention.

Every result is compared with single-device flex_attention (the dense reference) on fresh random inputs, forward and
gradients (against a random cotangent), under the error contract of tests/_helpers.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flexattn_jax as fa
from flexattn_jax.sharding import batch_head, ring_flex_attention, sharded_flex_attention
from flexattn_jax.sharding import ring as ring_module
from flexattn_jax.sharding.ring import merge_partials, work_per_device
from tests._helpers import MOD_CASES_BY_NAME, assert_close


def random_qkv(seed, B, Hq, Hkv, L, S, E=32, Ev=16, dtype=jnp.float32):
    """Fresh random normals like _helpers.random_qkv, drawn with NumPy: jax.random compiles anew for every shape,
    which costs these tests more than some of their attention programs."""
    rng = np.random.default_rng(seed)
    shapes = ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev))
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype) for shape in shapes)


def _mesh(shape, names, platform=None):
    devices = jax.devices(platform)
    size = int(np.prod(shape))
    if len(devices) < size:
        pytest.skip(f"needs {size} devices, {len(devices)} present")
    return Mesh(np.array(devices[:size]).reshape(shape), names)


# The tests' programs are tiny, and compiling them dominates their time: skip XLA's costlier CPU optimisations.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(fn, *args):
    """jit(fn)(*args), compiled without the costly CPU optimisations (on the CPU)."""
    options = _FAST_COMPILE if jax.default_backend() == "cpu" else None
    return jax.jit(fn).lower(*args).compile(options)(*args)


def _values_and_grads(attention, q, k, v, seed):
    """jit(attention) -> (out, lse), and the gradients of <out, random cotangent> + <finite lse, random> in q, k, v."""
    lse_shape = q.shape[:3]
    rng = np.random.default_rng(seed + 100)
    ct_out = jnp.asarray(rng.standard_normal((*lse_shape, v.shape[-1]), np.float32))
    ct_lse = jnp.asarray(rng.standard_normal(lse_shape, np.float32))

    def loss(q, k, v):
        out, lse = attention(q, k, v)
        lse_term = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * ct_lse)
        return jnp.sum(out.astype(jnp.float32) * ct_out) + lse_term, (out, lse)

    (_, (out, lse)), grads = _run(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), q, k, v)
    return out, lse, grads


def _assert_matches(got, want, dtype):
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = want
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"{name} is not finite"
        assert_close(g, ref, dtype, name)


def _aux_values_and_grads(attention, q, k, v, seed):
    """jit(attention) with return_aux -> (out, AuxOutput), and the gradients in q, k, v of <out, random cotangent>
    + <finite lse, random> + <finite max_scores, random> (max_scores carries no gradient, so adds nothing)."""
    lse_shape = q.shape[:3]
    rng = np.random.default_rng(seed + 200)
    ct_out = jnp.asarray(rng.standard_normal((*lse_shape, v.shape[-1]), np.float32))
    ct_lse, ct_max = (jnp.asarray(rng.standard_normal(lse_shape, np.float32)) for _ in range(2))

    def finite_term(x, ct):
        return jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0) * ct)

    def loss(q, k, v):
        out, aux = attention(q, k, v)
        total = jnp.sum(out.astype(jnp.float32) * ct_out) + finite_term(aux.lse, ct_lse)
        return total + finite_term(aux.max_scores, ct_max), (out, aux)

    (_, (out, aux)), grads = _run(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), q, k, v)
    return out, aux, grads


def _assert_aux_matches(got, want, dtype, masked_rows):
    """out, lse and max_scores (-inf exactly on `masked_rows`, the queries attending nowhere) and the gradients."""
    (out, aux, grads), (ref_out, ref_aux, ref_grads) = got, want
    _assert_matches((out, aux.lse, grads), (ref_out, ref_aux.lse, ref_grads), dtype)
    assert_close(aux.max_scores, ref_aux.max_scores, dtype, "max_scores")
    max_scores = np.asarray(aux.max_scores)
    assert np.all(max_scores[..., masked_rows] == -np.inf) and np.isfinite(max_scores[..., ~masked_rows]).all()


def _assert_sharded(x, mesh, spec):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (x.sharding, spec)


def _block_mask(mask_mod, B, H, L, S, block_size):
    return None if mask_mod is None else fa.create_block_mask(mask_mod, B, H, L, S, BLOCK_SIZE=block_size)


def _head_dependent_mask(b, h, q_idx, kv_idx):
    """Causal for odd heads, bidirectional for even ones: a BlockMask that differs per head."""
    del b
    return (q_idx >= kv_idx) | (h % 2 == 0)


def _gappy_causal_mask(b, h, q_idx, kv_idx):
    """Causal, with every query q_idx % 5 == 3 attending nowhere: fully masked rows."""
    del b, h
    return (q_idx >= kv_idx) & (q_idx % 5 != 3)


# ------------------------------------------------------------------------------------------- batch and heads

B, HQ, HKV, L, S = 4, 8, 4, 40, 24  # GQA; every axis a different size


@pytest.mark.parametrize("case", ["document_batched", "alibi_learned_slopes", "relative_bias_table", "head_dependent"])
def test_sharded_batch_and_heads_match_reference(case):
    mesh = _mesh((2, 4), ("data", "model"))
    q, k, v = random_qkv(1, B=B, Hq=HQ, Hkv=HKV, L=L, S=S)
    if case == "head_dependent":
        mask_mod, score_mod, mask_b, mask_h = _head_dependent_mask, fa.rel_causal, None, HQ
    else:
        mask_mod, score_mod = MOD_CASES_BY_NAME[case].build(B, HQ, L, S, 1)
        mask_b, mask_h = (B if case == "document_batched" else None), None
    block_mask = _block_mask(mask_mod, mask_b, mask_h, L, S, 8)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P("data", "model"))) for x in (q, k, v))
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_lse=True)

    got = _values_and_grads(
        lambda q, k, v: sharded_flex_attention(q, k, v, **kwargs, mesh=mesh, batch_axis="data", head_axis="model"),
        q, k, v, seed=1,
    )
    want = _values_and_grads(lambda q, k, v: fa.flex_attention(q, k, v, **kwargs), q, k, v, seed=1)
    _assert_matches(got, want, jnp.float32)
    _assert_sharded(got[0], mesh, P("data", "model"))
    _assert_sharded(got[1], mesh, P("data", "model"))


def test_sharded_return_aux_matches_reference():
    # max_scores and lse sharded like out, -inf on the fully masked rows; the gradients unchanged by return_aux.
    mesh = _mesh((2, 2), ("data", "model"))
    q, k, v = random_qkv(15, B=2, Hq=4, Hkv=2, L=40, S=24)
    block_mask = _block_mask(_gappy_causal_mask, None, None, 40, 24, 8)
    kwargs = dict(score_mod=fa.generate_alibi_bias(4), block_mask=block_mask, enable_gqa=True,
                  return_aux=fa.AuxRequest(lse=True, max_scores=True))
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P("data", "model"))) for x in (q, k, v))
    got = _aux_values_and_grads(
        lambda q, k, v: sharded_flex_attention(q, k, v, **kwargs, mesh=mesh, batch_axis="data", head_axis="model"),
        q, k, v, seed=15,
    )
    want = _aux_values_and_grads(
        lambda q, k, v: fa.flex_attention(q, k, v, **kwargs, implementation="reference"), q, k, v, seed=15
    )
    _assert_aux_matches(got, want, jnp.float32, masked_rows=np.arange(40) % 5 == 3)
    _assert_sharded(got[1].max_scores, mesh, P("data", "model"))


@pytest.mark.parametrize("kind", ["sharded", "ring"])
def test_key_and_value_of_batch_one_are_replicated_over_the_batch_axis(kind):
    # One cache shared by every batch (with a per-batch mask): replicated over the batch shards, which add its
    # gradients up; the ring passes the one copy around.
    mesh = _mesh((2, 2), ("data", "model" if kind == "sharded" else "seq"))
    q, _, _ = random_qkv(16, B=4, Hq=4, Hkv=2, L=32, S=32)
    _, k, v = random_qkv(17, B=1, Hq=4, Hkv=2, L=32, S=32)
    mask_mod, score_mod = MOD_CASES_BY_NAME["document_batched"].build(4, 4, 32, 32, 16)
    kwargs = dict(score_mod=score_mod, block_mask=_block_mask(mask_mod, 4, None, 32, 32, 8), enable_gqa=True,
                  return_lse=True)
    if kind == "sharded":
        attention = lambda q, k, v: sharded_flex_attention(  # noqa: E731
            q, k, v, **kwargs, mesh=mesh, batch_axis="data", head_axis="model")
    else:
        attention = lambda q, k, v: ring_flex_attention(  # noqa: E731
            q, k, v, **kwargs, mesh=mesh, seq_axis="seq", batch_axis="data")
    got = _values_and_grads(attention, q, k, v, seed=16)
    want = _values_and_grads(
        lambda q, k, v: fa.flex_attention(q, jnp.repeat(k, 4, axis=0), jnp.repeat(v, 4, axis=0), **kwargs),
        q, k, v, seed=16,
    )
    _assert_matches(got, want, jnp.float32)
    assert got[2][1].shape == k.shape and got[2][2].shape == v.shape


def test_sharded_over_a_tuple_of_mesh_axes_sees_global_batch_indices():
    # The batch over both axes of the mesh (8 shards of one batch each); per-batch document ids.
    mesh = _mesh((2, 4), ("x", "y"))
    batch, heads, length = 8, 2, 16
    q, k, v = random_qkv(2, B=batch, Hq=heads, Hkv=heads, L=length, S=length, dtype=jnp.bfloat16)
    mask_mod, _ = MOD_CASES_BY_NAME["document_batched"].build(batch, heads, length, length, 2)
    block_mask = _block_mask(mask_mod, batch, None, length, length, 8)
    out = _run(
        lambda q, k, v: sharded_flex_attention(q, k, v, block_mask=block_mask, mesh=mesh, batch_axis=("x", "y")),
        q, k, v,
    )
    assert_close(out, _run(lambda q, k, v: fa.flex_attention(q, k, v, block_mask=block_mask), q, k, v), jnp.bfloat16)
    assert out.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------------- ring

# Every mask of the brief, 2, 4 and 8 devices, zig-zag on and off; each case compiles a ring, so they are few.
RING_CASES = [
    # (devices, load_balance, mod case, block size)
    (2, True, "causal", 8),
    (4, False, "document_causal", 8),
    (8, True, "sliding_window", 4),
    (8, False, "causal", 8),
]
@pytest.mark.parametrize("devices,load_balance,case,block_size", RING_CASES)
def test_ring_matches_reference(devices, load_balance, case, block_size):
    mesh = _mesh((devices,), ("seq",))
    batch, q_heads, kv_heads, length = 2, 4, 2, 64
    q, k, v = random_qkv(3, B=batch, Hq=q_heads, Hkv=kv_heads, L=length, S=length)
    mask_mod, score_mod = MOD_CASES_BY_NAME[case].build(batch, q_heads, length, length, 3)
    block_mask = _block_mask(mask_mod, None, None, length, length, block_size)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P(None, None, "seq"))) for x in (q, k, v))
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_lse=True)

    got = _values_and_grads(
        lambda q, k, v: ring_flex_attention(q, k, v, **kwargs, mesh=mesh, seq_axis="seq", load_balance=load_balance),
        q, k, v, seed=3,
    )
    want = _values_and_grads(lambda q, k, v: fa.flex_attention(q, k, v, **kwargs), q, k, v, seed=3)
    _assert_matches(got, want, jnp.float32)
    _assert_sharded(got[0], mesh, P(None, None, "seq"))
    _assert_sharded(got[1], mesh, P(None, None, "seq"))


def test_ring_without_mask_and_with_key_length_unlike_query_length():
    # noop mask (block_mask=None), a position-dependent score_mod, L != S.
    mesh = _mesh((4,), ("seq",))
    q, k, v = random_qkv(4, B=1, Hq=3, Hkv=3, L=32, S=48)
    kwargs = dict(score_mod=fa.rel_bias, return_lse=True)
    got = _values_and_grads(lambda q, k, v: ring_flex_attention(q, k, v, **kwargs, mesh=mesh, seq_axis="seq"), q, k, v, 4)
    want = _values_and_grads(lambda q, k, v: fa.flex_attention(q, k, v, **kwargs), q, k, v, 4)
    _assert_matches(got, want, jnp.float32)


def test_ring_with_batch_and_head_axes_and_per_batch_mask():
    # seq x batch x heads on a 2 x 2 x 2 mesh; a per-batch BlockMask (sharded along B) and a learned bias table.
    mesh = _mesh((2, 2, 2), ("data", "model", "seq"))
    batch, q_heads, kv_heads, length = 2, 4, 2, 32
    q, k, v = random_qkv(5, B=batch, Hq=q_heads, Hkv=kv_heads, L=length, S=length)
    mask_mod, _ = MOD_CASES_BY_NAME["document_batched"].build(batch, q_heads, length, length, 5)
    _, score_mod = MOD_CASES_BY_NAME["relative_bias_table"].build(batch, q_heads, length, length, 5)
    block_mask = _block_mask(fa.and_masks(fa.causal_mask, mask_mod), batch, None, length, length, 4)
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_lse=True)
    axes = dict(mesh=mesh, seq_axis="seq", batch_axis="data", head_axis="model", load_balance=False)
    got = _values_and_grads(lambda q, k, v: ring_flex_attention(q, k, v, **kwargs, **axes), q, k, v, seed=5)
    want = _values_and_grads(lambda q, k, v: fa.flex_attention(q, k, v, **kwargs), q, k, v, seed=5)
    _assert_matches(got, want, jnp.float32)
    _assert_sharded(got[0], mesh, P("data", "model", "seq"))


def test_ring_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    mesh = _mesh((4,), ("seq",))
    q, k, v = random_qkv(6, B=1, Hq=2, Hkv=2, L=40, S=40)
    block_mask = _block_mask(_gappy_causal_mask, None, None, 40, 40, 5)
    kwargs = dict(score_mod=fa.generate_alibi_bias(2), block_mask=block_mask, return_lse=True)
    got = _values_and_grads(lambda q, k, v: ring_flex_attention(q, k, v, **kwargs, mesh=mesh, seq_axis="seq"), q, k, v, 6)
    want = _values_and_grads(lambda q, k, v: fa.flex_attention(q, k, v, **kwargs), q, k, v, 6)
    _assert_matches(got, want, jnp.float32)
    masked_rows = np.arange(40) % 5 == 3
    assert np.all(np.asarray(got[1])[..., masked_rows] == -np.inf)
    assert np.all(np.asarray(got[0])[..., masked_rows, :] == 0)


def test_ring_return_aux_matches_reference():
    # Zig-zag over 4 devices: skipped (future) chunk pairs and fully masked rows both give max -inf, merged NaN-free.
    mesh = _mesh((4,), ("seq",))
    q, k, v = random_qkv(16, B=1, Hq=4, Hkv=2, L=40, S=40)
    block_mask = _block_mask(_gappy_causal_mask, None, None, 40, 40, 5)
    kwargs = dict(score_mod=fa.generate_alibi_bias(4), block_mask=block_mask, enable_gqa=True,
                  return_aux=fa.AuxRequest(lse=True, max_scores=True))
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P(None, None, "seq"))) for x in (q, k, v))
    got = _aux_values_and_grads(
        lambda q, k, v: ring_flex_attention(q, k, v, **kwargs, mesh=mesh, seq_axis="seq"), q, k, v, seed=16
    )
    want = _aux_values_and_grads(
        lambda q, k, v: fa.flex_attention(q, k, v, **kwargs, implementation="reference"), q, k, v, seed=16
    )
    _assert_aux_matches(got, want, jnp.float32, masked_rows=np.arange(40) % 5 == 3)
    _assert_sharded(got[1].max_scores, mesh, P(None, None, "seq"))


def test_ring_in_bfloat16_learns_the_bias_table():
    # The gradient of a captured (learned) table comes back through the ring.
    mesh = _mesh((2,), ("seq",))
    q, k, v = random_qkv(7, B=1, Hq=2, Hkv=2, L=32, S=32, dtype=jnp.bfloat16)
    table = jnp.asarray(np.random.default_rng(8).standard_normal((2, 9), np.float32))
    block_mask = _block_mask(fa.causal_mask, None, None, 32, 32, 8)

    def loss(table, attention):
        out = attention(q, k, v, score_mod=fa.relative_position_bias(table), block_mask=block_mask)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    def ring(*args, **kwargs):
        return ring_flex_attention(*args, **kwargs, mesh=mesh, seq_axis="seq", load_balance=False)

    got = _run(jax.grad(lambda t: loss(t, ring)), table)
    assert_close(got, _run(jax.grad(lambda t: loss(t, fa.flex_attention)), table), jnp.bfloat16, "d table")


def test_zigzag_balances_causal_work():
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, 256, 256, BLOCK_SIZE=8)
    balanced = work_per_device(block_mask, ring_size=4, load_balance=True)
    contiguous = work_per_device(block_mask, ring_size=4, load_balance=False)
    assert balanced.sum() == contiguous.sum() == np.asarray(block_mask.to_dense()).sum()
    assert len(set(balanced.tolist())) == 1
    assert contiguous[-1] > 3 * contiguous[0]


def test_merge_partials_is_attention_over_the_union():
    q, k, v = random_qkv(9, B=1, Hq=2, Hkv=2, L=16, S=24)

    def whole_and_merged(q, k, v):
        left = fa.flex_attention(q, k[:, :, :10], v[:, :, :10], return_lse=True)
        right = fa.flex_attention(q, k[:, :, 10:], v[:, :, 10:], return_lse=True)
        return fa.flex_attention(q, k, v, return_lse=True), merge_partials(left, right)

    whole, merged = _run(whole_and_merged, q, k, v)
    assert_close(merged[0], whole[0], jnp.float32, "out")
    assert_close(merged[1], whole[1], jnp.float32, "lse")


def test_merge_partials_with_nothing_attended_is_finite_and_differentiable():
    out = jnp.asarray(np.random.default_rng(10).standard_normal((3, 4), np.float32))
    lse = jnp.array([0.5, -jnp.inf, -jnp.inf])
    nothing = (jnp.zeros((3, 4)), jnp.full((3,), -jnp.inf))
    merged_out, merged_lse = merge_partials((out, lse), nothing)
    np.testing.assert_array_equal(np.asarray(merged_lse), np.asarray(lse))
    np.testing.assert_allclose(np.asarray(merged_out[0]), np.asarray(out[0]), rtol=1e-6)
    assert np.all(np.asarray(merged_out[1:]) == 0)

    def loss(a, b):
        merged_out, merged_lse = merge_partials(a, b)
        return jnp.sum(merged_out) + jnp.sum(jnp.where(jnp.isfinite(merged_lse), merged_lse, 0.0))

    for g in jax.tree.leaves(_run(jax.grad(loss, argnums=(0, 1)), (out, lse), nothing)):
        assert np.isfinite(np.asarray(g)).all()


# ----------------------------------------------------------------------------------------------- bad input


def _bad_call(kind, **overrides):
    q, k, v = random_qkv(0, B=2, Hq=4, Hkv=2, L=20, S=20)
    mesh = _mesh((2, 4), ("data", "seq"))
    args = dict(mesh=mesh, enable_gqa=True)
    if kind == "ring":
        args.update(seq_axis="seq")
        args.update(overrides)
        return lambda: ring_flex_attention(q, k, v, **args)
    args.update(batch_axis="data")
    args.update(overrides)
    return lambda: sharded_flex_attention(q, k, v, **args)


BAD_INPUTS = [
    # (which function, overriding arguments, error type, words the message must contain)
    ("ring", {}, ValueError, ["query length L (20)", "divisible", "= 8"]),  # 2 chunks per device of 4
    ("ring", {"seq_axis": "sequence"}, ValueError, ["seq_axis", "'sequence'", "('data', 'seq')"]),
    ("ring", {"seq_axis": None}, ValueError, ["seq_axis"]),
    ("ring", {"seq_axis": "seq", "batch_axis": "seq"}, ValueError, ["seq_axis", "batch_axis", "'seq'"]),
    ("ring", {"load_balance": "yes"}, TypeError, ["load_balance", "'yes'"]),
    ("sharded", {"head_axis": "seq"}, ValueError, ["key/value head count Hkv (2)", "head_axis", "(4)"]),
    ("sharded", {"batch_axis": "seq"}, ValueError, ["batch size B (2)", "batch_axis", "(4)"]),
    ("sharded", {"batch_axis": 3}, TypeError, ["batch_axis", "3"]),
    ("sharded", {"mesh": "mesh"}, TypeError, ["mesh", "jax.sharding.Mesh", "str"]),
    ("sharded", {"enable_gqa": False}, ValueError, ["Hq=4", "Hkv=2", "enable_gqa"]),
    ("sharded", {"return_lse": True, "return_aux": fa.AuxRequest(lse=True)}, ValueError, ["return_lse", "return_aux"]),
    ("sharded", {"return_aux": (True, True)}, TypeError, ["return_aux", "AuxRequest", "tuple"]),
    ("ring", {"return_lse": True, "return_aux": fa.AuxRequest(max_scores=True)}, ValueError, ["return_lse", "return_aux"]),
    ("ring", {"return_aux": fa.AuxRequest(lse=1)}, TypeError, ["return_aux.lse", "bool"]),
]


@pytest.mark.parametrize("kind,overrides,error,words", BAD_INPUTS)
def test_bad_input_names_the_argument(kind, overrides, error, words):
    with pytest.raises(error) as info:
        _bad_call(kind, **overrides)()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_ring_chunks_must_be_whole_blocks():
    mesh = _mesh((4,), ("seq",))
    q, k, v = random_qkv(0, B=1, Hq=2, Hkv=2, L=64, S=64)
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, 64, 64, BLOCK_SIZE=16)  # chunks of 8 (2 x 4)
    with pytest.raises(ValueError, match=r"chunks \(8 queries, 8 keys.*BLOCK_SIZE \(16, 16\)"):
        ring_flex_attention(q, k, v, block_mask=block_mask, mesh=mesh, seq_axis="seq")


def test_no_gathers_in_the_compiled_programs():
    """Batch/head sharding communicates nothing, forward or backward; the ring only passes chunks around
    (collective-permute), never gathering q, k or v."""
    mesh = _mesh((2, 4), ("data", "model"))
    q, k, v = random_qkv(14, B=2, Hq=4, Hkv=4, L=64, S=64, E=16, Ev=16)
    block_mask = _block_mask(fa.causal_mask, None, None, 64, 64, 8)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P("data", "model"))) for x in (q, k, v))

    def compiled_text(attention, *args):
        grad = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) ** 2), argnums=(0, 1, 2))
        return jax.jit(grad).lower(*args).compile(_FAST_COMPILE).as_text()

    text = compiled_text(
        lambda q, k, v: sharded_flex_attention(q, k, v, block_mask=block_mask, mesh=mesh, batch_axis="data",
                                               head_axis="model"), q, k, v)
    assert not [op for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all") if op in text]

    ring_mesh = _mesh((4,), ("seq",))
    q, k, v = (jax.device_put(x, NamedSharding(ring_mesh, P(None, None, "seq"))) for x in (q, k, v))
    text = compiled_text(
        lambda q, k, v: ring_flex_attention(q, k, v, block_mask=block_mask, mesh=ring_mesh, seq_axis="seq"), q, k, v)
    assert "collective-permute" in text and "all-gather" not in text


def test_meshes_with_explicit_axes():
    """jax.make_mesh's Explicit axes: shard_map takes its inputs already laid out, which both functions arrange."""
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    assert jax.sharding.AxisType.Explicit in mesh.axis_types
    q, k, v = random_qkv(13, B=2, Hq=2, Hkv=2, L=64, S=64, E=16, Ev=16)
    block_mask = _block_mask(fa.causal_mask, None, None, 64, 64, 8)
    want = _run(lambda q, k, v: fa.flex_attention(q, k, v, block_mask=block_mask), q, k, v)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P("data", None, "seq"))) for x in (q, k, v))
    got = _run(
        lambda q, k, v: ring_flex_attention(q, k, v, block_mask=block_mask, mesh=mesh, seq_axis="seq",
                                            batch_axis="data"),
        q, k, v,
    )
    assert_close(got, want, jnp.float32, "ring")
    _assert_sharded(got, mesh, P("data", None, "seq"))
    got = _run(lambda q, k, v: sharded_flex_attention(q, k, v, block_mask=block_mask, mesh=mesh, batch_axis="data"),
               q, k, v)
    assert_close(got, want, jnp.float32, "batch-sharded")
    _assert_sharded(got, mesh, P("data"))


@pytest.mark.parametrize("spec", [P("data", None, "seq"), P(None, "seq"), P("data")], ids=["batch-seq", "heads", "batch"])
def test_plain_flex_attention_on_explicitly_sharded_inputs(spec):
    """The reference runs on inputs laid out over Explicit mesh axes (batch, heads or sequence), forward and
    gradients, and returns the output in the query's layout."""
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    q, k, v = random_qkv(14, B=2, Hq=8, Hkv=4, L=64, S=48, E=16, Ev=8)
    block_mask = _block_mask(fa.causal_mask, None, None, 64, 48, 8)

    def attend(q, k, v):
        return fa.flex_attention(q, k, v, score_mod=fa.rel_bias, block_mask=block_mask, enable_gqa=True,
                                 return_lse=True)

    def loss(q, k, v):
        out, lse = attend(q, k, v)
        return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    want = attend(q, k, v)
    want_grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    with jax.set_mesh(mesh):
        sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        got = jax.jit(attend)(*sharded)
        got_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*sharded)
        assert jax.typeof(got[0]).sharding.spec[: len(spec)] == tuple(spec)
    assert_close(got[0], want[0], jnp.float32, "out")
    assert_close(got[1], want[1], jnp.float32, "lse")
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert_close(g, w, jnp.float32, f"d{name}")


# ------------------------------------------------------------------------------------------ pallas_triton


def test_pallas_triton_sharded_and_ring_match_reference():
    """The Pallas kernels (interpret mode on the CPU) per shard: batch x heads on a 2 x 2 mesh, and a zig-zag ring
    of 2 over chunks of one 16-position block; forward and gradients."""
    q, k, v = random_qkv(12, B=2, Hq=4, Hkv=2, L=64, S=64, E=16, Ev=16)
    block_mask = _block_mask(fa.causal_mask, None, None, 64, 64, 16)
    kwargs = dict(score_mod=fa.generate_alibi_bias(4), block_mask=block_mask, enable_gqa=True, return_lse=True)
    pallas = dict(implementation="pallas_triton", interpret=True)
    want = _values_and_grads(lambda q, k, v: fa.flex_attention(q, k, v, **kwargs), q, k, v, seed=12)

    mesh = _mesh((2, 2), ("data", "model"))
    got = _values_and_grads(
        lambda q, k, v: sharded_flex_attention(q, k, v, **kwargs, **pallas, mesh=mesh, batch_axis="data",
                                               head_axis="model"),
        q, k, v, seed=12,
    )
    _assert_matches(got, want, jnp.float32)
    _assert_sharded(got[0], mesh, P("data", "model"))

    ring_mesh = _mesh((2,), ("seq",))
    got = _values_and_grads(
        lambda q, k, v: ring_flex_attention(q, k, v, **kwargs, **pallas, mesh=ring_mesh, seq_axis="seq"),
        q, k, v, seed=12,
    )
    _assert_matches(got, want, jnp.float32)
    _assert_sharded(got[0], ring_mesh, P(None, None, "seq"))


# ------------------------------------------------------------------------------------- docs and benchmark


@pytest.mark.parametrize("module", [batch_head, ring_module], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_context_parallel_benchmark_runs_tiny(tmp_path):
    """benchmarks/context_parallel.py --tiny (4 CPU devices, its own process): forward + backward, the ring's
    output checked against one device's."""
    script = Path(__file__).parents[1] / "benchmarks" / "context_parallel.py"
    subprocess.run(
        [sys.executable, str(script), "--tiny", "--backward", "--lengths", "64", "--mask", "causal"],
        check=True, timeout=300, cwd=tmp_path, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True,
    )
    record = json.loads((tmp_path / "context_parallel.json").read_text())
    assert {"date", "devices", "jax", "command", "flop_model"} <= set(record["context"])
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {"single", "ring", "ring_zigzag"} and rows["ring"]["devices"] == 4
    assert all(r["ms"] > 0 for r in rows.values())
    assert rows["ring_zigzag"]["balance"] == 1.0 < rows["ring"]["balance"]
    assert rows["ring"]["max_abs_error"] < 1e-4 and rows["ring_zigzag"]["max_abs_error"] < 1e-4
    assert "| 64 | ring_zigzag | 4 |" in (tmp_path / "context_parallel.md").read_text()


# ---------------------------------------------------------------------------------------------- several GPUs


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", fa.IMPLEMENTATIONS)
def test_on_several_gpus_matches_one(implementation):
    """Ring (zig-zag) and head-sharded attention over every GPU present, in bfloat16, against the reference."""
    devices = jax.devices("gpu")
    ring_size = 1 << (min(len(devices), 8).bit_length() - 1)  # the largest power of two available, at most 8
    if ring_size < 2:
        pytest.skip(f"needs 2 GPUs, {len(devices)} present")
    mesh = _mesh((ring_size,), ("gpus",), platform="gpu")
    batch, q_heads, kv_heads, length, block = 2, 8, ring_size, 2 * ring_size * 128, 128
    q, k, v = random_qkv(11, B=batch, Hq=q_heads, Hkv=kv_heads, L=length, S=length, E=64, Ev=64, dtype=jnp.bfloat16)
    documents = jnp.asarray(np.sort(np.random.default_rng(11).integers(0, 5, length)), jnp.int32)
    mask_mod = fa.and_masks(fa.causal_mask, fa.document_mask(documents))
    block_mask = fa.create_block_mask(mask_mod, None, None, length, length, BLOCK_SIZE=block)
    kwargs = dict(score_mod=fa.generate_alibi_bias(q_heads), block_mask=block_mask, enable_gqa=True, return_lse=True)
    want = _values_and_grads(
        lambda q, k, v: fa.flex_attention(q, k, v, **kwargs, implementation="reference"), q, k, v, seed=11
    )
    ring = _values_and_grads(
        lambda q, k, v: ring_flex_attention(q, k, v, **kwargs, implementation=implementation, mesh=mesh, seq_axis="gpus"),
        q, k, v, seed=11,
    )
    _assert_matches(ring, want, jnp.bfloat16)
    heads = _values_and_grads(
        lambda q, k, v: sharded_flex_attention(q, k, v, **kwargs, implementation=implementation, mesh=mesh, head_axis="gpus"),
        q, k, v, seed=11,
    )
    _assert_matches(heads, want, jnp.bfloat16)
