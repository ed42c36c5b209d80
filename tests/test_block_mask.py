"""BlockMask invariants (property tests), constructors, conversions and methods."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flexattn_jax as fa
from tests._helpers import assert_close


@st.composite
def dense_masks(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 3))
    q_len = draw(st.integers(1, 23))
    kv_len = draw(st.integers(1, 29))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    mask = np.random.default_rng(seed).random((b, h, q_len, kv_len)) < density
    # Make whole blocks all-true sometimes, so full blocks appear.
    if draw(st.booleans()):
        mask[..., : q_len // 2, : kv_len // 2] = True
    q_block = draw(st.integers(1, 8))
    kv_block = draw(st.integers(1, 8))
    return mask, (q_block, kv_block)


def _expected_maps(mask, q_block, kv_block):
    b, h, q_len, kv_len = mask.shape
    qb, kvb = -(-q_len // q_block), -(-kv_len // kv_block)
    padded = np.zeros((b, h, qb * q_block, kvb * kv_block), bool)
    padded[..., :q_len, :kv_len] = mask
    blocks = padded.reshape(b, h, qb, q_block, kvb, kv_block)
    return blocks.any(axis=(3, 5)), blocks.all(axis=(3, 5))


def _check_index_arrays(num_blocks, indices, block_map):
    num_blocks, indices, block_map = (np.asarray(x) for x in (num_blocks, indices, block_map))
    assert num_blocks.dtype == np.int32 and indices.dtype == np.int32
    np.testing.assert_array_equal(num_blocks, block_map.sum(-1))
    for index in np.ndindex(num_blocks.shape):
        n = num_blocks[index]
        listed = indices[index][:n]
        np.testing.assert_array_equal(listed, np.flatnonzero(block_map[index]))
        # Padding entries are valid block numbers too (kernels may read them).
        assert np.all((indices[index] >= 0) & (indices[index] < block_map.shape[-1]))
        assert sorted(indices[index].tolist()) == list(range(block_map.shape[-1]))


def _check_invariants(block_mask, mask, q_block, kv_block):
    any_map, all_map = _expected_maps(mask, q_block, kv_block)
    partial, full = (np.asarray(m) for m in block_mask.block_maps())
    np.testing.assert_array_equal(np.asarray(block_mask.to_dense()), any_map.astype(np.int32))
    np.testing.assert_array_equal(full, all_map)
    np.testing.assert_array_equal(partial, any_map & ~all_map)
    _check_index_arrays(block_mask.kv_num_blocks, block_mask.kv_indices, partial)
    _check_index_arrays(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, full)
    _check_index_arrays(block_mask.q_num_blocks, block_mask.q_indices, np.swapaxes(partial, -1, -2))
    _check_index_arrays(block_mask.full_q_num_blocks, block_mask.full_q_indices, np.swapaxes(full, -1, -2))
    assert block_mask.shape == mask.shape
    assert block_mask.BLOCK_SIZE == (q_block, kv_block)


def _allowed_positions(block_mask):
    """The element-level mask a BlockMask defines: full | (partial & mask_mod)."""
    b, h, q_len, kv_len = block_mask.shape
    partial, full = (np.asarray(m) for m in block_mask.block_maps())
    q_block, kv_block = block_mask.BLOCK_SIZE
    qi, ki = np.arange(q_len) // q_block, np.arange(kv_len) // kv_block
    by_mod = np.asarray(fa.create_mask(block_mask.mask_mod, b, h, q_len, kv_len))
    return full[:, :, qi][:, :, :, ki] | (partial[:, :, qi][:, :, :, ki] & by_mod)


@settings(max_examples=12)  # each example compiles anew
@given(dense_masks())
def test_create_block_mask_invariants(example):
    mask, (q_block, kv_block) = example
    b, h, q_len, kv_len = mask.shape
    dense = jnp.asarray(mask)

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx, kv_idx]

    block_mask = fa.create_block_mask(mask_mod, b, h, q_len, kv_len, BLOCK_SIZE=(q_block, kv_block))
    _check_invariants(block_mask, mask, q_block, kv_block)
    np.testing.assert_array_equal(_allowed_positions(block_mask), mask)


@settings(max_examples=12)  # each example compiles anew
@given(dense_masks())
def test_from_dense_round_trips_and_matches_create_block_mask(example):
    mask, (q_block, kv_block) = example
    block_mask = fa.create_block_mask_from_dense(jnp.asarray(mask), BLOCK_SIZE=(q_block, kv_block))
    _check_invariants(block_mask, mask, q_block, kv_block)
    np.testing.assert_array_equal(_allowed_positions(block_mask), mask)
    # The seed's conversions: block map of the mask, and back to a mask covering it.
    block_map = fa.convert_mask_to_block_mask(jnp.asarray(mask), KV_BLOCK_SIZE=kv_block, Q_BLOCK_SIZE=q_block)
    np.testing.assert_array_equal(np.asarray(block_map), _expected_maps(mask, q_block, kv_block)[0])
    expanded = np.asarray(fa.convert_block_mask_to_mask(block_map, KV_BLOCK_SIZE=kv_block, Q_BLOCK_SIZE=q_block))
    assert np.all(expanded[..., : mask.shape[2], : mask.shape[3]] >= mask)


@settings(max_examples=12)  # each example compiles anew
@given(dense_masks())
def test_from_kv_blocks_derives_the_q_side(example):
    mask, (q_block, kv_block) = example
    built = fa.create_block_mask_from_dense(jnp.asarray(mask), BLOCK_SIZE=(q_block, kv_block))
    rebuilt = jax.jit(
        lambda a, b, c, d: fa.BlockMask.from_kv_blocks(a, b, c, d, BLOCK_SIZE=(q_block, kv_block),
                                                       seq_lengths=mask.shape[2:])
    )(built.kv_num_blocks, built.kv_indices, built.full_kv_num_blocks, built.full_kv_indices)
    for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices", "kv_indices"):
        np.testing.assert_array_equal(np.asarray(getattr(rebuilt, name)), np.asarray(getattr(built, name)))


@settings(max_examples=12)  # each example compiles anew
@given(dense_masks(), st.data())
def test_query_block_selections_and_cuts_keep_the_invariants(example, data):
    """A slice of query blocks, then a cut to shorter lengths: the allowed positions are the dense mask's region.
    The cut keeps the blocks it had (as PyTorch's ``_adjust``; a block whose allowed positions all lie past the
    cut stays partial, and mask_mod rules its positions out), so its block map covers the region's, and a block
    it calls full is full in the region."""
    mask, (q_block, kv_block) = example
    built = fa.create_block_mask_from_dense(jnp.asarray(mask), BLOCK_SIZE=(q_block, kv_block))
    num_q_blocks = built.num_blocks[0]
    start = data.draw(st.integers(0, num_q_blocks - 1))
    stop = data.draw(st.integers(start + 1, num_q_blocks))
    selected = built[:, :, start:stop]
    rows = mask[:, :, start * q_block:stop * q_block]
    assert selected.seq_lengths == (rows.shape[2], mask.shape[3])
    np.testing.assert_array_equal(_allowed_positions(selected), rows)
    new_q = data.draw(st.integers(1, rows.shape[2]))
    new_kv = data.draw(st.integers(1, mask.shape[3]))
    cut = selected.adjust(new_q, new_kv)
    region = rows[:, :, :new_q, :new_kv]
    np.testing.assert_array_equal(_allowed_positions(cut), region)
    any_map, all_map = _expected_maps(region, q_block, kv_block)
    partial, full = (np.asarray(m) for m in cut.block_maps())
    assert np.all(partial | full >= any_map) and np.all(full <= all_map) and not np.any(partial & full)
    _check_index_arrays(cut.kv_num_blocks, cut.kv_indices, partial)
    _check_index_arrays(cut.full_kv_num_blocks, cut.full_kv_indices, full)
    _check_index_arrays(cut.q_num_blocks, cut.q_indices, np.swapaxes(partial, -1, -2))
    _check_index_arrays(cut.full_q_num_blocks, cut.full_q_indices, np.swapaxes(full, -1, -2))


def test_causal_worked_example_from_the_docstring():
    bm = fa.create_block_mask(fa.causal_mask, None, None, 6, 6, BLOCK_SIZE=2)
    assert bm.kv_num_blocks.tolist() == [[[1, 1, 1]]]
    assert bm.kv_indices.tolist() == [[[[0, 1, 2], [1, 0, 2], [2, 0, 1]]]]
    assert bm.full_kv_num_blocks.tolist() == [[[0, 1, 2]]]
    assert bm.full_kv_indices.tolist() == [[[[0, 1, 2], [0, 1, 2], [0, 1, 2]]]]
    assert bm.q_num_blocks.tolist() == [[[1, 1, 1]]]
    assert bm.full_q_num_blocks.tolist() == [[[2, 1, 0]]]


def test_sparsity_to_string_and_repr():
    bm = fa.create_block_mask(fa.causal_mask, None, None, 512, 512, BLOCK_SIZE=128)
    assert bm.sparsity() == pytest.approx(100 * (1 - 10 / 16))
    text = bm.to_string()
    assert "█" in text and "▒" in text and "·" in text and "sparsity=37.50%" in text
    assert repr(bm) == text
    lines = text.splitlines()
    assert lines[2:] == ["▒···", "█▒··", "██▒·", "███▒"]


def test_to_string_shrinks_large_maps():
    bm = fa.create_block_mask(fa.sliding_window_mask(256), None, None, 8192, 8192, BLOCK_SIZE=128)
    rows = bm.to_string(grid_size=16).splitlines()[2:]
    assert len(rows) == 16 and all(len(r) == 16 for r in rows)


def test_broadcasting_b_and_h_none():
    bm = fa.create_block_mask(fa.causal_mask, None, None, 64, 64, BLOCK_SIZE=16)
    assert bm.shape == (1, 1, 64, 64)
    assert bm.kv_indices.shape == (1, 1, 4, 4)


def test_getitem_selects_batch_and_heads_keeping_rank():
    def per_head(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < 8 * (h + 1) + b)

    bm = fa.create_block_mask(per_head, 2, 3, 64, 64, BLOCK_SIZE=8)
    one = bm[1, 2]
    assert one.shape == (1, 1, 64, 64)
    np.testing.assert_array_equal(np.asarray(one.to_dense()[0, 0]), np.asarray(bm.to_dense()[1, 2]))
    heads = bm[:, 1:]
    assert heads.shape == (2, 2, 64, 64)
    np.testing.assert_array_equal(np.asarray(heads.q_indices), np.asarray(bm.q_indices[:, 1:]))
    assert bm[-1].shape == (1, 3, 64, 64)
    with pytest.raises(IndexError):
        bm[5]
    with pytest.raises(IndexError):
        bm[0, 0, 0, 0]
    with pytest.raises(IndexError, match="empty"):
        bm[1:1]


def _per_batch_documents_and_per_head_windows(B, H, L, seed):
    ids = jnp.sort(jax.random.randint(jax.random.key(seed), (B, L), 0, 3), axis=-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return (ids[b, q_idx] == ids[b, kv_idx]) & (q_idx - kv_idx <= 8 * (h + 1))

    return mask_mod


@pytest.mark.parametrize("index", [1, (2, 3), (slice(None, None, -1), slice(1, 4, 2)), (slice(1, 3), -1)],
                         ids=["b", "b,h", "reversed,stepped", "slice,last"])
def test_a_selection_evaluates_its_mask_mod_at_the_original_batches_and_heads(index):
    """A mask_mod reading b or h (per-batch document ids, per-head windows) sees the batch and head it was built
    for, not the selection's own numbering."""
    B, H, L = 3, 4, 64
    bm = fa.create_block_mask(_per_batch_documents_and_per_head_windows(B, H, L, 0), B, H, L, L, BLOCK_SIZE=16)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, H, L, 16)) for i in range(3))
    whole = fa.flex_attention(q, k, v, block_mask=bm)
    index = index if isinstance(index, tuple) else (index,)
    rows = tuple(slice(i, i + 1 if i != -1 else None) if isinstance(i, int) else i for i in index)
    select = lambda x: x[rows[0]][:, rows[1]] if len(rows) == 2 else x[rows[0]]  # noqa: E731
    for implementation, interpret in (("reference", False), ("pallas_triton", True)):
        got = fa.flex_attention(select(q), select(k), select(v), block_mask=bm[index],
                                implementation=implementation, interpret=interpret)
        assert_close(got, select(whole), jnp.float32, implementation)


