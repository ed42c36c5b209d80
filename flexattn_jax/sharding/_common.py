"""What batch/head sharding and ring attention share: mesh-axis checks, partition specs, and mods that see global
indices."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flexattn_jax.block_mask import BlockMask

# One mesh axis name, or several (sharding one array axis over their product, the first the major one).
AxisNames = tuple[str, ...]

# The BlockMask's eight arrays, each [B, H, ...].
_BLOCK_MASK_ARRAYS = tuple(
    f.name for f in dataclasses.fields(BlockMask) if f.name not in ("seq_lengths", "BLOCK_SIZE", "mask_mod")
)


def check_mesh(mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((4,), ('data',))), got {type(mesh).__name__}"
        )


def normalize_axes(mesh: Mesh, axes, name: str) -> AxisNames | None:
    """None, a mesh axis name, or a tuple of names -> a tuple of names (None stays None); checks they exist."""
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else axes
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{name} must be a mesh axis name, a tuple of names, or None, got {axes!r}")
    for n in names:
        if n not in mesh.axis_names:
            raise ValueError(f"{name} names the mesh axis {n!r}, but the mesh's axes are {tuple(mesh.axis_names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name} names a mesh axis twice: {tuple(names)}")
    return tuple(names)


def check_disjoint(**named_axes: AxisNames | None) -> None:
    """Each mesh axis may shard one array axis only."""
    owner: dict[str, str] = {}
    for name, axes in named_axes.items():
        for axis in axes or ():
            if axis in owner:
                raise ValueError(f"{owner[axis]} and {name} both use the mesh axis {axis!r}; give each its own axes")
            owner[axis] = name


def axes_size(mesh: Mesh, axes: AxisNames | None) -> int:
    size = 1
    for axis in axes or ():
        size *= mesh.shape[axis]
    return size


def check_divisible(size: int, parts: int, what: str, axes_name: str, axes: AxisNames | None) -> None:
    if size % parts:
        raise ValueError(
            f"{what} ({size}) must be divisible by the size of {axes_name} {spec_entry(axes)!r} ({parts}); shard it "
            "over mesh axes whose size divides it"
        )


def spec_entry(axes: AxisNames | None):
    """The PartitionSpec entry sharding one array axis over `axes`."""
    if axes is None:
        return None
    return axes[0] if len(axes) == 1 else axes


def shard_index(axes: AxisNames | None) -> jax.Array:
    """This shard's position along `axes` (int32; 0 when the array axis is not sharded). Only inside shard_map."""
    if axes is None:
        return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(axes).astype(jnp.int32)


def block_mask_specs(block_mask: BlockMask, batch_axes, head_axes) -> BlockMask:
    """A BlockMask of PartitionSpecs: B and H sharded where the mask has them (not broadcast), else replicated."""
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    b = spec_entry(batch_axes) if mb > 1 else None
    h = spec_entry(head_axes) if mh > 1 else None
    specs = {}
    for name in _BLOCK_MASK_ARRAYS:
        array = getattr(block_mask, name)
        if array is None:
            specs[name] = None
            continue
        specs[name] = PartitionSpec(b, h, *([None] * (array.ndim - 2)))
    return dataclasses.replace(block_mask, **specs)


def uses_explicit_axes(mesh: Mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def place(mesh: Mesh, tree, specs):
    """On a mesh with Explicit axes, shard_map takes only arrays already laid out as its in_specs: reshard them.

    On Auto axes shard_map moves the data itself (nothing, for inputs already sharded that way).
    """
    if not uses_explicit_axes(mesh):
        return tree
    return jax.tree.map(
        lambda x, spec: jax.reshard(x, NamedSharding(mesh, spec)),
        tree,
        specs,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def global_score_mod(score_mod: Callable, b_offset, h_offset, q_offset=0, kv_offset=0) -> Callable:
    """score_mod seeing global indices: each local index plus the offset of this shard (or chunk)."""

    def with_global_indices(score, b, h, q_idx, kv_idx):
        return score_mod(score, b + b_offset, h + h_offset, q_idx + q_offset, kv_idx + kv_offset)

    with_global_indices.__name__ = getattr(score_mod, "__name__", "score_mod")
    return with_global_indices


def global_mask_mod(mask_mod: Callable, b_offset, h_offset, q_offset=0, kv_offset=0) -> Callable:
    """mask_mod seeing global indices: each local index plus the offset of this shard (or chunk)."""

    def with_global_indices(b, h, q_idx, kv_idx):
        return mask_mod(b + b_offset, h + h_offset, q_idx + q_offset, kv_idx + kv_offset)

    with_global_indices.__name__ = getattr(mask_mod, "__name__", "mask_mod")
    return with_global_indices

