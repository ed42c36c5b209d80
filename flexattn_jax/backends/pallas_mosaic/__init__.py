"""flex attention with Pallas Mosaic GPU kernels for Hopper (sm90), forward and backward.

The API asks ``unsupported_reason`` first (the reason is what ``flexattn_jax.explain_implementation`` reports), then
calls ``attention`` with plain arrays. The forward is ``forward.py``, the dK/dV and dQ kernels ``backward.py``; both
run inside the ``custom_vjp`` of ``pallas_triton.vjp``. The gradient falls back to the Triton backward kernels where
the Mosaic GPU ones do not serve the inputs (``unsupported_backward_reason``: head dim 256, a KV_BLOCK that is not a
multiple of 128) and where a gradient of an array the score_mod closes over is wanted (that needs an atomic
scatter-add, which only the Triton dQ kernel has).

``kernel_options`` keys read here:

* ``mosaic_block_n`` (64 or 128): keys per TMA copy and wgmma tile of the forward;
* ``mosaic_num_stages`` (2 to 4): shared-memory slots of the forward's key/value ring;
* ``mosaic_fwd_overlap`` (0 or 1): each compute warpgroup overlaps its softmax of a key tile with its own P V of the
  previous tile; unset: 1 at head dim 65 to 128 with 128-key tiles where no score_mod is left to apply and the
  mask_mod reads no captured array at q_idx or kv_idx (``forward.Config.overlap``; causal +2%, sliding window +4%
  at 8K, benchmarks/NOTES.md section 54), else 0 (ALiBi, soft-capping and document masks are slower with it);
* ``mosaic_fwd_q_buffers`` (1 or 2; unset: 2 where shared memory allows, 1 otherwise): query tiles per compute
  warpgroup in shared memory; with 2, each work item's queries are fetched while the previous item runs (section 16);
* ``mosaic_bwd_num_stages`` (2 to 4): slots of the backward kernels' rings;
* ``mosaic_bwd_fuse_dq``: 1, dQ accumulated by the dK/dV kernel with float32 reduce-adds, whose order, and so dQ's
  last bits, vary from run to run; 0, a dQ kernel of its own, deterministic; unset, fused where the walks are long,
  where it measured faster (``_fuse_dq_choice``);
* ``mosaic_backward`` (1, the default: the Mosaic GPU backward where it serves the inputs; 0: the Triton backward
  always);
* ``mosaic_fwd_copy_warps`` (1, the default, or 4) and ``mosaic_bwd_copy_warps`` (4, the default, or 1): warps of
  the memory warpgroup that run its copy loop, in the forward and in the backward kernels. One warp measured 1-3%
  faster in the forward, and 9% slower on the fused backward of full attention (section 31);
* ``mosaic_bwd_overlap`` (0, 1 or 2): how far the backward kernels overlap a step's matmuls with its softmax and
  dS (``backward.Config.overlap``); ``mosaic_bwd_auto_barriers`` (0 or 1): 1 compiles the dK/dV kernel with
  Pallas's automatic warpgroup barriers around its stores to shared memory. Unset, both follow the score_mod:
  overlap 2 without the barriers where its derivative is 1 (none, ALiBi, a bias); otherwise overlap 1 without
  them up to head dim 128, overlap 0 with them above (``backward.default_schedule``; sections 33 and 73);
* ``mosaic_fwd_float_indices`` (1, the default, or 0): 1 builds the score_mod's float32 conversions of q_idx,
  kv_idx, their sum or difference (ALiBi's ``kv_idx - q_idx``) from index tiles converted once per program, one
  float add per score, instead of converting the integer tiles score by score (``forward.IndexTiles``; measured
  4-10% faster on ALiBi's forward, section 36);
* ``mosaic_fwd_scale_queries`` (0 or 1; unset: 1 unless the score_mod applies a special function such as tanh to
  every score, or a backward follows and the scale is not a power of two, whose rounded product would leave the
  forward's lse off the scores the backward recomputes): where the score_mod needs the scaled score (ALiBi's sum,
  soft-capping's ``tanh(score / cap)``), 1 multiplies each query tile by the scale once per work item in shared
  memory, rounded to the input dtype, in place of one multiply per score (``forward.Config.scale_queries``; measured
  2-8% faster on ALiBi, 0-4% slower on soft-capping, section 40);
* ``mosaic_fwd_fixed_max`` (1, the default, or 0): 1, where the score_mod's result is bounded (soft-capping's
  tanh), the forward's softmax subtracts the bound (rounded up to an integer in exp2's units) instead of each row's
  running maximum, with no maximum to reduce and no accumulator to rescale per key tile
  (``forward.Config.fixed_max``; bfloat16 up to a cap of 41, float16 up to 4.8, so that every probability stays a
  normal number; past that, a fixed shift below the bound, bfloat16 up to a cap of 63, float16 up to 9.7; not with
  the maximum scores; measured on an H100 5-10% faster on soft-capping at D=128, the same at D=64, section 43); 0
  keeps the running maximum;
* ``mosaic_fwd_exp2_fma`` (0 or 16 to 128 in steps of 16, at most the key tile): where the fixed maximum applies,
  of each key tile how many columns take the softmax's exp2 from a cubic on the FMA units instead of the
  special-function unit that soft-capping's tanh shares (``forward.exp2_polynomial``, section 46); unset: 80 of
  128 columns (``forward.default_exp2_fma``) for a score_mod that applies a special function at head dim 64, else
  0 (measured on an H100 +15% on soft-capping at D=64, section 49, and 3-5% more with section 50's polynomial);
* ``mosaic_fwd_row_sum_fold`` (0 or 1): 1 keeps each thread's partial row sums of the softmax across key tiles
  and adds a row's threads' together once, after the walk (``forward.Config.row_sum_fold``, section 48); unset: 1
  where the fixed maximum applies to a score_mod that applies a special function, or where no score_mod is left to
  apply and the mask_mod reads no captured array, at head dim 128, else 0 (soft-capping +4-7% at D=128, section
  49; full attention +3%, section 51; causal +1-3% and prefix LM +2-3%, ALiBi folded -6-7%, section 53);
* ``mosaic_fwd_max_tree`` (1, the default, or 0): 1 takes each key tile's row maxima by column halves before the
  exchange between threads, the same maxima by shorter dependent chains (``forward.Config.max_tree``; measured on an
  H100 2-3% faster at D=64 and at B=8 S=2048 on full attention, section 59); 0, Mosaic GPU's reduction;
* ``mosaic_fwd_anchored_shift`` (0 or 1; unset: 1 where no score_mod is left to apply, else 0): 1, on bfloat16
  inputs where the fixed maximum does not apply and the maximum scores are not asked for, each row's softmax
  subtracts its maximum over the first key tile of its walk for the whole walk, with no maximum to reduce and no
  accumulator to rescale per later key tile; rows whose scores later exceed that maximum by more than 44 (natural
  units) fail a certificate after the walk, and their work items run again, exactly, in a second launch that skips
  every other item (``forward.Config.anchored_shift``; measured on an H200 6-20% faster forward at issue 8's
  shapes on full attention and causal, section 60; on an H100 ALiBi's forward at half the speed, every item run
  twice, section 66); 0 keeps the running maximum;
* ``mosaic_bwd_heads_inner`` (0, the default, or 1): 1 launches the backward's programs with the batch and the heads
  varying fastest, the order before section 34, which streams every tile from DRAM; kept to measure against;
* ``mosaic_bwd_kv_batch_loop`` (0 or 1; unset: 1 where the dK/dV programs, key tiles times key/value heads, are at
  least the GPU's SMs): where key and value have batch 1, 1 has each dK/dV program add up every query batch's
  contribution, reading key and value once, with no per-batch copy of them or of their gradients; 0 broadcasts
  them to the query batch (B times the programs) and adds the per-batch gradients up.

The Triton backward's keys pass through to it; the Triton forward's keys are accepted and unused.

Mosaic GPU's interpret mode cannot run wgmma on this JAX, so the kernel runs on a Hopper GPU only; without one the
tests lower it for CUDA (``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` under an abstract H100).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flexattn_jax.backends import _captures
from flexattn_jax.backends.pallas_mosaic import backward as _backward
from flexattn_jax.backends.pallas_mosaic import forward as _forward
from flexattn_jax.backends.pallas_triton import config as _triton_config
from flexattn_jax.backends.pallas_triton import vjp as _vjp
from flexattn_jax.backends.pallas_triton.backward import BlockLists

__all__ = [
    "attention",
    "check_kernel_options",
    "unsupported_reason",
    "unsupported_backward_reason",
    "is_hopper",
    "OPTION_KEYS",
    "HEAD_DIMS",
]

OPTION_KEYS = (
    "mosaic_block_n", "mosaic_num_stages", "mosaic_fwd_overlap", "mosaic_fwd_q_buffers",
    "mosaic_bwd_num_stages", "mosaic_bwd_fuse_dq", "mosaic_backward",
    "mosaic_fwd_copy_warps", "mosaic_bwd_copy_warps", "mosaic_bwd_overlap", "mosaic_bwd_auto_barriers",
    "mosaic_bwd_heads_inner", "mosaic_fwd_float_indices", "mosaic_bwd_kv_batch_loop",
    "mosaic_fwd_scale_queries", "mosaic_fwd_fixed_max", "mosaic_fwd_exp2_fma", "mosaic_fwd_row_sum_fold",
    "mosaic_fwd_max_tree", "mosaic_fwd_anchored_shift",
)
HEAD_DIMS = (64, 128, 256)
_BLOCK_NS = (64, 128)
_EXP2_FMA = tuple(range(0, 129, 16))  # key columns whose exp2 is a polynomial: multiples of 16
_MAX_STAGES = 4
_SMEM_BYTES = 227 * 1024  # shared memory one H100 block may use
# What Mosaic GPU adds to the buffers counted below (barriers, alignment): 128 KiB-key-tile, 3-stage D=128 needs
# 232568 bytes where the buffers are 229888, and is refused at launch.
_SMEM_RESERVE = 4 * 1024
# Where the backward fuses dQ into the dK/dV kernel by default: from this many 128-key tiles per query block on
# average when the BlockMask's contents are known while tracing, else from this query length.
FUSE_DQ_MIN_KEY_TILES = 16
FUSE_DQ_MIN_QUERIES = 8192


def is_hopper() -> bool:
    """The default device is a CUDA GPU of compute capability 9.x."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def check_kernel_options(kernel_options: Mapping[str, Any] | None) -> None:
    """Checks the ``mosaic_*`` keys of ``kernel_options`` (ValueError/TypeError naming the key)."""
    _options(kernel_options)


