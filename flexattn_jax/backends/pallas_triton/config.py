"""Tile sizes and launch parameters of the Pallas Triton kernels: ``kernel_options`` validated into a frozen Config.

``kernel_options`` keys (PyTorch's names):

* ``BLOCK_M``, ``BLOCK_N``: the forward's query and key tile sizes: powers of two from 16 to 256. Smaller tiles
  lower but compute wrong results on the GPU, so they are refused. A tile must divide the BlockMask's block size
  along its axis (the kernel then visits several tiles per mask block), unless the mask has a single block along
  that axis.
* ``num_warps`` (1, 2, 4, 8, 16) and ``num_stages`` (1 to 8): the Triton launch parameters of the forward.
* keys of the backward kernels (``BLOCK_M1``, ``BLOCK_N1``, ``BLOCK_M2``, ``BLOCK_N2`` and any key starting with
  ``bwd_``), of the decode kernel (starting with ``decode_``) and of the Mosaic GPU forward (starting with
  ``mosaic_``) pass through here untouched; those kernels check them.

Any other key raises, so that a typo does not go unnoticed.

Defaults depend on the (padded) head dim and the dtype: float32 dots run at full precision, so they use smaller
tiles; head dim 256 leaves room for fewer rows. Tiles also shrink to the sequence lengths (no 128-row tile for 40
queries) and to divide the mask's blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

__all__ = [
    "Config",
    "FORWARD_KEYS",
    "MIN_TILE",
    "MAX_TILE",
    "is_other_kernels_key",
    "check_kernel_options",
    "check_option_value",
    "fit_tile",
    "default_forward_config",
    "forward_config",
    "forward_tiles_unsupported_reason",
]

FORWARD_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_BACKWARD_KEYS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
_OTHER_PREFIXES = ("bwd_", "decode_", "mosaic_")
MIN_TILE = 16  # 8 x 8 tiles lower without complaint and give wrong results on an H100
MAX_TILE = 256
_WARPS = (1, 2, 4, 8, 16)
_MAX_STAGES = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Static launch configuration of one kernel (hashable: it is part of the compiled kernel's identity).

    Attributes:
      block_m: rows of the query tile.
      block_n: rows of the key/value tile.
      num_warps: warps per program.
      num_stages: software-pipelining depth of the key loop.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def is_other_kernels_key(key: str) -> bool:
    """A key read by the backward or decode kernels, not the forward."""
    return key in _BACKWARD_KEYS or key.startswith(_OTHER_PREFIXES)


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_option_value(key: str, value, *, kind: str) -> None:
    """Checks one ``kernel_options`` value of any Triton kernel. kind: "tile", "num_warps" or "num_stages" (a key
    outside these is only checked to be an int). Raises ValueError/TypeError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"kernel_options[{key!r}] must be an int, got {value!r}")
    if kind == "tile" and not (_is_power_of_two(value) and MIN_TILE <= value <= MAX_TILE):
        raise ValueError(
            f"kernel_options[{key!r}] must be a power of two from {MIN_TILE} to {MAX_TILE}, got {value} "
            f"(tiles under {MIN_TILE} give wrong results on the GPU)"
        )
    if kind == "num_warps" and value not in _WARPS:
        raise ValueError(f"kernel_options[{key!r}] must be one of {_WARPS}, got {value}")
    if kind == "num_stages" and not 1 <= value <= _MAX_STAGES:
        raise ValueError(f"kernel_options[{key!r}] must be from 1 to {_MAX_STAGES}, got {value}")


def check_kernel_options(kernel_options: Mapping[str, Any] | None) -> dict[str, int]:
    """Validates the forward's keys of ``kernel_options``; returns them. Raises ValueError/TypeError naming the key."""
    if kernel_options is None:
        return {}
    if not isinstance(kernel_options, Mapping):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    options = {}
    for key, value in kernel_options.items():
        if not isinstance(key, str):
            raise TypeError(f"kernel_options keys must be strings, got {key!r}")
        if is_other_kernels_key(key):
            continue
        if key not in FORWARD_KEYS:
            raise ValueError(
                f"kernel_options has an unknown key {key!r}; the forward reads {', '.join(FORWARD_KEYS)} "
                f"(backward keys: {', '.join(_BACKWARD_KEYS)} or 'bwd_*'; decode keys: 'decode_*'; "
                "pallas_mosaic keys: 'mosaic_*')"
            )
        check_option_value(key, value, kind="tile" if key in ("BLOCK_M", "BLOCK_N") else key)
        options[key] = value
    return options


