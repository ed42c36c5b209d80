"""The pallas_triton forward kernel against the dense reference (interpret mode on CPU; gpu-marked tests on a GPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import flexattn_jax as fa
from flexattn_jax.backends.pallas_triton import _tile, config
from tests._helpers import MOD_CASES, MOD_CASES_BY_NAME, SCALED_SCORE_MODS, assert_close, random_qkv
from tests.conftest import HAS_GPU

# On a GPU the kernels run compiled; elsewhere in interpret mode.
INTERPRET = not HAS_GPU
SMALL_TILES = {"BLOCK_M": 32, "BLOCK_N": 32}


def _compare(q, k, v, mask_mod=None, score_mod=None, *, block_size=32, kernel_options=None, enable_gqa=True, **kw):
    """Runs the kernel and the reference on the same inputs; asserts the error contract on out, lse and
    max_scores."""
    block_mask = None
    if mask_mod is not None:
        block_mask = fa.create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], BLOCK_SIZE=block_size)
    request = fa.AuxRequest(lse=True, max_scores=True)
    common = dict(score_mod=score_mod, block_mask=block_mask, enable_gqa=enable_gqa, return_aux=request, **kw)
    out, (lse, max_scores) = fa.flex_attention(
        q, k, v, implementation="pallas_triton", interpret=INTERPRET, kernel_options=kernel_options, **common
    )
    ref_out, (ref_lse, ref_max) = fa.flex_attention(q, k, v, implementation="reference", **common)
    assert out.dtype == q.dtype and lse.dtype == max_scores.dtype == jnp.float32
    assert_close(out, ref_out, q.dtype, "out")
    assert_close(lse, ref_lse, q.dtype, "lse")
    assert_close(max_scores, ref_max, q.dtype, "max_scores")
    return out, lse


@pytest.mark.parametrize("case", MOD_CASES, ids=repr)
def test_every_mod_matches_reference(case):
    B, Hq, Hkv, L, S = 2, 2, 1, 100, 77
    q, k, v = random_qkv(1, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=32, Ev=16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 1)
    _compare(q, k, v, mask_mod, score_mod, kernel_options=SMALL_TILES)


def test_gqa_odd_lengths_l_not_s():
    # (The per-mod test covers L > S.)
    q, k, v = random_qkv(2, B=1, Hq=4, Hkv=2, L=40, S=130, E=16, Ev=32)
    _compare(q, k, v, fa.causal_mask, fa.rel_bias, kernel_options=SMALL_TILES)


def test_without_block_mask_default_tiles():
    # One full block covering everything; tiles default (shrunk to the lengths), head dims padded (24 -> 32, 40 -> 64).
    q, k, v = random_qkv(3, B=1, Hq=3, Hkv=3, L=77, S=100, E=24, Ev=40)
    _compare(q, k, v, None, fa.tanh_softcap(3.0), scale=0.5)


@pytest.mark.parametrize("scale", [0.3, -0.2])
@pytest.mark.parametrize("score_mod", SCALED_SCORE_MODS.values(), ids=SCALED_SCORE_MODS.keys())
def test_scalings_folded_into_the_softmax(score_mod, scale):
    # The kernel moves literal factors around the score_mod into its exp2 (_captures.fold_scalings): either sign
    # of the scale, and a factor that would move the row maximum if it were folded.
    q, k, v = random_qkv(5, B=1, Hq=2, Hkv=2, L=70, S=50, E=16, Ev=16)
    _compare(q, k, v, fa.causal_mask, score_mod, kernel_options=SMALL_TILES, scale=scale)


def test_tiles_dividing_mask_blocks():
    # Mask blocks of 64: two query tiles per mask row, four key tiles per mask block; S = 77 leaves the last mask
    # block reaching past the padded keys.
    q, k, v = random_qkv(4, B=1, Hq=2, Hkv=1, L=130, S=77, E=32, Ev=16)
    _compare(q, k, v, fa.sliding_window_mask(40), None, block_size=64, kernel_options={"BLOCK_M": 32, "BLOCK_N": 16})


def test_fully_masked_rows_give_zero_and_minus_inf():
    L, S = 70, 50
    q, k, v = random_qkv(5, B=1, Hq=2, Hkv=2, L=L, S=S, E=16, Ev=16)

    def some_rows_see_nothing(b, h, q_idx, kv_idx):
        return (q_idx % 3 != 0) & (kv_idx <= q_idx)

    out, lse = _compare(q, k, v, some_rows_see_nothing, None, block_size=16, kernel_options={"BLOCK_M": 16})
    dead = np.arange(L) % 3 == 0
    assert np.all(np.asarray(out)[:, :, dead] == 0)
    assert np.all(np.asarray(lse)[:, :, dead] == -np.inf)
    assert np.all(np.isfinite(np.asarray(lse)[:, :, ~dead]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
    q, k, v = random_qkv(6, B=1, Hq=2, Hkv=1, L=64, S=96, E=32, Ev=32, dtype=dtype)
    _compare(q, k, v, fa.causal_mask, fa.generate_alibi_bias(2), kernel_options=SMALL_TILES)


def test_captured_tracers_of_an_outer_jit():
    B, H, L, S = 2, 2, 64, 48
    q, k, v = random_qkv(7, B=B, Hq=H, Hkv=H, L=L, S=S, E=16, Ev=16)
    table = jax.random.normal(jax.random.key(8), (H, 9), jnp.float32)
    ids_q = jnp.asarray(np.repeat(np.arange(4), 16)[None].repeat(B, 0), jnp.int32)
    ids_kv = jnp.asarray(np.repeat(np.arange(4), 12)[None].repeat(B, 0), jnp.int32)

    def attend(implementation, q, k, v, table, ids_q, ids_kv):
        block_mask = fa.create_block_mask(fa.document_mask(ids_q, ids_kv), B, None, L, S, BLOCK_SIZE=16)
        return fa.flex_attention(
            q,
            k,
            v,
            score_mod=fa.relative_position_bias(table),
            block_mask=block_mask,
            implementation=implementation,
            interpret=INTERPRET and implementation == "pallas_triton",
            kernel_options={"BLOCK_M": 16, "BLOCK_N": 16} if implementation == "pallas_triton" else None,
        )

    args = (q, k, v, table, ids_q, ids_kv)
    out = jax.jit(attend, static_argnums=0)("pallas_triton", *args)
    assert_close(out, attend("reference", *args), q.dtype)


def test_vmap_over_a_leading_axis():
    q, k, v = random_qkv(9, B=1, Hq=2, Hkv=2, L=40, S=40, E=16, Ev=16)
    stacked = [jnp.stack([x, 0.5 * x]) for x in (q, k, v)]
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, 40, 40, BLOCK_SIZE=16)

    def attend(implementation, q, k, v):
        return fa.flex_attention(
            q, k, v, block_mask=block_mask, implementation=implementation, interpret=INTERPRET,
            kernel_options={"BLOCK_M": 16, "BLOCK_N": 16} if implementation == "pallas_triton" else None,
        )

    out = jax.vmap(lambda *a: attend("pallas_triton", *a))(*stacked)
    ref = jax.vmap(lambda *a: attend("reference", *a))(*stacked)
    assert_close(out, ref, q.dtype)


def test_block_mask_as_jit_argument_does_not_recompile():
    L = S = 48
    q, k, v = random_qkv(10, B=1, Hq=2, Hkv=2, L=L, S=S, E=16, Ev=16)
    traces = []

    @jax.jit
    def attend(q, k, v, block_mask):
        traces.append(1)
        return fa.flex_attention(
            q, k, v, block_mask=block_mask, implementation="pallas_triton", interpret=INTERPRET,
            kernel_options={"BLOCK_M": 16, "BLOCK_N": 16},
        )

    for mask_mod in (fa.causal_mask, fa.sliding_window_mask(20)):
        block_mask = fa.create_block_mask(mask_mod, None, None, L, S, BLOCK_SIZE=16)
        # The same static mask_mod, new contents: only the index arrays differ.
        block_mask = fa.BlockMask.from_kv_blocks(
            block_mask.kv_num_blocks,
            block_mask.kv_indices,
            block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices,
            BLOCK_SIZE=16,
            mask_mod=fa.causal_mask,
            seq_lengths=(L, S),
        )
        out = attend(q, k, v, block_mask)
        ref = fa.flex_attention(q, k, v, block_mask=block_mask, implementation="reference")
        assert_close(out, ref, q.dtype)
    assert len(traces) == 1


BAD_OPTIONS = [
    ({"BLOCK_M": 8}, ValueError, r"BLOCK_M.*power of two from 16 to 256, got 8"),
    ({"BLOCK_N": 48}, ValueError, r"BLOCK_N.*got 48"),
    ({"BLOCK_M": 32.0}, TypeError, r"BLOCK_M.*must be an int"),
    ({"num_warps": 3}, ValueError, r"num_warps.*got 3"),
    ({"num_stages": 0}, ValueError, r"num_stages.*got 0"),
    ({"BLOCK_K": 32}, ValueError, r"unknown key 'BLOCK_K'.*BLOCK_M"),
    ({"BLOCK_N": 64}, ValueError, r"BLOCK_N.*64 does not divide.*key block size 32"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS, ids=[str(o) for o, _, _ in BAD_OPTIONS])
def test_bad_kernel_options_raise_before_tracing(options, error, message):
    q, k, v = random_qkv(11, B=1, Hq=2, Hkv=2, L=96, S=96, E=16, Ev=16)
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, 96, 96, BLOCK_SIZE=32)
    with pytest.raises(error, match=message):
        fa.flex_attention(
            q, k, v, block_mask=block_mask, implementation="pallas_triton", interpret=True, kernel_options=options
        )


def test_backward_keys_pass_through_the_forward():
    options = {"BLOCK_M": 32, "BLOCK_M1": 64, "bwd_num_warps": 8}
    assert config.check_kernel_options(options) == {"BLOCK_M": 32}


def test_implementation_choice_is_deterministic():
    q, k, v = random_qkv(12, B=1, Hq=2, Hkv=2, L=48, S=48, E=16, Ev=16)
    odd_blocks = fa.create_block_mask(fa.causal_mask, None, None, 48, 48, BLOCK_SIZE=24)
    # 24-position blocks admit no tile of 16 or more: None falls back to the reference, an explicit request raises.
    out = fa.flex_attention(q, k, v, block_mask=odd_blocks, interpret=True)
    assert_close(out, fa.flex_attention(q, k, v, block_mask=odd_blocks, implementation="reference"), q.dtype)
    with pytest.raises(ValueError, match="pallas_triton.*block size 24 is not a multiple of 16"):
        fa.flex_attention(q, k, v, block_mask=odd_blocks, implementation="pallas_triton", interpret=True)
    big = jnp.zeros((1, 2, 48, 512), jnp.float32)
    with pytest.raises(ValueError, match="head dims up to 256, got query/key head dim E=512"):
        fa.flex_attention(big, big, big, implementation="pallas_triton", interpret=True)
    if not HAS_GPU:
        with pytest.raises(ValueError, match="needs a CUDA GPU.*interpret=True"):
            fa.flex_attention(q, k, v, implementation="pallas_triton")


# ------------------------------------------------------------------------------------------ the tile steps


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_walk_starts_visits_each_start_once_in_order(count):
    """The walks read each next start a step ahead: every listed start is visited once, in order; a walk of no
    blocks runs no step; and no read leaves the list (it has max(count, 1) entries here; checkify raises on a read
    out of range, such as the step after the last left unclamped)."""
    starts = jnp.asarray([40, 8, 24, 0, 56][: max(count, 1)], jnp.int32)

    def body(start, carry):
        position, visited = carry
        return position + 1, visited.at[position].set(start)

    def walk(count):
        return _tile.walk_starts(count, lambda t: starts[t], body, (jnp.int32(0), jnp.full((5,), -1, jnp.int32)))

    error, (steps, visited) = jax.jit(checkify.checkify(walk, errors=checkify.index_checks))(jnp.int32(count))
    error.throw()
    assert int(steps) == count
    np.testing.assert_array_equal(visited[:count], starts[:count])
    assert np.all(np.asarray(visited[count:]) == -1)


def test_online_softmax_matches_one_shot_and_survives_empty_rows():
    key = jax.random.key(13)
    s = jax.random.normal(key, (16, 64), jnp.float32) * 4
    v = jax.random.normal(jax.random.fold_in(key, 1), (64, 16), jnp.float32)
    allowed = jax.random.bernoulli(jax.random.fold_in(key, 2), 0.5, (16, 64)).at[3].set(False)
    masked = _tile.mask_scores(s, allowed)
    state = _tile.softmax_init(16, 16)
    for start in range(0, 64, 16):
        state = _tile.softmax_update(state, masked[:, start : start + 16], v[start : start + 16], inline_ptx=False)
    out, lse = _tile.softmax_finalize(state)
    weights = jnp.where(allowed, jnp.exp(s), 0.0)
    total = weights.sum(axis=1)
    want = (weights @ v) / jnp.where(total > 0, total, 1.0)[:, None]
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(lse[total > 0], jnp.log(total[total > 0]), rtol=1e-6)
    assert lse[3] == -jnp.inf and np.all(np.asarray(out[3]) == 0)


def test_online_softmax_rescales_by_the_rounded_shifts_so_lse_does_not_drift(monkeypatch):
    """With the GPU's fused multiply-add (emulated here in float64), exp2(max * exp_scale - shift) is exp2 of the
    shift's rounding error, not 1, at every step where the maximum stays: over 256 key tiles that compounded into
    lse (4.6e-5 here, at |lse| near 10, and as much in the backward's probabilities). The state keeps the rounded
    shift, and a rescaling is by the difference of two of them."""

    def hardware_fma(a, b, c, *, fast):
        del fast
        exact = np.float64(np.asarray(a)) * np.float64(b) + np.float64(np.asarray(c))
        return jnp.asarray(exact.astype(np.float32))

    monkeypatch.setattr(_tile, "fma", hardware_fma)
    rng = np.random.default_rng(0)
    rows, keys, tile, exp_scale = 8, 4096, 16, _tile.LOG2_E * 0.125
    s = (rng.standard_normal((rows, keys)) * 8 + 40).astype(np.float32)
    s[:, 0] = s.max(axis=1) + 5  # the maximum comes first and stays
    v = jnp.ones((keys, 16), jnp.float32)
    state = _tile.softmax_init(rows, 16)
    for start in range(0, keys, tile):
        state = _tile.softmax_update(state, jnp.asarray(s[:, start : start + tile]), v[start : start + tile],
                                     exp_scale=exp_scale, inline_ptx=False)
    _, lse = _tile.softmax_finalize(state)
    scaled = s.astype(np.float64) * 0.125
    top = scaled.max(axis=1)
    want = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    ulp = np.spacing(np.float32(np.abs(want).max()))
    assert np.abs(np.asarray(lse, np.float64) - want).max() < 4 * ulp


def test_lse_of_large_scores_is_as_accurate_at_any_key_tile():
    """The kernel itself, where XLA's CPU compiler contracts a multiply into the next add as the GPU's FMA does:
    scores up to about 140 (a bias growing with the distance), their lse against float64 at key tiles of 16 and 128
    (before the state kept the rounded shift: 8.9e-5 and 1.7e-5), and the gradients, whose probabilities take lse
    (a randomized comparison found them 2.2e-5 from the reference at tiles of 16)."""
    B, H, L, S, E = 1, 2, 128, 256, 16
    q, k, v = random_qkv(69, B=B, Hq=H, Hkv=H, L=L, S=S, E=E, Ev=32)

    def distance_bias(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx).astype(jnp.float32)

    scores = np.einsum("bhqd,bhkd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) * E**-0.5
    scores += np.arange(L)[:, None] - np.arange(S)[None, :]
    top = scores.max(axis=-1)
    want = top + np.log(np.exp(scores - top[..., None]).sum(axis=-1))
    cotangent = jax.random.normal(jax.random.key(70), (B, H, L, 32))

    def loss(implementation, options, q, k, v):
        out = fa.flex_attention(q, k, v, distance_bias, implementation=implementation, kernel_options=options,
                                interpret=implementation != "reference")
        return jnp.sum(out * cotangent)

    reference = jax.grad(functools.partial(loss, "reference", None), argnums=(0, 1, 2))(q, k, v)
    for block_n in (16, 128):
        options = dict(BLOCK_M=32, BLOCK_N=block_n, BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16)
        _, lse = fa.flex_attention(q, k, v, distance_bias, return_lse=True, implementation="pallas_triton",
                                   interpret=True, kernel_options=options)
        assert np.abs(np.asarray(lse, np.float64) - want).max() < 1.5e-5, block_n  # one unit at |lse| near 130
        grads = jax.grad(functools.partial(loss, "pallas_triton", options), argnums=(0, 1, 2))(q, k, v)
        for name, got, ref in zip("qkv", grads, reference):
            assert_close(got, ref, jnp.float32, f"d{name} at key tiles of {block_n}")


# --------------------------------------------------------------------------------- realistic sizes, on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", ["noop", "causal", "document_causal", "alibi_learned_slopes", "relative_bias_table"])
def test_gpu_realistic_sizes(name, head_dim, dtype):
    B, H, L = 2, 4, 1024
    q, k, v = random_qkv(14, B=B, Hq=H, Hkv=H, L=L, S=L, E=head_dim, Ev=head_dim, dtype=dtype)
    mask_mod, score_mod = MOD_CASES_BY_NAME[name].build(B, H, L, L, 14)
    _compare(q, k, v, mask_mod, score_mod, block_size=128)


@pytest.mark.gpu
def test_gpu_long_gqa_odd_length():
    B, Hq, Hkv, L, S = 1, 8, 2, 2048, 2000
    q, k, v = random_qkv(15, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=128, Ev=128, dtype=jnp.bfloat16)
    _compare(q, k, v, fa.sliding_window_mask(256), fa.tanh_softcap(30.0), block_size=128)
