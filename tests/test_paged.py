"""The paged KV cache: allocation and release, token assignment with ragged lengths, the logical-to-physical
BlockMask conversion, attention on the pages against contiguous attention, and an NNX layer decoding with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flexattn_jax as fa
from flexattn_jax.nn.flax_nnx import FlexMultiHeadAttention
from flexattn_jax.paged import PagedKVCache
from tests._helpers import MOD_CASES_BY_NAME, assert_close
from tests.conftest import HAS_GPU

INTERPRET = not HAS_GPU
PS = 16  # page size


def _random(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _filled_cache(seed=0, B=3, Hkv=2, D=16, lengths_steps=((20, 3, 35), (1, 17, 0), (9, 9, 9))):
    """A cache filled in several ragged appends (so that the sequences' pages interleave in the pool), and the
    contiguous keys/values it should hold."""
    cache = PagedKVCache.create(B, num_pages=24, page_size=PS, max_pages_per_seq=6, num_kv_heads=Hkv, head_dim=D)
    ref_k = [np.zeros((0, Hkv, D), np.float32) for _ in range(B)]
    ref_v = [np.zeros((0, Hkv, D), np.float32) for _ in range(B)]
    for step, num_new in enumerate(lengths_steps):
        L = max(num_new)
        k = _random(seed + 2 * step, (B, L, Hkv, D))
        v = _random(seed + 2 * step + 1, (B, L, Hkv, D))
        cache = cache.append(k, v, num_new=jnp.array(num_new, jnp.int32))
        for b in range(B):
            ref_k[b] = np.concatenate([ref_k[b], np.asarray(k[b, : num_new[b]])])
            ref_v[b] = np.concatenate([ref_v[b], np.asarray(v[b, : num_new[b]])])
    return cache, ref_k, ref_v


def test_alloc_append_erase_reuse():
    cache, ref_k, _ = _filled_cache()
    lengths = [len(r) for r in ref_k]
    assert cache.lengths.tolist() == lengths == [30, 29, 44]
    table = np.asarray(cache.page_table)
    held = [(-(-n // PS)) for n in lengths]
    assert [(row >= 0).sum() for row in table] == held
    used = table[table >= 0]
    assert len(set(used.tolist())) == len(used)  # no page twice
    assert int(cache.num_free_pages) == 24 - sum(held)
    assert not np.asarray(cache.page_free)[used].any()
    # Pages interleave: sequence 1's second page is not next to its first.
    assert table[1, 1] != table[1, 0] + 1

    erased = cache.erase(jnp.array([False, True, False]))
    assert erased.lengths.tolist() == [30, 0, 44]
    assert (np.asarray(erased.page_table)[1] == -1).all()
    assert int(erased.num_free_pages) == 24 - held[0] - held[2]
    # The freed pages are reused (lowest first).
    again = erased.reserve(jnp.array([30, 40, 44], jnp.int32))
    lowest_free = np.flatnonzero(np.asarray(erased.page_free))[:3]
    assert np.asarray(again.page_table)[1, :3].tolist() == lowest_free.tolist()
    assert int(again.num_free_pages) == int(erased.num_free_pages) - 3
    np.testing.assert_array_equal(np.asarray(again.page_table)[[0, 2]], table[[0, 2]])


def test_gather_matches_contiguous_and_append_jits():
    cache, ref_k, ref_v = _filled_cache()
    key, value = cache.gather()
    for b in range(3):
        n = len(ref_k[b])
        np.testing.assert_array_equal(np.asarray(key[b, :, :n]), np.swapaxes(ref_k[b], 0, 1))
        np.testing.assert_array_equal(np.asarray(value[b, :, :n]), np.swapaxes(ref_v[b], 0, 1))
    # One more token per sequence, under jit: the same as eagerly.
    k1, v1 = _random(50, (3, 1, 2, 16)), _random(51, (3, 1, 2, 16))
    eager = cache.append(k1, v1)
    jitted = jax.jit(lambda c, k, v: c.append(k, v))(cache, k1, v1)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert eager.lengths.tolist() == [31, 30, 45]


def test_convert_logical_block_mask_visits_the_same_positions():
    cache, _, _ = _filled_cache()
    lengths = cache.lengths

    def causal_in_length(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & (kv_idx <= q_idx + 28)

    logical = fa.create_block_mask(causal_in_length, 3, None, 2, cache.max_length, BLOCK_SIZE=(128, PS))
    physical = cache.convert_logical_block_mask(logical)
    assert physical.seq_lengths == (2, 24 * PS)
    dense = np.asarray(fa.create_mask(physical.mask_mod, 3, 1, 2, 24 * PS))  # [B, 1, 2, rows]
    block_dense = np.asarray(physical.to_dense())
    table = np.asarray(cache.page_table)
    for b in range(3):
        for j in range(cache.max_pages_per_seq):
            page = table[b, j]
            logical_rows = np.arange(j * PS, (j + 1) * PS)
            want = (logical_rows[None, :] < int(lengths[b])) & (logical_rows[None, :] <= np.arange(2)[:, None] + 28)
            if page < 0:
                assert not want.any()
                continue
            np.testing.assert_array_equal(dense[b, 0, :, page * PS : (page + 1) * PS], want)
            assert block_dense[b, 0, 0, page] == int(want.any())


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
@pytest.mark.parametrize("case", ["causal", "alibi_learned_slopes", "document_batched", "relative_bias_table"])
def test_paged_attention_matches_contiguous(case, implementation):
    # Ragged lengths in one batch; 2 queries per sequence at its last positions; GQA 4:2.
    cache, _, _ = _filled_cache()
    B, Hq, L = 3, 4, 2
    lengths = cache.lengths
    mask_mod, score_mod = MOD_CASES_BY_NAME[case].build(B, Hq, L, cache.max_length, 3)
    mask_mod = mask_mod or fa.noop_mask
    offset = lengths - L

    def mask(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & mask_mod(b, h, q_idx + offset[b], kv_idx)

    def score(s, b, h, q_idx, kv_idx):
        return s if score_mod is None else score_mod(s, b, h, q_idx + offset[b], kv_idx)

    logical = fa.create_block_mask(mask, B, None, L, cache.max_length, BLOCK_SIZE=(128, PS))
    q = _random(60, (B, Hq, L, 16))
    out, lse = cache.attention(q, score_mod=score, block_mask=logical, return_lse=True,
                               implementation=implementation, interpret=implementation != "reference",
                               kernel_options={"decode_num_splits": 3})
    key, value = cache.gather()
    ref_out, ref_lse = fa.flex_attention(q, key, value, score_mod=score, block_mask=logical, enable_gqa=True,
                                         return_lse=True, implementation="reference")
    assert_close(out, ref_out, jnp.float32, "out")
    assert_close(lse, ref_lse, jnp.float32, "lse")


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_paged_return_aux_matches_contiguous(implementation):
    # The decode kernel (pallas_triton) and the gathered reference path; rows with (q_idx + h + b) % 3 == 0 attend
    # nowhere, so their max_scores are -inf.
    cache, _, _ = _filled_cache()
    B, Hq, L = 3, 4, 2
    lengths = cache.lengths

    def mask(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & ((q_idx + h + b) % 3 != 0)

    logical = fa.create_block_mask(mask, B, Hq, L, cache.max_length, BLOCK_SIZE=(128, PS))
    request = fa.AuxRequest(lse=True, max_scores=True)
    kwargs = dict(score_mod=fa.rel_bias, block_mask=logical, return_aux=request)
    q = _random(62, (B, Hq, L, 16))
    out, aux = cache.attention(q, **kwargs, implementation=implementation, interpret=implementation != "reference",
                               kernel_options={"decode_num_splits": 3})
    key, value = cache.gather()
    ref_out, ref_aux = fa.flex_attention(q, key, value, **kwargs, enable_gqa=True, implementation="reference")
    assert_close(out, ref_out, jnp.float32, "out")
    assert_close(aux.lse, ref_aux.lse, jnp.float32, "lse")
    assert_close(aux.max_scores, ref_aux.max_scores, jnp.float32, "max_scores")
    b, h, q_idx = np.meshgrid(np.arange(B), np.arange(Hq), np.arange(L), indexing="ij")
    masked_rows = (q_idx + h + b) % 3 == 0
    assert np.all(np.asarray(aux.max_scores)[masked_rows] == -np.inf)
    assert np.isfinite(np.asarray(aux.max_scores)[~masked_rows]).all()
    if implementation == "reference":  # the decode kernel is for inference; the gathered path is differentiable
        ct = _random(63, out.shape)

        def loss(attend, q):
            out, aux = attend(q)
            return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(aux.lse), aux.lse, 0.0))

        grad = jax.grad(loss, argnums=1)(lambda q: cache.attention(q, **kwargs, implementation="reference"), q)
        ref_grad = jax.grad(loss, argnums=1)(
            lambda q: fa.flex_attention(q, key, value, **kwargs, enable_gqa=True, implementation="reference"), q
        )
        assert np.isfinite(np.asarray(grad)).all()
        assert_close(grad, ref_grad, jnp.float32, "dq")


def test_paged_return_aux_with_return_lse_is_refused():
    cache = PagedKVCache.create(1, num_pages=2, page_size=PS, max_pages_per_seq=2, num_kv_heads=1, head_dim=8)
    q = _random(64, (1, 2, 1, 8))
    with pytest.raises(ValueError, match="return_lse=True or return_aux, not both"):
        cache.attention(q, return_lse=True, return_aux=fa.AuxRequest(lse=True))


def test_paged_decode_kernel_reads_the_pool_directly():
    cache, _, _ = _filled_cache()
    q = _random(61, (3, 4, 1, 16))
    lengths = cache.lengths
    bm = fa.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b], 3, None, 1, cache.max_length,
                              BLOCK_SIZE=(128, PS))
    jaxpr = str(jax.make_jaxpr(lambda q: cache.attention(q, block_mask=bm, implementation="pallas_triton",
                                                         interpret=True))(q))
    assert "flex_attention_decode" in jaxpr


def test_block_mask_with_another_kv_block_is_refused():
    cache, _, _ = _filled_cache()
    bm = fa.create_block_mask(fa.causal_mask, None, None, 1, cache.max_length, BLOCK_SIZE=(128, 32))
    with pytest.raises(ValueError, match="page size"):
        cache.convert_logical_block_mask(bm)
    for implementation in ("reference", "pallas_triton"):  # the gathering path as well as the decode kernel's
        with pytest.raises(ValueError, match="page size"):
            cache.attention(_random(67, (3, 4, 1, 16)), block_mask=bm, implementation=implementation,
                            interpret=True)


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_every_path_attends_the_same_positions(implementation):
    # Sequences of 30, 29 and 44 positions hold 2, 2 and 3 of their 6 logical pages. The default (no BlockMask)
    # attends each sequence's own positions; a mask that does not limit kv_idx to the lengths still never attends a
    # page nobody holds, whether the decode kernel reads the pool or the keys are gathered (zeros there).
    cache, ref_k, ref_v = _filled_cache()
    q = _random(68, (3, 4, 1, 16))
    run = dict(implementation=implementation, interpret=implementation == "pallas_triton")
    out = cache.attention(q, score_mod=fa.rel_bias, **run)
    for b in range(3):
        k = jnp.asarray(ref_k[b])[None].swapaxes(1, 2)
        v = jnp.asarray(ref_v[b])[None].swapaxes(1, 2)
        alone = fa.flex_attention(q[b : b + 1], k, v, score_mod=fa.rel_bias, enable_gqa=True,
                                  implementation="reference")
        assert_close(out[b : b + 1], alone, jnp.float32, f"sequence {b}")

    everything = fa.create_block_mask(fa.noop_mask, None, None, 1, cache.max_length, BLOCK_SIZE=(128, PS))
    out, lse = cache.attention(q, block_mask=everything, return_lse=True, **run)
    held_rows = (cache.page_table >= 0).sum(axis=1) * PS  # every held page is at the sequence's start here
    key, value = cache.gather()
    for b in range(3):
        n = int(held_rows[b])
        alone, alone_lse = fa.flex_attention(q[b : b + 1], key[b : b + 1, :, :n], value[b : b + 1, :, :n],
                                             enable_gqa=True, return_lse=True, implementation="reference")
        assert_close(out[b : b + 1], alone, jnp.float32, f"sequence {b}")
        assert_close(lse[b : b + 1], alone_lse, jnp.float32, f"lse of sequence {b}")


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_nnx_layer_decodes_with_the_paged_cache(implementation):
    B, T, F = 2, 9, 32
    layer = FlexMultiHeadAttention(
        F, 4, num_kv_heads=2, use_rope=True, mask_mod=fa.causal_mask, score_mod=fa.generate_alibi_bias(4),
        implementation=implementation, interpret=implementation != "reference", rngs=nnx.Rngs(0),
    )
    x = _random(70, (B, T, F))
    full = nnx.jit(lambda m, x: m(x))(layer, x)
    cache = PagedKVCache.create(B, num_pages=8, page_size=PS, max_pages_per_seq=2, num_kv_heads=2, head_dim=8)
    layer.init_cache(cache=cache)
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outputs = [step(layer, x[:, :5])] + [step(layer, x[:, t : t + 1]) for t in range(5, T)]
    assert layer.cache.get_value().lengths.tolist() == [T, T]
    assert_close(jnp.concatenate(outputs, axis=1), full, jnp.float32)


def test_nnx_layer_decodes_a_mask_reading_the_head_with_the_paged_cache():
    """Head 0 a window of 4, the others causal, without mask_varies: the cache's BlockMask has a block map per
    head (one built for head 0 alone skipped the first page for every head once the window left it)."""

    def local_or_global(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((h != 0) | (q_idx - kv_idx < 4))

    B, T, F = 2, 24, 16
    layer = FlexMultiHeadAttention(F, 4, num_kv_heads=2, head_dim=8, mask_mod=local_or_global, rngs=nnx.Rngs(0))
    x = _random(72, (B, T, F))
    full = layer(x)
    layer.init_cache(cache=PagedKVCache.create(B, num_pages=8, page_size=PS, max_pages_per_seq=2, num_kv_heads=2,
                                               head_dim=8))
    outputs = [layer(x[:, :8], decode=True)] + [layer(x[:, t : t + 1], decode=True) for t in range(8, T)]
    assert_close(jnp.concatenate(outputs, axis=1), full, jnp.float32)


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_a_mismatched_block_mask_is_refused_on_either_path(implementation):
    """The decode kernel's path checks the BlockMask as flex_attention does on the gather path."""
    cache, _, _ = _filled_cache()
    q = _random(63, (3, 4, 2, 16))
    run = dict(implementation=implementation, interpret=implementation == "pallas_triton")
    one_query = fa.create_block_mask(fa.causal_mask, None, None, 1, cache.max_length, BLOCK_SIZE=(1, PS))
    with pytest.raises(ValueError, match=r"block_mask was built for \(Q_LEN, KV_LEN\) = \(1, "):
        cache.attention(q, block_mask=one_query, **run)
    three_heads = fa.create_block_mask(fa.causal_mask, None, 3, 2, cache.max_length, BLOCK_SIZE=(2, PS))
    with pytest.raises(ValueError, match="block_mask has 3 heads; expected 1 or the query's head count Hq=4"):
        cache.attention(q, block_mask=three_heads, **run)
    with pytest.raises(ValueError, match="query must have rank 4"):
        cache.attention(q[0], **run)


def test_gradients_through_the_decode_kernel_are_refused_with_the_way_out():
    cache, _, _ = _filled_cache()
    q = _random(65, (3, 4, 1, 16))

    def loss(q, implementation):
        return jnp.sum(cache.attention(q, implementation=implementation, interpret=True) ** 2)

    with pytest.raises(ValueError, match="decode kernel .* is not differentiable; for gradients pass"):
        jax.grad(loss)(q, "pallas_triton")
    assert bool(jnp.all(jnp.isfinite(jax.grad(loss)(q, "reference"))))

    # An array the score_mod closes over never passes through attention's arguments: the kernel traces it.
    def bias_loss(table, implementation):
        def biased(score, b, h, q_idx, kv_idx):
            return score + table[h]

        out = cache.attention(q, score_mod=biased, implementation=implementation, interpret=True)
        return jnp.sum(out**2)

    table = _random(66, (4,))
    with pytest.raises(ValueError, match="decode kernel .* is not differentiable; for gradients pass"):
        jax.grad(bias_loss)(table, "pallas_triton")
    assert bool(jnp.all(jnp.isfinite(jax.grad(bias_loss)(table, "reference"))))
    # Without a gradient the guard changes nothing.
    assert_close(bias_loss(table, "pallas_triton"), bias_loss(table, "reference"), jnp.float32, "loss")


def test_ragged_decode_step_matches_each_sequence_alone():
    # One decode step of a batch whose sequences have different lengths: each output equals attention over that
    # sequence's own prefix.
    cache, ref_k, ref_v = _filled_cache()
    k1, v1 = _random(80, (3, 1, 2, 16)), _random(81, (3, 1, 2, 16))
    cache = cache.append(k1, v1)
    q = _random(82, (3, 4, 1, 16))
    lengths = cache.lengths
    bm = fa.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b], 3, None, 1, cache.max_length,
                              BLOCK_SIZE=(128, PS))
    out = cache.attention(q, score_mod=fa.rel_bias, block_mask=bm, implementation="pallas_triton", interpret=True)
    for b in range(3):
        k = jnp.concatenate([jnp.asarray(ref_k[b]), k1[b]])[None].swapaxes(1, 2)
        v = jnp.concatenate([jnp.asarray(ref_v[b]), v1[b]])[None].swapaxes(1, 2)
        alone = fa.flex_attention(q[b : b + 1], k, v, score_mod=fa.rel_bias, enable_gqa=True,
                                  implementation="reference")
        assert_close(out[b : b + 1], alone, jnp.float32, f"sequence {b}")


