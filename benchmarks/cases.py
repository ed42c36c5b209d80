"""The attention variants we benchmark (the attention-gym set), each as flexattn_jax mods.

The same semantics are written for PyTorch in ``torch_impls.py``; ``density`` counts the (query, key) pairs a case
allows, exactly, so TFLOP/s figures are density-adjusted: forward FLOPs = 4 * B * H * L * S * D * density.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import flexattn_jax as fa

# Document lengths per 8192 tokens (PERF_TARGETS.md): 7 documents.
DOCUMENT_PROPORTIONS = (512, 1536, 1024, 2048, 768, 1280, 1024)
SLIDING_WINDOW = 1024
SOFTCAP = 30.0


def document_ids(length: int) -> np.ndarray:
    """int32 [length]: 7 documents with lengths proportional to DOCUMENT_PROPORTIONS."""
    bounds = np.round(np.cumsum((0,) + DOCUMENT_PROPORTIONS) / sum(DOCUMENT_PROPORTIONS) * length).astype(int)
    return np.repeat(np.arange(len(DOCUMENT_PROPORTIONS)), np.diff(bounds)).astype(np.int32)


def per_head_windows(heads: int, length: int) -> np.ndarray:
    """int32 [heads]: a causal window per head, from length/16 doubling up to the whole sequence."""
    return np.minimum(length, (length // 16) * 2 ** (np.arange(heads) % 5)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Case:
    """One variant. ``mods(B, H, L, S)`` returns (mask_mod or None, score_mod or None, mask_varies_by_head)."""

    name: str
    mods: Callable
    # How jax.nn.dot_product_attention can express the mask: "none", "causal", "window", "dense" (mask array), or
    # "bias" (score_mod as an additive bias array); None where it cannot (softcap).
    dense_kind: str | None

    def density(self, B: int, H: int, L: int, S: int) -> float:
        """Fraction of (query, key) pairs allowed, counted exactly (one row block at a time)."""
        mask_mod, _, by_head = self.mods(B, H, L, S)
        if mask_mod is None:
            return 1.0
        heads = H if by_head else 1
        count_rows = jax.jit(
            lambda h, q0: jax.vmap(
                lambda q: jax.vmap(lambda kv: mask_mod(jnp.int32(0), h, q, kv))(jnp.arange(S, dtype=jnp.int32))
            )(q0 + jnp.arange(256, dtype=jnp.int32)).sum(where=(q0 + jnp.arange(256) < L)[:, None])
        )
        total = 0
        for h in range(heads):
            for q0 in range(0, L, 256):
                total += int(count_rows(jnp.int32(h), jnp.int32(q0)))
        return total / (heads * L * S)


def _noop(B, H, L, S):
    return None, None, False


def _causal(B, H, L, S):
    return fa.causal_mask, None, False


def _sliding_window(B, H, L, S):
    return fa.sliding_window_mask(SLIDING_WINDOW), None, False


def _prefix_lm(B, H, L, S):
    return fa.prefix_lm_mask(S // 4), None, False


def _document(B, H, L, S):
    return fa.and_masks(fa.causal_mask, fa.document_mask(jnp.asarray(document_ids(L)))), None, False


def _alibi(B, H, L, S):
    return None, fa.generate_alibi_bias(H), False


def _softcap(B, H, L, S):
    return fa.causal_mask, fa.tanh_softcap(SOFTCAP), False


def _per_head(B, H, L, S):
    windows = jnp.asarray(per_head_windows(H, S))

    def per_head_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

    return per_head_window, None, True


CASES = {
    case.name: case
    for case in [
        Case("noop", _noop, "none"),
        Case("causal", _causal, "causal"),
        Case("sliding_window", _sliding_window, "window"),
        Case("prefix_lm", _prefix_lm, "dense"),
        Case("document", _document, "dense"),
        Case("alibi", _alibi, "bias"),
        Case("softcap", _softcap, None),
        Case("per_head", _per_head, "dense"),
    ]
}