def default_forward_config(head_dim: int, dtype) -> Config:
    """The forward's defaults for a (power-of-two padded) head dim and an input dtype."""
    if jnp.dtype(dtype) == jnp.float32:
        if head_dim <= 64:
            return Config(block_m=64, block_n=32, num_warps=4, num_stages=3)
        if head_dim <= 128:
            return Config(block_m=64, block_n=32, num_warps=4, num_stages=2)
        return Config(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if head_dim <= 64:
        # Measured on an H200 and an H100 over sustained windows (benchmarks/NOTES.md section 53): 64 x 64 with 3
        # stages beats section 29's 128 x 64 by 4-11% on causal, sliding window, per-head masks and soft-capping,
        # 0-3% on full attention, prefix LM and the document mask, and is 1-2% under it on ALiBi. Section 29's
        # short windows, at the unloaded clock, had read 128 x 64 ahead.
        return Config(block_m=64, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        # Measured on an H100 (benchmarks/NOTES.md): 4 warps and 2 stages beat 8 warps and 3 stages by 17-32%.
        return Config(block_m=128, block_n=64, num_warps=4, num_stages=2)
    return Config(block_m=64, block_n=32, num_warps=4, num_stages=2)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fit_tile(default: int, length: int, mask_block: int, mask_blocks: int) -> int | None:
    """The largest power-of-two tile <= default that is not much longer than length and divides the mask block."""
    tile = max(MIN_TILE, min(default, _next_power_of_two(length)))
    if mask_blocks == 1:
        return tile
    while tile >= MIN_TILE and mask_block % tile:
        tile //= 2
    return tile if tile >= MIN_TILE else None


def forward_tiles_unsupported_reason(
    kernel_options: Mapping[str, Any] | None,
    *,
    q_len: int,
    kv_len: int,
    mask_block_size: tuple[int, int],
    mask_num_blocks: tuple[int, int],
) -> str | None:
    """Why no forward tiling fits this mask (None when one does). Assumes ``check_kernel_options`` passed."""
    options = check_kernel_options(kernel_options)
    for axis, key, length, block, blocks in (
        ("query", "BLOCK_M", q_len, mask_block_size[0], mask_num_blocks[0]),
        ("key", "BLOCK_N", kv_len, mask_block_size[1], mask_num_blocks[1]),
    ):
        if blocks == 1:
            continue
        if key in options:
            if block % options[key]:
                return (
                    f"kernel_options[{key!r}] = {options[key]} does not divide the BlockMask's {axis} block size "
                    f"{block}; use a power of two dividing it, or build the mask with a BLOCK_SIZE that is a "
                    f"multiple of {options[key]}"
                )
        elif fit_tile(MIN_TILE, length, block, blocks) is None:
            return (
                f"the BlockMask's {axis} block size {block} is not a multiple of {MIN_TILE}; the pallas_triton "
                f"kernels need tiles of at least {MIN_TILE} rows dividing it (build the mask with BLOCK_SIZE a "
                "multiple of 16, e.g. the default 128)"
            )
    return None


def forward_config(
    kernel_options: Mapping[str, Any] | None,
    *,
    head_dim: int,
    dtype,
    q_len: int,
    kv_len: int,
    mask_block_size: tuple[int, int],
    mask_num_blocks: tuple[int, int],
) -> Config:
    """The forward's Config: defaults for the head dim and dtype, overridden by ``kernel_options``, fitted to the
    lengths and the mask's blocks.

    Raises:
      ValueError/TypeError: bad ``kernel_options``, or a tile that cannot divide the mask's blocks.
    """
    options = check_kernel_options(kernel_options)
    reason = forward_tiles_unsupported_reason(
        options, q_len=q_len, kv_len=kv_len, mask_block_size=mask_block_size, mask_num_blocks=mask_num_blocks
    )
    if reason is not None:
        raise ValueError(reason)
    default = default_forward_config(head_dim, dtype)
    block_m = options.get("BLOCK_M") or fit_tile(default.block_m, q_len, mask_block_size[0], mask_num_blocks[0])
    block_n = options.get("BLOCK_N") or fit_tile(default.block_n, kv_len, mask_block_size[1], mask_num_blocks[1])
    return Config(
        block_m=block_m,
        block_n=block_n,
        num_warps=options.get("num_warps", default.num_warps),
        num_stages=options.get("num_stages", default.num_stages),
    )
