"""PyTorch FlexAttention and SDPA on the same cases, for the anchors of the comparison. Imported only when torch is.

The mods restate ``benchmarks.cases`` in PyTorch: keep the two in step.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from benchmarks.cases import SLIDING_WINDOW, SOFTCAP, Case, document_ids, per_head_windows


@functools.cache
def _compiled_flex_attention():
    # Every case (mask, score_mod, requires_grad) is a new specialisation; past dynamo's default limit of 8 it would
    # silently fall back to the unfused implementation and time that instead.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    return torch.compile(flex_attention, dynamic=False)


def _mods(case: Case, B: int, H: int, L: int, S: int, device):
    """(mask_mod or None, score_mod or None, by_head) in PyTorch for a case of benchmarks.cases."""
    name = case.name
    if name == "noop":
        return None, None, False
    if name == "causal":
        return (lambda b, h, q, kv: q >= kv), None, False
    if name == "sliding_window":
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < SLIDING_WINDOW)), None, False
    if name == "prefix_lm":
        return (lambda b, h, q, kv: (kv < S // 4) | (q >= kv)), None, False
    if name == "document":
        docs = torch.as_tensor(document_ids(L), device=device)
        return (lambda b, h, q, kv: (q >= kv) & (docs[q] == docs[kv])), None, False
    if name == "alibi":
        def alibi(score, b, h, q, kv):
            return score + torch.exp2(-(h + 1).to(torch.float32) * (8.0 / H)) * (kv - q)
        return None, alibi, False
    if name == "softcap":
        return (lambda b, h, q, kv: q >= kv), (lambda score, b, h, q, kv: SOFTCAP * torch.tanh(score / SOFTCAP)), False
    if name == "per_head":
        windows = torch.as_tensor(per_head_windows(H, S), device=device)
        return (lambda b, h, q, kv: (q >= kv) & (q - kv < windows[h])), None, True
    raise KeyError(name)


def flex(case: Case, B: int, H: int, L: int, S: int, device="cuda"):
    """``forward(q, k, v)`` running compiled PyTorch FlexAttention with create_block_mask."""
    mask_mod, score_mod, by_head = _mods(case, B, H, L, S, device)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, None, H if by_head else None, L, S, device=device)
    compiled = _compiled_flex_attention()

    def forward(q, k, v):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return forward


def sdpa(case: Case):
    """``forward(q, k, v)`` for scaled_dot_product_attention where it applies (noop, causal), else None."""
    if case.name not in ("noop", "causal"):
        return None
    is_causal = case.name == "causal"

    def forward(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    return forward


def from_jax(x) -> "torch.Tensor":
    """A JAX array on the GPU as a torch tensor (a copy through host memory: setup only, never timed)."""
    array = np.array(x.astype("float32"))  # a writable copy
    return torch.as_tensor(array, device="cuda").to(torch.bfloat16 if str(x.dtype) == "bfloat16" else torch.float32)


def create_block_mask_seconds(case: Case, H: int, L: int, device="cuda") -> float:
    mask_mod, _, by_head = _mods(case, 1, H, L, L, device)
    create_block_mask(mask_mod, None, H if by_head else None, L, L, device=device)  # warm-up
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    create_block_mask(mask_mod, None, H if by_head else None, L, L, device=device)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3
