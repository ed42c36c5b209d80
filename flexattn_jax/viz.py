"""Pictures of masks and block maps: as text (no dependencies) and with matplotlib (optional)."""

from __future__ import annotations

import numpy as np

from flexattn_jax import _validation

__all__ = ["block_map_to_text", "plot_mask", "plot_block_mask"]

FULL_CELL, PARTIAL_CELL, EMPTY_CELL = "█", "▒", "·"


def block_map_to_text(partial: np.ndarray, full: np.ndarray, grid_size: int = 24) -> str:
    """Draws one (batch, head) block map: '█' full, '▒' partial, '·' skipped.

    Maps larger than ``grid_size`` cells a side are shrunk: a cell stands for a group of blocks and shows '█' if
    every block in the group is full, '·' if none is visited, '▒' otherwise.
    """
    grid_size = _validation.check_positive_int(grid_size, "grid_size")
    partial = np.asarray(partial, bool)
    full = np.asarray(full, bool)
    rows, cols = partial.shape
    row_step = -(-rows // grid_size)
    col_step = -(-cols // grid_size)
    lines = []
    for r in range(0, rows, row_step):
        cells = []
        for c in range(0, cols, col_step):
            p = partial[r : r + row_step, c : c + col_step]
            f = full[r : r + row_step, c : c + col_step]
            if f.all():
                cells.append(FULL_CELL)
            elif not (p | f).any():
                cells.append(EMPTY_CELL)
            else:
                cells.append(PARTIAL_CELL)
        lines.append("".join(cells))
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'flexattn_jax[notebooks]'") from e
    return plt


def plot_mask(mask, ax=None, title: str | None = None):
    """Shows a dense boolean mask [Q_LEN, KV_LEN] (allowed positions dark). Returns the matplotlib Axes."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(np.asarray(mask, bool), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("kv_idx")
    ax.set_ylabel("q_idx")
    if title:
        ax.set_title(title)
    return ax


def plot_block_mask(block_mask, batch: int = 0, head: int = 0, ax=None, title: str | None = None):
    """Shows one (batch, head) of a BlockMask: full blocks black, partial grey, skipped white. Returns the Axes."""
    plt = _pyplot()
    partial, full = (np.asarray(m)[batch, head] for m in block_mask.block_maps())
    picture = np.where(full, 1.0, np.where(partial, 0.5, 0.0))
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(picture, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel(f"kv block ({block_mask.BLOCK_SIZE[1]} keys)")
    ax.set_ylabel(f"q block ({block_mask.BLOCK_SIZE[0]} queries)")
    if title:
        ax.set_title(title)
    return ax