def _options(kernel_options: Mapping[str, Any] | None) -> dict[str, int]:
    options = {}
    for key, value in (kernel_options or {}).items():
        if key not in OPTION_KEYS:
            if isinstance(key, str) and key.startswith("mosaic_"):
                raise ValueError(f"kernel_options has an unknown key {key!r}; pallas_mosaic reads {', '.join(OPTION_KEYS)}")
            continue
        _triton_config.check_option_value(key, value, kind="int")
        if key == "mosaic_block_n" and value not in _BLOCK_NS:
            raise ValueError(f"kernel_options['mosaic_block_n'] must be one of {_BLOCK_NS}, got {value}")
        if key in ("mosaic_num_stages", "mosaic_bwd_num_stages") and not 2 <= value <= _MAX_STAGES:
            raise ValueError(f"kernel_options[{key!r}] must be from 2 to {_MAX_STAGES}, got {value}")
        if key in ("mosaic_backward", "mosaic_bwd_fuse_dq", "mosaic_fwd_overlap", "mosaic_bwd_auto_barriers",
                   "mosaic_bwd_heads_inner", "mosaic_fwd_float_indices", "mosaic_bwd_kv_batch_loop",
                   "mosaic_fwd_scale_queries", "mosaic_fwd_fixed_max", "mosaic_fwd_row_sum_fold",
                   "mosaic_fwd_max_tree", "mosaic_fwd_anchored_shift") \
                and value not in (0, 1):
            raise ValueError(f"kernel_options[{key!r}] must be 0 or 1, got {value}")
        if key == "mosaic_fwd_exp2_fma" and value not in _EXP2_FMA:
            raise ValueError(f"kernel_options['mosaic_fwd_exp2_fma'] must be one of {_EXP2_FMA}, got {value}")
        if key == "mosaic_fwd_q_buffers" and value not in (1, 2):
            raise ValueError(f"kernel_options['mosaic_fwd_q_buffers'] must be 1 or 2, got {value}")
        if key in ("mosaic_fwd_copy_warps", "mosaic_bwd_copy_warps") and value not in (1, 4):
            raise ValueError(f"kernel_options[{key!r}] must be 1 or 4, got {value}")
        if key == "mosaic_bwd_overlap" and value not in (0, 1, 2):
            raise ValueError(f"kernel_options[{key!r}] must be 0, 1 or 2, got {value}")
        options[key] = value
    return options


