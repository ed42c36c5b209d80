"""flex_attention: validate the arguments, canonicalise them, and choose the implementation."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
# Pallas registers a tracing-context option when this module is first imported, which would otherwise happen
# inside the first kernel call: every jit traced before that call would then miss its cache once, the eager
# calls' kept functions among them.
import jax.experimental.pallas.fuser  # noqa: F401
import numpy as np

from flexattn_jax import _validation
from flexattn_jax.backends import pallas_mosaic, pallas_triton, reference
from flexattn_jax.block_mask import BlockMask, noop_mask
from flexattn_jax.mods import identity

__all__ = ["flex_attention", "explain_implementation", "AuxOutput", "AuxRequest", "Choice", "IMPLEMENTATIONS"]

# Every value `implementation=` accepts; None picks the best one available for the platform and inputs.
IMPLEMENTATIONS = ("reference", "pallas_triton", "pallas_mosaic")


def _full_attention_block_mask(q_len: int, kv_len: int) -> BlockMask:
    """A BlockMask visiting every position: one full block covering the whole matrix.

    Built as constants even under ``jit``, so that a backend can read its walk lengths while tracing (the Mosaic
    backward fuses dQ on long walks, ``pallas_mosaic.attended_key_tiles``)."""
    with jax.ensure_compile_time_eval():
        one = jnp.ones((1, 1, 1, 1), jnp.bool_)
        return BlockMask.from_block_maps(~one, one, BLOCK_SIZE=(q_len, kv_len), seq_lengths=(q_len, kv_len))


class AuxRequest(NamedTuple):
    """Which auxiliary outputs ``flex_attention(..., return_aux=AuxRequest(...))`` returns, as in PyTorch.

    Attributes:
      lse: the log-sum-exp of each query's modified scores.
      max_scores: each query's largest modified score.
    """

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """The auxiliary outputs of ``flex_attention``: each field an array [B, Hq, L] float32 where its
    ``AuxRequest`` field asked for it, else None. A NamedTuple, so a pytree that ``jit`` can return.

    Attributes:
      lse: natural log of the sum of exp(score) over the keys a query attends (the score after scale and
        score_mod); -inf where it attends none. Differentiable.
      max_scores: the largest of those scores; -inf where it attends none. It carries no gradient (PyTorch marks
        it non-differentiable too): it is returned through ``jax.lax.stop_gradient``.
    """

    lse: jax.Array | None = None
    max_scores: jax.Array | None = None


def check_return_aux(return_aux, return_lse) -> None:
    """``return_aux`` is None or an ``AuxRequest`` of two bools, and not given together with ``return_lse``."""
    if return_aux is None:
        return
    if not isinstance(return_aux, AuxRequest):
        raise TypeError(f"return_aux must be None or a flexattn_jax.AuxRequest, got {type(return_aux).__name__}")
    for field, value in zip(return_aux._fields, return_aux):
        if not isinstance(value, bool):
            raise TypeError(f"return_aux.{field} must be a bool, got {type(value).__name__} {value!r}")
    if return_lse:
        raise ValueError(
            "pass return_lse=True or return_aux, not both: return_aux=AuxRequest(lse=True) returns the lse in its "
            "AuxOutput"
        )


def check_implementation(implementation) -> None:
    """``implementation`` is None or one of ``IMPLEMENTATIONS`` (the paged entry point takes it too)."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")


def attention_results(out, lse, *max_scores, return_lse: bool, return_aux: AuxRequest | None):
    """What ``flex_attention`` returns, from its out, lse and (when asked for) max_scores: out, (out, lse), or
    (out, AuxOutput) with max_scores through ``stop_gradient``. The sharded and paged entry points return the same."""
    if return_aux is None:
        return (out, lse) if return_lse else out
    max_scores = jax.lax.stop_gradient(max_scores[0]) if return_aux.max_scores else None
    return out, AuxOutput(lse=lse if return_aux.lse else None, max_scores=max_scores)


class Choice(NamedTuple):
    """Which implementation ``flex_attention`` runs for some inputs, and why each other one was not chosen.

    Attributes:
      implementation: one of ``IMPLEMENTATIONS``.
      reasons: for each implementation not run, why (unsupported inputs, platform, or preference).
      backward: which kernels compute the gradient, and why where it is not the implementation's own
        (``explain_implementation`` fills it in).
    """

    implementation: str
    reasons: dict[str, str]
    backward: str = ""