def test_a_selection_of_one_batch_broadcasts_its_mask():
    B, H, L = 2, 2, 64
    mask_mod = _per_batch_documents_and_per_head_windows(B, H, L, 1)
    bm = fa.create_block_mask(mask_mod, B, H, L, L, BLOCK_SIZE=16)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, H, L, 16)) for i in range(3))
    second_for_both = fa.create_block_mask(lambda b, h, q_idx, kv_idx: mask_mod(1, h, q_idx, kv_idx), None, H, L, L,
                                           BLOCK_SIZE=16)
    expected = fa.flex_attention(q, k, v, block_mask=second_for_both)
    assert_close(fa.flex_attention(q, k, v, block_mask=bm[1]), expected, jnp.float32)


def test_selections_alike_do_not_retrace_jit():
    bm = fa.create_block_mask(_per_batch_documents_and_per_head_windows(2, 2, 64, 2), 2, 2, 64, 64, BLOCK_SIZE=16)
    traces = []

    @jax.jit
    def attend(q, block_mask):
        traces.append(None)
        return fa.flex_attention(q, q, q, block_mask=block_mask)

    q = jax.random.normal(jax.random.key(0), (1, 2, 64, 16))
    attend(q, bm[1])
    attend(q, bm[1])
    assert len(traces) == 1
    assert bm[:, :].mask_mod is bm.mask_mod  # the whole mask: nothing to remap


