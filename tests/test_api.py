"""flex_attention's argument checking: every bad input raises before anything is traced."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexattn_jax as fa
from tests._helpers import assert_close, random_qkv


def _qkv(**kwargs):
    return random_qkv(0, **{**dict(B=2, Hq=4, Hkv=2, L=16, S=24, E=8, Ev=8), **kwargs})


def _shape(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


Q, K, V = _qkv()
CAUSAL_16_24 = fa.create_block_mask(fa.causal_mask, None, None, 16, 24, BLOCK_SIZE=8)

BAD_INPUTS = [
    ("rank of query", dict(query=_shape(4, 16, 8)), ValueError, r"query must have rank 4, \[B, Hq, L, E\], got shape \(4, 16, 8\)"),
    ("rank of key", dict(key=_shape(2, 2, 24)), ValueError, "key must have rank 4"),
    ("rank of value", dict(value=_shape(2, 2, 24, 8, 1)), ValueError, "value must have rank 4"),
    ("not an array", dict(query=[[1.0]]), TypeError, "query must be an array, got list"),
    ("integer dtype", dict(query=_shape(2, 4, 16, 8, dtype=jnp.int32)), TypeError, "query must be float32, bfloat16 or float16, got int32"),
    ("mixed dtypes", dict(key=_shape(2, 2, 24, 8, dtype=jnp.bfloat16)), TypeError, "one dtype, got float32, bfloat16 and float32"),
    ("batch", dict(key=_shape(3, 2, 24, 8), value=_shape(3, 2, 24, 8)), ValueError, "same batch size .*got 2, 3 and 3"),
    ("kv heads", dict(value=_shape(2, 1, 24, 8)), ValueError, "same number of heads, got 2 and 1"),
    ("kv lengths", dict(value=_shape(2, 2, 23, 8)), ValueError, "same sequence length"),
    ("head dim", dict(key=_shape(2, 2, 24, 16), value=_shape(2, 2, 24, 8)), ValueError, "query E=8 and key E=16"),
    ("gqa not enabled", dict(enable_gqa=False), ValueError, "Hq=4 heads but key/value have Hkv=2; pass enable_gqa=True"),
    ("gqa not a multiple", dict(key=_shape(2, 3, 24, 8), value=_shape(2, 3, 24, 8)), ValueError, r"Hq \(4\) must be a multiple of Hkv \(3\)"),
    ("scale type", dict(scale="0.5"), TypeError, "scale must be a Python float or None, got str"),
    ("scale not finite", dict(scale=float("nan")), ValueError, "scale must be finite, got nan"),
    ("enable_gqa not a bool", dict(enable_gqa="yes"), TypeError, "enable_gqa must be a bool, got str 'yes'"),
    ("return_lse not a bool", dict(return_lse="no"), TypeError, "return_lse must be a bool, got str 'no'"),
    ("interpret not a bool", dict(interpret=1), TypeError, "interpret must be a bool, got int 1"),
    ("score_mod arity", dict(score_mod=lambda s, b, h, q: s), TypeError, r"score_mod must be a callable score_mod\(score, b, h, q_idx, kv_idx\), taking 5 positional arguments"),
    ("mask_mod as score_mod", dict(score_mod=fa.causal_mask), TypeError, "taking 5 positional arguments"),
    ("score_mod not callable", dict(score_mod=3), TypeError, "score_mod must be a callable"),
    ("score_mod returns a vector", dict(score_mod=lambda s, b, h, q, kv: jnp.stack([s, s])), TypeError, r"floating scalar score .* got float32\[2\]"),
    ("score_mod returns a bool", dict(score_mod=lambda s, b, h, q, kv: q >= kv), TypeError, "floating scalar score .* got bool"),
    ("block_mask type", dict(block_mask=jnp.ones((16, 24), bool)), TypeError, "block_mask must be a BlockMask"),
    ("block_mask lengths", dict(block_mask=fa.create_block_mask(fa.causal_mask, None, None, 16, 16, BLOCK_SIZE=8)), ValueError, r"built for \(Q_LEN, KV_LEN\) = \(16, 16\) but query and key have L=16, S=24"),
    ("block_mask longer", dict(block_mask=fa.create_block_mask(fa.causal_mask, None, None, 32, 32, BLOCK_SIZE=8)), ValueError, r"or cut this one to them with block_mask.adjust\(16, 24\)"),
    ("block_mask batch", dict(block_mask=fa.create_block_mask(fa.causal_mask, 3, None, 16, 24, BLOCK_SIZE=8)), ValueError, "batch size 3; expected 1 or the query's batch size 2"),
    ("block_mask heads", dict(block_mask=fa.create_block_mask(fa.causal_mask, None, 2, 16, 24, BLOCK_SIZE=8)), ValueError, "2 heads; expected 1 or the query's head count Hq=4"),
    ("implementation", dict(implementation="cuda"), ValueError, "implementation must be None or one of"),
    ("kernel_options", dict(kernel_options=[("BLOCK_M", 64)]), TypeError, "kernel_options must be a dict"),
    # Checked on the reference too: a key no kernel reads on the CPU would otherwise raise first on a GPU.
    ("backward tile", dict(kernel_options={"BLOCK_M1": 7}), ValueError, r"kernel_options\['BLOCK_M1'\] must be a power of two"),
    ("misspelt backward key", dict(kernel_options={"bwd_num_warp": 4}), ValueError, "unknown backward key 'bwd_num_warp'"),
    ("misspelt decode key", dict(kernel_options={"decode_num_split": 4}), ValueError, "unknown decode key 'decode_num_split'"),
    ("mosaic value", dict(kernel_options={"mosaic_block_n": 96}), ValueError, r"kernel_options\['mosaic_block_n'\] must be one of \(64, 128\)"),
    ("misspelt mosaic key", dict(kernel_options={"mosaic_blockn": 64}), ValueError, "unknown key 'mosaic_blockn'; pallas_mosaic reads"),
    ("unknown key", dict(kernel_options={"BLOCK_MM": 64}), ValueError, "unknown key 'BLOCK_MM'"),
    ("PyTorch's forward name, checked", dict(kernel_options={"fwd_BLOCK_M": 8}), ValueError, r"kernel_options\['BLOCK_M'\] must be a power of two"),
    ("PyTorch's and our name disagree", dict(kernel_options={"fwd_num_warps": 4, "num_warps": 8}), ValueError, "fwd_num_warps=4 .* and num_warps=8, which name the same setting"),
    ("PyTorch's hint not a bool", dict(kernel_options={"PRESCALE_QK": 1}), TypeError, r"kernel_options\['PRESCALE_QK'\] must be a bool, got int 1"),
    ("PyTorch's BACKEND", dict(kernel_options={"BACKEND": "FLASH"}), ValueError, r"'FLASH' is PyTorch's choice of kernels; here choose them with flex_attention\(..., implementation=...\)"),
    ("return_aux type", dict(return_aux=(True, True)), TypeError, "return_aux must be None or a flexattn_jax.AuxRequest, got tuple"),
    ("return_aux field", dict(return_aux=fa.AuxRequest(lse=1)), TypeError, "return_aux.lse must be a bool, got int 1"),
    ("return_aux with return_lse", dict(return_aux=fa.AuxRequest(lse=True), return_lse=True), ValueError, "return_lse=True or return_aux, not both"),
]


@pytest.mark.parametrize("name, override, error, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(name, override, error, message):
    kwargs = dict(query=Q, key=K, value=V, enable_gqa=True, block_mask=CAUSAL_16_24)
    kwargs.update(override)
    with pytest.raises(error, match=message):
        fa.flex_attention(**kwargs)


TAMPERED = [
    ("q_indices", dict(q_indices=CAUSAL_16_24.q_indices[..., :1]), r"block_mask.q_indices must be int32\[1, 1, 3, 2\], got int32\[1, 1, 3, 1\]"),
    ("full_kv_indices", dict(full_kv_indices=CAUSAL_16_24.full_kv_indices[..., :2]), r"full_kv_indices must be int32\[1, 1, 2, 3\]"),
    ("full_kv_num_blocks", dict(full_kv_num_blocks=CAUSAL_16_24.full_kv_num_blocks[..., :1]), r"full_kv_num_blocks must be int32\[1, 1, 2\]"),
    ("one full array dropped", dict(full_kv_num_blocks=None), "full-block arrays must all be arrays or all be None; got full_kv_num_blocks=None, full_kv_indices=an array"),
    ("float indices", dict(kv_indices=CAUSAL_16_24.kv_indices.astype(jnp.float32)), r"kv_indices must be int32\[1, 1, 2, 3\], got float32"),
    ("int BLOCK_SIZE", dict(BLOCK_SIZE=8), r"BLOCK_SIZE must be a \(Q_BLOCK, KV_BLOCK\) tuple of positive ints, got 8"),
]


@pytest.mark.parametrize("name, fields, message", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_a_tampered_block_mask_is_rejected(name, fields, message):
    # A BlockMask assembled by hand or changed with dataclasses.replace is checked as one create_block_mask built.
    import dataclasses

    tampered = dataclasses.replace(CAUSAL_16_24, **fields)
    for implementation in ("reference", "pallas_triton"):
        with pytest.raises(ValueError, match=message):
            fa.flex_attention(Q, K, V, block_mask=tampered, enable_gqa=True, implementation=implementation,
                              interpret=True)


def test_a_block_mask_for_one_batch_or_head_whose_mask_mod_reads_it_is_rejected():
    # B=None builds the block map for batch 0 alone: a document mask with one row of ids per batch would classify
    # every other batch's blocks with batch 0's documents.
    ids = jnp.array([[0] * 8 + [1] * 16, [0] * 20 + [1] * 4])
    per_batch = fa.document_mask(ids)
    with pytest.raises(ValueError, match=r"mask_mod reads b but .* all 2 batches .* create_block_mask\(mask_mod, B=2"):
        fa.flex_attention(Q, K[:, :, :16], V[:, :, :16], enable_gqa=True,
                          block_mask=fa.create_block_mask(per_batch, None, None, 16, 16, BLOCK_SIZE=8))

    def per_head(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + h

    with pytest.raises(ValueError, match=r"mask_mod reads h but .* all 4 heads .* create_block_mask\(mask_mod, H=4"):
        fa.flex_attention(Q, K, V, enable_gqa=True,
                          block_mask=fa.create_block_mask(per_head, None, None, 16, 24, BLOCK_SIZE=8))
    # Built per batch and head, both run; a selection of one batch broadcasts as the rows it kept were built.
    fa.flex_attention(Q, K, V, enable_gqa=True, block_mask=fa.create_block_mask(per_head, None, 4, 16, 24, BLOCK_SIZE=8))
    whole = fa.create_block_mask(per_batch, 2, None, 16, 16, BLOCK_SIZE=8)
    out = fa.flex_attention(Q, K[:, :, :16], V[:, :, :16], enable_gqa=True, block_mask=whole[1])
    alone = fa.flex_attention(Q[1:], K[1:, :, :16], V[1:, :, :16], enable_gqa=True, block_mask=whole[1])
    assert jnp.allclose(out[1:], alone, atol=1e-6)


def test_a_block_mask_whose_mask_mod_returns_no_boolean_is_rejected():
    # from_block_maps checks its mask_mod too; one swapped in afterwards is caught by flex_attention.
    good = fa.BlockMask.from_block_maps(jnp.ones((1, 1, 2, 3), bool), BLOCK_SIZE=8, seq_lengths=(16, 24))
    bad = dataclasses.replace(good, mask_mod=lambda b, h, q, kv: q - kv)
    with pytest.raises(TypeError, match="block_mask.mask_mod must return a boolean scalar"):
        fa.flex_attention(Q, K, V, block_mask=bad, enable_gqa=True)


def test_errors_come_before_tracing_inside_jit():
    @jax.jit
    def run(q, k, v):
        return fa.flex_attention(q, k, v)  # Hq=4, Hkv=2 without enable_gqa

    with pytest.raises(ValueError, match="enable_gqa"):
        run(Q, K, V)


def test_a_mask_mod_of_the_wrong_arity_is_named():
    with pytest.raises(TypeError, match=r"mask_mod must be a callable mask_mod\(b, h, q_idx, kv_idx\), taking 4"):
        fa.create_block_mask(fa.rel_bias, None, None, 16, 16, BLOCK_SIZE=8)
    with pytest.raises(TypeError, match="each argument of and_masks must be a callable mask_mod"):
        fa.and_masks(fa.causal_mask, fa.rel_bias)
    with pytest.raises(TypeError, match="each argument of compose must be a callable score_mod"):
        fa.compose(fa.rel_bias, fa.causal_mask)


def test_numpy_scalars_serve_as_scale():
    q, k, v = _qkv(E=16, Hkv=4)
    expected = fa.flex_attention(q, k, v, scale=0.25)
    for scale in (np.float32(0.25), np.float64(0.25)):
        assert jnp.array_equal(fa.flex_attention(q, k, v, scale=scale), expected)


def test_defaults_scale_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(E=16, Hkv=4)
    default = fa.flex_attention(q, k, v)
    explicit = fa.flex_attention(q, k, v, scale=0.25)
    assert jnp.array_equal(default, explicit)


def test_implementations_lists_the_reference():
    assert "reference" in fa.IMPLEMENTATIONS
    out = fa.flex_attention(Q, K, V, enable_gqa=True, implementation="reference", kernel_options={"BLOCK_M": 64})
    assert out.shape == (2, 4, 16, 8)


def test_return_aux_returns_what_it_asks_for():
    """As PyTorch's: (out, AuxOutput) with the requested fields, None for the others; lse as return_lse gives it."""
    out, lse = fa.flex_attention(Q, K, V, block_mask=CAUSAL_16_24, enable_gqa=True, return_lse=True)
    for lse_wanted, max_wanted in ((False, False), (True, False), (False, True), (True, True)):
        request = fa.AuxRequest(lse=lse_wanted, max_scores=max_wanted)
        got, aux = fa.flex_attention(Q, K, V, block_mask=CAUSAL_16_24, enable_gqa=True, return_aux=request)
        assert isinstance(aux, fa.AuxOutput)
        assert jnp.array_equal(got, out)
        assert (aux.lse is not None) == lse_wanted and (aux.max_scores is not None) == max_wanted
        if lse_wanted:
            assert jnp.array_equal(aux.lse, lse)
        if max_wanted:
            assert aux.max_scores.shape == lse.shape and aux.max_scores.dtype == jnp.float32


