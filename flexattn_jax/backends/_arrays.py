"""Array helpers the kernel wrappers share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["pad_axis"]


def pad_axis(x: jax.Array, axis: int, size: int, value=0, *, mode: str = "constant") -> jax.Array:
    """``x`` padded at the end of ``axis`` to ``size`` (unchanged when already that long): with ``value``, or with
    the last entry repeated when ``mode="edge"``."""
    if x.shape[axis] >= size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=jnp.asarray(value, x.dtype))