def _config(kernel_options, *, head_dim: int, mask_block_size, mask_num_blocks) -> tuple[_forward.Config | None, str]:
    """The launch configuration, or None and why no configuration fits."""
    options = _options(kernel_options)
    default_n = 128 if head_dim <= 128 else 64
    kv_block, num_kv_blocks = mask_block_size[1], mask_num_blocks[1]
    # An explicit key tile, or the default, or 64 where the mask's blocks need it.
    candidates = [options["mosaic_block_n"]] if "mosaic_block_n" in options else sorted({default_n, 64}, reverse=True)
    fitting = [n for n in candidates if num_kv_blocks == 1 or kv_block % n == 0]
    if not fitting:
        return None, (
            f"pallas_mosaic needs the BlockMask's KV_BLOCK to be a multiple of the key tile {candidates}, "
            f"got KV_BLOCK={kv_block}"
        )
    block_n = fitting[0]
    stages = options.get("mosaic_num_stages", 2)

    def fits(q_buffers: int) -> bool:
        return _forward.smem_bytes(head_dim, head_dim, block_n, stages, q_buffers) + _SMEM_RESERVE <= _SMEM_BYTES

    # A second query buffer, to fetch the next work item's queries early, where it fits.
    q_buffers = options.get("mosaic_fwd_q_buffers", 2 if fits(2) else 1)
    if not fits(q_buffers):
        smem = _forward.smem_bytes(head_dim, head_dim, block_n, stages, q_buffers)
        return None, (
            f"pallas_mosaic with mosaic_block_n={block_n}, mosaic_num_stages={stages}, mosaic_fwd_q_buffers="
            f"{q_buffers} and head dim {head_dim} needs {smem} bytes of shared memory, over the {_SMEM_BYTES} an "
            "H100 block has"
        )
    overlap = bool(options["mosaic_fwd_overlap"]) if "mosaic_fwd_overlap" in options else None
    copy_warps = options.get("mosaic_fwd_copy_warps", 1)
    float_indices = bool(options.get("mosaic_fwd_float_indices", 1))
    scale_queries = bool(options["mosaic_fwd_scale_queries"]) if "mosaic_fwd_scale_queries" in options else None
    fixed_max = bool(options.get("mosaic_fwd_fixed_max", 1))
    exp2_fma = options.get("mosaic_fwd_exp2_fma")
    if exp2_fma is not None and exp2_fma > block_n:
        raise ValueError(f"kernel_options['mosaic_fwd_exp2_fma'] must be at most the key tile, {block_n} here "
                         f"(mosaic_block_n), got {exp2_fma}")
    return _forward.Config(block_n=block_n, num_stages=stages, q_buffers=q_buffers, overlap=overlap,
                           copy_warps=copy_warps, float_indices=float_indices, scale_queries=scale_queries,
                           fixed_max=fixed_max, exp2_fma=exp2_fma,
                           row_sum_fold=bool(options["mosaic_fwd_row_sum_fold"])
                           if "mosaic_fwd_row_sum_fold" in options else None,
                           max_tree=bool(options.get("mosaic_fwd_max_tree", 1)),
                           anchored_shift=bool(options["mosaic_fwd_anchored_shift"])
                           if "mosaic_fwd_anchored_shift" in options else None), ""


