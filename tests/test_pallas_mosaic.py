"""The pallas_mosaic (Mosaic GPU, Hopper) kernels, forward and backward: CUDA lowering, the fallbacks to the Triton
backward and the choice of implementation on this machine; the comparisons with the reference, forward and
gradients, on a GPU (Mosaic GPU's interpreter cannot run wgmma)."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
import pytest

import flexattn_jax as fa
from flexattn_jax.backends import pallas_mosaic
from tests._helpers import MOD_CASES, SCALED_SCORE_MODS, assert_close, random_qkv
from tests.conftest import HAS_GPU

_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")

# Mods that index a captured array at a computed position: Mosaic GPU cannot gather, pallas_triton serves them.
_GATHERING = {"relative_bias_table"}
_SUPPORTED = [case for case in MOD_CASES if case.name not in _GATHERING]


def _block_mask(mask_mod, B, L, S, block_size=128):
    if mask_mod is None:
        return None
    return fa.create_block_mask(mask_mod, B, None, L, S, BLOCK_SIZE=block_size)


def _lists(q, k, block_mask):
    if block_mask is None:
        block_mask = fa.create_block_mask(fa.noop_mask, None, None, q.shape[2], k.shape[2])
    return block_mask


def _lower_for_cuda(q, k, v, mask_mod, score_mod, kernel_options=None, with_max_scores=False, scale=0.125,
                    block_mask=None):
    if block_mask is None:
        block_mask = _lists(q, k, _block_mask(mask_mod, q.shape[0], q.shape[2], k.shape[2]))
    mask_mod = block_mask.mask_mod or fa.noop_mask

    def forward(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices):
        return pallas_mosaic.attention(
            q,
            k,
            v,
            score_mod=score_mod or fa.identity,
            mask_mod=mask_mod,
            kv_num_blocks=kv_num_blocks,
            kv_indices=kv_indices,
            full_kv_num_blocks=full_kv_num_blocks,
            full_kv_indices=full_kv_indices,
            block_size=block_mask.BLOCK_SIZE,
            scale=scale,
            kernel_options=kernel_options,
            with_max_scores=with_max_scores,
        )

    args = (q, k, v, block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        lowered = jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "mosaic_gpu" in text
    assert "flex_attention_forward_mosaic" in text  # the name profilers list the kernel by
    return text


@pytest.mark.parametrize("case", _SUPPORTED, ids=repr)
def test_every_supported_mod_lowers_for_cuda(case):
    B, Hq, Hkv, L, S = 2, 4, 2, 300, 200
    q, k, v = random_qkv(0, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=64, Ev=64, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 0)
    _lower_for_cuda(q, k, v, mask_mod, score_mod)


def _partial_lists_only(mask_mod, L, S):
    """The BlockMask of ``mask_mod`` with every listed block partial: no full-block lists, so every step of a walk
    evaluates the mask_mod (what a BlockMask built from one block map gives)."""
    partial, full = fa.create_block_mask(mask_mod, None, None, L, S).block_maps()
    block_mask = fa.BlockMask.from_block_maps(partial | full, None, BLOCK_SIZE=128, mask_mod=mask_mod,
                                              seq_lengths=(L, S))
    assert block_mask.full_kv_num_blocks is None
    return block_mask


@pytest.mark.parametrize(
    "head_dim, score_mod, walk",
    [(64, None, "anchored"), (64, fa.generate_alibi_bias(2), "running"), (128, None, "overlapped"),
     (128, fa.tanh_softcap(30.0), "fixed")],
    ids=["anchored-64", "running-max-64", "overlapped-128", "fixed-max-128"],
)
def test_lists_of_partial_blocks_only_lower_for_cuda(head_dim, score_mod, walk, forward_plans):
    # Each softmax's walk (the anchored, the running and the fixed maximum; the plain and the overlapped walk) on a
    # BlockMask without full-block lists.
    q, k, v = random_qkv(1, B=1, Hq=2, Hkv=1, L=256, S=640, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
    block_mask = _partial_lists_only(fa.causal_mask, 256, 640)
    _lower_for_cuda(q, k, v, fa.causal_mask, score_mod, block_mask=block_mask)
    (plan,) = forward_plans
    assert not plan.has_full
    assert (plan.anchored, plan.fixed_shift is not None, plan.overlap) == {
        "anchored": (True, False, False), "running": (False, False, False), "overlapped": (True, False, True),
        "fixed": (False, True, False)}[walk]
    text = _lower_gradient_for_cuda(q, k, v, fa.causal_mask, score_mod, block_mask=block_mask)
    assert "flex_attention_dkdv_mosaic" in text and _TRITON_CALL not in text


@pytest.mark.parametrize(
    "head_dim, dtype, options",
    [(128, jnp.float16, None), (256, jnp.bfloat16, None),
     (128, jnp.bfloat16, {"mosaic_block_n": 64, "mosaic_num_stages": 3}),
     (128, jnp.bfloat16, {"mosaic_fwd_overlap": 1}), (64, jnp.bfloat16, {"mosaic_fwd_overlap": 0}),
     (128, jnp.bfloat16, {"mosaic_fwd_q_buffers": 1}), (128, jnp.bfloat16, {"mosaic_fwd_copy_warps": 4}),
     (128, jnp.bfloat16, {"mosaic_fwd_float_indices": 0}), (64, jnp.float16, {"mosaic_fwd_scale_queries": 1}),
     (128, jnp.bfloat16, {"mosaic_fwd_scale_queries": 1, "mosaic_fwd_overlap": 1})],
    ids=["f16-128", "bf16-256", "bn64-3stages", "overlap", "no-overlap", "one-query-buffer", "four-copy-warps",
         "int-indices", "f16-64-scaled-queries", "overlap-scaled-queries"],
)
def test_head_dims_and_options_lower_for_cuda(head_dim, dtype, options):
    q, k, v = random_qkv(1, B=1, Hq=2, Hkv=1, L=256, S=384, E=head_dim, Ev=head_dim, dtype=dtype)
    _lower_for_cuda(q, k, v, fa.causal_mask, fa.tanh_softcap(20.0), kernel_options=options)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_row_maxima_either_way_lower_for_cuda(head_dim):
    # The running maximum (no score_mod: soft-capping's fixed maximum takes none) by column halves or by Mosaic GPU's
    # reduction, on the plain walk at 64 and the overlapped one at 128: both lower, and the option reaches the kernel.
    q, k, v = random_qkv(1, B=1, Hq=2, Hkv=1, L=256, S=384, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
    by_halves, by_chains = (_lower_for_cuda(q, k, v, fa.causal_mask, None, kernel_options={"mosaic_fwd_max_tree": tree})
                            for tree in (1, 0))
    assert by_halves != by_chains


def test_row_maximum_by_column_halves_is_the_row_maximum():
    from flexattn_jax.backends.pallas_mosaic import forward

    tile = jax.random.normal(jax.random.key(3), (64, 128), jnp.float32)
    tile = tile.at[5].set(-jnp.inf).at[7, :100].set(-jnp.inf)  # a row masked whole, one masked in part
    for columns in (128, 64):
        got = forward.row_maximum(tile[:, :columns], tree=True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(tile[:, :columns].max(axis=1)))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_float_index_tiles_serve_alibi_in_the_kernel(head_dim, monkeypatch):
    """ALiBi's float32(kv_idx - q_idx) comes from the index tiles built once per program (IndexTiles, with the
    pattern (-1, 1)), unless mosaic_fwd_float_indices is 0."""
    from flexattn_jax.backends.pallas_mosaic import forward

    built = []

    class Recorded(forward.IndexTiles):
        def __init__(self, signs, block_n):
            built.append(set(signs))
            super().__init__(signs, block_n)

    monkeypatch.setattr(forward, "IndexTiles", Recorded)
    q, k, v = random_qkv(2, B=1, Hq=2, Hkv=1, L=256, S=384, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
    _lower_for_cuda(q, k, v, fa.causal_mask, fa.generate_alibi_bias(2), kernel_options={"mosaic_fwd_float_indices": 0})
    assert built == []
    _lower_for_cuda(q, k, v, fa.causal_mask, fa.generate_alibi_bias(2))
    assert built == [{(-1, 1)}]  # ALiBi keeps the running maximum: one launch
    built.clear()
    _lower_for_cuda(q, k, v, fa.causal_mask, fa.generate_alibi_bias(2), kernel_options={"mosaic_fwd_anchored_shift": 1})
    assert built == [{(-1, 1)}] * 2  # the anchored walk's launch and its repair launch


def _recorded_plans(monkeypatch, *, repairs: bool) -> list:
    """The plan of each Mosaic forward kernel traced from now on, in order; the repair launches' too with
    ``repairs``."""
    from flexattn_jax.backends.pallas_mosaic import forward

    plans = []
    kernel = forward._kernel

    def recorded(*refs, plan, **kwargs):
        if repairs or not plan.repair:
            plans.append(plan)
        return kernel(*refs, plan=plan, **kwargs)

    monkeypatch.setattr(forward, "_kernel", recorded)
    return plans


@pytest.fixture
def forward_plans(monkeypatch):
    """The plan of each Mosaic forward kernel traced while the test runs, in order (first launches only: not the
    anchored walk's repair launch, see test_anchored_walk_plans_a_repair_launch)."""
    return _recorded_plans(monkeypatch, repairs=False)


@pytest.mark.parametrize(
    "score_mod, scale_queries, query_scale, score_scale",
    [(fa.tanh_softcap(20.0), 1, 0.125 / 20.0, 1.0), (fa.tanh_softcap(20.0), None, 1.0, 0.125 / 20.0),
     (fa.identity, 1, 1.0, 1.0), (fa.generate_alibi_bias(2), None, 0.125, 1.0),
     (fa.generate_alibi_bias(2), 0, 1.0, 0.125)],
    ids=["softcap", "softcap-default", "no-score-mod", "alibi-default", "alibi-option-off"],
)
def test_queries_are_scaled_in_the_kernel_where_the_score_mod_needs_the_scaled_score(
    score_mod, scale_queries, query_scale, score_scale, forward_plans
):
    """mosaic_fwd_scale_queries moves the multiply by the scale (with soft-capping's 1 / cap) from every score to the
    query tile; by default unless the score_mod calls a special function (tanh), whose unit bounds the step. Without
    a score_mod the scale is already folded into exp2, and there is nothing to move."""
    q, k, v = random_qkv(3, B=1, Hq=2, Hkv=1, L=256, S=384, E=64, Ev=64, dtype=jnp.bfloat16)
    options = None if scale_queries is None else {"mosaic_fwd_scale_queries": scale_queries}
    _lower_for_cuda(q, k, v, fa.causal_mask, score_mod, kernel_options=options)
    (plan,) = forward_plans
    assert (plan.query_scale, plan.scaling.score_scale) == pytest.approx((query_scale, score_scale))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_forward_a_backward_follows_scales_queries_only_by_a_power_of_two(head_dim, forward_plans):
    """The backward recomputes the scores from the unscaled queries with the forward's lse: queries scaled and rounded
    in the forward (head dim 128's 0.0884...) would make its probabilities' rows sum to other than 1. Head dim 64's
    0.125 scales exactly; a forward no backward follows scales either; mosaic_fwd_scale_queries 1 is obeyed."""
    q, k, v = random_qkv(3, B=1, Hq=2, Hkv=1, L=256, S=384, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
    scale = head_dim**-0.5
    alibi = fa.generate_alibi_bias(2)
    _lower_for_cuda(q, k, v, fa.causal_mask, alibi, scale=scale)
    _lower_gradient_for_cuda(q, k, v, fa.causal_mask, alibi, scale=scale)
    _lower_gradient_for_cuda(q, k, v, fa.causal_mask, alibi, scale=scale, kernel_options={"mosaic_fwd_scale_queries": 1})
    exact = head_dim == 64
    assert [plan.query_scale for plan in forward_plans] == pytest.approx([scale, scale if exact else 1.0, scale])
    assert [plan.scaling.score_scale for plan in forward_plans] == pytest.approx([1.0, 1.0 if exact else scale, 1.0])


_FIXED_MAX = {"mosaic_fwd_fixed_max": 1}
@pytest.mark.parametrize(
    "score_mod, dtype, options, with_max_scores, fixed_shift",
    # The shift in exp2's units, an integer: cap c's values times c log2(e) lie in [-c log2(e), c log2(e)].
    [(fa.tanh_softcap(30.0), jnp.bfloat16, _FIXED_MAX, False, 44),  # 43.3 rounded up
     (fa.tanh_softcap(41.0), jnp.bfloat16, _FIXED_MAX, False, 60),  # 59.2 up; -59.2 lies 119.2 below
     # 60.6 up to 61 would leave -60.6 121.6 below: the shift that keeps it 120 below, rounded down, 59.4 to 59.
     (fa.tanh_softcap(42.0), jnp.bfloat16, _FIXED_MAX, False, 59),
     (fa.tanh_softcap(50.0), jnp.bfloat16, _FIXED_MAX, False, 47),  # 120 - 72.1 = 47.9 down
     (fa.tanh_softcap(63.0), jnp.bfloat16, _FIXED_MAX, False, 29),  # 120 - 90.9 = 29.1 down; 90.9 - 29 <= 64
     (fa.tanh_softcap(64.0), jnp.bfloat16, _FIXED_MAX, False, None),  # 92.3 - 27 > 64
     (fa.tanh_softcap(30.0), jnp.float16, _FIXED_MAX, False, None),
     (fa.tanh_softcap(4.0), jnp.float16, _FIXED_MAX, False, 6),  # 5.8 up; -5.8 lies 11.8 below
     (fa.tanh_softcap(9.0), jnp.float16, _FIXED_MAX, False, 1),  # 14 - 13.0 = 1.02 down; 13.0 - 1 <= 15
     (fa.tanh_softcap(10.0), jnp.float16, _FIXED_MAX, False, None),  # 14.4 - (-1) > 15: the integer shift's cost
     (fa.tanh_softcap(30.0), jnp.bfloat16, None, False, 44),
     (fa.tanh_softcap(30.0), jnp.bfloat16, {"mosaic_fwd_fixed_max": 0}, False, None),
     (fa.tanh_softcap(30.0), jnp.bfloat16, _FIXED_MAX, True, None),
     # The factor 2 folds into exp2's scale as a cap's does: logistic's bound 1 times 2 log2(e) = 2.9, up to 3.
     (lambda s, b, h, q_idx, kv_idx: 2.0 * jax.nn.sigmoid(s), jnp.bfloat16, _FIXED_MAX, False, 3),
     (lambda s, b, h, q_idx, kv_idx: -2.0 * jax.nn.sigmoid(s), jnp.bfloat16, _FIXED_MAX, False, None),
     (fa.generate_alibi_bias(2), jnp.bfloat16, _FIXED_MAX, False, None),
     (None, jnp.bfloat16, _FIXED_MAX, False, None)],
    ids=["cap-30", "cap-41", "cap-42-shifted", "cap-50-shifted", "cap-63-shifted", "cap-64-too-wide",
         "f16-cap-30-too-wide", "f16-cap-4", "f16-cap-9-shifted", "f16-cap-10-too-wide", "default-on", "off",
         "max-scores", "sigmoid", "negative-factor-not-peeled", "alibi", "no-score-mod"],
)
def test_the_softmax_takes_a_fixed_maximum_where_the_score_mod_bounds_its_result(
    score_mod, dtype, options, with_max_scores, fixed_shift, forward_plans
):
    """With mosaic_fwd_fixed_max: soft-capping's values lie in [-1, 1] before the cap's factor (folded into the
    exponent), so the softmax subtracts 1 (rounded up to an integer in exp2's units), not the running maximum,
    where every probability then stays a normal number of P's dtype; for wider caps an integer shift below it that
    keeps -1's probability normal and 1's finite. 2 sigmoid takes 1 too (logistic's [0, 1]); a negative factor
    after it is not folded out, and the program's last step is a multiply."""
    q, k, v = random_qkv(3, B=1, Hq=2, Hkv=1, L=256, S=384, E=64, Ev=64, dtype=dtype)
    _lower_for_cuda(q, k, v, fa.causal_mask, score_mod, kernel_options=options, with_max_scores=with_max_scores)
    (plan,) = forward_plans
    assert plan.fixed_shift == fixed_shift


@pytest.mark.parametrize(
    "score_mod, head_dim, options, exp2_fma, row_sum_fold",
    [(fa.tanh_softcap(30.0), 64, {"mosaic_fwd_exp2_fma": 32}, 32, False),
     (fa.tanh_softcap(50.0), 64, {"mosaic_fwd_exp2_fma": 128, "mosaic_fwd_overlap": 1}, 128, False),
     (fa.tanh_softcap(30.0), 64, {"mosaic_fwd_exp2_fma": 64, "mosaic_fwd_fixed_max": 0}, 0, False),
     (fa.generate_alibi_bias(2), 64, {"mosaic_fwd_exp2_fma": 64}, 0, False),
     (fa.tanh_softcap(30.0), 64, {"mosaic_fwd_exp2_fma": 64, "mosaic_fwd_row_sum_fold": 1, "mosaic_fwd_overlap": 1},
      64, True),
     (None, 64, {"mosaic_fwd_row_sum_fold": 1}, 0, True),
     (fa.tanh_softcap(30.0), 64, None, 80, False), (fa.tanh_softcap(30.0), 64, {"mosaic_block_n": 64}, 32, False),
     (fa.tanh_softcap(30.0), 128, None, 0, True), (fa.tanh_softcap(30.0), 128, {"mosaic_fwd_fixed_max": 0}, 0, False),
     (None, 128, None, 0, True), (fa.generate_alibi_bias(2), 64, None, 0, False),
     (fa.tanh_softcap(30.0), 256, None, 0, False)],
    ids=["softcap-32", "shifted-all-overlap", "running-max-none", "alibi-none", "softcap-fold-overlap", "noop-fold",
         "default-softcap-64", "default-softcap-64-bn64", "default-softcap-128", "default-running-max-128",
         "default-causal", "default-alibi", "default-softcap-256"],
)
def test_exp2_on_the_fma_units_and_folded_row_sums_plans(score_mod, head_dim, options, exp2_fma, row_sum_fold,
                                                         forward_plans):
    """mosaic_fwd_exp2_fma lowers where the fixed maximum bounds the exp2's argument and is dropped elsewhere (the
    polynomial takes no -inf); mosaic_fwd_row_sum_fold with either maximum; unset, soft-capping takes the first at
    head dim 64 (80 of 128 columns, 32 of 64) and the second at 128 (where each was measured); other score_mods
    neither, and causal without a score_mod the fold at 128 (the test below)."""
    q, k, v = random_qkv(3, B=1, Hq=2, Hkv=1, L=256, S=384, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
    _lower_for_cuda(q, k, v, fa.causal_mask, score_mod, kernel_options=options)
    (plan,) = forward_plans
    assert (plan.exp2_fma, plan.row_sum_fold) == (exp2_fma, row_sum_fold)


@pytest.mark.parametrize("mask_mod, score_mod, head_dim, row_sum_fold",
                         [(None, None, 128, True), (fa.noop_mask, None, 128, True), (None, None, 64, False),
                          (fa.causal_mask, None, 128, True), (fa.causal_mask, None, 64, False),
                          (fa.prefix_lm_mask(100), None, 128, True),
                          (fa.document_mask(jnp.arange(256) // 100, jnp.arange(384) // 100), None, 128, False),
                          (None, lambda s, b, h, q, kv: s * 0.5, 128, True),
                          (None, fa.generate_alibi_bias(2), 128, False)],
                         ids=["none-128", "noop-128", "none-64", "causal-128", "causal-64", "prefix-128",
                              "document-128", "scaled-128", "alibi-128"])
def test_plain_masks_fold_row_sums_at_head_dim_128(mask_mod, score_mod, head_dim, row_sum_fold, forward_plans):
    """Unset, mosaic_fwd_row_sum_fold is on where the mask_mod reads no captured array and no score_mod is left
    once its literal factors join the scale, at head dim 128 (NOTES.md sections 51 and 53)."""
    q, k, v = random_qkv(4, B=1, Hq=2, Hkv=2, L=256, S=384, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
    _lower_for_cuda(q, k, v, mask_mod, score_mod)
    (plan,) = forward_plans
    assert plan.row_sum_fold == row_sum_fold


def _per_head_windows(b, h, q_idx, kv_idx):
    windows = jnp.array([40, 300], jnp.int32)
    return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])


@pytest.mark.parametrize(
    "mask_mod, score_mod, head_dim, options, overlap",
    [(None, None, 128, None, True), (fa.causal_mask, None, 128, None, True), (fa.causal_mask, None, 64, None, False),
     (fa.sliding_window_mask(100), None, 128, None, True), (_per_head_windows, None, 128, None, True),
     (fa.document_mask(jnp.arange(256) // 100, jnp.arange(384) // 100), None, 128, None, False),
     (None, lambda s, b, h, q, kv: s * 0.5, 128, None, True), (None, fa.generate_alibi_bias(2), 128, None, False),
     (fa.causal_mask, fa.tanh_softcap(30.0), 128, None, False),
     (fa.causal_mask, None, 128, {"mosaic_block_n": 64}, False),
     (fa.causal_mask, None, 128, {"mosaic_fwd_overlap": 0}, False),
     (None, fa.generate_alibi_bias(2), 128, {"mosaic_fwd_overlap": 1}, True)],
    ids=["none-128", "causal-128", "causal-64", "sliding-128", "per-head-windows-128", "document-128", "scaled-128",
         "alibi-128", "softcap-128", "causal-128-key-tile-64", "causal-128-off", "alibi-128-on"],
)
def test_overlapped_walk_by_default_where_no_score_mod_is_left_at_head_dim_128(mask_mod, score_mod, head_dim,
                                                                               options, overlap, forward_plans):
    """Unset, mosaic_fwd_overlap is on at head dim 128 with 128-key tiles where no score_mod is left once its
    literal factors join the scale and the mask_mod reads no captured array at q_idx or kv_idx (a scalar read such
    as per-head window sizes is fine): NOTES.md section 54. Given, it is what it says."""
    q, k, v = random_qkv(4, B=1, Hq=2, Hkv=2, L=256, S=384, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
    _lower_for_cuda(q, k, v, mask_mod, score_mod, kernel_options=options)
    (plan,) = forward_plans
    assert plan.overlap == overlap


@pytest.mark.gpu
@pytest.mark.parametrize("mask_mod", [None, fa.causal_mask, fa.prefix_lm_mask(300)], ids=["full", "causal", "prefix"])
def test_gpu_plain_masks_with_their_default_folded_row_sums(mask_mod):
    # Lengths the key tile does not divide: the last tile's padded keys are masked by bounds as well.
    q, k, v = random_qkv(8, B=2, Hq=4, Hkv=2, L=640, S=1000, E=128, Ev=128, dtype=jnp.bfloat16)
    _compare_on_gpu(q, k, v, mask_mod, None)


@pytest.fixture
def all_forward_plans(monkeypatch):
    """The plan of every Mosaic forward launch traced while the test runs, repair launches included."""
    return _recorded_plans(monkeypatch, repairs=True)


def _double(score, b, h, q_idx, kv_idx):
    """A literal factor only: it joins the softmax's scale, and no score_mod is left to apply."""
    del b, h, q_idx, kv_idx
    return score * 2.0


@pytest.mark.parametrize(
    "score_mod, dtype, options, with_max_scores, anchored",
    [(None, jnp.bfloat16, None, False, True), (fa.generate_alibi_bias(2), jnp.bfloat16, None, False, False),
     (fa.generate_alibi_bias(2), jnp.bfloat16, {"mosaic_fwd_anchored_shift": 1}, False, True),
     (_double, jnp.bfloat16, None, False, True),
     (None, jnp.bfloat16, {"mosaic_fwd_overlap": 0}, False, True),
     (None, jnp.bfloat16, {"mosaic_fwd_anchored_shift": 0}, False, False),
     (None, jnp.float16, None, False, False), (fa.tanh_softcap(30.0), jnp.bfloat16, None, False, False),
     (fa.tanh_softcap(30.0), jnp.bfloat16, {"mosaic_fwd_anchored_shift": 1}, False, False),
     (None, jnp.bfloat16, None, True, False)],
    ids=["causal", "alibi-default", "alibi-option-on", "literal-factor", "plain-walk", "option-off", "float16",
         "softcap-fixed-max", "softcap-option-on", "max-scores"],
)
def test_anchored_walk_plans_a_repair_launch(score_mod, dtype, options, with_max_scores, anchored,
                                             all_forward_plans):
    """mosaic_fwd_anchored_shift anchors the walk on bfloat16 inputs, without the maximum scores, where the fixed
    maximum does not apply: by default where no score_mod is left once its literal factors join the scale, with
    the option on under any score_mod (ALiBi's bias, which the default leaves on the running maximum). A second
    launch then reruns the failed items on the running maximum, one query buffer, writing into the first launch's
    outputs (aliased, not copied)."""
    q, k, v = random_qkv(3, B=1, Hq=2, Hkv=1, L=256, S=384, E=128, Ev=128, dtype=dtype)
    text = _lower_for_cuda(q, k, v, fa.causal_mask, score_mod, kernel_options=options,
                           with_max_scores=with_max_scores)
    first, *repairs = all_forward_plans
    assert (first.anchored, first.repair) == (anchored, False)
    if not anchored:
        assert repairs == []
        assert "flex_attention_forward_mosaic_repair" not in text
        return
    (repair,) = repairs
    assert (repair.anchored, repair.repair, repair.q_buffers) == (False, True, 1)
    assert dataclasses.replace(repair, anchored=True, repair=False, q_buffers=first.q_buffers) == first
    assert "flex_attention_forward_mosaic_repair" in text
    assert text.count("output_operand_aliases") == 1  # the repair launch's out and lse are the first launch's


def test_anchor_certificate():
    """A row is exact where its sum stays at most 2^64 (bfloat16) and, with no anchor (the first tile allowed
    nothing), at least kv_len 2^-110, or where the walk had no tile at all."""
    from types import SimpleNamespace

    from flexattn_jax.backends.pallas_mosaic.forward import anchor_certificate

    plan = SimpleNamespace(dtype=jnp.dtype(jnp.bfloat16), kv_len=1024)
    inf, nan = float("inf"), float("nan")
    row_max = jnp.array([3.0, 3.0, 3.0, 3.0, -inf, -inf, -inf, 3.0], jnp.float32)
    row_sum = jnp.array([1.0, 2.0**64, 2.0**65, inf, 0.0, 2.0**-99, 2.0**-101, nan], jnp.float32)
    want = [True, True, False, False, False, True, False, False]
    assert anchor_certificate(row_max, row_sum, jnp.int32(3), plan).tolist() == want
    # No tile walked: nothing is allowed anywhere, and 0 / -inf is the exact answer.
    assert anchor_certificate(row_max[4:5], row_sum[4:5], jnp.int32(0), plan).tolist() == [True]


def test_repair_launch_reads_the_failed_items_and_the_gate():
    """The repair launch gets one flag per (batch, head, 128-row query tile) holding a failed row (lse NaN) among
    the first q_len rows, and a gate that is 0 only where no flag is set; it writes into out and lse in place."""
    from flexattn_jax.backends.pallas_mosaic.forward import repair_failed_items

    lse = jax.random.normal(jax.random.key(2), (2, 3, 384), jnp.float32)
    out = jax.random.normal(jax.random.key(3), (2, 3, 384, 64), jnp.float32)
    seen = []

    def launch(*args):
        *inputs, needs, gate, out_ref, lse_ref = args
        seen.append((inputs, needs, gate))
        lse_ref[0, 0, 5] = 7.0  # a repaired row

    clean_out, clean_lse = repair_failed_items(launch, ["inputs"], out, lse, 300)
    (inputs, needs, gate), = seen
    assert inputs == ["inputs"] and gate.tolist() == [0] and not needs.any() and needs.shape == (2, 3, 3)
    np.testing.assert_array_equal(clean_out, out)
    assert clean_lse[0, 0, 5] == 7.0
    # Failed rows in tile 1 of (1, 2) and tile 0 of (0, 1); one past q_len (row 350 of tile 2) does not count.
    failed = lse.at[1, 2, 200].set(jnp.nan).at[0, 1, 3].set(jnp.nan).at[1, 0, 350].set(jnp.nan)
    seen.clear()
    repair_failed_items(launch, [], out, failed, 300)
    (_, needs, gate), = seen
    assert gate.tolist() == [1]
    assert sorted(map(tuple, np.argwhere(np.asarray(needs)).tolist())) == [(0, 1, 0), (1, 2, 1)]


def test_fold_columns_keeps_row_sums():
    from flexattn_jax.backends.pallas_mosaic.forward import ROW_SUM_COLUMNS, fold_columns

    x = jax.random.uniform(jax.random.key(5), (64, 128), jnp.float32)
    folded = fold_columns(x, ROW_SUM_COLUMNS)
    assert folded.shape == (64, ROW_SUM_COLUMNS)
    # Column c of the fold adds the columns congruent to c modulo its width: each thread's own columns.
    assert_close(folded, x.reshape(64, -1, ROW_SUM_COLUMNS).sum(axis=1), jnp.float32, "fold")
    assert_close(folded.sum(axis=1), x.sum(axis=1), jnp.float32, "row sums")


def test_is_power_of_two():
    from flexattn_jax.backends.pallas_mosaic.forward import is_power_of_two

    assert [is_power_of_two(x) for x in (0.125, 1.0, 4.0, 2.0**-20)] == [True] * 4
    assert [is_power_of_two(x) for x in (128**-0.5, 0.0, -0.125, 3.0, 0.125 / 20.0)] == [False] * 5


@pytest.mark.parametrize("head_dim", [64, 128])
def test_max_scores_are_a_third_output_only_when_asked_for(head_dim):
    """With ``with_max_scores`` the kernel stages each row's maximum through shared memory as it does the lse, and
    the lowered program returns it; without, the program is as before."""
    q, k, v = random_qkv(2, B=1, Hq=2, Hkv=1, L=200, S=384, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)

    def results(text):
        return re.search(r"func.func public @main\(.*?\) -> \((.*)\)", text).group(1).count("tensor<")

    assert results(_lower_for_cuda(q, k, v, fa.causal_mask, fa.tanh_softcap(20.0), with_max_scores=True)) == 3
    assert results(_lower_for_cuda(q, k, v, fa.causal_mask, fa.tanh_softcap(20.0))) == 2


def test_a_custom_vjp_rule_in_the_score_mod_takes_the_triton_backward():
    """The Mosaic backward takes the score_mod's derivative in forward mode, which a jax.custom_vjp refuses; a
    jax.custom_jvp rule it applies."""
    from tests.test_captures import _halved_gradient, _straight_through_clip

    q = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.bfloat16)

    def reason(score_mod):
        return pallas_mosaic.unsupported_backward_reason(
            q, score_mod=score_mod, mask_mod=fa.noop_mask, block_size=(128, 128), num_blocks=(2, 2),
            kernel_options=None,
        )

    assert "custom_vjp" in reason(lambda score, b, h, q_idx, kv_idx: _straight_through_clip(score))
    assert reason(lambda score, b, h, q_idx, kv_idx: _halved_gradient(score)) is None


@pytest.mark.parametrize("name", sorted(_GATHERING))
def test_gathering_mods_are_refused_with_the_reason(name):
    case = next(c for c in MOD_CASES if c.name == name)
    B, H, L = 2, 2, 256
    q, k, v = random_qkv(2, B=B, Hq=H, Hkv=H, L=L, S=L, E=64, Ev=64, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, H, L, L, 2)
    block_mask = _block_mask(mask_mod, B, L, L)
    reason = pallas_mosaic.unsupported_reason(
        q, k, v, score_mod=score_mod or fa.identity, mask_mod=block_mask.mask_mod if block_mask else fa.noop_mask,
        block_size=(128, 128), num_blocks=(2, 2), kernel_options=None,
    )
    assert "other than q_idx or kv_idx plus an offset" in reason
    with pytest.raises(ValueError, match="other than q_idx or kv_idx plus an offset; pallas_mosaic reads arrays"):
        _lower_for_cuda(q, k, v, mask_mod, score_mod)


@pytest.mark.parametrize(
    "dtype, head_dim, block_size, options, match",
    [
        (jnp.float32, 64, 128, None, "supports bfloat16 and float16, got float32"),
        (jnp.bfloat16, 96, 128, None, r"head dims in \(64, 128, 256\), got E=96"),
        (jnp.bfloat16, 64, 64, None, "Q_BLOCK to be a multiple of 128, got 64"),
        (jnp.bfloat16, 64, (128, 32), None, "KV_BLOCK to be a multiple of the key tile"),
        (jnp.bfloat16, 256, 128, {"mosaic_block_n": 128, "mosaic_num_stages": 4}, "bytes of shared memory"),
        # Refused at launch on an H100 (232568 bytes needed, 232448 available).
        (jnp.bfloat16, 128, 128, {"mosaic_block_n": 128, "mosaic_num_stages": 3}, "bytes of shared memory"),
        (jnp.bfloat16, 256, 128, {"mosaic_fwd_q_buffers": 2}, "mosaic_fwd_q_buffers=2 .* bytes of shared memory"),
    ],
    ids=["f32", "head-96", "q-block-64", "kv-block-32", "smem", "smem-128x3", "smem-two-query-buffers"],
)
def test_unsupported_inputs_say_what_is_supported(dtype, head_dim, block_size, options, match):
    q, k, v = random_qkv(3, B=1, Hq=2, Hkv=2, L=256, S=256, E=head_dim, Ev=head_dim, dtype=dtype)
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, 256, 256, BLOCK_SIZE=block_size)
    reason = pallas_mosaic.unsupported_reason(
        q, k, v, score_mod=fa.identity, mask_mod=fa.causal_mask, block_size=block_mask.BLOCK_SIZE,
        num_blocks=block_mask.num_blocks, kernel_options=options,
    )
    assert reason is not None and re.search(match, reason), reason


@pytest.mark.parametrize(
    "options, error",
    [({"mosaic_block_n": 32}, ValueError), ({"mosaic_num_stages": 1}, ValueError), ({"mosaic_block_n": 64.0}, TypeError),
     ({"mosaic_tile": 64}, ValueError), ({"mosaic_fwd_q_buffers": 3}, ValueError),
     ({"mosaic_fwd_copy_warps": 2}, ValueError), ({"mosaic_bwd_copy_warps": 0}, ValueError),
     ({"mosaic_fwd_float_indices": 2}, ValueError), ({"mosaic_fwd_scale_queries": 2}, ValueError),
     ({"mosaic_fwd_fixed_max": 2}, ValueError), ({"mosaic_fwd_exp2_fma": 40}, ValueError),
     ({"mosaic_fwd_exp2_fma": 128, "mosaic_block_n": 64}, ValueError), ({"mosaic_fwd_row_sum_fold": 2}, ValueError),
     ({"mosaic_fwd_max_tree": 2}, ValueError)],
)
def test_bad_kernel_options_raise(options, error):
    q, k, v = random_qkv(4, B=1, Hq=2, Hkv=2, L=128, S=128, E=64, Ev=64, dtype=jnp.bfloat16)
    with pytest.raises(error, match="mosaic_"):
        pallas_mosaic.unsupported_reason(q, k, v, score_mod=fa.identity, mask_mod=fa.noop_mask, block_size=(128, 128),
                                         num_blocks=(1, 1), kernel_options=options)


@pytest.mark.skipif(HAS_GPU, reason="the CPU's answers")
def test_choice_on_cpu_explains_itself():
    q = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.bfloat16)
    choice = fa.explain_implementation(q, q, q)
    assert choice.implementation == "reference"
    assert "not a CUDA GPU" in choice.reasons["pallas_mosaic"]
    assert fa.explain_implementation(q, q, q, interpret=True).implementation == "pallas_triton"
    assert choice.backward.startswith("reference: JAX autodiff")
    assert fa.explain_implementation(q, q, q, interpret=True).backward.startswith("pallas_triton: its dK/dV")
    with pytest.raises(ValueError, match="needs a Hopper GPU"):
        x = jnp.ones((1, 2, 256, 64), jnp.bfloat16)
        fa.flex_attention(x, x, x, implementation="pallas_mosaic")
    with pytest.raises(ValueError, match="no interpret mode"):
        x = jnp.ones((1, 2, 256, 64), jnp.bfloat16)
        fa.flex_attention(x, x, x, implementation="pallas_mosaic", interpret=True)


# ----------------------------------------------------------------------------------------------- on a GPU


def _compare_on_gpu(q, k, v, mask_mod, score_mod, *, block_size=128, kernel_options=None, grads=True, scale=None,
                    block_mask=None):
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    if block_mask is None:
        block_mask = _block_mask(mask_mod, B, L, S, block_size)
    common = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_lse=True, scale=scale)
    choice = fa.explain_implementation(q, k, v, score_mod, block_mask, enable_gqa=True)
    assert choice.implementation == "pallas_mosaic", choice.reasons

    def run(implementation, q, k, v):
        return fa.flex_attention(q, k, v, implementation=implementation, kernel_options=kernel_options, **common)

    out, lse = jax.jit(lambda *a: run("pallas_mosaic", *a))(q, k, v)
    ref_out, ref_lse = run("reference", q, k, v)
    assert_close(out, ref_out, q.dtype, "out")
    assert_close(lse, ref_lse, q.dtype, "lse")
    if grads:
        cotangent = jax.random.normal(jax.random.key(99), out.shape, jnp.float32)

        def loss(implementation, q, k, v):
            return jnp.sum(run(implementation, q, k, v)[0].astype(jnp.float32) * cotangent)

        got = jax.jit(jax.grad(lambda *a: loss("pallas_mosaic", *a), argnums=(0, 1, 2)))(q, k, v)
        want = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
        for name, g, w in zip("qkv", got, want):
            assert_close(g, w, q.dtype, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", _SUPPORTED, ids=repr)
def test_gpu_every_supported_mod_matches_reference(case):
    B, Hq, Hkv, L, S = 2, 4, 2, 1000, 777
    q, k, v = random_qkv(5, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 5)
    # dQ fused into the dK/dV kernel (the default for long walks only): the path with more to get wrong.
    _compare_on_gpu(q, k, v, mask_mod, score_mod, kernel_options={"mosaic_bwd_fuse_dq": 1})


_SCHEDULE_CASES = [case for case in _SUPPORTED
                   if case.name in ("noop", "causal", "dilated", "document_causal", "alibi_learned_slopes",
                                    "softcap_causal")]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "options",
    [{"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_overlap": 0, "mosaic_bwd_auto_barriers": 1},
     {"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_overlap": 1, "mosaic_bwd_auto_barriers": 0},
     {"mosaic_bwd_fuse_dq": 0}],
    ids=["overlap0-fused-auto-barriers", "overlap1-fused-no-barriers", "dq-kernel"],
)
@pytest.mark.parametrize("case", _SCHEDULE_CASES, ids=repr)
def test_gpu_backward_schedules_match_reference(case, options):
    """The backward schedules beside the default ones that ``test_gpu_every_supported_mod_matches_reference`` runs
    for every mod (dQ fused; overlap 2 without automatic barriers, or overlap 1 without them for soft-capping)."""
    B, Hq, Hkv, L, S = 1, 4, 2, 700, 900
    q, k, v = random_qkv(14, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 14)
    _compare_on_gpu(q, k, v, mask_mod, score_mod, kernel_options=options)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_dim, dtype, options",
    [(64, jnp.bfloat16, None), (256, jnp.float16, None),
     (128, jnp.bfloat16, {"mosaic_block_n": 64, "mosaic_num_stages": 3}),
     (64, jnp.bfloat16, {"mosaic_bwd_fuse_dq": 1}), (128, jnp.bfloat16, {"mosaic_bwd_fuse_dq": 0}),
     (128, jnp.bfloat16, {"mosaic_bwd_num_stages": 3}),
     (128, jnp.bfloat16, {"mosaic_fwd_copy_warps": 4, "mosaic_bwd_copy_warps": 1, "mosaic_bwd_fuse_dq": 1}),
     (128, jnp.bfloat16, {"mosaic_fwd_copy_warps": 4, "mosaic_bwd_copy_warps": 1, "mosaic_bwd_fuse_dq": 0}),
     (64, jnp.bfloat16, {"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_auto_barriers": 1}),
     (64, jnp.bfloat16, {"mosaic_bwd_fuse_dq": 0, "mosaic_bwd_overlap": 1}),
     (64, jnp.bfloat16, {"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_overlap": 0, "mosaic_bwd_auto_barriers": 1}),
     (128, jnp.bfloat16, {"mosaic_bwd_fuse_dq": 1, "mosaic_bwd_heads_inner": 1}),
     (128, jnp.bfloat16, {"mosaic_bwd_fuse_dq": 0, "mosaic_bwd_heads_inner": 1})],
    ids=["bf16-64", "f16-256", "bn64-3stages", "64-fused-dq", "128-dq-kernel", "bwd-3stages", "other-copy-warps",
         "other-copy-warps-dq-kernel", "64-fused-auto-barriers", "64-overlap1-dq-kernel",
         "64-overlap0-fused-auto-barriers", "heads-inner-fused",
         "heads-inner-dq-kernel"],
)
def test_gpu_head_dims_and_options(head_dim, dtype, options):
    q, k, v = random_qkv(6, B=1, Hq=4, Hkv=1, L=2048, S=2048, E=head_dim, Ev=head_dim, dtype=dtype)
    _compare_on_gpu(q, k, v, fa.sliding_window_mask(300), fa.tanh_softcap(30.0), kernel_options=options)


_FORWARD_VARIANTS = {
    "plain": {"mosaic_fwd_overlap": 0}, "overlap": {"mosaic_fwd_overlap": 1},
    "int-indices": {"mosaic_fwd_float_indices": 0}, "scaled-queries": {"mosaic_fwd_scale_queries": 1},
    "exp2-fma": {"mosaic_fwd_exp2_fma": 48}, "row-sum-fold": {"mosaic_fwd_row_sum_fold": 1},
    "max-chain": {"mosaic_fwd_max_tree": 0, "mosaic_fwd_anchored_shift": 0},
    "running-max": {"mosaic_fwd_anchored_shift": 0},
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(_FORWARD_VARIANTS))
@pytest.mark.parametrize("case", _SUPPORTED, ids=repr)
def test_gpu_forward_variants_match_reference(case, variant):
    # Forward only, at a length no tile divides and with GQA: the plain walk, the intra-warpgroup overlapped one,
    # the index conversions score by score (the default builds them from float index tiles), the queries scaled
    # in shared memory, some exp2 from the FMA units' polynomial (with the fixed maximum), the row sums reduced
    # across threads once.
    B, Hq, Hkv, L, S = 1, 4, 2, 1100, 900
    q, k, v = random_qkv(8, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 8)
    _compare_on_gpu(q, k, v, mask_mod, score_mod, kernel_options=_FORWARD_VARIANTS[variant], grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _SCHEDULE_CASES, ids=repr)
def test_gpu_programs_of_many_items_match_reference(case):
    # The persistent forward runs 2-3 work items per program here (17 query tiles x 8 heads x 2 batches over one
    # program per SM), of walks of differing lengths: the key/value ring and the query buffers carry from one item
    # to the next, and the ping-pong restarts at each. The tests above run one item per program.
    B, Hq, Hkv, L, S = 2, 8, 2, 2100, 1900
    q, k, v = random_qkv(10, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 10)
    _compare_on_gpu(q, k, v, mask_mod, score_mod, grads=False)


@pytest.mark.gpu
def test_gpu_programs_of_many_items_with_rows_that_attend_nowhere():
    # Items of no key tile (every third query tile) between items that walk some: no step for the first, and
    # their queries still fetched and their output still stored through the query buffers.
    q, k, v = random_qkv(11, B=2, Hq=8, Hkv=8, L=2048, S=1024, E=64, Ev=64, dtype=jnp.bfloat16)

    def some_rows_attend_nowhere(b, h, q_idx, kv_idx):
        return ((q_idx // 128) % 3 != 1) & (kv_idx <= q_idx)

    _compare_on_gpu(q, k, v, some_rows_attend_nowhere, None, grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "options",
    [None, {"mosaic_fwd_float_indices": 0}, {"mosaic_block_n": 64}, {"mosaic_fwd_scale_queries": 1},
     {"mosaic_fwd_row_sum_fold": 1}],
    ids=["defaults", "int-indices", "bn64", "scaled-queries", "row-sum-fold"],
)
def test_gpu_forward_variants_at_head_dim_64_where_nothing_is_masked(options):
    # No mask and lengths the key tile divides (no bounds to mask): ALiBi's indices.
    q, k, v = random_qkv(9, B=2, Hq=4, Hkv=4, L=1024, S=1024, E=64, Ev=64, dtype=jnp.bfloat16)
    _compare_on_gpu(q, k, v, None, fa.generate_alibi_bias(4), kernel_options=options, grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("scale_queries", [0, 1])
@pytest.mark.parametrize("scale", [0.3, -0.2])
@pytest.mark.parametrize("score_mod", SCALED_SCORE_MODS.values(), ids=SCALED_SCORE_MODS.keys())
def test_gpu_scalings_folded_into_the_softmax(score_mod, scale, scale_queries):
    # The forward moves literal factors around the score_mod into its exp2 (peel_scalings), or the leading ones
    # into the query tile: either sign of the scale, and a factor that would move the row maximum if it were folded.
    q, k, v = random_qkv(9, B=1, Hq=2, Hkv=2, L=384, S=320, E=64, Ev=64, dtype=jnp.bfloat16)
    _compare_on_gpu(q, k, v, fa.causal_mask, score_mod, scale=scale, grads=False,
                    kernel_options={"mosaic_fwd_scale_queries": scale_queries})


@pytest.mark.gpu
@pytest.mark.parametrize(
    "options",
    [{"mosaic_fwd_overlap": 0}, {"mosaic_fwd_overlap": 1}, {"mosaic_fwd_row_sum_fold": 1},
     {"mosaic_fwd_overlap": 1, "mosaic_fwd_row_sum_fold": 1},
     {"mosaic_fwd_overlap": 0, "mosaic_fwd_max_tree": 0, "mosaic_fwd_anchored_shift": 0},
     {"mosaic_fwd_anchored_shift": 0}],
    ids=["plain", "overlap", "row-sum-fold", "row-sum-fold-overlap", "max-chain", "running-max"],
)
def test_gpu_fully_masked_rows_give_zero_and_minus_inf(options):
    q, k, v = random_qkv(7, B=1, Hq=2, Hkv=2, L=512, S=512, E=64, Ev=64, dtype=jnp.bfloat16)

    def upper_half_attends_nowhere(b, h, q_idx, kv_idx):
        return (q_idx < 256) & (kv_idx <= q_idx)

    _compare_on_gpu(q, k, v, upper_half_attends_nowhere, None, kernel_options=options)
    block_mask = _block_mask(upper_half_attends_nowhere, 1, 512, 512)
    out, lse = fa.flex_attention(q, k, v, block_mask=block_mask, return_lse=True, implementation="pallas_mosaic",
                                 kernel_options=options)
    assert float(jnp.abs(out[:, :, 256:].astype(jnp.float32)).max()) == 0.0
    assert bool(jnp.all(lse[:, :, 256:] == -jnp.inf))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_dim, score_mod",
    [(64, None), (64, fa.generate_alibi_bias(4)), (128, None)],
    ids=["anchored-64", "running-max-64", "overlapped-128"],
)
def test_gpu_lists_of_partial_blocks_only_match_reference(head_dim, score_mod):
    # A BlockMask without full-block lists, at lengths no tile divides: every step of the walk evaluates the
    # mask_mod, and the backward walks partial blocks only.
    q, k, v = random_qkv(12, B=1, Hq=4, Hkv=4, L=1100, S=900, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
    _compare_on_gpu(q, k, v, fa.causal_mask, score_mod, block_mask=_partial_lists_only(fa.causal_mask, 1100, 900))


# The anchored walk under any score_mod (by default only where none is left to apply).
_ANCHORED = {"mosaic_fwd_anchored_shift": 1}


def _hot_keys(score, b, h, q_idx, kv_idx):
    """Keys 600 to 609 scored 110 above the others (natural units): past what the anchored walk allows above its
    first tile's maximum (44) for every row whose walk reaches them after that tile. A score_mod rather than keys of
    their own, so that the hot keys differ and the gradients are not a cancellation."""
    del b, h, q_idx
    return score + jnp.where((kv_idx >= 600) & (kv_idx < 610), 110.0, 0.0).astype(score.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("mask_mod", [None, fa.causal_mask, fa.sliding_window_mask(700)],
                         ids=["full", "causal", "sliding"])
@pytest.mark.parametrize("options", [_ANCHORED, {**_ANCHORED, "mosaic_fwd_overlap": 0}], ids=["default", "plain"])
def test_gpu_anchored_walk_repairs_rows_past_its_limit(mask_mod, options):
    """Rows whose later scores exceed their first tile's maximum by more than 44 fail the certificate;
    their items run again on the running maximum: the result is the reference's, and so are the gradients."""
    q, k, v = random_qkv(21, B=2, Hq=2, Hkv=2, L=1000, S=1000, E=64, Ev=64, dtype=jnp.bfloat16)
    _compare_on_gpu(q, k, v, mask_mod, _hot_keys, kernel_options=options)
    out, lse = fa.flex_attention(q, k, v, _hot_keys, block_mask=_block_mask(mask_mod, 2, 1000, 1000),
                                 return_lse=True, implementation="pallas_mosaic", kernel_options=options)
    assert float(lse.max()) > 100.0  # the hot keys dominate the rows that see them
    assert bool(jnp.all(jnp.isfinite(lse) | (lse == -jnp.inf)))


_REPAIR_CASES = [case for case in _SUPPORTED
                 if case.name in ("noop", "causal", "document_causal", "alibi_learned_slopes", "dilated")]


@pytest.mark.gpu
@pytest.mark.parametrize("options", [_ANCHORED, {**_ANCHORED, "mosaic_fwd_overlap": 0}], ids=["default", "plain"])
@pytest.mark.parametrize("case", _REPAIR_CASES, ids=repr)
def test_gpu_repair_launch_of_every_item_matches_reference(case, options, monkeypatch):
    """Every certificate failing (patched), every item runs again in the repair launch, whose results alone are
    then the output: its gating, its aliased writes and its one query buffer, at lengths no tile divides and with
    GQA."""
    from flexattn_jax.backends.pallas_mosaic import forward

    monkeypatch.setattr(forward, "anchor_certificate", lambda row_max, row_sum, num_steps, plan: row_sum < 0)
    B, Hq, Hkv, L, S = 2, 4, 2, 1100, 900
    q, k, v = random_qkv(22, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 22)
    _compare_on_gpu(q, k, v, mask_mod, score_mod, kernel_options=options)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "cap, dtype, head_dim, options",
    [(30.0, jnp.bfloat16, 64, _FIXED_MAX), (30.0, jnp.bfloat16, 128, {**_FIXED_MAX, "mosaic_fwd_overlap": 1}),
     (41.0, jnp.bfloat16, 128, {**_FIXED_MAX, "mosaic_fwd_overlap": 0}), (4.0, jnp.float16, 64, _FIXED_MAX),
     (30.0, jnp.bfloat16, 64, {"mosaic_fwd_fixed_max": 0}), (50.0, jnp.bfloat16, 128, None),
     (63.0, jnp.bfloat16, 64, None), (9.0, jnp.float16, 128, None),
     (30.0, jnp.bfloat16, 64, {"mosaic_fwd_exp2_fma": 32}), (50.0, jnp.bfloat16, 64, {"mosaic_fwd_exp2_fma": 128}),
     (4.0, jnp.float16, 128, {"mosaic_fwd_exp2_fma": 64, "mosaic_fwd_overlap": 1})],
    ids=["bf16-30-64", "bf16-30-128-overlap", "bf16-41-128-plain", "f16-4-64", "running-max", "bf16-50-shifted",
         "bf16-63-shifted", "f16-9-shifted", "exp2-fma-32", "exp2-fma-all-shifted", "exp2-fma-64-f16-overlap"],
)
def test_gpu_soft_capping_with_a_fixed_maximum_matches_reference(cap, dtype, head_dim, options):
    """The softmax against the cap (mosaic_fwd_fixed_max): scores driven to both
    ends of the cap, a length no tile divides, and every fifth row attending nowhere (output 0, lse -inf)."""
    L = 700
    q, k, v = random_qkv(12, B=1, Hq=4, Hkv=2, L=L, S=L, E=head_dim, Ev=head_dim, dtype=jnp.float32)
    q = (q * 3.0 * cap**0.5).astype(dtype)  # q.k * scale of spread about 3 * cap: most scores beyond the cap
    k, v = k.astype(dtype), v.astype(dtype)

    def some_rows_attend_nowhere(b, h, q_idx, kv_idx):
        return (q_idx % 5 != 3) & (kv_idx <= q_idx)

    _compare_on_gpu(q, k, v, some_rows_attend_nowhere, fa.tanh_softcap(cap), kernel_options=options)
    block_mask = _block_mask(some_rows_attend_nowhere, 1, L, L)
    out, lse = fa.flex_attention(q, k, v, fa.tanh_softcap(cap), block_mask, enable_gqa=True, return_lse=True,
                                 implementation="pallas_mosaic", kernel_options=options)
    assert float(jnp.abs(out[:, :, 3::5].astype(jnp.float32)).max()) == 0.0
    assert bool(jnp.all(lse[:, :, 3::5] == -jnp.inf))


_MAX_SCORES_CASES = [case for case in _SUPPORTED
                     if case.name in ("noop", "causal", "document_causal", "alibi", "softcap_causal", "composed")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", _MAX_SCORES_CASES, ids=repr)
@pytest.mark.parametrize("options", [None, {"mosaic_fwd_q_buffers": 1, "mosaic_block_n": 64}],
                         ids=["default", "one-buffer-64"])
def test_gpu_max_scores_match_reference(case, options):
    """return_aux's max_scores from the Mosaic forward: lengths no tile divides, and a row of each of the first
    query tiles that attends nowhere (max -inf there)."""
    B, Hq, Hkv, L, S = 2, 4, 2, 1000, 777
    q, k, v = random_qkv(8, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 8)
    mask_mod = fa.and_masks(mask_mod or fa.noop_mask, lambda b, h, q_idx, kv_idx: q_idx % 97 != 5)
    block_mask = _block_mask(mask_mod, B, L, S)
    request = fa.AuxRequest(lse=True, max_scores=True)
    common = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_aux=request)
    assert fa.explain_implementation(q, k, v, score_mod, block_mask, enable_gqa=True).implementation == "pallas_mosaic"
    out, aux = jax.jit(lambda *a: fa.flex_attention(*a, kernel_options=options, **common))(q, k, v)
    ref_out, ref_aux = fa.flex_attention(q, k, v, implementation="reference", **common)
    assert_close(out, ref_out, q.dtype, "out")
    assert_close(aux.lse, ref_aux.lse, q.dtype, "lse")
    assert_close(aux.max_scores, ref_aux.max_scores, q.dtype, "max_scores")
    assert bool(jnp.all(aux.max_scores[:, :, 5::97] == -jnp.inf))


def _program_and_consts(mod, score=False):
    from flexattn_jax.backends import _captures

    (program,), consts = _captures.trace_for_tiles(mod, [(64, 128, "full")], score=score)
    return program, consts


def _program(mod, score=False):
    return _program_and_consts(mod, score)[0]


@pytest.mark.parametrize("scale, shift", [(43.28085122666891, 44), (72.13475204444818, 26), (1.0, 0), (1.0, -3)])
def test_exp2_polynomial_is_within_its_bound(scale, shift):
    from flexattn_jax.backends.pallas_mosaic.forward import exp2_polynomial, exp2_split

    # The range a fixed shift leaves: down to -120 below it (FIXED_SHIFT_BELOW), up to 64 above.
    x = jnp.concatenate([-jnp.abs(jax.random.normal(jax.random.key(0), (4096,))) * 30.0,
                         jnp.linspace(-125.0, 64.0, 8193)])
    y = (x + shift) / scale
    want = np.exp2(np.asarray(y, np.float64) * scale - shift)
    # Op by op, not under jit: XLA's CPU compiler would fold the rounding's (.. + M) - M (the kernel keeps it).
    got = exp2_polynomial(y, scale, shift)
    assert float(np.max(np.abs(np.asarray(got, np.float64) - want) / want)) < 1e-4
    tile = jax.random.uniform(jax.random.key(2), (64, 128), jnp.float32, -100.0, 20.0)
    tile = (tile + shift) / scale
    split = exp2_split(tile, scale, shift, 48)
    want = jnp.exp2(tile * jnp.float32(scale) - jnp.float32(shift))
    assert float(jnp.max(jnp.abs(split - want) / want)) < 1e-4
    assert bool(jnp.all(split[:, :80] == want[:, :80]))  # the first columns stay on exp2 itself
    assert not bool(jnp.all(split[:, 80:] == want[:, 80:]))  # the others come from the polynomial
    assert bool(jnp.all(exp2_split(tile, scale, shift, 0) == want))


@pytest.mark.parametrize("total", [1, 7, 131, 132, 133, 263, 264, 2048])
def test_persistent_schedule_runs_every_item_once(total):
    from flexattn_jax.backends.pallas_mosaic.forward import persistent_schedule

    num_programs = min(total, 132)
    runs = []
    for program in range(num_programs):
        count, work_of = persistent_schedule(jnp.int32(program), total, num_programs)
        runs += [int(work_of(jnp.int32(i))) for i in range(int(count))]
    assert sorted(runs) == list(range(total))


def test_persistent_schedule_balances_causal_query_tiles():
    from flexattn_jax.backends.pallas_mosaic.forward import persistent_schedule

    # B=8, H=16, S=2048: 16 query tiles a head, numbered heaviest first; a causal tile's weight is its key steps.
    tiles, total, num_programs = 16, 16 * 128, 132
    loads = []
    for program in range(num_programs):
        count, work_of = persistent_schedule(jnp.int32(program), total, num_programs)
        loads.append(sum(tiles - int(work_of(jnp.int32(i))) % tiles for i in range(int(count))))
    assert max(loads) <= 1.05 * sum(loads) / num_programs  # round-robin dealing: 1.21


def test_reads_by_q_idx_or_kv_idx_plus_a_constant_are_rows_and_columns():
    from flexattn_jax.backends.pallas_mosaic.forward import ReadSite, analyze_reads

    ids = jnp.arange(1000, dtype=jnp.int32) // 300
    sites, problem = analyze_reads(_program(fa.and_masks(fa.causal_mask, fa.document_mask(ids))), 128)
    assert problem is None and sites == (ReadSite("row", 0, axis=0), ReadSite("column", 0, axis=0))
    sites, _ = analyze_reads(_program(fa.document_mask(jnp.stack([ids, ids[::-1]]))), 128)
    assert sites == (ReadSite("row", 0, axis=1), ReadSite("column", 0, axis=1))  # ids[b, q_idx]: b stays a scalar
    sites, _ = analyze_reads(_program(fa.alibi_bias(jnp.ones(4)), score=True), 128)
    assert sites == (ReadSite("scalar", 0),)

    def shifted(b, h, q_idx, kv_idx):  # kv_idx - 3 counts from the end for kv_idx < 3, as jnp indexes
        return ids[q_idx + 256] == ids[kv_idx - 3]

    sites, problem = analyze_reads(_program(shifted), 128)
    assert problem is None
    assert sites == (ReadSite("row", 0, axis=0, offset=256), ReadSite("column", 0, axis=0, offset=-3))


def test_reads_that_only_agree_with_q_idx_somewhere_are_refused():
    from flexattn_jax.backends.pallas_mosaic.forward import analyze_reads

    ids = jnp.arange(1000, dtype=jnp.int32) // 300

    def clamped(b, h, q_idx, kv_idx):
        return ids[jnp.minimum(q_idx, 100)] == ids[kv_idx]

    _, problem = analyze_reads(_program(clamped), 128)
    assert "other than q_idx or kv_idx plus an offset" in problem
    _, problem = analyze_reads(_program(fa.relative_position_bias(jnp.ones((4, 33))), score=True), 128)
    assert "other than q_idx or kv_idx plus an offset" in problem


def test_an_offset_that_depends_on_b_or_h_is_refused():
    """The kernel reads every program's rows at one offset: ``ids[q_idx + h]`` and ``ids[q_idx + starts[h]]`` would
    read the wrong entries for all heads but one."""
    from flexattn_jax.backends.pallas_mosaic.forward import analyze_reads

    ids, starts = jnp.arange(1000, dtype=jnp.int32) // 300, jnp.array([0, 128, 256, 384], jnp.int32)
    _, problem = analyze_reads(_program(lambda b, h, q_idx, kv_idx: ids[q_idx + h] == ids[kv_idx]), 128)
    assert "offset from q_idx or kv_idx that depends on b or h" in problem
    _, problem = analyze_reads(_program(lambda b, h, q_idx, kv_idx: ids[q_idx + starts[h]] == ids[kv_idx]), 128)
    assert "differently for each b or h" in problem


def test_an_offset_from_captured_values_is_known_at_run_time():
    """``ids[q_idx + start]`` with a captured scalar start: the probes with zeros see q_idx itself, those with other
    values an offset; the site is marked run-time, and ``walked_consts`` computes it from the real start, also
    inside a jit where it is traced (a BlockMask's query block selected by a traced index)."""
    from flexattn_jax.backends.pallas_mosaic.forward import ReadSite, analyze_reads, walked_consts

    ids = jnp.arange(1000, dtype=jnp.int32) // 7

    def shifted_documents(start):
        def mask_mod(b, h, q_idx, kv_idx):
            return ids[q_idx + start] == ids[kv_idx]

        return mask_mod

    sites, problem = analyze_reads(_program(shifted_documents(jnp.int32(0))), 128)
    assert problem is None and [(s.kind, s.offset) for s in sites] == [("whole", 0), ("row", None), ("column", 0)]
    # An offset that the captured start sets only past a threshold is seen to change too.
    start = jnp.int32(0)
    sites, problem = analyze_reads(_program(lambda b, h, q_idx, kv_idx: ids[q_idx + jnp.where(start > 300, 100, 0)] == ids[
        kv_idx]), 128)
    assert problem is None and sites[1].offset is None
    # The offset may be any sum of constants and captured values.
    sites, problem = analyze_reads(_program(lambda b, h, q_idx, kv_idx: ids[q_idx - (3 - 2 * start)] == ids[
        kv_idx + start]), 128)
    assert problem is None
    assert [(s.kind, s.offset) for s in sites if s.kind != "whole"] == [("row", None), ("column", None)]

    @jax.jit
    def walked(start):
        program, consts = _program_and_consts(shifted_documents(start))
        sites, problem = analyze_reads(program, 128)
        assert problem is None and sites[1].offset is None
        walked_in, sites = walked_consts(program, consts, sites, 256, 1024)
        assert sites[1].source == len(consts) and sites[2].source is None
        return walked_in[sites[1].source], walked_in[sites[2].const]

    for start in (900, -100):
        rows, columns = walked(jnp.int32(start))
        assert rows.shape == (256,) and columns.shape == (1024,)
        positions = jnp.arange(256) + start
        # Past the end jnp clamps; before the start it counts from the end.
        want = ids[jnp.minimum(jnp.where(positions < 0, positions + 1000, positions), 999)]
        assert (rows == want).all(), start
        assert (columns == jnp.concatenate([ids, jnp.full(24, ids[-1])])).all()  # padded with the last entry


def test_an_index_that_is_q_idx_plus_an_offset_only_at_the_probed_values_is_refused():
    """The probes see a read at a few positions and a few captured values; the jaxpr shows whether the index is
    q_idx (kv_idx) plus an offset of captured values and constants for every value. Each of these agrees with
    q_idx plus an offset wherever the probes look, and the kernel would read the wrong rows elsewhere: when the
    captured start is 7 (the first two), or at query 777 (the third)."""
    from flexattn_jax.backends.pallas_mosaic.forward import analyze_reads

    ids, start = jnp.arange(1000, dtype=jnp.int32) // 7, jnp.int32(0)
    mods = {
        "doubled at one start": lambda b, h, q_idx, kv_idx: ids[
            jnp.where(q_idx + start == q_idx + 7, 2 * q_idx, q_idx)] == ids[kv_idx],
        "shifted at one start": lambda b, h, q_idx, kv_idx: ids[
            q_idx + jnp.where(q_idx + start == q_idx + 7, 100, 0)] == ids[kv_idx],
        "moved at one query": lambda b, h, q_idx, kv_idx: ids[jnp.where(q_idx == 777, 0, q_idx)] == ids[kv_idx],
    }
    for name, mod in mods.items():
        sites, problem = analyze_reads(_program(mod), 128)
        assert sites is None and "plus an offset of constants and captured values" in problem, name
        q, k, v = random_qkv(0, B=1, Hq=1, Hkv=1, L=1000, S=1000, E=64, Ev=64, dtype=jnp.bfloat16)
        reason = pallas_mosaic.unsupported_reason(q, k, v, score_mod=fa.identity, mask_mod=mod, block_size=(128, 128),
                                                  num_blocks=(8, 8), kernel_options=None)
        assert "plus an offset of constants and captured values" in reason, name  # pallas_triton serves it


def test_read_analyses_are_kept_by_program_text(monkeypatch):
    """Outside jit every call traces the mods again: the same mod traced twice is probed once, and a mod that
    differs in a literal (an offset) is probed for itself."""
    from flexattn_jax.backends.pallas_mosaic import forward

    probed = []
    analyze = forward._analyze_reads
    monkeypatch.setattr(forward, "_analyze_reads",
                        lambda program, block_n: probed.append(1) or analyze(program, block_n))
    monkeypatch.setattr(forward, "_ANALYSES", {})
    ids = jnp.arange(1000, dtype=jnp.int32) // 7

    def shifted(offset):
        return lambda b, h, q_idx, kv_idx: ids[q_idx + offset] == ids[kv_idx]

    first, again, other = (forward.analyze_reads(_program(shifted(n)), 128) for n in (256, 256, 257))
    assert first == again and first[0][0].offset == 256 and other[0][0].offset == 257
    assert len(probed) == 2


def test_walked_consts_shift_as_jnp_indexes():
    """Each shifted copy's entry i is what the mod itself reads at q_idx = i (or kv_idx = i): negative positions
    count from the end, positions past either end are clamped."""
    from flexattn_jax.backends.pallas_mosaic.forward import analyze_reads, walked_consts

    ids = jax.random.randint(jax.random.key(0), (3, 300), 0, 1000)
    bias = jax.random.normal(jax.random.key(1), (250,))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + jnp.where(ids[b, q_idx + 40] > ids[b, kv_idx], bias[kv_idx - 200], bias[q_idx - 3])

    program, program_consts = _program_and_consts(score_mod, score=True)
    sites, problem = analyze_reads(program, 128)
    assert problem is None and sum(site.offset != 0 for site in sites) == 3
    consts, walked = walked_consts(program, program_consts, sites, 384, 512)
    for site in walked:
        array = program_consts[site.const]
        if site.source is None:  # a read at q_idx or kv_idx itself: the array padded
            assert site.offset == 0 and consts[site.const].shape[site.axis] in (384, 512)
            continue
        copy = consts[site.source]
        for i in (0, 1, 150, copy.shape[site.axis] - 1):
            want = jax.vmap(lambda b: array[b, i + site.offset])(jnp.arange(3)) if array.ndim == 2 else array[
                i + site.offset]
            got = copy[:, i] if array.ndim == 2 else copy[i]
            assert (got == want).all(), (site, i)


def _plain_vector_load(ref, index, axis):
    return ref[tuple(slice(i.start, i.start + i.size) if isinstance(i, pl.Slice) else i for i in index)]


_OFFSET_IDS = jax.random.randint(jax.random.key(5), (2, 700), 0, 4)
_OFFSET_BIAS = jax.random.normal(jax.random.key(6), (700,))


def _offset_mods(start):
    """Mods reading captured arrays at q_idx or kv_idx plus an offset: static, negative (counted from the end near
    0), from a captured start (``start``), past the end (clamped)."""
    return {
        "document rows ahead": (False, lambda b, h, q_idx, kv_idx: _OFFSET_IDS[b, q_idx + 256] == _OFFSET_IDS[
            b, kv_idx]),
        "behind and captured": (True, lambda s, b, h, q_idx, kv_idx: s + _OFFSET_BIAS[q_idx - 7] * _OFFSET_BIAS[
            kv_idx + start]),
        "past the end": (True, lambda s, b, h, q_idx, kv_idx: s - _OFFSET_BIAS[q_idx + 600]),
        # Offsets summed from the captured start and constants, on both axes.
        "captured sums": (False, lambda b, h, q_idx, kv_idx: _OFFSET_IDS[b, q_idx + 2 * start - 3] == _OFFSET_IDS[
            b, kv_idx - start]),
    }


@pytest.mark.parametrize("transposed", [False, True], ids=["forward tiles", "dK/dV tiles"])
@pytest.mark.parametrize("name", sorted(_offset_mods(0)))
@pytest.mark.parametrize("start", [0, 45, -20])
def test_the_kernels_reads_give_the_mods_values(name, start, transposed):
    """What the kernels compute from a mod, with its reads made as theirs are (``walked_consts``'s arrays, sliced by
    ``site_load`` at each tile's first query and key), against the mod itself at every position of several tiles,
    under a jit where the captured start is traced: the forward's [64 queries, 128 keys] tiles and the dK/dV
    kernel's transposed [64 keys, 64 queries] ones."""
    from flexattn_jax.backends import _captures
    from flexattn_jax.backends.pallas_mosaic.forward import analyze_reads, site_load, walked_consts

    L, S, q_pad, kv_pad = 500, 600, 512, 640
    tiles = [(0, 0, 0, 1), (448, 512, 1, 0), (192, 128, 1, 1)]  # (q_start, kv_start, b, h)
    shape = (64, 64) if transposed else (64, 128)
    q_axis = 1 if transposed else 0

    @jax.jit
    def kernel_and_mod(start):
        is_score, mod = _offset_mods(start)[name]
        (program,), consts = _captures.trace_for_tiles(mod, [(*shape, "full")], score=is_score)
        sites, problem = analyze_reads(program, shape[1])
        assert problem is None, problem
        walked, sites = walked_consts(program, consts, sites, q_pad, kv_pad)
        got, want = [], []
        for q_start, kv_start, b, h in tiles:
            q_idx = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
            kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
            score = [jnp.ones(shape, jnp.float32)] if is_score else []
            load = site_load(sites, walked, q_start, kv_start, shape, transposed=transposed,
                             vector_load=_plain_vector_load)
            got.append(program(walked[: program.num_consts], *score, jnp.int32(b), jnp.int32(h), q_idx, kv_idx,
                               load=load))
            at_one = lambda qi, ki: mod(*[jnp.float32(1.0)][: int(is_score)], b, h, qi, ki)  # noqa: E731
            want.append(jax.vmap(jax.vmap(at_one))(q_idx, kv_idx))
        return got, want

    got, want = kernel_and_mod(jnp.int32(start))
    for (q_start, kv_start, _, _), g, w in zip(tiles, got, want):
        # Queries and keys past the true lengths are masked or dropped by the kernels; compare the others.
        rows, columns = min(shape[q_axis], L - q_start), min(shape[1 - q_axis], S - kv_start)
        if transposed:
            g, w = g.T, w.T
        assert (g[:rows, :columns] == w[:rows, :columns]).all(), (q_start, kv_start)


def test_query_block_selections_with_captured_reads_stay_on_mosaic():
    """A BlockMask's query-block selection of a document mask reads ``ids[q_idx + offset]``: a static offset for an
    int, a captured one for a traced index inside jit. Both are served by the Mosaic kernels, which lower."""
    ids = jnp.repeat(jnp.arange(4), 256)
    bm = fa.create_block_mask(fa.and_masks(fa.causal_mask, fa.document_mask(ids)), None, None, 1024, 1024)
    q = jax.ShapeDtypeStruct((1, 2, 128, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, 1024, 128), jnp.bfloat16)

    def reasons(mask_mod):
        common = dict(score_mod=fa.identity, mask_mod=mask_mod, block_size=(128, 128), num_blocks=(1, 8),
                      kernel_options=None)
        return (pallas_mosaic.unsupported_reason(q, kv, kv, **common),
                pallas_mosaic.unsupported_backward_reason(q, **{k: v for k, v in common.items() if k != "mask_mod"},
                                                          mask_mod=mask_mod))

    assert reasons(bm[:, :, 3].mask_mod) == (None, None)
    choices = []

    @jax.jit
    def explain(block):
        choices.append(reasons(bm[:, :, block].mask_mod))
        return block

    explain(jnp.int32(3))
    assert choices == [(None, None)]

    qs, ks, vs = random_qkv(3, B=1, Hq=2, Hkv=2, L=128, S=1024, E=128, Ev=128, dtype=jnp.bfloat16)
    text = _lower_for_cuda(qs, ks, vs, bm[:, :, 5].mask_mod, None)
    assert "flex_attention_forward_mosaic" in text
    text = _lower_gradient_for_cuda(qs, ks, vs, bm[:, :, 5].mask_mod, None)
    assert "flex_attention_dkdv_mosaic" in text


def _lower_gradient_for_cuda(q, k, v, mask_mod, score_mod, *, score_mod_of=None, array_gradient=False,
                             kernel_options=None, scale=0.125, block_mask=None):
    """The text of the CUDA lowering of the gradient of sum(out) with respect to q, k, v, and with respect to the
    array the score_mod closes over when ``array_gradient`` (``score_mod_of(array)`` builds the mod then)."""
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    if block_mask is None:
        block_mask = fa.create_block_mask(mask_mod or fa.noop_mask, B, None, L, S)

    def loss(q, k, v, array):
        mod = score_mod_of(array) if score_mod_of is not None else (score_mod or fa.identity)
        out, _ = pallas_mosaic.attention(
            q, k, v, score_mod=mod, mask_mod=block_mask.mask_mod, kv_num_blocks=block_mask.kv_num_blocks,
            kv_indices=block_mask.kv_indices, full_kv_num_blocks=block_mask.full_kv_num_blocks,
            full_kv_indices=block_mask.full_kv_indices, block_size=block_mask.BLOCK_SIZE, scale=scale,
            kernel_options=kernel_options,
        )
        return jnp.sum(out.astype(jnp.float32))

    array = jnp.linspace(0.1, 0.5, q.shape[1], dtype=jnp.float32)
    argnums = (0, 1, 2, 3) if array_gradient else (0, 1, 2)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        lowered = jax.jit(jax.grad(loss, argnums=argnums)).trace(q, k, v, array).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


@pytest.mark.parametrize("fuse_dq", [0, 1])
def test_key_and_value_of_batch_one_lower_for_cuda_without_copies(fuse_dq):
    """The forward reads key and value of batch 1 for every query batch (its copies index batch 0): the lowered
    module takes them as they are and makes no [B, ...] copy. So does the gradient's where each dK/dV program adds
    up every query batch (``mosaic_bwd_kv_batch_loop`` 1, the default where those programs fill the GPU), with dK
    and dV of batch 1 straight from the kernel; with 0 (the default at this size: 4 programs) it broadcasts and
    sums."""
    q, _, _ = random_qkv(3, B=3, Hq=4, Hkv=2, L=256, S=200, E=64, Ev=64, dtype=jnp.bfloat16)
    _, k, v = random_qkv(4, B=1, Hq=4, Hkv=2, L=256, S=200, E=64, Ev=64, dtype=jnp.bfloat16)
    copy = r"broadcast_in_dim.*-> tensor<3x2x\d+x64xbf16>"
    assert not re.search(copy, _lower_for_cuda(q, k, v, fa.causal_mask, None))
    for loop in (None, 0, 1):
        options = {"mosaic_bwd_fuse_dq": fuse_dq}
        if loop is not None:
            options["mosaic_bwd_kv_batch_loop"] = loop
        text = _lower_gradient_for_cuda(q, k, v, fa.causal_mask, None, kernel_options=options)
        assert "mosaic_gpu" in text and _TRITON_CALL not in text
        assert bool(re.search(copy, text)) == (loop != 1), loop


@pytest.mark.gpu
@pytest.mark.parametrize("score_mod", [None, fa.tanh_softcap(30.0)], ids=["no-score-mod", "softcap"])
@pytest.mark.parametrize("fuse_dq", [0, 1])
@pytest.mark.parametrize("Hkv", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("loop", [0, 1])
def test_gpu_key_and_value_of_batch_one_gradients_match_reference(loop, Hkv, fuse_dq, score_mod):
    """dK and dV of key and value shared by three query batches, each with its own mask, with GQA or not, at
    lengths no tile divides: added up in each dK/dV program (``mosaic_bwd_kv_batch_loop`` 1) or broadcast and
    summed (0)."""
    B, Hq, L, S = 3, 4, 300, 450
    q, _, _ = random_qkv(21, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)
    _, k, v = random_qkv(22, B=1, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)

    def mask_mod(b, h, q_idx, kv_idx):  # batch b sees 100 b more keys
        return kv_idx <= q_idx + 100 * b

    _compare_on_gpu(q, k, v, mask_mod, score_mod,
                    kernel_options={"mosaic_bwd_kv_batch_loop": loop, "mosaic_bwd_fuse_dq": fuse_dq})


_TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("case", _SUPPORTED, ids=repr)
def test_every_supported_mod_lowers_the_mosaic_backward(case):
    """Forward and backward in Mosaic GPU (no Triton kernel), with GQA and lengths no tile divides."""
    B, Hq, Hkv, L, S = 2, 4, 2, 300, 200
    q, k, v = random_qkv(8, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=64, Ev=64, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 8)
    text = _lower_gradient_for_cuda(q, k, v, mask_mod, score_mod)
    assert "mosaic_gpu" in text and _TRITON_CALL not in text


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("fuse_dq", [0, 1])
def test_both_dq_paths_lower_at_both_head_dims(head_dim, fuse_dq):
    """dQ fused into the dK/dV kernel (reduce-adds; at head dim 64 the warpgroups alternate, at 128 they split the
    columns) or in a kernel of its own; one mask_mod with a captured array and a score_mod."""
    B, Hq, Hkv, L, S = 1, 4, 2, 300, 200
    q, k, v = random_qkv(12, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
    ids = jnp.arange(L, dtype=jnp.int32) // 70
    mask_mod = fa.and_masks(fa.causal_mask, fa.document_mask(ids, ids[:S]))
    text = _lower_gradient_for_cuda(q, k, v, mask_mod, fa.tanh_softcap(30.0),
                                    kernel_options={"mosaic_bwd_fuse_dq": fuse_dq})
    assert "mosaic_gpu" in text and _TRITON_CALL not in text


@pytest.mark.parametrize("fuse_dq", [0, 1])
def test_backward_schedule_options_reach_the_kernels(fuse_dq, monkeypatch):
    """``mosaic_bwd_overlap`` decides where the backward kernels read an accumulator with a product still in flight
    (``wgmma_accumulator_load(..., wait_n=1)``: none at 0; in the dK/dV kernel one per traced step at 1, two at 2;
    in the dQ kernel one at 1 and 2), and ``mosaic_bwd_auto_barriers`` 0 compiles the dK/dV kernel, and it alone,
    without Pallas's automatic barriers; unset, both follow the score_mod (``default_schedule``)."""
    from flexattn_jax.backends.pallas_mosaic import backward

    early_reads, no_auto_barriers = [], []
    load, kernel = backward.plgpu.wgmma_accumulator_load, backward.plgpu.kernel

    def counting_load(acc, *, wait_n=0):
        early_reads.append(wait_n == 1)
        return load(acc, wait_n=wait_n)

    def recording_kernel(*args, compiler_params, kernel_name, **kwargs):
        if compiler_params.unsafe_no_auto_barriers:
            no_auto_barriers.append(kernel_name)
        return kernel(*args, compiler_params=compiler_params, kernel_name=kernel_name, **kwargs)

    monkeypatch.setattr(backward.plgpu, "wgmma_accumulator_load", counting_load)
    monkeypatch.setattr(backward.plgpu, "kernel", recording_kernel)

    def lower(head_dim, score_mod=None, **options):
        early_reads.clear()
        no_auto_barriers.clear()
        q, k, v = random_qkv(13, B=1, Hq=2, Hkv=2, L=256, S=256, E=head_dim, Ev=head_dim, dtype=jnp.bfloat16)
        # The forward's overlapped walk (its default here at head dim 128) reads accumulators early too: off.
        _lower_gradient_for_cuda(q, k, v, fa.causal_mask, score_mod,
                                 kernel_options={"mosaic_bwd_fuse_dq": fuse_dq, "mosaic_fwd_overlap": 0, **options})
        return sum(early_reads), list(no_auto_barriers)

    steps = 2  # the causal walk's step is traced twice: partial blocks, then full ones
    dq_kernel = 0 if fuse_dq else steps
    assert lower(128, mosaic_bwd_overlap=0, mosaic_bwd_auto_barriers=1) == (0, [])
    assert lower(128, mosaic_bwd_overlap=1, mosaic_bwd_auto_barriers=1) == (steps + dq_kernel, [])
    assert lower(64) == (2 * steps + dq_kernel, ["flex_attention_dkdv_mosaic"])  # the defaults
    # The defaults for a score_mod whose derivative is not 1, at both head dims.
    assert lower(64, fa.tanh_softcap(30.0)) == (steps + dq_kernel, ["flex_attention_dkdv_mosaic"])
    assert lower(128, fa.tanh_softcap(30.0)) == (steps + dq_kernel, ["flex_attention_dkdv_mosaic"])
    assert lower(64, fa.tanh_softcap(30.0), mosaic_bwd_overlap=0, mosaic_bwd_auto_barriers=1) == (0, [])
    assert lower(64, fa.tanh_softcap(30.0), mosaic_bwd_overlap=2, mosaic_bwd_auto_barriers=0) == (
        2 * steps + dq_kernel, ["flex_attention_dkdv_mosaic"])


@pytest.mark.parametrize("fuse_dq", [0, 1])
def test_backward_programs_launch_head_by_head(fuse_dq, monkeypatch):
    """Pallas runs a grid's last axis fastest: by default the backward kernels put their tiles there, so that the
    programs in flight at once share one head's streamed tiles in L2 (NOTES.md section 34);
    ``mosaic_bwd_heads_inner`` 1 puts the batch there instead, the earlier order."""
    from flexattn_jax.backends.pallas_mosaic import backward

    launches = {}
    kernel = backward.plgpu.kernel

    def recording_kernel(*args, grid, grid_names, kernel_name, **kwargs):
        launches[kernel_name] = dict(zip(grid_names, grid)), grid_names[-1]
        return kernel(*args, grid=grid, grid_names=grid_names, kernel_name=kernel_name, **kwargs)

    monkeypatch.setattr(backward.plgpu, "kernel", recording_kernel)
    B, Hq, Hkv, L, S = 3, 4, 2, 256, 384
    q, k, v = random_qkv(13, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=64, Ev=64, dtype=jnp.bfloat16)

    def lower(**options):
        launches.clear()
        _lower_gradient_for_cuda(q, k, v, fa.causal_mask, None, kernel_options={"mosaic_bwd_fuse_dq": fuse_dq,
                                                                                 **options})
        launches.pop("flex_attention_forward_mosaic")  # the forward's persistent grids, recorded too
        launches.pop("flex_attention_forward_mosaic_repair")
        return dict(launches)

    expected = {"flex_attention_dkdv_mosaic": ({"batch": B, "heads": Hkv, "kv": S // 128}, "kv")}
    if not fuse_dq:
        expected["flex_attention_dq_mosaic"] = ({"batch": B, "heads": Hq, "q": L // 128}, "q")
    assert lower() == expected
    assert lower(mosaic_bwd_heads_inner=1) == {name: (sizes, "batch") for name, (sizes, _) in expected.items()}


def test_the_default_backward_schedule_follows_the_score_mods_derivative():
    """Overlap 2 without automatic barriers where the score_mod's derivative is 1; otherwise overlap 1 without them
    up to head dim 128 and overlap 0 with them above (soft-capping measured slower with the first, faster with
    overlap 1 at 64 and 128: NOTES.md sections 33 and 73)."""
    from flexattn_jax.backends import _captures
    from flexattn_jax.backends.pallas_mosaic import backward

    def schedule(score_mod):
        (program,), consts = _captures.trace_for_tiles(score_mod, [(64, 64, "full")], score=True)
        return [backward.default_schedule(program, consts, head_dim) for head_dim in (64, 128, 256)]

    for adds_to_the_score in (fa.identity, fa.generate_alibi_bias(4), fa.alibi_bias(jnp.linspace(0.1, 1.0, 4)),
                              fa.rel_bias, fa.relative_position_bias(jnp.ones((4, 33)))):
        assert schedule(adds_to_the_score) == [(2, False)] * 3
    for other in (fa.tanh_softcap(30.0), fa.causal, lambda score, b, h, q_idx, kv_idx: score * 2.0):
        assert schedule(other) == [(1, False), (1, False), (0, True)]


@pytest.mark.parametrize("fuse_dq", [0, 1])
def test_copy_warp_options_reach_the_kernels(fuse_dq, monkeypatch):
    """Each copy-warp option decides which kernels run their copy loop in one warp (``plgpu.warp_map``): by
    default the forward's alone; the dK/dV kernel's, and the dQ kernel's where it runs, with
    ``mosaic_bwd_copy_warps`` 1."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    one_warp_loops = []
    warp_map = plgpu.warp_map
    monkeypatch.setattr(plgpu, "warp_map", lambda f: (one_warp_loops.append(f), warp_map(f))[1])
    q, k, v = random_qkv(13, B=1, Hq=2, Hkv=2, L=256, S=256, E=128, Ev=128, dtype=jnp.bfloat16)

    def count(**options):
        one_warp_loops.clear()
        _lower_gradient_for_cuda(q, k, v, fa.causal_mask, None, kernel_options={"mosaic_bwd_fuse_dq": fuse_dq,
                                                                                 **options})
        return len(one_warp_loops)

    backward_kernels = 1 if fuse_dq else 2
    forward_kernels = 2  # the anchored walk and its repair launch
    assert count() == forward_kernels
    assert count(mosaic_fwd_copy_warps=4) == 0
    assert count(mosaic_bwd_copy_warps=1) == forward_kernels + backward_kernels
    assert count(mosaic_fwd_copy_warps=4, mosaic_bwd_copy_warps=1) == backward_kernels


def test_second_query_buffer_where_it_fits():
    from flexattn_jax.backends.pallas_mosaic import _config

    def q_buffers(head_dim, **options):
        config, why = _config(options, head_dim=head_dim, mask_block_size=(128, 128), mask_num_blocks=(4, 4))
        assert config is not None, why
        return config.q_buffers

    assert q_buffers(64) == q_buffers(128) == 2 == q_buffers(128, mosaic_block_n=64, mosaic_num_stages=4)
    assert q_buffers(256) == 1  # 256 KiB with two
    assert q_buffers(128, mosaic_fwd_q_buffers=1) == 1


def test_fusing_dq_is_the_default_for_long_queries_where_it_fits():
    from flexattn_jax.backends.pallas_mosaic import FUSE_DQ_MIN_QUERIES, _backward_config

    long = FUSE_DQ_MIN_QUERIES
    assert _backward_config({}, 128, long).fuse_dq and _backward_config({}, 64, long).fuse_dq
    assert not _backward_config({}, 128, long - 1).fuse_dq
    assert not _backward_config({"mosaic_bwd_num_stages": 3}, 128, long).fuse_dq  # 226 KiB with the dQ buffers
    assert _backward_config({"mosaic_bwd_num_stages": 3}, 64, long).fuse_dq
    assert not _backward_config({"mosaic_bwd_fuse_dq": 0}, 64, long).fuse_dq
    assert _backward_config({"mosaic_bwd_fuse_dq": 1}, 64, 256).fuse_dq


def test_fusing_dq_follows_the_walk_length_when_the_mask_is_known():
    from flexattn_jax.backends.pallas_mosaic import FUSE_DQ_MIN_QUERIES, _backward_config, attended_key_tiles

    S = FUSE_DQ_MIN_QUERIES
    ids = jnp.arange(S, dtype=jnp.int32) // (S // 7)
    tiles = {}
    documents = fa.and_masks(fa.causal_mask, fa.document_mask(ids))  # the benchmarks' document case
    for name, mask_mod in [("causal", fa.causal_mask), ("document", documents)]:
        block_mask = fa.create_block_mask(mask_mod, None, None, S, S)
        tiles[name] = attended_key_tiles(block_mask.kv_num_blocks, block_mask.full_kv_num_blocks, 128)
    assert tiles["causal"] == pytest.approx(32.5) and 4 < tiles["document"] < 6
    assert _backward_config({}, 128, S, tiles["causal"]).fuse_dq
    assert not _backward_config({}, 128, S, tiles["document"]).fuse_dq  # long, but sparse: measured slower fused
    assert _backward_config({}, 128, 4096, 32.0).fuse_dq  # a dense 4096 x 4096 walk
    # At 2048 queries: full attention (16 tiles) measured faster fused, causal (8.5) slower (NOTES.md section 34).
    assert _backward_config({}, 128, 2048, 16.0).fuse_dq and not _backward_config({}, 128, 2048, 8.5).fuse_dq

    @jax.jit
    def traced(kv_num_blocks):
        assert attended_key_tiles(kv_num_blocks, None, 128) is None  # unknown while tracing: the length rule
        return kv_num_blocks

    traced(jnp.ones((1, 1, 4), jnp.int32))


def test_attention_without_a_block_mask_has_known_walks_under_jit():
    """flex_attention's default mask (no block_mask given) is built as constants inside jit, so the backward's
    choice sees full attention's walk length: 16 tiles at 2048 keys, where fusing dQ measured faster (NOTES.md
    section 35), rather than the length rule's answer for an unknown mask (not fused below 8192 queries)."""
    from flexattn_jax.api import _full_attention_block_mask
    from flexattn_jax.backends.pallas_mosaic import _backward_config, attended_key_tiles

    tiles = []

    @jax.jit
    def traced(x):
        block_mask = _full_attention_block_mask(2048, 2048)
        tiles.append(attended_key_tiles(block_mask.kv_num_blocks, block_mask.full_kv_num_blocks,
                                        block_mask.BLOCK_SIZE[1]))
        return x

    traced(jnp.float32(1))
    assert tiles == [16.0]
    assert _backward_config({}, 128, 2048, tiles[0]).fuse_dq and not _backward_config({}, 128, 2048).fuse_dq


_HEAD_BIAS = jnp.array([0.5, -1.0], jnp.float32)

# Mods whose value does not depend on q_idx or kv_idx: the interpreter gives a literal or a 0-d value, which the
# kernels broadcast to a tile in the wgmma layout (forward.as_tile).
_UNTILED_MODS = {
    "constant": (None, lambda score, b, h, q_idx, kv_idx: 1.0),
    "typed constant": (None, lambda score, b, h, q_idx, kv_idx: jnp.float32(2.0)),
    "per-head value": (None, lambda score, b, h, q_idx, kv_idx: _HEAD_BIAS[h]),
    "per-batch mask": (lambda b, h, q_idx, kv_idx: b < 1, None),
}


@pytest.mark.parametrize("name", sorted(_UNTILED_MODS))
def test_mods_of_no_index_lower_forward_and_backward(name):
    mask_mod, score_mod = _UNTILED_MODS[name]
    q, k, v = random_qkv(8, B=1, Hq=2, Hkv=2, L=256, S=256, E=64, Ev=64, dtype=jnp.bfloat16)
    _lower_for_cuda(q, k, v, mask_mod, score_mod)
    text = _lower_gradient_for_cuda(q, k, v, mask_mod, score_mod)
    assert "flex_attention_dkdv_mosaic" in text and _TRITON_CALL not in text


def test_a_score_mod_reading_rows_and_columns_lowers_the_mosaic_backward():
    """The backward differentiates the score_mod in forward mode; its row and column reads (Mosaic GPU vector loads,
    which have no differentiation rule) are made before and replayed."""
    q, k, v = random_qkv(8, B=1, Hq=2, Hkv=2, L=256, S=256, E=64, Ev=64, dtype=jnp.bfloat16)
    bias = jnp.linspace(-1.0, 1.0, 512, dtype=jnp.float32)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx + 200] - bias[kv_idx]

    text = _lower_gradient_for_cuda(q, k, v, fa.causal_mask, score_mod)
    assert "flex_attention_dkdv_mosaic" in text and _TRITON_CALL not in text


def test_x64_is_left_to_the_triton_kernels():
    """Under jax_enable_x64 jnp makes indices and captured arrays 64-bit, which the Mosaic kernels' int32 index
    arithmetic does not take: the choice says so and pallas_triton serves it (its gradients under x64 are tested
    in test_pallas_triton_backward)."""
    q = jax.ShapeDtypeStruct((1, 2, 256, 128), jnp.bfloat16)
    common = dict(score_mod=fa.rel_bias, mask_mod=fa.causal_mask, block_size=(128, 128), num_blocks=(2, 2),
                  kernel_options=None)
    assert pallas_mosaic.unsupported_reason(q, q, q, **common) is None
    with jax.enable_x64(True):
        assert "jax_enable_x64" in pallas_mosaic.unsupported_reason(q, q, q, **common)


def test_the_triton_backward_serves_what_the_mosaic_one_does_not():
    q, k, v = random_qkv(9, B=1, Hq=2, Hkv=2, L=256, S=256, E=64, Ev=64, dtype=jnp.bfloat16)
    # A gradient with respect to the slopes the score_mod closes over needs the Triton dQ kernel's scatter-add ...
    text = _lower_gradient_for_cuda(q, k, v, fa.causal_mask, None, score_mod_of=fa.alibi_bias, array_gradient=True)
    assert _TRITON_CALL in text
    # ... but the same mod with the slopes held fixed runs on the Mosaic GPU backward.
    text = _lower_gradient_for_cuda(q, k, v, fa.causal_mask, None, score_mod_of=fa.alibi_bias)
    assert _TRITON_CALL not in text
    assert _TRITON_CALL in _lower_gradient_for_cuda(q, k, v, fa.causal_mask, None,
                                                    kernel_options={"mosaic_backward": 0})
    q, k, v = random_qkv(9, B=1, Hq=2, Hkv=2, L=256, S=256, E=256, Ev=256, dtype=jnp.bfloat16)
    assert _TRITON_CALL in _lower_gradient_for_cuda(q, k, v, fa.causal_mask, None)


@pytest.mark.parametrize(
    "head_dim, block_size, options, match",
    [
        (256, 128, None, r"head dims \(64, 128\), got 256"),
        (64, (128, 64), {"mosaic_block_n": 64}, "KV_BLOCK to be a multiple of 128, got 64"),
        (64, 128, {"mosaic_backward": 0}, "'mosaic_backward'] is 0"),
        (128, 128, {"mosaic_bwd_num_stages": 4}, None),
        (128, 128, {"mosaic_bwd_num_stages": 3, "mosaic_bwd_fuse_dq": 1}, "mosaic_bwd_fuse_dq=1 .* shared memory"),
    ],
    ids=["head-256", "kv-block-64", "turned-off", "4-stages", "fused-3-stages"],
)
def test_backward_refusals_say_why(head_dim, block_size, options, match):
    q = jnp.zeros((1, 2, 512, head_dim), jnp.bfloat16)
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, 512, 512, BLOCK_SIZE=block_size)
    reason = pallas_mosaic.unsupported_backward_reason(
        q, score_mod=fa.identity, mask_mod=fa.causal_mask, block_size=block_mask.BLOCK_SIZE,
        num_blocks=block_mask.num_blocks, kernel_options=options,
    )
    if match is None:
        assert reason is None
    else:
        assert reason is not None and re.search(match, reason), reason


def test_the_choice_says_which_backward_runs():
    """What ``explain_implementation`` reports as ``Choice.backward`` when pallas_mosaic runs the forward."""
    from flexattn_jax import api

    block_mask = fa.create_block_mask(fa.causal_mask, None, None, 512, 512)
    chosen = fa.Choice("pallas_mosaic", {})
    for head_dim, options, start in [
        (128, None, "pallas_mosaic: its dK/dV kernel, dQ by a kernel of its own (a query block attends 2.5 128-key "
                    "tiles on average; fused from 16)"),
        (128, {"mosaic_bwd_fuse_dq": 1},
         "pallas_mosaic: its dK/dV kernel, dQ accumulated in the dK/dV kernel (kernel_options['mosaic_bwd_fuse_dq']"),
        (128, {"mosaic_bwd_num_stages": 3}, "pallas_mosaic: its dK/dV kernel, dQ by a kernel of its own (fused, it "
                                            "would not fit in shared memory at head dim 128 with 3 stages)"),
        (256, None, "pallas_triton's dK/dV and dQ kernels: the pallas_mosaic backward supports head dims"),
        (128, {"mosaic_backward": 0}, "pallas_triton's dK/dV and dQ kernels: kernel_options['mosaic_backward'] is 0"),
    ]:
        q = jax.ShapeDtypeStruct((1, 2, 512, head_dim), jnp.bfloat16)
        said = api._backward_of(chosen, q, fa.identity, fa.causal_mask, block_mask, options)
        assert said.startswith(start), said
    # Full attention (no BlockMask) over 2048 keys: 16 tiles, fused; a BlockMask traced inside jit: the length rule.
    q = jax.ShapeDtypeStruct((1, 2, 2048, 128), jnp.bfloat16)
    said = api._backward_of(chosen, q, fa.identity, fa.noop_mask, api._full_attention_block_mask(2048, 2048), None)
    assert "dQ accumulated in the dK/dV kernel (a query block attends 16.0 128-key tiles" in said, said

    @jax.jit
    def traced(block_mask):
        said.append(api._backward_of(chosen, q, fa.identity, fa.causal_mask, block_mask, None))
        return block_mask.kv_num_blocks

    said = []
    traced(fa.create_block_mask(fa.causal_mask, None, None, 2048, 2048))
    assert said == ["pallas_mosaic: its dK/dV kernel, dQ by a kernel of its own (the BlockMask is traced; fused from "
                    "8192 queries, here 2048); pallas_triton's kernels when a gradient with respect to an array the "
                    "score_mod closes over is taken (that needs the Triton dQ kernel's atomic scatter-add)"]


@pytest.mark.parametrize("options", [{"mosaic_backward": 2}, {"mosaic_bwd_num_stages": 1}, {"mosaic_bwd_fuse_dq": 3},
                                     {"mosaic_bwd_overlap": 3}, {"mosaic_bwd_auto_barriers": 2},
                                     {"mosaic_bwd_heads_inner": 2}])
def test_bad_backward_options_raise(options):
    q = jnp.zeros((1, 2, 128, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="mosaic_b"):
        pallas_mosaic.unsupported_backward_reason(q, score_mod=fa.identity, mask_mod=fa.noop_mask,
                                                  block_size=(128, 128), num_blocks=(1, 1), kernel_options=options)


def test_vmap_and_grad_lower_for_cuda():
    """An extra leading axis (vmap) and the gradient, all in Mosaic GPU kernels."""
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, 256, 256)

    def attend(q, k, v):
        return pallas_mosaic.attention(
            q, k, v, score_mod=fa.generate_alibi_bias(2), mask_mod=fa.causal_mask,
            kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices,
            full_kv_num_blocks=block_mask.full_kv_num_blocks, full_kv_indices=block_mask.full_kv_indices,
            block_size=block_mask.BLOCK_SIZE, scale=0.125,
        )[0]

    def loss(q, k, v):
        return jnp.sum(jax.vmap(attend)(q, k, v).astype(jnp.float32))

    x = jax.ShapeDtypeStruct((3, 1, 2, 256, 64), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and _TRITON_CALL not in text
    assert "flex_attention_dkdv_mosaic" in text


@pytest.mark.gpu
def test_gpu_vmap_of_grad_matches_reference():
    """vmap over a leading axis of the gradient: each vmapped instance accumulates its own dQ (the fused path,
    which at this length is not the default)."""
    N, B, H, L, E = 3, 1, 2, 640, 128
    keys = jax.random.split(jax.random.key(13), 3)
    q, k, v = (jax.random.normal(key, (N, B, H, L, E), jnp.float32).astype(jnp.bfloat16) for key in keys)
    block_mask = _block_mask(fa.causal_mask, B, L, L)

    def loss(implementation, q, k, v):
        options = {"mosaic_bwd_fuse_dq": 1} if implementation == "pallas_mosaic" else None
        out = fa.flex_attention(q, k, v, block_mask=block_mask, implementation=implementation, kernel_options=options)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(E, dtype=jnp.float32)).reshape(1, 1, 1, E))

    def grads(implementation):
        grad = jax.grad(functools.partial(loss, implementation), argnums=(0, 1, 2))
        return jax.jit(jax.vmap(grad))(q, k, v)

    for name, got, want in zip("qkv", grads("pallas_mosaic"), grads("reference")):
        assert_close(got, want, q.dtype, f"d{name}")


@pytest.mark.gpu
def test_gpu_gradient_of_a_captured_array_and_the_triton_backward_match_the_reference():
    """Learned ALiBi slopes: their gradient comes from the Triton dQ kernel behind the Mosaic forward; and the
    Triton backward asked for by kernel_options agrees with the reference too."""
    B, H, L = 1, 4, 1000
    q, k, v = random_qkv(10, B=B, Hq=H, Hkv=H, L=L, S=L, E=128, Ev=128, dtype=jnp.bfloat16)
    slopes = jax.random.uniform(jax.random.key(10), (H,), jnp.float32, 0.01, 0.5)
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, L, L)
    cotangent = jax.random.normal(jax.random.key(11), q.shape, jnp.float32)

    def loss(implementation, options, q, k, v, slopes):
        out = fa.flex_attention(q, k, v, score_mod=fa.alibi_bias(slopes), block_mask=block_mask,
                                implementation=implementation, kernel_options=options)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    want = jax.grad(functools.partial(loss, "reference", None), argnums=(0, 1, 2, 3))(q, k, v, slopes)
    for options in (None, {"mosaic_backward": 0}):
        got = jax.jit(jax.grad(functools.partial(loss, "pallas_mosaic", options), argnums=(0, 1, 2, 3)))(
            q, k, v, slopes
        )
        for name, g, w in zip(("dq", "dk", "dv", "dslopes"), got, want):
            assert_close(g, w, q.dtype, name)


@pytest.mark.gpu
def test_gpu_query_block_selections_of_a_document_mask_on_mosaic():
    """A BlockMask's query blocks selected by an int and by a traced index inside jit, with document ids and
    per-head score offsets read at q_idx + offset (a shifted copy, ``walked_consts``) and at kv_idx: the Mosaic
    forward and backward against the reference on the whole mask's rows."""
    B, H, L, Q_BLOCK = 2, 4, 1024, 128
    ids = jnp.stack([jnp.repeat(jnp.arange(4), 256), jnp.repeat(jnp.arange(8), 128)])
    bias = jax.random.normal(jax.random.key(7), (L,))
    bm = fa.create_block_mask(fa.and_masks(fa.causal_mask, fa.document_mask(ids)), B, None, L, L,
                              BLOCK_SIZE=Q_BLOCK)
    q, k, v = (jax.random.normal(jax.random.key(i), (B, H, L, 128)).astype(jnp.bfloat16) for i in range(3))
    cotangent = jax.random.normal(jax.random.key(9), (B, H, Q_BLOCK, 128), jnp.float32)

    def rows(block, implementation, q, k, v):
        start = block * Q_BLOCK
        q_rows = jax.lax.dynamic_slice_in_dim(q, start, Q_BLOCK, axis=2)
        score_mod = lambda s, b, h, q_idx, kv_idx: s + bias[q_idx + start] - bias[kv_idx]  # noqa: E731
        return fa.flex_attention(q_rows, k, v, score_mod=score_mod, block_mask=bm[:, :, block],
                                 implementation=implementation)

    def loss(block, implementation, q, k, v):
        return jnp.sum(rows(block, implementation, q, k, v).astype(jnp.float32) * cotangent)

    selected = bm[:, :, 5]
    choice = fa.explain_implementation(q[:, :, :Q_BLOCK], k, v, None, selected)
    assert choice.implementation == "pallas_mosaic", choice.reasons
    for block, traced in ((5, False), (3, True)):
        index = jnp.int32(block) if traced else block
        run = jax.jit(rows, static_argnums=(0, 1)) if not traced else jax.jit(rows, static_argnums=(1,))
        grad = jax.grad(loss, argnums=(2, 3, 4))
        grad = jax.jit(grad, static_argnums=(0, 1)) if not traced else jax.jit(grad, static_argnums=(1,))
        assert_close(run(index, "pallas_mosaic", q, k, v), rows(block, "reference", q, k, v), jnp.bfloat16,
                     f"block {block}")
        for name, got, want in zip("qkv", grad(index, "pallas_mosaic", q, k, v), jax.grad(
                loss, argnums=(2, 3, 4))(block, "reference", q, k, v)):
            assert_close(got, want, jnp.bfloat16, f"block {block} d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_UNTILED_MODS))
def test_gpu_mods_of_no_index_match_reference(name):
    mask_mod, score_mod = _UNTILED_MODS[name]
    q, k, v = random_qkv(11, B=2, Hq=2, Hkv=2, L=300, S=400, E=128, Ev=128, dtype=jnp.bfloat16)
    _compare_on_gpu(q, k, v, mask_mod, score_mod)


@pytest.mark.gpu
def test_gpu_x64_runs_the_triton_kernels_and_matches_reference():
    with jax.enable_x64(True):
        q, k, v = random_qkv(12, B=2, Hq=4, Hkv=2, L=300, S=300, E=128, Ev=128, dtype=jnp.bfloat16)
        ids = jnp.arange(300) // 70  # int64 under x64
        block_mask = fa.create_block_mask(fa.and_masks(fa.causal_mask, fa.document_mask(ids)), None, None, 300, 300)
        choice = fa.explain_implementation(q, k, v, fa.rel_bias, block_mask, enable_gqa=True)
        assert choice.implementation == "pallas_triton", choice.reasons
        cotangent = jax.random.normal(jax.random.key(13), q.shape, jnp.float32)

        def loss(implementation, q, k, v):
            out = fa.flex_attention(q, k, v, fa.rel_bias, block_mask, enable_gqa=True, implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) * cotangent)

        out = jax.jit(lambda *a: fa.flex_attention(*a, fa.rel_bias, block_mask, enable_gqa=True))(q, k, v)
        want = fa.flex_attention(q, k, v, fa.rel_bias, block_mask, enable_gqa=True, implementation="reference")
        assert_close(out, want, jnp.bfloat16, "out")
        got = jax.jit(jax.grad(lambda *a: loss(None, *a), argnums=(0, 1, 2)))(q, k, v)
        want = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert_close(g, w, jnp.bfloat16, name)
