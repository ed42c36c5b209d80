"""What the tests share: the error contract, random inputs, and the library's mods as test cases."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import flexattn_jax as fa

# The error contract: relative error ||out - ref|| / ||ref|| below these, per dtype (gradients included).
RELATIVE_TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 1e-2}


def relative_error(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not np.isnan(out).any(), "NaN in output"
    finite = np.isfinite(ref)
    # -inf entries (lse of fully masked rows) must match exactly; the norm covers the finite ones.
    np.testing.assert_array_equal(out[~finite], ref[~finite])
    denominator = np.linalg.norm(ref[finite])
    numerator = np.linalg.norm(out[finite] - ref[finite])
    return float(numerator / max(denominator, 1e-30))


def assert_close(out, ref, dtype, name: str = "output", factor: float = 1.0) -> None:
    """Asserts the relative-error contract for `dtype` (the inputs' dtype)."""
    tolerance = RELATIVE_TOLERANCE[jnp.dtype(dtype)] * factor
    error = relative_error(out, ref)
    assert error < tolerance, f"{name}: relative error {error:.3e} >= {tolerance:.1e}"


def random_qkv(seed: int, B=2, Hq=4, Hkv=2, L=100, S=77, E=32, Ev=16, dtype=jnp.float32):
    """Fresh random normals; every axis a different size by default so a transposed axis cannot pass."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, Hq, L, E), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, Hkv, S, E), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, Hkv, S, Ev), jnp.float32).astype(dtype)
    return q, k, v


@dataclasses.dataclass(frozen=True)
class ModCase:
    """One attention variant: an optional mask_mod and an optional score_mod, built for given sizes."""

    name: str
    build: Callable  # (B, H, L, S, seed) -> (mask_mod or None, score_mod or None)

    def __repr__(self):
        return self.name


def _doc_ids(length, seed, batch=None):
    rng = np.random.default_rng(seed)
    shape = (length,) if batch is None else (batch, length)
    # Sorted random ids: packed documents of random lengths.
    ids = np.sort(rng.integers(0, 4, size=shape), axis=-1)
    return jnp.asarray(ids, jnp.int32)


def _rel_table(H, seed, max_distance=8):
    return jax.random.normal(jax.random.key(seed + 7), (H, 2 * max_distance + 1), jnp.float32)


def _slopes(H, seed):
    return jax.random.uniform(jax.random.key(seed + 11), (H,), jnp.float32, 0.01, 0.5)


MOD_CASES = [
    ModCase("noop", lambda B, H, L, S, seed: (None, None)),
    ModCase("causal", lambda B, H, L, S, seed: (fa.causal_mask, None)),
    ModCase("sliding_window", lambda B, H, L, S, seed: (fa.sliding_window_mask(24), None)),
    ModCase("prefix_lm", lambda B, H, L, S, seed: (fa.prefix_lm_mask(S // 4), None)),
    ModCase(
        "document_causal",
        lambda B, H, L, S, seed: (
            fa.and_masks(fa.causal_mask, fa.document_mask(_doc_ids(L, seed), _doc_ids(S, seed))),
            None,
        ),
    ),
    ModCase(
        "document_batched",
        lambda B, H, L, S, seed: (fa.document_mask(_doc_ids(L, seed, B), _doc_ids(S, seed, B)), None),
    ),
    ModCase("dilated", lambda B, H, L, S, seed: (fa.dilated_mask(3), None)),
    ModCase("alibi", lambda B, H, L, S, seed: (None, fa.generate_alibi_bias(H))),
    ModCase("alibi_learned_slopes", lambda B, H, L, S, seed: (fa.causal_mask, fa.alibi_bias(_slopes(H, seed)))),
    ModCase("softcap_causal", lambda B, H, L, S, seed: (fa.causal_mask, fa.tanh_softcap(2.0))),
    ModCase("relative_bias_table", lambda B, H, L, S, seed: (None, fa.relative_position_bias(_rel_table(H, seed)))),
    ModCase("rel_bias", lambda B, H, L, S, seed: (None, fa.rel_bias)),
    ModCase("rel_causal_score_mod", lambda B, H, L, S, seed: (None, fa.rel_causal)),
    ModCase("causal_score_mod", lambda B, H, L, S, seed: (None, fa.causal)),
    ModCase(
        "composed",
        lambda B, H, L, S, seed: (
            fa.or_masks(fa.sliding_window_mask(16), fa.prefix_lm_mask(8)),
            fa.compose(fa.tanh_softcap(5.0), fa.generate_alibi_bias(H)),
        ),
    ),
]

MOD_CASES_BY_NAME = {case.name: case for case in MOD_CASES}


def _negative_factor(score, b, h, q_idx, kv_idx):
    return -2.0 * jnp.tanh(score / 3.0)


# Score_mods whose literal factors the forward kernels fold into their exp2 (_captures.fold_scalings), for tests
# run with both signs of the scale: none, soft-capping's pair, and a trailing factor that would move the row
# maximum if it were folded.
SCALED_SCORE_MODS = {"identity": None, "softcap": fa.tanh_softcap(2.0), "negative-factor": _negative_factor}