@pytest.mark.parametrize("index", [(slice(None), slice(None), 1), (1, slice(1, 3), slice(1, 3)),
                                   (slice(None), -1, -1), (0, 0, slice(2, None))],
                         ids=["row", "b,h,rows", "last,last", "tail"])
def test_a_query_block_selection_is_the_mask_of_those_rows(index):
    """``bm[:, :, qb]`` keeps query block qb's rows; its mask_mod sees their original query positions, so the
    positions it allows, and attention under it, are the original's for those rows. L = 60 is not a multiple of the
    block size, so the last row block is ragged."""
    B, H, L, Q_BLOCK = 2, 3, 60, 16
    bm = fa.create_block_mask(_per_batch_documents_and_per_head_windows(B, H, L, 3), B, H, L, L, BLOCK_SIZE=Q_BLOCK)
    selected = bm[index]
    b_rows, h_rows, q_blocks = (slice(i, i + 1 if i != -1 else None) if isinstance(i, int) else i for i in index)
    start, stop, _ = q_blocks.indices(bm.num_blocks[0])
    q_rows = slice(start * Q_BLOCK, min(stop * Q_BLOCK, L))
    assert selected.seq_lengths == (q_rows.stop - q_rows.start, L)
    allowed = _allowed_positions(bm)[b_rows, h_rows, q_rows]
    np.testing.assert_array_equal(_allowed_positions(selected), allowed)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, H, L, 16)) for i in range(3))
    whole = fa.flex_attention(q, k, v, block_mask=bm)[b_rows, h_rows, q_rows]
    got = fa.flex_attention(q[b_rows, h_rows, q_rows], k[b_rows, h_rows], v[b_rows, h_rows], block_mask=selected)
    assert_close(got, whole, jnp.float32)


@pytest.mark.parametrize("implementation,interpret", [("reference", False), ("pallas_triton", True)])
def test_a_traced_query_block_selects_its_rows_inside_jit(implementation, interpret):
    B, H, L, Q_BLOCK = 1, 2, 64, 16
    bm = fa.create_block_mask(_per_batch_documents_and_per_head_windows(B, H, L, 4), B, H, L, L, BLOCK_SIZE=Q_BLOCK)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, H, L, 16)) for i in range(3))
    whole = fa.flex_attention(q, k, v, block_mask=bm)

    @jax.jit
    def rows_of(block, q, k, v):
        q_rows = jax.lax.dynamic_slice_in_dim(q, block * Q_BLOCK, Q_BLOCK, axis=2)
        return fa.flex_attention(q_rows, k, v, block_mask=bm[:, :, block], implementation=implementation,
                                 interpret=interpret)

    for block in (0, 2, -1):
        expected = whole[:, :, (block % 4) * Q_BLOCK:][:, :, :Q_BLOCK]
        assert_close(rows_of(jnp.int32(block), q, k, v), expected, jnp.float32, f"block {block}")