def test_docstring_examples():
    import doctest

    from flexattn_jax import paged

    result = doctest.testmod(paged, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_haiku_and_linen_layers_decode_with_the_paged_cache():
    """The Haiku layer's ``kv_cache`` state and linen's ``cache`` collection take a PagedKVCache in place of the
    contiguous cache; decoding step by step then equals the full computation."""
    hk = pytest.importorskip("haiku")
    from flexattn_jax.flax import FlexMultiHeadAttentionLinen
    from flexattn_jax.haiku import FlexMultiHeadAttention as HaikuAttention

    B, T, F, H, HKV, D = 2, 9, 32, 4, 2, 8
    settings = dict(num_kv_heads=HKV, use_rope=True, mask_mod=fa.causal_mask, score_mod=fa.generate_alibi_bias(H))
    x = _random(90, (B, T, F))

    def paged():
        return PagedKVCache.create(B, num_pages=8, page_size=PS, max_pages_per_seq=2, num_kv_heads=HKV, head_dim=D)

    def decode_in_steps(step, state):
        outputs = []
        for start, stop in [(0, 5)] + [(t, t + 1) for t in range(5, T)]:
            out, state = step(state, x[:, start:stop])
            outputs.append(out)
        return jnp.concatenate(outputs, axis=1), state

    # Haiku: the cache is the module's state "kv_cache".
    layer = hk.without_apply_rng(hk.transform_with_state(lambda x, decode=False: HaikuAttention(H, **settings)(
        x, decode=decode)))
    params, state = layer.init(jax.random.key(0), x, decode=True)
    (name,) = state
    full, _ = jax.jit(layer.apply)(params, {}, x)
    state = {name: {"kv_cache": paged()}}
    step = jax.jit(lambda state, tokens: layer.apply(params, state, tokens, decode=True))
    out, state = decode_in_steps(step, state)
    assert state[name]["kv_cache"].lengths.tolist() == [T, T]
    assert_close(out, full, jnp.float32)

    # linen: the cache is the variable "kv_cache" of the "cache" collection.
    module = FlexMultiHeadAttentionLinen(num_heads=H, **settings)
    variables = module.init(jax.random.key(1), x)
    full = jax.jit(module.apply)(variables, x)

    @jax.jit
    def linen_step(cache, tokens):
        out, mutated = module.apply({**variables, "cache": cache}, tokens, decode=True, mutable=["cache"])
        return out, mutated["cache"]

    out, cache = decode_in_steps(linen_step, {"kv_cache": paged()})
    assert cache["kv_cache"].lengths.tolist() == [T, T]
    assert_close(out, full, jnp.float32)


def test_ragged_cache_gives_each_sequence_its_own_rotary_positions():
    from flexattn_jax.nn import rotary_embedding

    cache, _, _ = _filled_cache()
    positions = cache.query_positions(2)
    assert positions.tolist() == [[int(n), int(n) + 1] for n in cache.lengths]
    assert len(set(cache.lengths.tolist())) > 1, "the lengths are ragged"
    x = _random(95, (3, 2, 4, 8))
    rotated = rotary_embedding(x, positions)
    for b in range(3):
        assert_close(rotated[b], rotary_embedding(x[b : b + 1], positions[b])[0], jnp.float32)


def _small_cache(filled=20):
    """Two sequences of ``filled`` positions, one kv head of dim 16, max_length 64."""
    cache = PagedKVCache.create(2, num_pages=8, page_size=PS, max_pages_per_seq=4, num_kv_heads=1, head_dim=16)
    kv = _random(100, (2, filled, 1, 16))
    return cache.append(kv, kv)


def test_create_refuses_a_dtype_the_kernels_do_not_take():
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16, float16, got .*int32"):
        PagedKVCache.create(2, num_pages=8, page_size=PS, max_pages_per_seq=4, num_kv_heads=1, head_dim=16,
                            dtype=jnp.int32)


def test_append_checks_num_new():
    cache = PagedKVCache.create(2, num_pages=8, page_size=PS, max_pages_per_seq=4, num_kv_heads=1, head_dim=16)
    kv = _random(101, (2, 20, 1, 16))
    for bad, error in ((3, ValueError), (jnp.array([3, 5, 1]), ValueError), (jnp.array([3.0, 5.0]), TypeError)):
        with pytest.raises(error, match=r"num_new must be an int array \[B\] = \[2\]"):
            cache.append(kv, kv, num_new=bad)
    # More than the L tokens given would count positions never written; a negative count a negative length.
    for bad in ([30, 5], [-3, 5]):
        with pytest.raises(ValueError, match=r"num_new must be from 0 to L=20 .* got \[" + str(bad[0])):
            cache.append(kv, kv, num_new=jnp.array(bad))
    with pytest.raises(ValueError, match="the cache addresses max_length=64 positions per sequence"):
        cache.append(_random(102, (2, 70, 1, 16)), _random(103, (2, 70, 1, 16)))
    full = cache.append(kv, kv).append(kv, kv).append(kv, kv).append(kv, kv, num_new=jnp.array([4, 0]))
    assert full.lengths.tolist() == [64, 60]  # up to max_length exactly is fine
    with pytest.raises(ValueError, match=r"would give \[65, 61\]"):
        full.append(kv, kv, num_new=[1, 1])
    with pytest.raises(TypeError, match="key must be a floating array"):
        cache.append(kv.astype(jnp.int32), kv)
    # Under jit the values cannot be read: a traced num_new is checked for its shape and dtype only.
    step = jax.jit(lambda c, k, n: c.append(k, k, num_new=n))
    assert step(cache, kv, jnp.array([20, 3])).lengths.tolist() == [20, 3]
    with pytest.raises(TypeError, match="num_new must be an int array"):
        step(cache, kv, jnp.array([20.0, 3.0]))


def test_erase_takes_a_bool_mask_and_reserve_int_lengths():
    cache = _small_cache()
    # Indices [0, 1] ("sequences 0 and 1") cast to bool would erase sequence 1 alone.
    with pytest.raises(TypeError, match=r"sequences must be a bool mask \[B\] = \[2\] .* got int32\[2\]; to erase"):
        cache.erase(jnp.array([0, 1]))
    for bad in (True, jnp.array([True, False, True])):
        with pytest.raises(ValueError, match=r"sequences must be a bool mask \[B\] = \[2\]"):
            cache.erase(bad)
    assert cache.erase([True, False]).lengths.tolist() == [0, 20]
    assert jax.jit(lambda c, s: c.erase(s))(cache, jnp.array([False, True])).lengths.tolist() == [20, 0]

    for bad, error in ((16, ValueError), (jnp.array([16, 16, 16]), ValueError), (jnp.array([16.0, 16.0]), TypeError)):
        with pytest.raises(error, match=r"new_lengths must be an int array \[B\] = \[2\]"):
            cache.reserve(bad)
    with pytest.raises(ValueError, match=r"new_lengths must be from 0 to max_length=64 .* got \[65, 16\]"):
        cache.reserve(jnp.array([65, 16]))
    assert (cache.reserve(jnp.array([64, 16])).page_table >= 0).sum(axis=1).tolist() == [4, 2]


def test_paged_attention_checks_implementation():
    cache = _small_cache()
    q = _random(104, (2, 2, 1, 16))
    for typo in ("Reference", "triton"):
        with pytest.raises(ValueError, match=r"implementation must be None or one of \('reference', "):
            cache.attention(q, implementation=typo, interpret=True)
    # pallas_mosaic has no interpret mode and no decode kernel: flex_attention on the gathered keys says so, where
    # the Triton decode kernel had run in its place.
    with pytest.raises(ValueError, match="implementation='pallas_mosaic' cannot serve these inputs: .*no interpret"):
        cache.attention(q, implementation="pallas_mosaic", interpret=True)
    if not HAS_GPU:
        with pytest.raises(ValueError, match="implementation='pallas_triton' needs a CUDA GPU"):
            cache.attention(q, implementation="pallas_triton")


@pytest.mark.parametrize("implementation", ["reference", "pallas_triton"])
def test_paged_attention_checks_its_arguments_on_either_path(implementation):
    """The decode kernel's path checks scale, score_mod, kernel_options and the query as flex_attention does."""
    cache = _small_cache()
    q = _random(105, (2, 2, 1, 16))
    run = dict(implementation=implementation, interpret=implementation == "pallas_triton")
    bad_arguments = (
        (dict(scale="0.5"), TypeError, "scale must be a Python float or None, got str"),
        (dict(score_mod=3), TypeError, "score_mod must be a callable"),
        (dict(score_mod=lambda s, b, h, q_idx, kv_idx: q_idx), TypeError, "score_mod must return a floating scalar"),
        (dict(kernel_options={"BLOCK_MM": 16}), ValueError, "kernel_options has an unknown key 'BLOCK_MM'"),
        (dict(kernel_options={"BLOCK_M": 8}), ValueError, r"kernel_options\['BLOCK_M'\] must be a power of two"),
        (dict(kernel_options=[1]), TypeError, "kernel_options must be a dict or None, got list"),
    )
    for arguments, error, message in bad_arguments:
        with pytest.raises(error, match=message):
            cache.attention(q, **arguments, **run)
    with pytest.raises(TypeError, match="query must be float32, bfloat16 or float16, got int32"):
        cache.attention(q.astype(jnp.int32), **run)
    with pytest.raises(ValueError, match=r"query must not have an empty axis, got shape \(2, 2, 0, 16\)"):
        cache.attention(jnp.zeros((2, 2, 0, 16)), **run)