def unsupported_reason(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    score_mod: Callable,
    mask_mod: Callable,
    block_size: tuple[int, int],
    num_blocks: tuple[int, int],
    kernel_options: Mapping[str, Any] | None,
    interpret: bool = False,
) -> str | None:
    """None when ``attention`` serves these inputs; otherwise what is unsupported and what is.

    Invalid ``kernel_options`` raise here (ValueError/TypeError).
    """
    _triton_config.check_kernel_options(kernel_options)
    _options(kernel_options)
    if interpret:
        return "pallas_mosaic has no interpret mode (Mosaic GPU's interpreter cannot run wgmma); it needs a Hopper GPU"
    if jax.config.jax_enable_x64:
        # Its index arithmetic and the arrays its mods read are 32-bit; under x64 jnp makes them 64-bit.
        return "pallas_mosaic runs with jax_enable_x64 off (its kernels index in int32); pallas_triton serves x64"
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        return f"pallas_mosaic supports bfloat16 and float16, got {jnp.dtype(query.dtype).name} (pallas_triton serves it)"
    head_dim, value_dim = query.shape[-1], value.shape[-1]
    if head_dim != value_dim or head_dim not in HEAD_DIMS:
        return f"pallas_mosaic supports equal query and value head dims in {HEAD_DIMS}, got E={head_dim}, Ev={value_dim}"
    if num_blocks[0] > 1 and block_size[0] % _forward.Q_TILE:
        return (
            f"pallas_mosaic needs the BlockMask's Q_BLOCK to be a multiple of {_forward.Q_TILE}, got {block_size[0]}"
        )
    config, why = _config(kernel_options, head_dim=head_dim, mask_block_size=block_size, mask_num_blocks=num_blocks)
    if config is None:
        return why
    tile = (_forward.BLOCK_M, config.block_n)
    for mod, is_score in ((score_mod, True), (mask_mod, False)):
        (program,), _ = _captures.trace_for_tiles(mod, [(*tile, "full")], score=is_score)
        reason = _forward.unsupported_mod_reason(program, config.block_n)
        if reason is not None:
            return reason
    return None