@pytest.mark.parametrize("implementation,interpret", [("reference", False), ("pallas_triton", True)])
def test_the_decoding_idiom_attends_one_row_of_a_mask_built_once(implementation, interpret):
    """PyTorch's decoding idiom: a causal mask built for the longest sequence, one query at a traced position, its
    block row selected and cut to one query, and a mask_mod offset by the position."""
    L, Q_BLOCK = 64, 16
    bm = fa.create_block_mask(fa.causal_mask, None, None, L, L, BLOCK_SIZE=Q_BLOCK)
    k, v = (jax.random.normal(jax.random.key(i), (1, 2, L, 16)) for i in range(2))
    queries = jax.random.normal(jax.random.key(2), (1, 2, L, 16))
    whole = fa.flex_attention(queries, k, v, block_mask=bm)

    @jax.jit
    def decode_step(q, pos):
        row = bm[:, :, pos // Q_BLOCK].adjust(1, L)
        row = dataclasses.replace(row, mask_mod=lambda b, h, q_idx, kv_idx: bm.mask_mod(b, h, q_idx + pos, kv_idx))
        return fa.flex_attention(q, k, v, block_mask=row, implementation=implementation, interpret=interpret)

    for pos in (0, 5, 16, 37, L - 1):
        got = decode_step(queries[:, :, pos:pos + 1], jnp.int32(pos))
        assert_close(got, whole[:, :, pos:pos + 1], jnp.float32, f"pos {pos}")


@pytest.mark.parametrize("new_lengths", [(64, 64), (40, 64), (64, 37), (17, 50), (1, 1)])
def test_adjust_cuts_the_mask_to_its_first_queries_and_keys(new_lengths):
    """Ragged cuts leave no full block past a new length: its allowed positions are the corner of the original's."""
    bm = fa.create_block_mask(fa.causal_mask, None, None, 64, 64, BLOCK_SIZE=16)
    cut = bm._adjust(*new_lengths)
    new_q, new_kv = new_lengths
    assert cut.seq_lengths == new_lengths and cut.num_blocks == (-(-new_q // 16), -(-new_kv // 16))
    np.testing.assert_array_equal(_allowed_positions(cut), _allowed_positions(bm)[:, :, :new_q, :new_kv])
    _, full = cut.block_maps()
    if new_kv % 16:
        assert not np.asarray(full)[..., -1].any()
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 2, 64, 16)) for i in range(3))
    expected = fa.flex_attention(q[:, :, :new_q], k[:, :, :new_kv], v[:, :, :new_kv],
                                 block_mask=fa.create_block_mask(fa.causal_mask, None, None, new_q, new_kv, 16))
    got = fa.flex_attention(q[:, :, :new_q], k[:, :, :new_kv], v[:, :, :new_kv], block_mask=cut,
                            implementation="pallas_triton", interpret=True)
    assert_close(got, expected, jnp.float32)
    with pytest.raises(ValueError, match="only shrinks"):
        bm.adjust(65, 64)
    with pytest.raises(ValueError, match="new_q_len must be a positive int"):
        bm.adjust(0, 64)
    with pytest.raises((TypeError, ValueError), match="new_kv_len"):
        bm.adjust(64, "64")


def test_from_kv_blocks_takes_pytorchs_compute_q_blocks():
    bm = fa.create_block_mask(fa.causal_mask, None, None, 64, 64, BLOCK_SIZE=16)
    for compute_q_blocks in (True, False):
        rebuilt = fa.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                              bm.full_kv_indices, 16, fa.causal_mask, compute_q_blocks=compute_q_blocks)
        np.testing.assert_array_equal(np.asarray(rebuilt.q_indices), np.asarray(bm.q_indices))
    with pytest.raises(TypeError, match="compute_q_blocks must be a bool"):
        fa.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, compute_q_blocks=None)


def test_assigning_to_a_block_mask_says_what_to_write_instead():
    bm = fa.create_block_mask(fa.causal_mask, None, None, 64, 64, BLOCK_SIZE=16)
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"dataclasses.replace\(bm, mask_mod=...\)"):
        bm.mask_mod = fa.noop_mask
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"bm.adjust\(new_q_len, new_kv_len\)"):
        bm.seq_lengths = (1, 64)
    assert dataclasses.replace(bm, mask_mod=fa.noop_mask).mask_mod is fa.noop_mask
    assert bm[:, :, 1].seq_lengths == (16, 64)


def test_numel_and_as_tuple_follow_pytorch():
    bm = fa.create_block_mask(fa.causal_mask, 2, None, 48, 64, BLOCK_SIZE=(16, 32))
    assert bm.numel() == 2 * 1 * 48 * 64
    flat = bm.as_tuple()
    assert flat[:2] == (48, 64) and flat[-3:] == (16, 32, fa.causal_mask)
    assert flat[2] is bm.kv_num_blocks and flat[9] is bm.full_q_indices
    nested = bm.as_tuple(flatten=False)
    assert len(nested) == 11 and nested[0] == (48, 64) and nested[-2] == (16, 32)