def test_max_scores_under_jit_carry_no_gradient():
    """AuxOutput is a pytree jit returns; max_scores is stopped (PyTorch marks it non-differentiable), lse is not."""
    request = fa.AuxRequest(lse=True, max_scores=True)

    def attend(q):
        return fa.flex_attention(q, K, V, block_mask=CAUSAL_16_24, enable_gqa=True, return_aux=request)

    out, aux = jax.jit(attend)(Q)
    eager_out, eager_aux = attend(Q)
    assert jnp.array_equal(out, eager_out) and jnp.array_equal(aux.max_scores, eager_aux.max_scores)
    through_max = jax.grad(lambda q: jnp.sum(attend(q)[1].max_scores))(Q)
    assert not jnp.any(through_max)
    through_lse = jax.grad(lambda q: jnp.sum(attend(q)[1].lse))(Q)
    assert jnp.all(jnp.isfinite(through_lse)) and jnp.any(through_lse)



def test_a_library_mod_reading_past_its_arrays_is_refused():
    # JAX clamps an out-of-range read: ids shorter than the sequence, slopes or a table for fewer heads would give a
    # silently wrong mask or bias.
    short_ids = fa.document_mask(jnp.repeat(jnp.arange(2), 8))  # 16 ids
    with pytest.raises(ValueError, match=r"mask_mod reads document ids \[16\], which covers a query length of 16, "
                                         r"but the query length here is 24"):
        fa.create_block_mask(short_ids, None, None, 24, 16, BLOCK_SIZE=8)
    with pytest.raises(ValueError, match="covers a key length of 16, but the key length here is 24"):
        fa.create_mask(fa.and_masks(fa.causal_mask, short_ids), None, None, 16, 24)
    two_rows = fa.document_mask(jnp.zeros((2, 16), jnp.int32))
    with pytest.raises(ValueError, match="covers a batch size of 2, but the batch size here is 3"):
        fa.create_block_mask(two_rows, 3, None, 16, 16, BLOCK_SIZE=8)
    for score_mod, what in ((fa.alibi_bias(jnp.array([0.5, 0.25])), r"slopes \[2\]"),
                            (fa.relative_position_bias(jnp.zeros((2, 9))), r"a bias table \[2, 9\]"),
                            (fa.compose(fa.tanh_softcap(5.0), fa.alibi_bias(jnp.ones(3))), r"slopes \[3\]")):
        with pytest.raises(ValueError, match=f"score_mod reads {what}, which covers a query head count of "
                                             r"\d, but the query head count here is 4"):
            fa.flex_attention(Q, K, V, score_mod=score_mod, enable_gqa=True)
    # Arrays reaching at least as far serve.
    fa.flex_attention(Q, K, V, score_mod=fa.alibi_bias(jnp.ones(4)), enable_gqa=True)
    fa.create_block_mask(short_ids, None, None, 16, 16, BLOCK_SIZE=8)