def unsupported_backward_reason(
    query: jax.Array,
    *,
    score_mod: Callable,
    mask_mod: Callable,
    block_size: tuple[int, int],
    num_blocks: tuple[int, int],
    kernel_options: Mapping[str, Any] | None,
) -> str | None:
    """None when the Mosaic GPU backward serves inputs the forward serves (and ``kernel_options`` does not turn it
    off); otherwise why the Triton backward kernels compute the gradient instead."""
    options = _options(kernel_options)
    if not options.get("mosaic_backward", 1):
        return "kernel_options['mosaic_backward'] is 0"
    head_dim = query.shape[-1]
    if head_dim not in _backward.HEAD_DIMS:
        return f"the pallas_mosaic backward supports head dims {_backward.HEAD_DIMS}, got {head_dim}"
    rows = _backward.PROGRAM_ROWS
    for axis, block, count in (("Q_BLOCK", block_size[0], num_blocks[0]), ("KV_BLOCK", block_size[1], num_blocks[1])):
        if count > 1 and block % rows:
            return f"the pallas_mosaic backward needs the BlockMask's {axis} to be a multiple of {rows}, got {block}"
    config = _backward_config(options, head_dim, query.shape[-2])
    smem = _backward.smem_bytes(head_dim, config.num_stages, config.fuse_dq)
    if smem + _SMEM_RESERVE > _SMEM_BYTES:
        return (
            f"the pallas_mosaic backward with mosaic_bwd_num_stages={config.num_stages}, "
            f"mosaic_bwd_fuse_dq={int(config.fuse_dq)} and head dim {head_dim} needs {smem} bytes of shared memory, "
            f"over the {_SMEM_BYTES} an H100 block has"
        )
    for mod, is_score in ((score_mod, True), (mask_mod, False)):
        (program,), _ = _captures.trace_for_tiles(mod, [_MosaicBackward.tile], score=is_score)
        reason = _forward.unsupported_mod_reason(program, _backward.TILE)
        if reason is not None:
            return reason
        if is_score and program.calls("custom_vjp_call"):
            # The Mosaic kernels take the score_mod's derivative in forward mode, which a custom_vjp rule refuses.
            return f"{program.name} calls a jax.custom_vjp function, whose rule the pallas_mosaic backward cannot apply"
    return None


def attended_key_tiles(kv_num_blocks, full_kv_num_blocks, kv_block: int) -> float | None:
    """How many 128-key tiles a query block attends on average, from the BlockMask's kv-side counts; None when they
    are traced (a BlockMask passed into ``jit`` as an argument), whose contents are unknown until run time."""
    counts = [c for c in (kv_num_blocks, full_kv_num_blocks) if c is not None]
    if any(isinstance(c, jax.core.Tracer) for c in counts):
        return None
    try:
        blocks = sum(float(np.asarray(c, np.float64).mean()) for c in counts)
    except (TypeError, RuntimeError):  # an array this process cannot read whole
        return None
    return blocks * kv_block / 128