def test_create_block_mask_takes_pytorchs_device_and_compile_keywords():
    cpu = jax.devices("cpu")[0]
    for device in ("cpu", cpu, jax.sharding.SingleDeviceSharding(cpu)):
        bm = fa.create_block_mask(fa.causal_mask, None, None, 32, 32, 16, device=device, _compile=True)
        assert bm.kv_indices.devices() == {cpu}
    with pytest.raises(TypeError, match="keyword-only here"):
        fa.create_block_mask(fa.causal_mask, None, None, 32, 32, "cuda")
    with pytest.raises(ValueError, match="device must be"):
        fa.create_block_mask(fa.causal_mask, None, None, 32, 32, device="mps")
    with pytest.raises(TypeError, match="_compile must be a bool"):
        fa.create_block_mask(fa.causal_mask, None, None, 32, 32, _compile="yes")
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(ValueError, match="no gpu device"):
            fa.create_block_mask(fa.causal_mask, None, None, 32, 32, device="cuda")
    assert fa.create_mask(fa.causal_mask, None, None, 8, 8, device="cpu").devices() == {cpu}
    other = jax.devices("cpu")[1]  # conftest gives the tests eight CPU devices
    moved = fa.create_block_mask(fa.causal_mask, None, None, 32, 32, 16).to(other)
    assert all(x.devices() == {other} for x in jax.tree.leaves(moved)) and moved.mask_mod is fa.causal_mask
    back = moved.to("cpu")  # a platform name: its first device
    assert all(x.devices() == {cpu} for x in jax.tree.leaves(back))


def test_create_mask_of_a_score_mod_is_where_it_is_not_minus_infinity():
    def window_score(score, b, h, q_idx, kv_idx):
        return jnp.where(jnp.abs(q_idx - kv_idx) <= 2 + h, score + 0.5 * kv_idx.astype(jnp.float32), -jnp.inf)

    expected = fa.create_mask(lambda b, h, q_idx, kv_idx: jnp.abs(q_idx - kv_idx) <= 2 + h, 2, 3, 12, 10)
    np.testing.assert_array_equal(np.asarray(fa.create_mask(window_score, 2, 3, 12, 10)), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(fa.create_mask(fa.causal, None, None, 6, 6)),
                                  np.tril(np.ones((6, 6), bool))[None, None])
    assert np.asarray(fa.create_mask(fa.alibi_bias(fa.alibi_slopes(2)), 1, 2, 4, 4)).all()
    with pytest.raises(TypeError, match="mask_mod or a score_mod"):
        fa.create_mask(3, None, None, 4, 4)


_DOCUMENT_IDS = jnp.repeat(jnp.arange(4), 16)  # rebound by the test below, as a training loop would per batch


def _documents_of_the_global_ids(b, h, q_idx, kv_idx):
    return _DOCUMENT_IDS[q_idx] == _DOCUMENT_IDS[kv_idx]


def test_a_mask_mod_reading_a_rebound_global_sees_its_new_value():
    """As PyTorch evaluates mask_mod at every call: block maps and kernels follow the global the mask_mod reads,
    and a new array of the same shape compiles nothing new."""
    from flexattn_jax.block_mask import _block_maps_from_mask_program

    global _DOCUMENT_IDS
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 2, 64, 16)) for i in range(3))
    first = fa.create_block_mask(_documents_of_the_global_ids, None, None, 64, 64, BLOCK_SIZE=16)
    assert first.to_dense()[0, 0].tolist() == np.eye(4, dtype=int).tolist()
    compiled = _block_maps_from_mask_program._cache_size()
    saved, _DOCUMENT_IDS = _DOCUMENT_IDS, jnp.zeros(64, jnp.int32)  # one document: every block full
    try:
        second = fa.create_block_mask(_documents_of_the_global_ids, None, None, 64, 64, BLOCK_SIZE=16)
        assert np.all(np.asarray(second.to_dense()) == 1)
        assert _block_maps_from_mask_program._cache_size() == compiled
        everywhere = fa.flex_attention(q, k, v)
        for implementation, interpret in (("reference", False), ("pallas_triton", True)):
            got = fa.flex_attention(q, k, v, block_mask=second, implementation=implementation, interpret=interpret)
            assert_close(got, everywhere, jnp.float32, implementation)
    finally:
        _DOCUMENT_IDS = saved


def test_any_callable_serves_as_mask_mod():
    @dataclasses.dataclass
    class Window:  # unhashable: a dataclass with eq and no frozen
        size: int

        def __call__(self, b, h, q_idx, kv_idx):
            return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < self.size)

    window = Window(16)
    bm = fa.create_block_mask(window, None, None, 64, 64, BLOCK_SIZE=16)
    assert bm.to_dense()[0, 0].tolist() == fa.create_block_mask(fa.sliding_window_mask(16), None, None, 64, 64,
                                                                 BLOCK_SIZE=16).to_dense()[0, 0].tolist()
    # An unhashable mask_mod's BlockMask passes into jit as an argument (its static data is hashed), and a second
    # call with the same mask_mod does not trace again.
    q, k, v = (jax.random.normal(key, (1, 2, 64, 16)) for key in jax.random.split(jax.random.key(3), 3))
    traces = []

    @jax.jit
    def attend(q, k, v, block_mask):
        traces.append(1)
        return fa.flex_attention(q, k, v, block_mask=block_mask, implementation="reference")

    ref = fa.flex_attention(q, k, v, score_mod=None, implementation="reference",
                            block_mask=fa.create_block_mask(fa.sliding_window_mask(16), None, None, 64, 64,
                                                            BLOCK_SIZE=16))
    assert_close(attend(q, k, v, bm), ref, jnp.float32)
    attend(q, k, v, bm[:, :1])  # the whole head axis: the same mask_mod
    attend(q, k, v, fa.create_block_mask(window, None, None, 64, 64, BLOCK_SIZE=16))
    assert len(traces) == 1