def test_pytorch_kernel_options_are_put_in_our_terms():
    """PyTorch FlexAttention's names of our knobs, its hints and FORCE_USE_FLEX_ATTENTION are taken; the kernels
    then run with our keys (here a forward tile of 16 queries on the Triton kernel, in interpret mode, and the
    decode kernel turned off for a short query)."""
    from flexattn_jax import _validation

    torch_options = {"fwd_BLOCK_M": 16, "fwd_BLOCK_N": 16, "fwd_num_warps": 4, "bwd_BLOCK_M1": 32, "bwd_num_warps": 4,
                     "ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": False, "PRESCALE_QK": True,
                     "USE_TMA": True, "FORCE_USE_FLEX_ATTENTION": True, "BACKEND": "AUTO"}
    assert _validation.pytorch_kernel_options(torch_options) == {
        "BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "BLOCK_M1": 32, "bwd_num_warps": 4, "decode_enable": 0}
    assert _validation.pytorch_kernel_options({"FORCE_USE_FLEX_ATTENTION": False}) == {}
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, 16, 24, BLOCK_SIZE=16)
    for q_len in (16, 1):
        q = Q[:, :, :q_len]
        bm = block_mask if q_len == 16 else block_mask.adjust(1, 24)
        expected = fa.flex_attention(q, K, V, block_mask=bm, enable_gqa=True, implementation="reference")
        got = fa.flex_attention(q, K, V, block_mask=bm, enable_gqa=True, implementation="pallas_triton",
                                interpret=True, kernel_options={"fwd_BLOCK_M": 16, "FORCE_USE_FLEX_ATTENTION": True,
                                                                "ROWS_GUARANTEED_SAFE": True})
        assert_close(got, expected, jnp.float32, f"L={q_len}")