def _backward_of(choice: Choice, query, score_mod, mask_mod, block_mask, kernel_options) -> str:
    """What computes the gradient when ``choice.implementation`` runs the forward."""
    if choice.implementation == "reference":
        return "reference: JAX autodiff of the dense reference"
    if choice.implementation == "pallas_triton":
        return "pallas_triton: its dK/dV and dQ kernels"
    why = pallas_mosaic.unsupported_backward_reason(
        query, score_mod=score_mod, mask_mod=mask_mod, block_size=block_mask.BLOCK_SIZE,
        num_blocks=block_mask.num_blocks, kernel_options=kernel_options,
    )
    if why is not None:
        return f"pallas_triton's dK/dV and dQ kernels: {why}"
    key_tiles = pallas_mosaic.attended_key_tiles(block_mask.kv_num_blocks, block_mask.full_kv_num_blocks,
                                                 block_mask.BLOCK_SIZE[1])
    dq = pallas_mosaic.dq_path(kernel_options, query.shape[-1], query.shape[-2], key_tiles)
    return (
        f"pallas_mosaic: its dK/dV kernel, {dq}; pallas_triton's kernels when a gradient with respect to an "
        "array the score_mod closes over is taken (that needs the Triton dQ kernel's atomic scatter-add)"
    )


def _choose(implementation, interpret, query, key, value, score_mod, mask_mod, block_mask, kernel_options) -> Choice:
    """The implementation to run, decided from the platform and the inputs alone (never by trying one)."""
    check_implementation(implementation)
    on_gpu = jax.default_backend() == "gpu"
    sizes = dict(block_size=block_mask.BLOCK_SIZE, num_blocks=block_mask.num_blocks, kernel_options=kernel_options)
    # Invalid kernel_options raise whichever implementation runs.
    triton_reason = pallas_triton.unsupported_reason(query, key, value, **sizes)
    if implementation == "reference":
        return Choice("reference", {"pallas_triton": "implementation='reference' was asked for",
                                    "pallas_mosaic": "implementation='reference' was asked for"})
    if implementation == "pallas_triton" or (implementation is None and interpret):
        if triton_reason is not None:
            if implementation is None:
                return Choice("reference", {"pallas_triton": triton_reason, "pallas_mosaic": "interpret=True"})
            raise ValueError(f"implementation='pallas_triton' cannot serve these inputs: {triton_reason}")
        if not (on_gpu or interpret):
            raise ValueError(
                f"implementation='pallas_triton' needs a CUDA GPU, but the default backend is {jax.default_backend()!r}; "
                "pass interpret=True to run it in interpret mode on the CPU"
            )
        other = "implementation='pallas_triton' was asked for" if implementation else "interpret=True"
        return Choice("pallas_triton", {"reference": other, "pallas_mosaic": other})

    if implementation is None and not on_gpu:
        why = f"the default backend is {jax.default_backend()!r}, not a CUDA GPU"
        return Choice("reference", {"pallas_triton": why, "pallas_mosaic": why})
    mosaic_reason = pallas_mosaic.unsupported_reason(
        query, key, value, score_mod=score_mod, mask_mod=mask_mod, interpret=interpret, **sizes
    )
    if implementation == "pallas_mosaic":
        if mosaic_reason is not None:
            raise ValueError(f"implementation='pallas_mosaic' cannot serve these inputs: {mosaic_reason}")
        if not on_gpu:
            raise ValueError(
                f"implementation='pallas_mosaic' needs a Hopper GPU, but the default backend is "
                f"{jax.default_backend()!r}; it has no interpret mode (use pallas_triton with interpret=True)"
            )
        asked = "implementation='pallas_mosaic' was asked for"
        return Choice("pallas_mosaic", {"reference": asked, "pallas_triton": asked})

    # implementation is None, on a GPU, not interpreted.
    if mosaic_reason is None and not pallas_mosaic.is_hopper():
        mosaic_reason = "pallas_mosaic needs a Hopper GPU (compute capability 9.x)"
    if mosaic_reason is None and pallas_triton.uses_decode_kernel(query, key, **sizes):
        mosaic_reason = "short queries (decoding) run faster on pallas_triton's split-KV decode kernel"
    if mosaic_reason is None:
        return Choice("pallas_mosaic", {"reference": "a kernel serves these inputs",
                                        "pallas_triton": "pallas_mosaic serves these inputs on this Hopper GPU"})
    if triton_reason is None:
        return Choice("pallas_triton", {"reference": "a kernel serves these inputs", "pallas_mosaic": mosaic_reason})
    return Choice("reference", {"pallas_triton": triton_reason, "pallas_mosaic": mosaic_reason})