def test_create_block_mask_under_jit():
    @jax.jit
    def build(window):
        mask_mod = lambda b, h, q, kv: (q - kv >= 0) & (q - kv < window)  # noqa: E731
        return fa.create_block_mask(mask_mod, None, None, 100, 100, BLOCK_SIZE=16)

    bm = build(jnp.int32(20))
    eager = fa.create_block_mask(fa.sliding_window_mask(20), None, None, 100, 100, BLOCK_SIZE=16)
    np.testing.assert_array_equal(np.asarray(bm.to_dense()), np.asarray(eager.to_dense()))
    np.testing.assert_array_equal(np.asarray(bm.full_kv_indices), np.asarray(eager.full_kv_indices))


def test_a_mask_per_batch_built_inside_the_step_traces_it_once():
    """The idiom for a mask that changes with every batch (BlockMask's docstring): the step takes the document ids
    and builds the BlockMask itself, so new ids of the same shape run the compiled step again (a BlockMask built
    outside would bring a new mask_mod, static data, each time)."""
    traces = []
    q = jax.random.normal(jax.random.key(0), (2, 2, 96, 16))

    @jax.jit
    def step(q, ids):
        traces.append(1)
        block_mask = fa.create_block_mask(fa.and_masks(fa.causal_mask, fa.document_mask(ids)), 2, None, 96, 96,
                                          BLOCK_SIZE=32)
        return fa.flex_attention(q, q, q, block_mask=block_mask)

    for seed in range(3):
        ids = jnp.sort(jax.random.randint(jax.random.key(seed), (2, 96), 0, 4), axis=-1)
        mask = fa.create_mask(fa.and_masks(fa.causal_mask, fa.document_mask(ids)), 2, None, 96, 96)
        scores = jnp.where(mask, jnp.einsum("bhqd,bhkd->bhqk", q, q) / 4.0, -jnp.inf)
        assert_close(step(q, ids), jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), q), jnp.float32)
    assert len(traces) == 1


def test_create_block_mask_under_jit_is_a_constant_unless_the_mask_reads_a_traced_value():
    ids_outside = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 25)
    kinds = {}

    @jax.jit
    def build(ids_argument):
        masks = {
            "causal": fa.causal_mask,
            "ids closed over": fa.document_mask(ids_outside),
            "ids passed in": fa.document_mask(ids_argument),
        }
        built = {}
        for name, mask_mod in masks.items():
            block_mask = fa.create_block_mask(mask_mod, None, None, 100, 100, BLOCK_SIZE=16)
            kinds[name] = isinstance(block_mask.kv_num_blocks, jax.core.Tracer)
            built[name] = jax.tree.leaves(block_mask)  # the arrays (the mask_mod may hold a tracer)
        return built

    built = build(ids_outside)
    assert kinds == {"causal": False, "ids closed over": False, "ids passed in": True}
    for name, mask_mod in [("causal", fa.causal_mask), ("ids closed over", fa.document_mask(ids_outside)),
                           ("ids passed in", fa.document_mask(ids_outside))]:
        eager = fa.create_block_mask(mask_mod, None, None, 100, 100, BLOCK_SIZE=16)
        for got, want in zip(built[name], jax.tree.leaves(eager), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_block_mask_is_a_pytree():
    bm = fa.create_block_mask(fa.causal_mask, None, None, 32, 32, BLOCK_SIZE=8)
    leaves, treedef = jax.tree_util.tree_flatten(bm)
    assert len(leaves) == 8
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.mask_mod is fa.causal_mask and again.BLOCK_SIZE == (8, 8) and again.seq_lengths == (32, 32)
    returned = jax.jit(lambda m: m)(bm)
    np.testing.assert_array_equal(np.asarray(returned.kv_indices), np.asarray(bm.kv_indices))


def test_long_sliding_window_builds_with_bounded_memory():
    # 32768^2 positions would be 1 GiB of booleans; built block row by block row it needs a few MB.
    bm = fa.create_block_mask(fa.sliding_window_mask(1024), None, None, 32768, 32768, BLOCK_SIZE=128)
    dense = np.asarray(bm.to_dense()[0, 0])
    assert dense.shape == (256, 256)
    assert dense.sum() == 248 * 9 + sum(range(1, 9))  # 9 blocks a row, fewer in the first 8 rows
    np.testing.assert_array_equal(np.asarray(bm.full_kv_num_blocks[0, 0, 8:]), np.full(248, 7))


def test_create_mask_matches_mask_mod():
    m = np.asarray(fa.create_mask(fa.prefix_lm_mask(3), None, None, 6, 7))
    expected = (np.arange(7)[None, :] < 3) | (np.arange(6)[:, None] >= np.arange(7)[None, :])
    np.testing.assert_array_equal(m[0, 0], expected)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(mask_mod=fa.causal_mask, B=0, H=None, Q_LEN=8, KV_LEN=8), ValueError, "B must be a positive int"),
        (dict(mask_mod=fa.causal_mask, B=None, H=None, Q_LEN=8.0, KV_LEN=8), ValueError, "Q_LEN"),
        (dict(mask_mod=fa.causal_mask, B=None, H=None, Q_LEN=8, KV_LEN=8, BLOCK_SIZE=0), ValueError, "BLOCK_SIZE"),
        (dict(mask_mod=fa.causal_mask, B=None, H=None, Q_LEN=8, KV_LEN=8, BLOCK_SIZE=(1, 2, 3)), ValueError,
         "BLOCK_SIZE"),
        (dict(mask_mod="causal", B=None, H=None, Q_LEN=8, KV_LEN=8), TypeError, "mask_mod must be a callable"),
        (dict(mask_mod=lambda b, h, q, kv: (q - kv).astype(jnp.float32), B=None, H=None, Q_LEN=8, KV_LEN=8),
         TypeError, "boolean scalar"),
    ],
)
def test_create_block_mask_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        fa.create_block_mask(**kwargs)