def _fuse_dq_choice(options: Mapping[str, int], head_dim: int, q_len: int,
                    key_tiles: float | None) -> tuple[bool, str]:
    """Whether the backward fuses dQ into the dK/dV kernel, and why. Unless ``mosaic_bwd_fuse_dq`` is given, it
    does where its buffers fit in shared memory beside the rings (head dim 128 with 3 or 4 stages does not) and
    the walks are long: ``FUSE_DQ_MIN_KEY_TILES`` 128-key tiles or more per query block on average when
    ``key_tiles`` (``attended_key_tiles``) is known, else ``FUSE_DQ_MIN_QUERIES`` queries or more. Fusing saves the
    dQ kernel's recomputation of S and dP, but adds a float32 dQ buffer to clear and convert and ties the two
    warpgroups together at every step. It measured 2-10% faster on full and causal attention at 8192 queries (64
    and 32 tiles; NOTES.md section 11); with the programs launched head by head (section 34) 8-9% faster on full
    attention at 2048 (16 tiles; section 35), but 2-4% slower on causal (8.5) and sliding-window masks there and
    5-20% slower on document masks (about 5 tiles at 8192, fewer at 2048)."""
    if "mosaic_bwd_fuse_dq" in options:
        value = options["mosaic_bwd_fuse_dq"]
        return bool(value), f"kernel_options['mosaic_bwd_fuse_dq'] is {value}"
    stages = options.get("mosaic_bwd_num_stages", 2)
    if _backward.smem_bytes(head_dim, stages, True) + _SMEM_RESERVE > _SMEM_BYTES:
        return False, f"fused, it would not fit in shared memory at head dim {head_dim} with {stages} stages"
    if key_tiles is not None:
        return key_tiles >= FUSE_DQ_MIN_KEY_TILES, (
            f"a query block attends {key_tiles:.1f} 128-key tiles on average; fused from {FUSE_DQ_MIN_KEY_TILES}")
    return q_len >= FUSE_DQ_MIN_QUERIES, (
        f"the BlockMask is traced; fused from {FUSE_DQ_MIN_QUERIES} queries, here {q_len}")


def _backward_config(options: Mapping[str, int], head_dim: int, q_len: int,
                     key_tiles: float | None = None) -> _backward.Config:
    """The options' backward configuration; dQ fused or not as ``_fuse_dq_choice`` says."""
    fuse_dq, _ = _fuse_dq_choice(options, head_dim, q_len, key_tiles)
    return _backward.Config(num_stages=options.get("mosaic_bwd_num_stages", 2), fuse_dq=fuse_dq,
                            copy_warps=options.get("mosaic_bwd_copy_warps", 4),
                            overlap=options.get("mosaic_bwd_overlap"),
                            auto_barriers=None if "mosaic_bwd_auto_barriers" not in options
                            else bool(options["mosaic_bwd_auto_barriers"]),
                            heads_inner=bool(options.get("mosaic_bwd_heads_inner", 0)),
                            kv_batch_loop=None if "mosaic_bwd_kv_batch_loop" not in options
                            else bool(options["mosaic_bwd_kv_batch_loop"]))


def dq_path(kernel_options: Mapping[str, Any] | None, head_dim: int, q_len: int, key_tiles: float | None) -> str:
    """How the Mosaic backward computes dQ for these inputs, and why, in words; ``key_tiles`` as
    ``attended_key_tiles`` gives it."""
    fused, why = _fuse_dq_choice(_options(kernel_options), head_dim, q_len, key_tiles)
    return f"{'dQ accumulated in the dK/dV kernel' if fused else 'dQ by a kernel of its own'} ({why})"


@dataclasses.dataclass(frozen=True)
class _MosaicBackward:
    """The Mosaic GPU dK/dV and dQ kernels as the backward of the Triton ``custom_vjp``."""

    config: _backward.Config
    mask_block_size: tuple[int, int]
    scale: float
    tile = (_backward.TILE, _backward.TILE, "full")

    def takes_batch_one_kv(self, k_shape, kv_lists: BlockLists) -> bool:
        return _backward.loops_over_query_batches(self.config, k_shape[1], k_shape[2], self.mask_block_size[1],
                                                  kv_lists.indices.shape[-1])

    def __call__(self, q, k, v, d_out, lse2, delta, kv_lists, q_lists, score_program, score_consts, mask_program,
                 mask_consts):
        return _backward.flex_backward(
            q,
            k,
            v,
            d_out,
            lse2,
            delta,
            kv_lists,
            q_lists,
            score_mod=score_program,
            score_consts=score_consts,
            mask_mod=mask_program,
            mask_consts=mask_consts,
            mask_block_size=self.mask_block_size,
            scale=self.scale,
            config=self.config,
        )