def _prepare(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options):
    """Validates the arguments and fills in the defaults: (score_mod, block_mask, mask_mod, scale, kernel_options),
    the last with PyTorch's names put in ours."""
    _validation.check_qkv(query, key, value, enable_gqa, kv_batch_broadcast=True)
    scale = _validation.check_scale(scale)
    if score_mod is None:
        score_mod = identity
    _validation.check_score_mod(score_mod)
    q_len, kv_len = query.shape[2], key.shape[2]
    b, hq = query.shape[:2]
    _validation.check_extents(score_mod, "score_mod", batch=b, head=hq, q=q_len, kv=kv_len)
    if block_mask is None:
        block_mask = _full_attention_block_mask(q_len, kv_len)
    else:
        _validation.check_block_mask(block_mask, query, key)
    if kernel_options is not None and not isinstance(kernel_options, Mapping):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    kernel_options = _validation.pytorch_kernel_options(kernel_options)
    # Every key is checked whichever implementation runs: a misspelt or out-of-range one would otherwise pass where
    # no kernel reads it (the reference, a CPU) and raise only on a GPU.
    pallas_triton.check_kernel_options(kernel_options)
    pallas_mosaic.check_kernel_options(kernel_options)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    mask_mod = block_mask.mask_mod if block_mask.mask_mod is not None else noop_mask
    return score_mod, block_mask, mask_mod, scale, kernel_options


def _broadcast_kv_batch(query, key, value):
    """Key and value of batch size 1 shared by a query batch of B, as PyTorch allows: broadcast to B. The kernels
    then read B copies; the gradient of the broadcast adds the batches' dK and dV up. (The Pallas kernels take them
    unbroadcast: their forward kernels read the one copy, and so may pallas_mosaic's backward.)"""
    b = query.shape[0]
    if key.shape[0] == b:
        return key, value
    return tuple(jnp.broadcast_to(x, (b, *x.shape[1:])) for x in (key, value))


# Outside any trace (an eager call), flex_attention runs a Pallas implementation through a jit function kept here,
# so that calls alike compile the kernels once rather than at every call. Keyed by what the call's result depends
# on besides the arrays passed: each mod's jaxpr text and the contents of the arrays it closes over (they are
# compiled in as constants), and the static arguments. Oldest first; a mod whose captured arrays change at every
# call gets a new entry each time, and compiles each time, as it would without the cache. Each entry holds its
# mods' constants, so a call whose two mods close over more than _MAX_EAGER_CONST_BYTES is not kept: at most 64 MiB
# in all.
_EAGER_CALLS: dict[tuple, Callable] = {}
_MAX_EAGER_CALLS = 16
_MAX_EAGER_CONST_BYTES = 4 << 20


def _mod_key(mod: Callable, num_args: int):
    """What a mod computes, as a hashable value: its jaxpr for scalar arguments and the shape, dtype and bytes of
    each array it closes over; None where it closes over a traced array or cannot be traced for scalars alone."""
    scalars = [jax.ShapeDtypeStruct((), jnp.float32)] * (num_args - 4) + [jax.ShapeDtypeStruct((), jnp.int32)] * 4
    try:
        closed = jax.make_jaxpr(mod)(*scalars)
    except Exception:  # noqa: BLE001 - such a mod runs as before, traced at every call
        return None
    if any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        return None
    if sum(getattr(c, "nbytes", 0) for c in closed.consts) > _MAX_EAGER_CONST_BYTES // 2:
        return None
    consts = []
    for c in closed.consts:
        host = np.asarray(c)
        consts.append((host.shape, str(host.dtype), hashlib.blake2b(host.tobytes(), digest_size=16).digest()))
    return str(closed.jaxpr), tuple(consts)