def test_from_kv_blocks_bad_input():
    with pytest.raises(ValueError, match="kv_indices"):
        fa.BlockMask.from_kv_blocks(jnp.zeros((1, 1, 2), jnp.int32), jnp.zeros((1, 1, 3, 2), jnp.int32))
    with pytest.raises(ValueError, match="given together"):
        fa.BlockMask.from_kv_blocks(
            jnp.zeros((1, 1, 2), jnp.int32), jnp.zeros((1, 1, 2, 2), jnp.int32), jnp.zeros((1, 1, 2), jnp.int32)
        )
    with pytest.raises(ValueError, match="seq_lengths"):
        fa.BlockMask.from_kv_blocks(
            jnp.zeros((1, 1, 2), jnp.int32), jnp.zeros((1, 1, 2, 2), jnp.int32), BLOCK_SIZE=8, seq_lengths=(64, 16)
        )


_NUM = jnp.array([[[1, 1]]])
_IDX = jnp.array([[[[0, 1], [1, 0]]]])


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((_NUM, jnp.array([[[[5, 1], [1, 0]]]])), ValueError, r"kv_indices must list key blocks in \[0, 2\).* got 5"),
        ((_NUM, jnp.array([[[[-1, 1], [1, 0]]]])), ValueError, r"kv_indices .* \[0, 2\).* got -1"),
        ((jnp.array([[[5, 1]]]), _IDX), ValueError, r"kv_num_blocks must be in \[0, 2\].* got 5"),
        ((jnp.array([[[-1, 1]]]), _IDX), ValueError, r"kv_num_blocks must be in \[0, 2\].* got -1"),
        ((_NUM, jnp.array([[[[0.7, 1.9], [1.0, 0.0]]]])), TypeError, r"kv_indices must be an integer array, got float32"),
        ((_NUM.astype(jnp.float32), _IDX), TypeError, "kv_num_blocks must be an integer array"),
        ((_NUM * 0, _IDX, _NUM, jnp.array([[[[9, 1], [1, 0]]]])), ValueError, r"full_kv_indices .* \[0, 2\).* got 9"),
        ((_NUM * 0, _IDX, _NUM * 3, _IDX), ValueError, r"full_kv_num_blocks must be in \[0, 2\].* got 3"),
        ((jnp.zeros((1, 1, 2), int), jnp.zeros((1, 1, 2, 0), int)), ValueError, "kv_indices .* no empty axis"),
    ],
)
def test_from_kv_blocks_refuses_indices_that_describe_another_mask(args, error, message):
    with pytest.raises(error, match=message):
        fa.BlockMask.from_kv_blocks(*args, BLOCK_SIZE=16)


def test_from_kv_blocks_ignores_padding_past_num_blocks_and_works_under_jit():
    # Entries past kv_num_blocks are padding: anything goes there, and traced arrays are not read.
    bm = fa.BlockMask.from_kv_blocks(jnp.array([[[1, 0]]]), jnp.array([[[[0, 7], [-3, 9]]]]), BLOCK_SIZE=16)
    assert bm.to_dense().tolist() == [[[[1, 0], [0, 0]]]]
    dense = jax.jit(lambda n, i: fa.BlockMask.from_kv_blocks(n, i, BLOCK_SIZE=16).to_dense())(_NUM, _IDX)
    assert dense.tolist() == [[[[1, 0], [0, 1]]]]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: fa.BlockMask.from_kv_blocks(_NUM, _IDX, BLOCK_SIZE=16, seq_lengths=32), ValueError,
         r"seq_lengths must be a \(Q_LEN, KV_LEN\) pair of positive ints, got 32"),
        (lambda: fa.BlockMask.from_kv_blocks(_NUM, _IDX, BLOCK_SIZE=16, seq_lengths=(32, 32, 5)), ValueError,
         "seq_lengths must be"),
        (lambda: fa.BlockMask.from_kv_blocks(_NUM, _IDX, BLOCK_SIZE=16, seq_lengths=(31.5, 32)), ValueError,
         r"seq_lengths must be .* got \(31.5, 32\)"),
        (lambda: fa.BlockMask.from_kv_blocks(_NUM, _IDX, BLOCK_SIZE=16, mask_mod=3), TypeError,
         "mask_mod must be a callable"),
        (lambda: fa.BlockMask.from_block_maps(jnp.zeros((1, 1, 0, 0), bool), BLOCK_SIZE=16), ValueError,
         "partial_blocks .* no empty axis"),
        (lambda: fa.create_block_mask(fa.causal_mask, True, None, 32, 32), ValueError,
         "B must be a positive int .* got True"),
        (lambda: fa.create_block_mask(fa.causal_mask, None, None, 32, 32, BLOCK_SIZE=True), ValueError,
         "BLOCK_SIZE must be a positive int"),
        (lambda: fa.create_block_mask(fa.causal_mask, 2, None, 32, 32)[True], TypeError,
         "BlockMask indices must be ints or slices, got bool"),
    ],
)
def test_block_mask_constructors_check_their_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "sizes, message",
    [((-1, None, 8, 8), "B must be a positive int"), ((2.5, None, 8, 8), "B must be a positive int"),
     ((None, True, 8, 8), "H must be a positive int"), ((None, None, 8.7, 8), "Q_LEN must be a positive int"),
     ((None, None, -3, 8), "Q_LEN"), ((None, None, 8, "8"), "KV_LEN must be a positive int")],
)
def test_create_mask_checks_its_sizes_as_create_block_mask_does(sizes, message):
    for build in (fa.create_mask, fa.create_block_mask):
        with pytest.raises(ValueError, match=message):
            build(fa.causal_mask, *sizes)


