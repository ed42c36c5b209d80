"""The split-KV decode kernel (short queries) against the dense reference; interpret mode on CPU, gpu-marked sizes
on a GPU; and its lowering for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexattn_jax as fa
from flexattn_jax.backends import pallas_triton
from flexattn_jax.backends.pallas_triton import decode
from tests._helpers import MOD_CASES, assert_close, random_qkv
from tests.conftest import HAS_GPU

INTERPRET = not HAS_GPU
_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")


def _uses_decode_kernel(fn, *args) -> bool:
    return "flex_attention_decode" in str(jax.make_jaxpr(fn)(*args))


def _compare(q, k, v, mask_mod=None, score_mod=None, *, block_size=32, mask_heads=None, kernel_options=None, **kw):
    block_mask = None
    if mask_mod is not None:
        block_mask = fa.create_block_mask(
            mask_mod, q.shape[0], mask_heads, q.shape[2], k.shape[2], BLOCK_SIZE=block_size
        )
    request = fa.AuxRequest(lse=True, max_scores=True)
    common = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_aux=request, **kw)

    def run(q, k, v):
        return fa.flex_attention(
            q, k, v, implementation="pallas_triton", interpret=INTERPRET, kernel_options=kernel_options, **common
        )

    assert _uses_decode_kernel(run, q, k, v)
    out, (lse, max_scores) = run(q, k, v)
    ref_out, (ref_lse, ref_max) = fa.flex_attention(q, k, v, implementation="reference", **common)
    assert out.dtype == q.dtype and lse.dtype == max_scores.dtype == jnp.float32
    assert_close(out, ref_out, q.dtype, "out")
    assert_close(lse, ref_lse, q.dtype, "lse")
    # The largest of the splits' maxima; -inf from a split that saw nothing.
    assert_close(max_scores, ref_max, q.dtype, "max_scores")
    return out, lse


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("case", MOD_CASES, ids=repr)
def test_every_mod_matches_reference(case, q_len):
    # GQA group 2, S not a multiple of the mask block; 3 splits so that the merge combines shares.
    B, Hq, Hkv, S = 2, 4, 2, 77
    q, k, v = random_qkv(1, B=B, Hq=Hq, Hkv=Hkv, L=q_len, S=S, E=32, Ev=16)
    mask_mod, score_mod = case.build(B, Hq, q_len, S, 1)
    _compare(q, k, v, mask_mod, score_mod, kernel_options={"decode_num_splits": 3, "decode_BLOCK_N": 16})


def test_full_and_partial_blocks_many_splits_default_tiles():
    # Several mask blocks, full ones among them (sliding window over 150 keys), more splits than a row's tiles.
    q, k, v = random_qkv(2, B=2, Hq=8, Hkv=2, L=2, S=150, E=64, Ev=64)

    def window(b, h, q_idx, kv_idx):
        return kv_idx >= 40 + q_idx

    _compare(q, k, v, window, fa.tanh_softcap(4.0), block_size=16, kernel_options={"decode_num_splits": 16})
    _compare(q, k, v, window, None, block_size=16)  # default splits and tiles


def test_mask_varying_over_heads_one_head_per_tile():
    q, k, v = random_qkv(3, B=1, Hq=4, Hkv=2, L=3, S=100, E=16, Ev=16)

    def by_head(b, h, q_idx, kv_idx):
        return (kv_idx % (h + 2)) == 0

    _compare(q, k, v, by_head, fa.generate_alibi_bias(4), mask_heads=4, kernel_options={"decode_num_splits": 2})


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = random_qkv(4, B=2, Hq=4, Hkv=1, L=5, S=70, E=16, Ev=16)

    def some_rows_see_nothing(b, h, q_idx, kv_idx):
        return (q_idx % 2 == 0) & (h != 1) & (kv_idx < 60)

    out, lse = _compare(q, k, v, some_rows_see_nothing, None, block_size=16, mask_heads=4,
                        kernel_options={"decode_num_splits": 4})
    dead = (np.arange(5)[None, :] % 2 == 1) | (np.arange(4)[:, None] == 1)
    assert np.all(np.asarray(out)[:, dead] == 0)
    assert np.all(np.asarray(lse)[:, dead] == -np.inf)
    assert np.all(np.isfinite(np.asarray(lse)[:, ~dead]))


def test_nothing_visited_at_all():
    q, k, v = random_qkv(5, B=1, Hq=2, Hkv=2, L=1, S=64, E=16, Ev=16)
    out, lse = _compare(q, k, v, lambda b, h, q_idx, kv_idx: kv_idx < 0, None, block_size=16)
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == -np.inf)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
    q, k, v = random_qkv(6, B=2, Hq=8, Hkv=2, L=1, S=300, E=64, Ev=64, dtype=dtype)
    _compare(q, k, v, fa.causal_mask, fa.generate_alibi_bias(8), block_size=128, kernel_options={"decode_num_splits": 2})


def test_longer_queries_and_multi_block_queries_use_the_forward_kernel():
    q, k, v = random_qkv(7, B=1, Hq=2, Hkv=1, L=40, S=64, E=16, Ev=16)
    run = lambda q, k, v: fa.flex_attention(q, k, v, enable_gqa=True, implementation="pallas_triton", interpret=True)  # noqa: E731
    assert not _uses_decode_kernel(run, q, k, v)
    q = q[:, :, :20]
    bm = fa.create_block_mask(fa.causal_mask, None, None, 20, 64, BLOCK_SIZE=16)  # two query blocks
    run_bm = lambda q, k, v: fa.flex_attention(  # noqa: E731
        q, k, v, block_mask=bm, enable_gqa=True, implementation="pallas_triton", interpret=True
    )
    assert not _uses_decode_kernel(run_bm, q, k, v)
    off = lambda q, k, v: fa.flex_attention(  # noqa: E731
        q, k, v, enable_gqa=True, implementation="pallas_triton", interpret=True, kernel_options={"decode_enable": 0}
    )
    assert not _uses_decode_kernel(off, q, k, v)
    assert _uses_decode_kernel(run, q, k, v)
    np.testing.assert_allclose(np.asarray(run(q, k, v)), np.asarray(off(q, k, v)), rtol=2e-5, atol=2e-6)


def test_bad_decode_options_raise():
    q, k, v = random_qkv(8, B=1, Hq=2, Hkv=1, L=1, S=64, E=16, Ev=16)
    for options, error in (
        ({"decode_BLOCK_N": 8}, ValueError),
        ({"decode_num_splits": 0}, ValueError),
        ({"decode_splits": 2}, ValueError),
        ({"decode_num_warps": 2.0}, TypeError),
    ):
        with pytest.raises(error):
            fa.flex_attention(q, k, v, enable_gqa=True, implementation="pallas_triton", interpret=True,
                              kernel_options=options)


def test_gradients_match_reference():
    # The backward runs the dK/dV and dQ kernels on the decode kernel's output; the captured slopes get a gradient.
    B, Hq, Hkv, L, S = 1, 4, 2, 2, 48
    q, k, v = random_qkv(9, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=16, Ev=16)
    slopes = jnp.linspace(0.1, 0.4, Hq, dtype=jnp.float32)
    bm = fa.create_block_mask(fa.sliding_window_mask(30), None, None, L, S, BLOCK_SIZE=16)

    def loss(q, k, v, slopes, implementation):
        out, lse = fa.flex_attention(
            q, k, v, score_mod=fa.alibi_bias(slopes), block_mask=bm, enable_gqa=True, return_lse=True,
            implementation=implementation, interpret=implementation != "reference",
            kernel_options={"decode_num_splits": 2, "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16},
        )
        return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, slopes, "pallas_triton")
    ref = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, slopes, "reference")
    for name, g, r in zip(("dq", "dk", "dv", "dslopes"), grads, ref):
        assert_close(g, r, jnp.float32, name, factor=5.0)


def test_key_value_shared_by_every_batch():
    # flex_decode with key/value of batch 1 (a paged cache's pool): per-batch mask rows choose the keys.
    q, k, v = random_qkv(10, B=3, Hq=4, Hkv=2, L=1, S=96, E=16, Ev=16)
    k1, v1 = k[:1], v[:1]
    lengths = jnp.array([10, 96, 50], jnp.int32)

    def prefix(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    bm = fa.create_block_mask(prefix, 3, None, 1, 96, BLOCK_SIZE=32)
    out, lse = decode.flex_decode(
        q, k1, v1, score_mod=fa.rel_bias, mask_mod=prefix, kv_num_blocks=bm.kv_num_blocks, kv_indices=bm.kv_indices,
        full_kv_num_blocks=bm.full_kv_num_blocks, full_kv_indices=bm.full_kv_indices, block_size=bm.BLOCK_SIZE,
        scale=0.25, interpret=INTERPRET, kernel_options={"decode_num_splits": 2},
    )
    kb, vb = jnp.broadcast_to(k1, k.shape), jnp.broadcast_to(v1, v.shape)
    ref_out, ref_lse = fa.flex_attention(q, kb, vb, score_mod=fa.rel_bias, block_mask=bm, scale=0.25,
                                         enable_gqa=True, return_lse=True, implementation="reference")
    assert_close(out, ref_out, jnp.float32, "out")
    assert_close(lse, ref_lse, jnp.float32, "lse")


# ------------------------------------------------------------------------------------------- lowering for CUDA


@pytest.mark.parametrize("case", MOD_CASES, ids=repr)
def test_every_mod_lowers_for_cuda(case):
    B, Hq, Hkv, L, S = 2, 8, 2, 1, 1000
    q, k, v = random_qkv(0, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 0)
    mask_mod = mask_mod or fa.noop_mask
    bm = fa.create_block_mask(mask_mod, B, None, L, S)

    def forward(q, k, v, bm):
        return pallas_triton.attention(
            q, k, v, score_mod=score_mod or fa.identity, mask_mod=mask_mod, kv_num_blocks=bm.kv_num_blocks,
            kv_indices=bm.kv_indices, full_kv_num_blocks=bm.full_kv_num_blocks, full_kv_indices=bm.full_kv_indices,
            block_size=bm.BLOCK_SIZE, scale=0.125,
        )

    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        lowered = jax.jit(forward).trace(q, k, v, bm).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "__gpu$xla.gpu.triton" in text and "flex_attention_decode" in text


def test_q_len_3_and_per_head_mask_lower_for_cuda():
    q, k, v = random_qkv(0, B=1, Hq=4, Hkv=1, L=3, S=512, E=64, Ev=64, dtype=jnp.bfloat16)

    def by_head(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + 400 + h

    bm = fa.create_block_mask(by_head, None, 4, 3, 512, BLOCK_SIZE=(128, 64))

    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        lowered = jax.jit(
            lambda q, k, v, bm: pallas_triton.attention(
                q, k, v, score_mod=fa.identity, mask_mod=by_head, kv_num_blocks=bm.kv_num_blocks,
                kv_indices=bm.kv_indices, full_kv_num_blocks=bm.full_kv_num_blocks,
                full_kv_indices=bm.full_kv_indices, block_size=bm.BLOCK_SIZE, scale=0.125,
                kernel_options={"decode_BLOCK_N": 32},
            )
        ).trace(q, k, v, bm).lower(lowering_platforms=("cuda",))
    assert "flex_attention_decode" in lowered.as_text()


# ------------------------------------------------------------------------------------------------ on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kv_len", [4096, 32768])
def test_gpu_realistic_decode(kv_len):
    B, Hq, Hkv, D = 8, 32, 8, 128
    q, k, v = random_qkv(11, B=B, Hq=Hq, Hkv=Hkv, L=1, S=kv_len, E=D, Ev=D, dtype=jnp.bfloat16)
    _compare(q, k, v, fa.causal_mask, None, block_size=128)
    _compare(q, k, v, None, fa.generate_alibi_bias(Hq))