@pytest.mark.parametrize("implementation,interpret", [("reference", False), ("pallas_triton", True)])
def test_key_and_value_of_batch_one_are_shared_by_every_query_batch(implementation, interpret):
    """As PyTorch allows: the same output as the keys and values repeated per batch, and their gradients the sum
    over the batches, with a mask that differs per batch."""
    B, Hq, Hkv, L, S = 3, 4, 2, 32, 48
    q = jax.random.normal(jax.random.key(0), (B, Hq, L, 16))
    k, v = (jax.random.normal(jax.random.key(i), (1, Hkv, S, 16)) for i in (1, 2))
    bm = fa.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + 8 * b, B, None, L, S, BLOCK_SIZE=16)

    def loss(q, k, v, repeat):
        if repeat:
            k, v = (jnp.repeat(x, B, axis=0) for x in (k, v))
        out = fa.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, implementation=implementation,
                                interpret=interpret)
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
    (_, expected), expected_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, True)
    assert_close(out, expected, jnp.float32)
    for name, got, want in zip("qkv", grads, expected_grads):
        assert got.shape == want.shape
        assert_close(got, want, jnp.float32, f"d{name}")
    assert fa.explain_implementation(q, k, v, block_mask=bm, enable_gqa=True).implementation == "reference"
    with pytest.raises(ValueError, match=r"same batch size \(or key and value a batch size of 1"):
        fa.flex_attention(q, jnp.repeat(k, 2, axis=0), jnp.repeat(v, 2, axis=0), enable_gqa=True)