_DENSE = np.tril(np.ones((32, 32), bool))
_BLOCK_MAP = np.ones((1, 1, 2, 2), bool)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: fa.convert_mask_to_block_mask(_DENSE, 0, 16), ValueError,
         "KV_BLOCK_SIZE must be a positive int, got 0"),
        (lambda: fa.convert_mask_to_block_mask(_DENSE, 16, -4), ValueError, "Q_BLOCK_SIZE must be a positive int"),
        (lambda: fa.convert_mask_to_block_mask(_DENSE, 2.5, 16), ValueError, "KV_BLOCK_SIZE .* got 2.5"),
        (lambda: fa.convert_mask_to_block_mask(_DENSE.astype(int), 16, 16), TypeError,
         r"mask must be a boolean array .* got int"),
        (lambda: fa.convert_mask_to_block_mask(fa.create_block_mask(fa.causal_mask, None, None, 32, 32, 16)),
         TypeError, r"got a BlockMask; its block map is already bm.to_dense\(\)"),
        (lambda: fa.convert_block_mask_to_mask(_BLOCK_MAP, 0, 16), ValueError, "KV_BLOCK_SIZE must be a positive int"),
        (lambda: fa.convert_block_mask_to_mask(_BLOCK_MAP, 16, True), ValueError, "Q_BLOCK_SIZE .* got True"),
        (lambda: fa.convert_block_mask_to_mask(_BLOCK_MAP.astype(int) * 3, 2, 2), TypeError,
         r"block_mask must be a boolean array \(a block map \[B, H, QB, KVB\]\), got int"),
        (lambda: fa.convert_block_mask_to_mask(fa.create_block_mask(fa.causal_mask, None, None, 32, 32, 16), 16, 16),
         TypeError, r"got a BlockMask; pass its block map, bm.to_dense\(\).astype\(bool\)"),
    ],
)
def test_dense_block_conversions_check_their_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_convert_block_mask_to_mask_of_a_block_masks_map():
    bm = fa.create_block_mask(fa.causal_mask, None, None, 32, 32, 16)
    dense = fa.convert_block_mask_to_mask(bm.to_dense().astype(bool), 16, 16)
    assert dense.dtype == jnp.bool_
    back = fa.convert_mask_to_block_mask(dense, 16, 16)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(bm.to_dense()) == 1)


@pytest.mark.parametrize("grid_size", [0, -1, 2.5, True])
def test_to_string_checks_grid_size(grid_size):
    bm = fa.create_block_mask(fa.causal_mask, None, None, 32, 32, 16)
    with pytest.raises(ValueError, match=f"grid_size must be a positive int, got {grid_size}"):
        bm.to_string(grid_size=grid_size)
    with pytest.raises(ValueError, match="grid_size must be a positive int"):
        fa.viz.block_map_to_text(np.ones((2, 2), bool), np.ones((2, 2), bool), grid_size)


@pytest.mark.gpu
def test_gpu_query_block_selections_on_the_default_kernels():
    """On the GPU's default kernels (the Mosaic forward for a block of queries, the decode kernel for one): a traced
    query block inside jit, whose mask_mod reads the offset as a captured scalar, and the decoding idiom."""
    B, H, L, Q_BLOCK = 2, 4, 1024, 128
    bm = fa.create_block_mask(_per_batch_documents_and_per_head_windows(B, H, L, 5), B, H, L, L, BLOCK_SIZE=Q_BLOCK)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, H, L, 128)).astype(jnp.bfloat16) for i in range(3))
    whole = fa.flex_attention(q, k, v, block_mask=bm, implementation="reference")

    @jax.jit
    def rows_of(block):
        q_rows = jax.lax.dynamic_slice_in_dim(q, block * Q_BLOCK, Q_BLOCK, axis=2)
        return fa.flex_attention(q_rows, k, v, block_mask=bm[:, :, block])

    for block in (0, 5):
        assert_close(rows_of(jnp.int32(block)), whole[:, :, block * Q_BLOCK:(block + 1) * Q_BLOCK], jnp.bfloat16,
                     f"block {block}")

    causal = fa.create_block_mask(fa.causal_mask, None, None, L, L, BLOCK_SIZE=Q_BLOCK)
    causal_whole = fa.flex_attention(q, k, v, block_mask=causal, implementation="reference")

    @jax.jit
    def decode_step(q_one, pos):
        row = causal[:, :, pos // Q_BLOCK].adjust(1, L)
        row = dataclasses.replace(row, mask_mod=lambda b, h, q_idx, kv_idx: causal.mask_mod(b, h, q_idx + pos, kv_idx))
        return fa.flex_attention(q_one, k, v, block_mask=row)

    for pos in (0, 300, L - 1):
        assert_close(decode_step(q[:, :, pos:pos + 1], jnp.int32(pos)), causal_whole[:, :, pos:pos + 1],
                     jnp.bfloat16, f"pos {pos}")