def _compiled_for_eager_call(query, key, value, block_mask: BlockMask, *, score_mod, mask_mod, kernel_options,
                             **static) -> Callable | None:
    """For a call outside any trace, the kept jit function that runs it on (query, key, value, the BlockMask
    without its mask_mod); None inside a trace, or where the arguments give no key."""
    if any(isinstance(x, jax.core.Tracer) for x in (query, key, value, *jax.tree.leaves(block_mask))):
        return None
    score_key, mask_key = _mod_key(score_mod, 5), _mod_key(mask_mod, 4)
    if score_key is None or mask_key is None:
        return None
    try:
        options = tuple(sorted((kernel_options or {}).items()))
        call_key = (score_key, mask_key, options, tuple(sorted(static.items())))
        hash(call_key)
    except TypeError:
        return None
    compiled = _EAGER_CALLS.get(call_key)
    if compiled is None:

        def call(query, key, value, block_mask):
            block_mask = dataclasses.replace(block_mask, mask_mod=mask_mod)
            return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                  kernel_options=kernel_options, **static)

        compiled = jax.jit(call)
        if len(_EAGER_CALLS) >= _MAX_EAGER_CALLS:
            _EAGER_CALLS.pop(next(iter(_EAGER_CALLS)))
        _EAGER_CALLS[call_key] = compiled
    return compiled


def explain_implementation(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    implementation: str | None = None,
    interpret: bool = False,
    kernel_options: Mapping[str, Any] | None = None,
) -> Choice:
    """Which implementation ``flex_attention`` would run with these arguments, why not the others, and what computes
    the gradient (``Choice.backward``).

    Takes ``flex_attention``'s arguments (arrays or ``jax.ShapeDtypeStruct``); runs nothing.

    >>> import jax, jax.numpy as jnp, flexattn_jax as fa
    >>> q = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.float32)
    >>> fa.explain_implementation(q, q, q).implementation  # on a CPU
    'reference'
    """
    _validation.check_flags(enable_gqa=enable_gqa, interpret=interpret)
    score_mod, block_mask, mask_mod, _, kernel_options = _prepare(
        query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options
    )
    choice = _choose(implementation, interpret, query, key, value, score_mod, mask_mod, block_mask, kernel_options)
    backward = _backward_of(choice, query, score_mod, mask_mod, block_mask, kernel_options)
    return choice._replace(backward=backward)