@pytest.mark.parametrize("Hkv", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("kv_batch_loop", [0, 1])
@pytest.mark.parametrize("L", [1, 40], ids=["decode", "prefill"])
def test_key_and_value_of_batch_one_are_read_without_copies(L, kv_batch_loop, Hkv):
    """B query batches over one shared cache, decoding (one query each, the decode kernel) or prefilling: the
    pallas_triton forward kernels read key and value of batch 1, with no copy per batch, and so do its backward
    kernels with ``bwd_kv_batch_loop`` (each dK/dV program adds up every query batch); all match the reference,
    gradients included."""
    B, Hq, S = 3, 4, 96
    q = jax.random.normal(jax.random.key(0), (B, Hq, L, 16))
    k, v = (jax.random.normal(jax.random.key(i), (1, Hkv, S, 16)) for i in (1, 2))
    lengths = jnp.array([10, 96, 50], jnp.int32)
    bm = fa.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b] - q_idx, B, None, L, S,
                              BLOCK_SIZE=(L if L == 1 else 16, 32))
    run = functools.partial(fa.flex_attention, block_mask=bm, score_mod=fa.rel_bias, enable_gqa=True,
                            implementation="pallas_triton", interpret=True,
                            kernel_options={"bwd_kv_batch_loop": kv_batch_loop})

    def copies(jaxpr):  # the equations that make a [B, ...] array of the keys or values
        found = []
        for eqn in jaxpr.eqns:
            found += [eqn.primitive.name for out in eqn.outvars if getattr(out.aval, "shape", ())[:3] == (B, Hkv, S)]
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                found += copies(sub)
        return found

    assert copies(jax.make_jaxpr(run)(q, k, v).jaxpr) == []
    gradient = jax.grad(lambda q, k, v: jnp.sum(run(q, k, v)), argnums=(0, 1, 2))
    assert (copies(jax.make_jaxpr(gradient)(q, k, v).jaxpr) == []) == bool(kv_batch_loop)

    def loss(implementation, q, k, v):
        out = run(q, k, v) if implementation else fa.flex_attention(
            q, jnp.repeat(k, B, axis=0), jnp.repeat(v, B, axis=0), block_mask=bm, score_mod=fa.rel_bias,
            enable_gqa=True, implementation="reference")
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.value_and_grad(functools.partial(loss, True), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, want), want_grads = jax.value_and_grad(functools.partial(loss, False), argnums=(0, 1, 2), has_aux=True)(
        q, k, v)
    assert_close(out, want, jnp.float32)
    for name, got, expected in zip("qkv", grads, want_grads):
        assert got.shape == expected.shape
        assert_close(got, expected, jnp.float32, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("implementation,options", [(None, None), ("pallas_triton", None),
                                                    ("pallas_triton", {"bwd_kv_batch_loop": 1})],
                         ids=["default", "pallas_triton", "pallas_triton-kv-batch-loop"])
@pytest.mark.parametrize("L", [512, 1], ids=["prefill", "decode"])
def test_gpu_key_and_value_of_batch_one_on_the_default_kernels(L, implementation, options):
    """On the GPU, where a kernel reading past key and value of batch 1 would read other memory (interpret mode
    clamps the block index and cannot tell); the Triton backward also with its batch loop."""
    B, Hq, Hkv, S = 3, 4, 2, 512
    q = jax.random.normal(jax.random.key(0), (B, Hq, L, 128)).astype(jnp.bfloat16)
    k, v = (jax.random.normal(jax.random.key(i), (1, Hkv, S, 128)).astype(jnp.bfloat16) for i in (1, 2))
    # Decoding: one query at the cache's end, the decode kernel reading the one shared copy.
    bm = fa.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + (S - L), None, None, L, S)

    def loss(implementation, q, k, v):
        out = fa.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, implementation=implementation,
                                kernel_options=options)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    (_, out), got = jax.value_and_grad(functools.partial(loss, implementation), (0, 1, 2), has_aux=True)(q, k, v)
    (_, ref), want = jax.value_and_grad(functools.partial(loss, "reference"), (0, 1, 2), has_aux=True)(q, k, v)
    assert_close(out, ref, jnp.bfloat16, "out")
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape
        assert_close(g, w, jnp.bfloat16, f"d{name}")