@dataclasses.dataclass(frozen=True)
class _MosaicForward:
    """The Mosaic GPU forward as the ``forward`` of the Triton ``custom_vjp``."""

    config: _forward.Config
    mask_block_size: tuple[int, int]
    scale: float

    @property
    def tile(self):
        return (_forward.BLOCK_M, self.config.block_n, "full")

    def __call__(self, q, k, v, score_consts, mask_consts, kv_lists: BlockLists, score_program, mask_program, *,
                 with_max_scores: bool, for_backward: bool):
        return _forward.flex_forward(
            q,
            k,
            v,
            score_consts,
            mask_consts,
            *kv_lists.arrays_with_none(),
            score_mod=score_program,
            mask_mod=mask_program,
            config=self.config,
            mask_block_size=self.mask_block_size,
            scale=self.scale,
            with_max_scores=with_max_scores,
            for_backward=for_backward,
        )


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    score_mod: Callable,
    mask_mod: Callable,
    kv_num_blocks: jax.Array,
    kv_indices: jax.Array,
    full_kv_num_blocks: jax.Array | None,
    full_kv_indices: jax.Array | None,
    q_num_blocks: jax.Array | None = None,
    q_indices: jax.Array | None = None,
    full_q_num_blocks: jax.Array | None = None,
    full_q_indices: jax.Array | None = None,
    block_size: tuple[int, int],
    scale: float,
    kernel_options: Mapping[str, Any] | None = None,
    with_max_scores: bool = False,
) -> tuple[jax.Array, ...]:
    """flex attention: out [B, Hq, L, E] and lse [B, Hq, L] float32, differentiable, and with ``with_max_scores``
    each query's maximum modified score (no gradient); arguments as ``pallas_triton.attention``. Raises ValueError
    when ``unsupported_reason`` is not None."""
    block_size = tuple(int(b) for b in block_size)
    num_blocks = tuple(kv_indices.shape[-2:])
    reason = unsupported_reason(
        query,
        key,
        value,
        score_mod=score_mod,
        mask_mod=mask_mod,
        block_size=block_size,
        num_blocks=num_blocks,
        kernel_options=kernel_options,
    )
    if reason is not None:
        raise ValueError(reason)
    config, _ = _config(kernel_options, head_dim=query.shape[-1], mask_block_size=block_size, mask_num_blocks=num_blocks)
    backward_kernels = None
    if (
        unsupported_backward_reason(
            query,
            score_mod=score_mod,
            mask_mod=mask_mod,
            block_size=block_size,
            num_blocks=num_blocks,
            kernel_options=kernel_options,
        )
        is None
    ):
        key_tiles = attended_key_tiles(kv_num_blocks, full_kv_num_blocks, block_size[1])
        backward_kernels = _MosaicBackward(
            _backward_config(_options(kernel_options), query.shape[-1], query.shape[-2], key_tiles),
            block_size,
            float(scale),
        )
    return _vjp.attention(
        query,
        key,
        value,
        score_mod=score_mod,
        mask_mod=mask_mod,
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num_blocks,
        full_kv_indices=full_kv_indices,
        q_num_blocks=q_num_blocks,
        q_indices=q_indices,
        full_q_num_blocks=full_q_num_blocks,
        full_q_indices=full_q_indices,
        block_size=block_size,
        scale=scale,
        kernel_options=_triton_options(kernel_options),
        forward=_MosaicForward(config, block_size, float(scale)),
        backward_kernels=backward_kernels,
        with_max_scores=with_max_scores,
    )


def _triton_options(kernel_options):
    """The options the Triton backward reads (the Mosaic ones removed)."""
    if kernel_options is None:
        return None
    return {k: v for k, v in kernel_options.items() if k not in OPTION_KEYS}