def flex_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    implementation: str | None = None,
    interpret: bool = False,
    kernel_options: Mapping[str, Any] | None = None,
    *,
    return_aux: AuxRequest | None = None,
):
    """Scaled dot-product attention with a user-defined score_mod and a block-sparse mask.

    Args:
      query: [B, Hq, L, E]; key: [B, Hkv, S, E]; value: [B, Hkv, S, Ev]. float32, bfloat16 or float16, one dtype.
        Key and value may have batch size 1, shared by every query batch (as PyTorch's).
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` applied to each scaled score; None for the
        identity. The indices are int32; h is the query head. It may close over arrays (also traced ones).
      block_mask: a BlockMask from ``create_block_mask``; its ``mask_mod`` decides which positions attend. None
        attends everywhere.
      scale: multiplies q.k before score_mod; defaults to 1 / sqrt(E).
      enable_gqa: allow Hq to be a multiple of Hkv (query head h reads key/value head h // (Hq // Hkv)).
      return_lse: also return the log-sum-exp of the (modified) scores.
      implementation: None for the best available, or one of ``IMPLEMENTATIONS``. None picks ``"pallas_mosaic"``
        on a Hopper GPU when it supports the inputs, else ``"pallas_triton"`` on a GPU (or with ``interpret=True``)
        when it supports them, else ``"reference"``; ``explain_implementation`` says which and why.
      interpret: run a Pallas implementation in interpret mode (on the CPU).
      kernel_options: kernel tunables (tile sizes, warps, stages); checked on every implementation, and ignored by
        the reference. PyTorch's names are taken too (``fwd_BLOCK_M``, ``bwd_BLOCK_N1``, ``FORCE_USE_FLEX_ATTENTION``,
        the hints ``ROWS_GUARANTEED_SAFE``, ``PRESCALE_QK``...; ``_validation.pytorch_kernel_options``).
      return_aux: an ``AuxRequest`` naming the auxiliary outputs to return (lse, max_scores), as PyTorch's
        ``return_aux``; not together with ``return_lse``.

    Under ``jax.jit`` the kernels compile with the step. Called outside any trace, a Pallas implementation compiles
    its kernels once for each set of mods (their jaxprs and the contents of the arrays they close over) and of
    static arguments, and calls alike reuse them.

    Returns:
      out [B, Hq, L, Ev] in the query's dtype, and with ``return_lse`` also lse [B, Hq, L] float32 (natural log;
      -inf for a query that attends nowhere, whose output is 0). With ``return_aux``, ``(out, AuxOutput)`` whose
      fields are the requested arrays [B, Hq, L] float32 and None elsewhere.

    >>> import jax, jax.numpy as jnp, flexattn_jax as fa
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 2, 256, 64))
    >>> mask = fa.create_block_mask(fa.causal_mask, None, None, 256, 256)
    >>> fa.flex_attention(q, k, v, block_mask=mask).shape
    (1, 2, 256, 64)
    >>> out, aux = fa.flex_attention(q, k, v, block_mask=mask, return_aux=fa.AuxRequest(max_scores=True))
    >>> aux.max_scores.shape, aux.lse is None
    ((1, 2, 256), True)
    """
    _validation.check_flags(enable_gqa=enable_gqa, return_lse=return_lse, interpret=interpret)
    check_return_aux(return_aux, return_lse)
    score_mod, block_mask, mask_mod, scale, kernel_options = _prepare(
        query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options
    )
    with_max_scores = return_aux is not None and return_aux.max_scores

    def finish(*results):
        return attention_results(*results, return_lse=return_lse, return_aux=return_aux)

    # The choice reads no batch size of key and value; they are broadcast only where the chosen implementation
    # needs B copies.
    implementation = _choose(
        implementation, interpret, query, key, value, score_mod, mask_mod, block_mask, kernel_options
    ).implementation
    if implementation in ("pallas_mosaic", "pallas_triton"):
        compiled = _compiled_for_eager_call(
            query, key, value, block_mask, score_mod=score_mod, mask_mod=mask_mod, scale=float(scale),
            enable_gqa=enable_gqa, return_lse=return_lse, implementation=implementation, interpret=interpret,
            kernel_options=kernel_options, return_aux=return_aux,
        )
        if compiled is not None:
            return compiled(query, key, value, dataclasses.replace(block_mask, mask_mod=None))
        # Both kernels take the BlockMask as its index arrays, and key and value of batch 1 as they are (their
        # forward kernels read the one copy; pallas_mosaic's backward too where its dK/dV programs fill the GPU).
        kernel_args = dict(
            score_mod=score_mod,
            mask_mod=mask_mod,
            kv_num_blocks=block_mask.kv_num_blocks,
            kv_indices=block_mask.kv_indices,
            full_kv_num_blocks=block_mask.full_kv_num_blocks,
            full_kv_indices=block_mask.full_kv_indices,
            q_num_blocks=block_mask.q_num_blocks,
            q_indices=block_mask.q_indices,
            full_q_num_blocks=block_mask.full_q_num_blocks,
            full_q_indices=block_mask.full_q_indices,
            block_size=block_mask.BLOCK_SIZE,
            scale=float(scale),
            kernel_options=kernel_options,
            with_max_scores=with_max_scores,
        )
        if implementation == "pallas_mosaic":
            return finish(*pallas_mosaic.attention(query, key, value, **kernel_args))
        return finish(*pallas_triton.attention(query, key, value, interpret=interpret, **kernel_args))
    key, value = _broadcast_kv_batch(query, key, value)
    partial_blocks, full_blocks = block_mask.block_maps()
    return finish(*reference.attention(
        query,
        key,
        value,
        score_mod=score_mod,
        mask_mod=mask_mod,
        partial_blocks=partial_blocks,
        full_blocks=full_blocks,
        block_size=block_mask.BLOCK_SIZE,
        scale=float(scale),
        with_max_scores=with_max_scores,
    ))