def test_eager_calls_alike_compile_the_kernels_once(monkeypatch):
    """Outside any trace a Pallas implementation runs through a kept jit function, keyed by the mods' jaxprs and
    the contents of the arrays they close over: mods built afresh with the same contents reuse it (the kernels are
    traced once), and a changed array gives a new result, never the old one."""
    from flexattn_jax import api

    traced = []
    attention = api.pallas_triton.attention
    monkeypatch.setattr(api.pallas_triton, "attention", lambda *a, **k: traced.append(1) or attention(*a, **k))
    monkeypatch.setattr(api, "_EAGER_CALLS", {})
    q, k, v = random_qkv(0, B=1, Hq=2, Hkv=2, L=64, S=80, E=16, Ev=16, dtype=jnp.float32)
    ids = jnp.repeat(jnp.arange(4), 20)
    block_mask = fa.create_block_mask(fa.document_mask(ids), None, None, 64, 80, BLOCK_SIZE=16)

    def run(bias, implementation="pallas_triton"):
        return fa.flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + bias[h] * (kv_idx - q_idx).astype(jnp.float32),
                                 block_mask=block_mask, return_lse=True, implementation=implementation,
                                 interpret=implementation == "pallas_triton")

    for bias in (jnp.array([0.1, -0.2]), jnp.array([0.1, -0.2]), jnp.array([0.3, 0.0])):
        out, lse = run(bias)
        want_out, want_lse = run(bias, "reference")
        assert_close(out, want_out, jnp.float32)
        assert_close(lse, want_lse, jnp.float32)
    assert len(traced) == 2  # the second bias has the first's contents
    # Inside a trace the call is traced as before.
    jax.jit(lambda q: fa.flex_attention(q, k, v, implementation="pallas_triton", interpret=True))(q)
    assert len(traced) == 3
