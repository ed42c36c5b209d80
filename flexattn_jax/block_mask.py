"""BlockMask: which (query block, key block) tiles attention visits, and how.

The attention matrix of one (batch, head) is cut into tiles of Q_BLOCK x KV_BLOCK positions. Each tile is one of

* **full**: every position in it is allowed. Kernels visit it without calling ``mask_mod``.
* **partial**: some positions are allowed. Kernels visit it and apply ``mask_mod`` element by element.
* **empty**: no position is allowed. Kernels skip it.

The full class exists because evaluating ``mask_mod`` costs arithmetic on every element of a tile; for the
tiles strictly under the diagonal of a causal mask it is known to be true everywhere, so it is skipped.

A position (q, kv) is allowed exactly when its tile is full, or its tile is partial and
``mask_mod(b, h, q, kv)`` is true. Positions past ``seq_lengths`` are never allowed, so the last tile row or
column of a length that is not a multiple of the block size is never full.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from flexattn_jax import _validation, viz

__all__ = [
    "BlockMask",
    "create_block_mask",
    "create_mask",
    "create_block_mask_from_dense",
    "convert_mask_to_block_mask",
    "convert_block_mask_to_mask",
    "noop_mask",
    "DEFAULT_BLOCK_SIZE",
]

DEFAULT_BLOCK_SIZE = 128
# create_block_mask evaluates mask_mod on at most this many positions at a time, so the memory it needs stays
# bounded (a few hundred MB of booleans and indices) whatever the sequence lengths.
_MAX_POSITIONS_PER_CHUNK = 1 << 24

MaskMod = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def noop_mask(b, h, q_idx, kv_idx):
    """Allows every position: ``True``."""
    del b, h, kv_idx
    return jnp.ones_like(q_idx, dtype=jnp.bool_)


@dataclasses.dataclass(frozen=True)
class _SelectedMaskMod:
    """The mask_mod of a BlockMask whose batches, heads or query blocks ``BlockMask.__getitem__`` selected.

    Kernels call a mask_mod with the selection's own b, h and q_idx (0 for its first batch, head or query), but the
    mask_mod was written for the original ones (a document mask reads ``ids[b, q_idx]``): this maps them back,
    ``start + i * step`` on the batch and head axes (``start`` alone on an axis of one entry, which broadcasts) and
    ``q_offset + q_idx`` on the query axis. Hashable by its fields, so that two masks selected alike are one static
    value to ``jit``.
    """

    mask_mod: MaskMod
    batch: tuple[int, int, int] | None  # (start, step, size) of the selection; None: the axis was kept whole
    head: tuple[int, int, int] | None
    q_offset: int = 0  # the first selected query block's first position in the original mask

    @property
    def __name__(self) -> str:
        return getattr(self.mask_mod, "__name__", type(self.mask_mod).__name__)

    @property
    def index_extents(self) -> dict:
        """The original mod's query and key extents, seen from the selection's first query (batch and head
        selections were checked against the mask's own sizes when they were made)."""
        extents = getattr(self.mask_mod, "index_extents", None) or {}
        shifted = {axis: extents[axis] for axis in ("kv",) if axis in extents}
        if "q" in extents:
            extent, what = extents["q"]
            shifted["q"] = (extent - self.q_offset, f"{what} from query {self.q_offset} on")
        return shifted

    def __call__(self, b, h, q_idx, kv_idx):
        q_idx = q_idx + self.q_offset if self.q_offset else q_idx
        return self.mask_mod(_original_index(b, self.batch), _original_index(h, self.head), q_idx, kv_idx)


class _TracedQOffsetMaskMod:
    """The mask_mod of a BlockMask whose query block a traced index selected, inside ``jit``: it reads the offset as
    any mask_mod reads a traced array it closes over. Hashed by identity, since a traced value cannot be hashed; such
    a BlockMask belongs to the trace that made it (return the attention's output from the ``jit``, not the mask)."""

    def __init__(self, mask_mod: MaskMod, q_offset: jax.Array):
        self.mask_mod = mask_mod
        self.q_offset = q_offset
        self.__name__ = getattr(mask_mod, "__name__", type(mask_mod).__name__)
        extents = getattr(mask_mod, "index_extents", None) or {}
        # Where the offset is unknown only the key extent can be checked.
        self.index_extents = {axis: extents[axis] for axis in ("kv",) if axis in extents}

    def __call__(self, b, h, q_idx, kv_idx):
        return self.mask_mod(b, h, q_idx + self.q_offset, kv_idx)


def _one_entry_slice(i, n: int, what: str, axis: str):
    """An int index (negative counting from the end) as the slice of its one entry, which keeps the axis; anything
    else unchanged. IndexError naming ``what`` past either end."""
    if not _validation.is_int(i):
        return i
    if not -n <= i < n:
        raise IndexError(f"{what} {i} out of range for {axis}")
    i = int(i) % n
    return slice(i, i + 1)


def _original_index(i, selection: tuple[int, int, int] | None):
    if selection is None:
        return i
    start, step, size = selection
    if size == 1:
        return jnp.zeros_like(i) + start
    return i * step + start if (start, step) != (0, 1) else i


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _normalize_block_size(block_size) -> tuple[int, int]:
    if _validation.is_int(block_size):
        block_size = (int(block_size), int(block_size))
    if (
        not isinstance(block_size, (tuple, list))
        or len(block_size) != 2
        or not all(_validation.is_int(s) and s > 0 for s in block_size)
    ):
        raise ValueError(
            f"BLOCK_SIZE must be a positive int or a (Q_BLOCK, KV_BLOCK) pair of positive ints, got {block_size!r}"
        )
    return int(block_size[0]), int(block_size[1])


def _check_seq_lengths(seq_lengths) -> tuple[int, int]:
    if (
        not isinstance(seq_lengths, (tuple, list))
        or len(seq_lengths) != 2
        or not all(_validation.is_int(n) and n > 0 for n in seq_lengths)
    ):
        raise ValueError(f"seq_lengths must be a (Q_LEN, KV_LEN) pair of positive ints, got {seq_lengths!r}")
    return int(seq_lengths[0]), int(seq_lengths[1])


def _block_index_array(x, name: str) -> jax.Array:
    """x as an int32 array; a float array is refused rather than truncated (block 1.9 is not block 1)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {jnp.dtype(x.dtype).name}{list(x.shape)}")
    return x.astype(jnp.int32)


def _check_block_lists(num_blocks: jax.Array, indices: jax.Array, num_name: str, indices_name: str) -> None:
    """When concrete: 0 <= num_blocks <= KVB, and the first num_blocks entries of each indices row in [0, KVB).

    _indices_to_map clips what it reads, so an out-of-range count or block number would otherwise describe a
    different mask than the one given, silently.
    """
    if not (_validation.is_concrete(num_blocks) and _validation.is_concrete(indices)):
        return
    num_blocks, indices = np.asarray(num_blocks), np.asarray(indices)
    kvb = indices.shape[-1]
    bad = (num_blocks < 0) | (num_blocks > kvb)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{num_name} must be in [0, {kvb}] (KVB, the length of {indices_name}'s rows), got {num_blocks[where]} "
            f"at {list(where)}"
        )
    listed = np.arange(kvb) < num_blocks[..., None]
    bad = listed & ((indices < 0) | (indices >= kvb))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{indices_name} must list key blocks in [0, {kvb}) in the first {num_name} entries of each row, got "
            f"{indices[where]} at {list(where)}"
        )


def _map_to_indices(block_map: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Block map [..., R, C] (bool) -> (num_blocks [..., R] int32, indices [..., R, C] int32).

    The first num_blocks entries of each indices row are the set columns in increasing order; the rest are the
    unset columns, also increasing, so every entry is a valid column and kernels may read past num_blocks safely.
    """
    num_blocks = block_map.sum(axis=-1, dtype=jnp.int32)
    indices = jnp.argsort(~block_map, axis=-1, stable=True).astype(jnp.int32)
    return num_blocks, indices


def _indices_to_map(num_blocks: jax.Array, indices: jax.Array, num_cols: int) -> jax.Array:
    """Inverse of _map_to_indices for the set part: (num_blocks [..., R], indices [..., R, K]) -> [..., R, C]."""
    positions = jnp.arange(indices.shape[-1], dtype=jnp.int32).reshape((1,) * num_blocks.ndim + (-1,))
    valid = positions < num_blocks[..., None]
    lead = indices.shape[:-1]
    flat_idx = indices.reshape(-1, indices.shape[-1])
    flat_valid = valid.reshape(-1, indices.shape[-1])
    rows = jnp.arange(flat_idx.shape[0])[:, None]
    dense = jnp.zeros((flat_idx.shape[0], num_cols), jnp.bool_)
    # Padding entries point at real columns; writing False with `max` leaves those columns as they are.
    dense = dense.at[rows, jnp.clip(flat_idx, 0, num_cols - 1)].max(flat_valid)
    return dense.reshape(*lead, num_cols)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "kv_num_blocks",
        "kv_indices",
        "full_kv_num_blocks",
        "full_kv_indices",
        "q_num_blocks",
        "q_indices",
        "full_q_num_blocks",
        "full_q_indices",
    ],
    meta_fields=["seq_lengths", "BLOCK_SIZE", "mask_mod"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
    """The block-sparse structure of an attention mask, as index arrays kernels walk.

    A pytree: the eight arrays are its leaves, ``seq_lengths``, ``BLOCK_SIZE`` and ``mask_mod`` its static data, so
    it can be passed into and returned from ``jax.jit``; new contents of the same shapes and the same ``mask_mod``
    object do not recompile. A mask built afresh for each batch has a new ``mask_mod`` (a closure over that batch's
    document ids), and ``jit`` traces again for each: build such a mask inside the jitted step, from the ids passed
    in as an argument (``create_block_mask`` works under ``jit``), as the attention layers do.

    Shapes use B and H (each the inputs' batch and query-head count, or 1 to broadcast), QB = ceil(Q_LEN / Q_BLOCK)
    and KVB = ceil(KV_LEN / KV_BLOCK).

    Attributes:
      kv_num_blocks: int32 [B, H, QB]. How many *partial* key blocks query block i visits.
      kv_indices: int32 [B, H, QB, KVB]. Row i lists those partial key blocks first, in increasing order; the
        entries past ``kv_num_blocks`` are padding (other valid block numbers) and must be ignored.
      full_kv_num_blocks: int32 [B, H, QB] or None. How many *full* key blocks query block i visits.
      full_kv_indices: int32 [B, H, QB, KVB] or None. The full key blocks, laid out like ``kv_indices``. When the
        full pair is None, every visited block is partial and ``mask_mod`` is applied everywhere.
      q_num_blocks, q_indices, full_q_num_blocks, full_q_indices: the same structure transposed: for each key
        block, the query blocks that visit it ([B, H, KVB] and [B, H, KVB, QB]). The backward pass walks these.
      seq_lengths: (Q_LEN, KV_LEN), the sequence lengths the mask was built for.
      BLOCK_SIZE: (Q_BLOCK, KV_BLOCK).
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` applied inside partial blocks.

    Example: a causal mask with Q_LEN = KV_LEN = 6 and BLOCK_SIZE = 2 has 3 x 3 blocks; the diagonal blocks are
    partial and the blocks under it full::

        kv_num_blocks      = [[[1, 1, 1]]]                  # the diagonal block of each row
        kv_indices         = [[[[0, 1, 2], [1, 0, 2], [2, 0, 1]]]]
        full_kv_num_blocks = [[[0, 1, 2]]]
        full_kv_indices    = [[[[0, 1, 2], [0, 1, 2], [0, 1, 2]]]]
        q_num_blocks       = [[[1, 1, 1]]]                  # key block j is partial only for query block j
        full_q_num_blocks  = [[[2, 1, 0]]]                  # ... and full for the query blocks after it
    """

    kv_num_blocks: jax.Array
    kv_indices: jax.Array
    full_kv_num_blocks: jax.Array | None
    full_kv_indices: jax.Array | None
    q_num_blocks: jax.Array
    q_indices: jax.Array
    full_q_num_blocks: jax.Array | None
    full_q_indices: jax.Array | None
    seq_lengths: tuple[int, int]
    BLOCK_SIZE: tuple[int, int]
    mask_mod: MaskMod = noop_mask

    # ----------------------------------------------------------------------------------------------- constructors

    @classmethod
    def from_block_maps(
        cls,
        partial_blocks: jax.Array,
        full_blocks: jax.Array | None = None,
        BLOCK_SIZE=DEFAULT_BLOCK_SIZE,
        mask_mod: MaskMod | None = None,
        seq_lengths: tuple[int, int] | None = None,
    ) -> "BlockMask":
        """Builds a BlockMask from block-level boolean maps [B, H, QB, KVB] of partial and full blocks.

        A block set in both maps counts as full.
        """
        q_block, kv_block = _normalize_block_size(BLOCK_SIZE)
        if mask_mod is not None:
            check_mask_mod(mask_mod)
        partial_blocks = jnp.asarray(partial_blocks, jnp.bool_)
        if partial_blocks.ndim != 4:
            raise ValueError(f"partial_blocks must be [B, H, QB, KVB], got shape {partial_blocks.shape}")
        if 0 in partial_blocks.shape:
            raise ValueError(f"partial_blocks [B, H, QB, KVB] must have no empty axis, got shape {partial_blocks.shape}")
        num_q_blocks, num_kv_blocks = partial_blocks.shape[-2:]
        if seq_lengths is None:
            seq_lengths = (num_q_blocks * q_block, num_kv_blocks * kv_block)
        seq_lengths = _check_seq_lengths(seq_lengths)
        if (_cdiv(seq_lengths[0], q_block), _cdiv(seq_lengths[1], kv_block)) != (num_q_blocks, num_kv_blocks):
            raise ValueError(
                f"seq_lengths {seq_lengths} with BLOCK_SIZE {(q_block, kv_block)} needs "
                f"{(_cdiv(seq_lengths[0], q_block), _cdiv(seq_lengths[1], kv_block))} blocks, "
                f"but the block maps have {(num_q_blocks, num_kv_blocks)}"
            )
        if full_blocks is not None:
            full_blocks = jnp.asarray(full_blocks, jnp.bool_)
            if full_blocks.shape != partial_blocks.shape:
                raise ValueError(
                    f"full_blocks must have the shape of partial_blocks {partial_blocks.shape}, "
                    f"got {full_blocks.shape}"
                )
            partial_blocks = partial_blocks & ~full_blocks
        kv_num, kv_idx = _map_to_indices(partial_blocks)
        q_num, q_idx = _map_to_indices(jnp.swapaxes(partial_blocks, -1, -2))
        full_kv_num = full_kv_idx = full_q_num = full_q_idx = None
        if full_blocks is not None:
            full_kv_num, full_kv_idx = _map_to_indices(full_blocks)
            full_q_num, full_q_idx = _map_to_indices(jnp.swapaxes(full_blocks, -1, -2))
        return cls(
            kv_num_blocks=kv_num,
            kv_indices=kv_idx,
            full_kv_num_blocks=full_kv_num,
            full_kv_indices=full_kv_idx,
            q_num_blocks=q_num,
            q_indices=q_idx,
            full_q_num_blocks=full_q_num,
            full_q_indices=full_q_idx,
            seq_lengths=seq_lengths,
            BLOCK_SIZE=(q_block, kv_block),
            mask_mod=noop_mask if mask_mod is None else mask_mod,
        )

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: jax.Array,
        kv_indices: jax.Array,
        full_kv_num_blocks: jax.Array | None = None,
        full_kv_indices: jax.Array | None = None,
        BLOCK_SIZE=DEFAULT_BLOCK_SIZE,
        mask_mod: MaskMod | None = None,
        seq_lengths: tuple[int, int] | None = None,
        compute_q_blocks: bool = True,
    ) -> "BlockMask":
        """Builds a BlockMask from the kv-side arrays alone, deriving the transposed q-side ones (as PyTorch's).

        ``kv_num_blocks`` is [B, H, QB] and ``kv_indices`` [B, H, QB, KVB]; the full pair, if given, likewise.
        The index arrays must be integers; when concrete (not traced), each ``kv_num_blocks`` entry must be in
        [0, KVB] and the key blocks its row lists in [0, KVB). Works under ``jax.jit`` (where they are not checked).
        ``compute_q_blocks`` is accepted for PyTorch's signature: the q-side arrays are always derived, since every
        implementation's backward walks them.
        """
        _validation.check_flags(compute_q_blocks=compute_q_blocks)
        kv_num_blocks = _block_index_array(kv_num_blocks, "kv_num_blocks")
        kv_indices = _block_index_array(kv_indices, "kv_indices")
        if kv_num_blocks.ndim != 3 or kv_indices.ndim != 4 or kv_indices.shape[:3] != kv_num_blocks.shape:
            raise ValueError(
                "kv_num_blocks must be [B, H, QB] and kv_indices [B, H, QB, KVB] with the same B, H, QB; got "
                f"{kv_num_blocks.shape} and {kv_indices.shape}"
            )
        if 0 in kv_indices.shape:
            raise ValueError(f"kv_indices [B, H, QB, KVB] must have no empty axis, got shape {kv_indices.shape}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be given together")
        _check_block_lists(kv_num_blocks, kv_indices, "kv_num_blocks", "kv_indices")
        num_kv_blocks = kv_indices.shape[-1]
        partial = _indices_to_map(kv_num_blocks, kv_indices, num_kv_blocks)
        full = None
        if full_kv_num_blocks is not None:
            full_kv_num_blocks = _block_index_array(full_kv_num_blocks, "full_kv_num_blocks")
            full_kv_indices = _block_index_array(full_kv_indices, "full_kv_indices")
            if full_kv_indices.shape != kv_indices.shape or full_kv_num_blocks.shape != kv_num_blocks.shape:
                raise ValueError(
                    "full_kv_num_blocks / full_kv_indices must have the shapes of kv_num_blocks / kv_indices "
                    f"{kv_num_blocks.shape} / {kv_indices.shape}, got {full_kv_num_blocks.shape} / "
                    f"{full_kv_indices.shape}"
                )
            _check_block_lists(full_kv_num_blocks, full_kv_indices, "full_kv_num_blocks", "full_kv_indices")
            full = _indices_to_map(full_kv_num_blocks, full_kv_indices, num_kv_blocks)
        return cls.from_block_maps(partial, full, BLOCK_SIZE, mask_mod, seq_lengths)

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Q_LEN, KV_LEN); B and H are 1 where the mask broadcasts."""
        b, h = self.kv_num_blocks.shape[:2]
        return (b, h, *self.seq_lengths)

    @property
    def num_blocks(self) -> tuple[int, int]:
        """(QB, KVB): query and key block counts."""
        return self.kv_indices.shape[-2], self.kv_indices.shape[-1]

    def block_maps(self) -> tuple[jax.Array, jax.Array]:
        """(partial, full) block-level boolean maps [B, H, QB, KVB]."""
        num_kv_blocks = self.kv_indices.shape[-1]
        partial = _indices_to_map(self.kv_num_blocks, self.kv_indices, num_kv_blocks)
        if self.full_kv_num_blocks is None:
            full = jnp.zeros_like(partial)
        else:
            full = _indices_to_map(self.full_kv_num_blocks, self.full_kv_indices, num_kv_blocks)
        return partial, full

    def to_dense(self) -> jax.Array:
        """Block-level map [B, H, QB, KVB], int32: 1 where a block is visited (partial or full), 0 where skipped."""
        partial, full = self.block_maps()
        return (partial | full).astype(jnp.int32)

    def sparsity(self) -> float:
        """Percentage of blocks skipped: 100 * (1 - visited blocks / all blocks). PyTorch's BlockMask counts
        positions instead (visited blocks' area over Q_LEN x KV_LEN), which is the same where the lengths are
        multiples of the block size, and can fall below 0 where they are not."""
        dense = np.asarray(self.to_dense())
        return float(100.0 * (1.0 - dense.sum() / dense.size))

    # ------------------------------------------------------------------------------------------------- slicing

    def __getitem__(self, index) -> "BlockMask":
        """Selects batches, heads and query blocks: ``bm[b]``, ``bm[b, h]``, ``bm[:, 2:4]``, ``bm[:, :, qb]``.

        Integers keep their axis (size 1). The selection's mask_mod sees the original batch and head indices and
        query positions (``_SelectedMaskMod``): ``bm[1]`` applied to a batch of one evaluates
        ``mask_mod(1, h, q_idx, kv_idx)``, as the rows it keeps were built with, and ``bm[:, :, 2]`` evaluates
        ``mask_mod(b, h, 2 * Q_BLOCK + q_idx, kv_idx)``. (PyTorch's BlockMask replaces a sliced mask's mask_mod by one
        that raises instead.)

        Query blocks are selected by an int, a slice of step 1, or a 0-d integer array, which may be traced inside
        ``jit``. The selection's ``seq_lengths`` are the positions its blocks cover; a traced index covers a whole
        block, Q_BLOCK positions. With ``adjust`` this is the decoding idiom: the one query at position ``pos``
        attends as row ``pos`` of a causal mask built once for the longest sequence::

            row = block_mask[:, :, pos // Q_BLOCK].adjust(1, KV_LEN)  # mask_mod sees q_idx = (pos // Q_BLOCK) * Q_BLOCK
            row = dataclasses.replace(row, mask_mod=lambda b, h, q, kv: block_mask.mask_mod(b, h, q + pos, kv))
        """
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 3:
            raise IndexError(f"a BlockMask is indexed by (batch, head, query block) at most, got {len(index)} indices")
        selected = self._select_batches_and_heads(index[:2])
        return selected._select_query_blocks(index[2]) if len(index) == 3 else selected

    def _select_batches_and_heads(self, index: tuple) -> "BlockMask":
        sizes = self.kv_num_blocks.shape[:2]
        keep_dims = []
        for i, n in zip(index, sizes):
            i = _one_entry_slice(i, n, "index", f"an axis of size {n}")
            if not isinstance(i, slice):
                raise TypeError(f"BlockMask indices must be ints or slices, got {type(i).__name__} {i!r}")
            keep_dims.append(i)
        index = tuple(keep_dims)
        # (start, step, size) of each axis's selection; None for the whole axis, which needs no remapping.
        ranges = [range(*i.indices(n)) for i, n in zip(index + (slice(None),) * (2 - len(index)), sizes)]
        if any(len(r) == 0 for r in ranges):
            raise IndexError(f"the selection {index} of a BlockMask with (B, H) = {sizes} is empty")
        selections = [None if (r.start, r.step, len(r)) == (0, 1, n) else (r.start, r.step, len(r))
                      for r, n in zip(ranges, sizes)]
        if selections == [None, None]:
            return self
        mask_mod = _SelectedMaskMod(self.mask_mod, *selections)

        def take(x):
            return None if x is None else x[index]

        return dataclasses.replace(
            self,
            mask_mod=mask_mod,
            kv_num_blocks=take(self.kv_num_blocks),
            kv_indices=take(self.kv_indices),
            full_kv_num_blocks=take(self.full_kv_num_blocks),
            full_kv_indices=take(self.full_kv_indices),
            q_num_blocks=take(self.q_num_blocks),
            q_indices=take(self.q_indices),
            full_q_num_blocks=take(self.full_q_num_blocks),
            full_q_indices=take(self.full_q_indices),
        )

    def _select_query_blocks(self, index) -> "BlockMask":
        q_block = self.BLOCK_SIZE[0]
        q_len, kv_len = self.seq_lengths
        num_q_blocks = self.num_blocks[0]
        partial, full = self.block_maps()
        if isinstance(index, (jax.Array, np.ndarray)) and not isinstance(index, jax.core.Tracer):
            if index.ndim == 0 and jnp.issubdtype(index.dtype, jnp.integer):
                index = int(index)
        index = _one_entry_slice(index, num_q_blocks, "query block", f"a BlockMask of {num_q_blocks} query blocks")
        if isinstance(index, slice):
            rows = range(*index.indices(num_q_blocks))
            if rows.step != 1 or len(rows) == 0:
                raise IndexError(
                    f"query blocks are selected by a slice of step 1 that is not empty, got {index} of "
                    f"{num_q_blocks} blocks"
                )
            start, stop = rows.start, rows.stop
            offset = start * q_block
            mask_mod = self.mask_mod
            if isinstance(mask_mod, _SelectedMaskMod):
                mask_mod = dataclasses.replace(mask_mod, q_offset=mask_mod.q_offset + offset)
            elif offset:
                mask_mod = _SelectedMaskMod(mask_mod, None, None, offset)
            partial, full = partial[:, :, start:stop], full[:, :, start:stop]
            new_q_len = min(stop * q_block, q_len) - offset
        elif isinstance(index, jax.Array) and index.ndim == 0 and jnp.issubdtype(index.dtype, jnp.integer):
            index = index.astype(jnp.int32)
            # Negative counts from the end, as for an int; past the ends it is clamped, as jax.lax.dynamic_slice is.
            index = jnp.clip(jnp.where(index < 0, index + num_q_blocks, index), 0, num_q_blocks - 1)
            partial = jax.lax.dynamic_slice_in_dim(partial, index, 1, axis=2)
            full = jax.lax.dynamic_slice_in_dim(full, index, 1, axis=2)
            mask_mod = _TracedQOffsetMaskMod(self.mask_mod, index * q_block)
            new_q_len = min(q_block, q_len)
        else:
            raise TypeError(
                "a BlockMask's query-block index must be an int, a slice or a 0-d int array, got "
                f"{type(index).__name__} {getattr(index, 'shape', index)!r}"
            )
        return BlockMask.from_block_maps(
            partial,
            None if self.full_kv_num_blocks is None else full,
            self.BLOCK_SIZE,
            mask_mod,
            (new_q_len, kv_len),
        )

    def adjust(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """The mask cut to its first ``new_q_len`` queries and ``new_kv_len`` keys (PyTorch's ``_adjust``).

        Lengths may only shrink: a longer mask has blocks this one never evaluated, so build it with
        ``create_block_mask``. A full block that the cut leaves hanging past a new length becomes partial, since
        kernels mask positions past ``seq_lengths`` in partial blocks only.
        """
        new_q_len = _validation.check_positive_int(new_q_len, "new_q_len")
        new_kv_len = _validation.check_positive_int(new_kv_len, "new_kv_len")
        q_len, kv_len = self.seq_lengths
        if new_q_len > q_len or new_kv_len > kv_len:
            raise ValueError(
                f"adjust only shrinks a BlockMask: it covers (Q_LEN, KV_LEN) = {(q_len, kv_len)}, asked for "
                f"{(new_q_len, new_kv_len)}; build the longer mask with create_block_mask"
            )
        q_block, kv_block = self.BLOCK_SIZE
        num_q_blocks, num_kv_blocks = _cdiv(new_q_len, q_block), _cdiv(new_kv_len, kv_block)
        partial, full = (m[:, :, :num_q_blocks, :num_kv_blocks] for m in self.block_maps())
        ragged = np.zeros((num_q_blocks, num_kv_blocks), bool)
        if new_q_len % q_block:
            ragged[-1, :] = True
        if new_kv_len % kv_block:
            ragged[:, -1] = True
        ragged = ragged[None, None]
        partial, full = partial | (full & ragged), full & ~ragged
        return BlockMask.from_block_maps(
            partial,
            None if self.full_kv_num_blocks is None else full,
            self.BLOCK_SIZE,
            self.mask_mod,
            (new_q_len, new_kv_len),
        )

    _adjust = adjust

    def to(self, device) -> "BlockMask":
        """The mask with its index arrays on ``device``: a ``jax.Device``, a ``jax.sharding.Sharding``, or a platform
        name (``"cpu"``, ``"gpu"``, PyTorch's ``"cuda"``) for its first device. Inside ``jit`` it is left as it is."""
        placement = _placement(device, "device")
        return self if placement is None else _place(self, placement)

    def numel(self) -> int:
        """B x H x Q_LEN x KV_LEN: the positions the mask covers, visited or not (as PyTorch's)."""
        return math.prod(self.shape)

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields in PyTorch's order: Q_LEN, KV_LEN, the eight index arrays (kv side, then q side, each partial
        then full), Q_BLOCK, KV_BLOCK, mask_mod. ``flatten=False`` keeps ``seq_lengths`` and ``BLOCK_SIZE`` as pairs."""
        _validation.check_flags(flatten=flatten)
        seq_lengths = tuple(self.seq_lengths) if flatten else (self.seq_lengths,)
        block_size = tuple(self.BLOCK_SIZE) if flatten else (self.BLOCK_SIZE,)
        return (
            *seq_lengths,
            self.kv_num_blocks,
            self.kv_indices,
            self.full_kv_num_blocks,
            self.full_kv_indices,
            self.q_num_blocks,
            self.q_indices,
            self.full_q_num_blocks,
            self.full_q_indices,
            *block_size,
            self.mask_mod,
        )

    # --------------------------------------------------------------------------------------------------- text

    def to_string(self, grid_size: int = 24, limit: int = 4) -> str:
        """Draws the block map of up to ``limit`` (batch, head) pairs: '█' full, '▒' partial, '·' skipped."""
        partial, full = (np.asarray(m) for m in self.block_maps())
        b, h = partial.shape[:2]
        lines = [
            f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, sparsity={self.sparsity():.2f}%, "
            f"mask_mod={getattr(self.mask_mod, '__name__', repr(self.mask_mod))})"
        ]
        shown = 0
        for bi in range(b):
            for hi in range(h):
                if shown == limit:
                    lines.append("...")
                    return "\n".join(lines)
                lines.append(f"b={bi}, h={hi}")
                lines.append(viz.block_map_to_text(partial[bi, hi], full[bi, hi], grid_size))
                shown += 1
        return "\n".join(lines)

    def __repr__(self) -> str:
        try:
            return self.to_string()
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            return f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, traced)"


def _refuse_assignment(self, name, value):
    """PyTorch's decoding idiom assigns to a BlockMask (``bm.mask_mod = ...``, ``bm.seq_lengths = ...``); ours is
    immutable, as a pytree that ``jit`` takes must be: say what to write instead."""
    del value
    if name == "seq_lengths":
        instead = "bm.adjust(new_q_len, new_kv_len) cuts a mask to new lengths"
    else:
        instead = f"dataclasses.replace(bm, {name}=...) returns a mask with it changed"
    raise dataclasses.FrozenInstanceError(f"a BlockMask is immutable, cannot assign to {name!r}: {instead}")


# Set after the class is made: a frozen dataclass may not define __setattr__ itself. Its __init__ and
# dataclasses.replace set fields through object.__setattr__, which this does not touch.
BlockMask.__setattr__ = _refuse_assignment


# ---------------------------------------------------------------------------------------------- construction


def check_mask_mod(mask_mod: MaskMod, name: str = "mask_mod") -> None:
    if not callable(mask_mod):
        raise TypeError(f"{name} must be a callable mask_mod(b, h, q_idx, kv_idx) -> bool, got {mask_mod!r}")
    _validation.check_arity(mask_mod, 4, name, "mask_mod(b, h, q_idx, kv_idx)")
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    out = jax.eval_shape(mask_mod, i32, i32, i32, i32)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != () or out.dtype != jnp.bool_:
        got = out if not isinstance(out, jax.ShapeDtypeStruct) else f"{out.dtype}{list(out.shape)}"
        raise TypeError(
            f"{name} must return a boolean scalar for scalar int32 indices (b, h, q_idx, kv_idx), got {got}"
        )


def mask_axes(mask_mod: Callable) -> frozenset[str]:
    """The axes, of ("batch", "head"), whose index ``mask_mod``'s result depends on, read from its jaxpr.

    An equation's outputs depend on everything its inputs depend on (control flow included), so the answer may
    name an axis the mask ignores in fact, never miss one it uses.
    """
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    jaxpr = jax.make_jaxpr(mask_mod)(scalar, scalar, scalar, scalar).jaxpr
    depends = {jaxpr.invars[0]: frozenset({"batch"}), jaxpr.invars[1]: frozenset({"head"})}

    def of(v):
        return frozenset() if isinstance(v, jax.extend.core.Literal) else depends.get(v, frozenset())

    for eqn in jaxpr.eqns:
        axes = frozenset().union(*(of(v) for v in eqn.invars))
        if axes:
            for v in eqn.outvars:
                depends[v] = axes
    return frozenset().union(*(of(v) for v in jaxpr.outvars))


class _MaskProgram:
    """A mask_mod as it reads now: its jaxpr for scalar indices, equal to another with the same text.

    ``create_block_mask`` compiles its block-map evaluation once per program and passes the arrays the mask_mod
    reads as arguments: a mask_mod reading a global that has since been rebound (``doc_ids = batch_ids`` between
    calls) gets its new block maps, a new array of the same shape costs no compilation, and any callable serves,
    hashable or not.
    """

    def __init__(self, jaxpr):
        self.jaxpr = jaxpr
        self.text = str(jaxpr)

    @classmethod
    def trace(cls, mask_mod: MaskMod) -> tuple["_MaskProgram", list]:
        """(program, the arrays it reads)."""
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        # Through a new function: make_jaxpr keeps the trace of a function it has seen, with the arrays it read then.
        closed = jax.make_jaxpr(lambda *indices: mask_mod(*indices))(i32, i32, i32, i32)
        return cls(closed.jaxpr), list(closed.consts)

    def __eq__(self, other) -> bool:
        return isinstance(other, _MaskProgram) and self.text == other.text

    def __hash__(self) -> int:
        return hash(self.text)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5, 6, 7))
def _block_maps_from_mask_program(program: _MaskProgram, consts, B, H, q_len, kv_len, q_block, kv_block):
    """Evaluates the mask block row by block row; returns (any, all) maps [B, H, QB, KVB].

    Compiled once per (program, sizes); ``consts`` are the arrays the mask_mod reads.
    """
    evaluate = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(program.jaxpr, consts))

    def mask_mod(b, h, q_idx, kv_idx):
        return evaluate(b, h, q_idx, kv_idx)[0]

    num_q_blocks, num_kv_blocks = _cdiv(q_len, q_block), _cdiv(kv_len, kv_block)
    padded_kv = num_kv_blocks * kv_block
    kv_idx = jnp.arange(padded_kv, dtype=jnp.int32)
    kv_in_bounds = kv_idx < kv_len
    kv_idx_clamped = jnp.minimum(kv_idx, kv_len - 1)
    offsets = jnp.arange(q_block, dtype=jnp.int32)

    over_kv = jax.vmap(mask_mod, in_axes=(None, None, None, 0))
    over_q_kv = jax.vmap(over_kv, in_axes=(None, None, 0, None))

    def one_block_row(bhq):
        b, h, qb = bhq[0], bhq[1], bhq[2]
        q_idx = qb * q_block + offsets
        allowed = over_q_kv(b, h, jnp.minimum(q_idx, q_len - 1), kv_idx_clamped)
        allowed = allowed & (q_idx < q_len)[:, None] & kv_in_bounds[None, :]
        allowed = allowed.reshape(q_block, num_kv_blocks, kv_block)
        return allowed.any(axis=(0, 2)), allowed.all(axis=(0, 2))

    grid = np.stack(
        np.meshgrid(np.arange(B), np.arange(H), np.arange(num_q_blocks), indexing="ij"), axis=-1
    ).reshape(-1, 3)
    rows_per_chunk = max(1, _MAX_POSITIONS_PER_CHUNK // (q_block * padded_kv))
    any_map, all_map = jax.lax.map(
        one_block_row, jnp.asarray(grid, jnp.int32), batch_size=min(rows_per_chunk, grid.shape[0])
    )
    shape = (B, H, num_q_blocks, num_kv_blocks)
    return any_map.reshape(shape), all_map.reshape(shape)


def _check_sizes(B, H, Q_LEN, KV_LEN) -> tuple[int, int, int, int]:
    """B, H (None meaning 1), Q_LEN and KV_LEN as positive Python ints; ValueError naming one that is not."""
    B = 1 if B is None else B
    H = 1 if H is None else H
    for name, value in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not _validation.is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int (or None for B and H), got {value!r}")
    return int(B), int(H), int(Q_LEN), int(KV_LEN)


def create_block_mask(
    mask_mod: MaskMod,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    BLOCK_SIZE=DEFAULT_BLOCK_SIZE,
    *,
    device=None,
    _compile: bool = False,
) -> BlockMask:
    """Builds the BlockMask of ``mask_mod`` for sequences of Q_LEN queries and KV_LEN keys.

    Args:
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` on int32 scalars; it may close over arrays.
      B, H: batch and head counts the mask varies over; None means 1 (the mask broadcasts over that axis).
      Q_LEN, KV_LEN: sequence lengths; they need not be multiples of the block size (positions past them are
        masked).
      BLOCK_SIZE: an int, or a (Q_BLOCK, KV_BLOCK) pair.
      device: where the index arrays are placed: a ``jax.Device``, a ``jax.sharding.Sharding``, or a platform name
        (``"cpu"``, ``"gpu"``, ``"tpu"``; PyTorch's ``"cuda"`` means ``"gpu"``) for its first device. None: JAX's
        default device. Keyword-only: PyTorch's sixth positional argument is ``device``, ours ``BLOCK_SIZE``.
      _compile: accepted for PyTorch compatibility. The construction is always compiled here, and evaluated a
        few block rows at a time, which is what PyTorch's ``_compile=True`` buys.

    Returns:
      A BlockMask whose fully allowed blocks are full and whose other visited blocks are partial.

    mask_mod is evaluated a few block rows at a time, so a 131072 x 131072 mask needs memory for its block map, not
    for its 17 billion positions. Usable under ``jax.jit`` (the lengths are static). There, a mask_mod that reads
    no traced value (``causal_mask``, a fixed window, document ids computed outside the ``jit``) is evaluated while
    tracing, and its BlockMask is a constant of the compiled program: it is not rebuilt at every call, and a
    backend can read its walk lengths (``pallas_mosaic`` chooses its dQ path by them). A mask_mod that reads a
    traced array (ids passed to the ``jit`` as an argument) is built by the program itself.

    >>> import flexattn_jax as fa
    >>> bm = fa.create_block_mask(fa.causal_mask, None, None, 256, 256, BLOCK_SIZE=128)
    >>> bm.to_dense()[0, 0].tolist()
    [[1, 0], [1, 1]]
    """
    B, H, Q_LEN, KV_LEN = _check_sizes(B, H, Q_LEN, KV_LEN)
    if isinstance(BLOCK_SIZE, (str, jax.Device)):
        raise TypeError(
            f"BLOCK_SIZE must be an int or a (Q_BLOCK, KV_BLOCK) pair, got {BLOCK_SIZE!r}; PyTorch's sixth positional "
            f"argument is device, which is keyword-only here: create_block_mask(..., device={BLOCK_SIZE!r})"
        )
    q_block, kv_block = _normalize_block_size(BLOCK_SIZE)
    placement = _placement(device, "device")
    _validation.check_flags(_compile=_compile)
    check_mask_mod(mask_mod)
    _validation.check_extents(mask_mod, "mask_mod", batch=B, head=H, q=Q_LEN, kv=KV_LEN)
    block_mask = _create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, q_block, kv_block)
    return block_mask if placement is None else _place(block_mask, placement)


def _placement(device, name: str):
    """``device`` as a Device or Sharding to put arrays on, or None for JAX's default placement."""
    if device is None or isinstance(device, (jax.Device, jax.sharding.Sharding)):
        return device
    if isinstance(device, str):
        platform = device.split(":")[0].lower()
        platform = "gpu" if platform == "cuda" else platform
        if platform not in ("cpu", "gpu", "tpu"):
            raise ValueError(f"{name} must be 'cpu', 'gpu' (or 'cuda'), 'tpu', a jax.Device or a Sharding, got {device!r}")
        try:
            return jax.devices(platform)[0]
        except RuntimeError as e:
            raise ValueError(f"{name}={device!r}: JAX has no {platform} device here ({e})") from None
    raise TypeError(
        f"{name} must be None, a platform name, a jax.Device or a Sharding, got {type(device).__name__} {device!r}"
    )


def _place(tree, placement):
    """A BlockMask or an array with its arrays on ``placement``; left where they are while traced (``jit`` places
    them)."""
    if not all(_validation.is_concrete(x) for x in jax.tree.leaves(tree)):
        return tree
    return jax.device_put(tree, placement)


def _create_block_mask(mask_mod: MaskMod, B: int, H: int, Q_LEN: int, KV_LEN: int, q_block: int, kv_block: int):
    program, consts = _MaskProgram.trace(mask_mod)
    # The same mask on every call unless mask_mod reads a traced value: then built once, while tracing.
    traced = any(isinstance(c, jax.core.Tracer) for c in consts)
    with contextlib.nullcontext() if traced else jax.ensure_compile_time_eval():
        any_map, all_map = _block_maps_from_mask_program(
            program, consts, int(B), int(H), int(Q_LEN), int(KV_LEN), q_block, kv_block
        )
        return BlockMask.from_block_maps(
            any_map & ~all_map, all_map, (q_block, kv_block), mask_mod, (int(Q_LEN), int(KV_LEN))
        )


def create_mask(
    mod_fn: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, *, device=None
) -> jax.Array:
    """The dense boolean mask [B, H, Q_LEN, KV_LEN] of a mask_mod or a score_mod (B, H None mean 1).

    ``mod_fn`` is told apart by its arguments, as in PyTorch: a mask_mod ``(b, h, q_idx, kv_idx)`` gives where it is
    true; a score_mod ``(score, b, h, q_idx, kv_idx)``, called on a score of 0, gives where it is not -inf (the
    positions it masks by setting -inf). ``device`` places the result as ``create_block_mask``'s does. Memory
    O(Q_LEN x KV_LEN).
    """
    B, H, Q_LEN, KV_LEN = _check_sizes(B, H, Q_LEN, KV_LEN)
    placement = _placement(device, "device")
    if not callable(mod_fn):
        raise TypeError(f"mod_fn must be a mask_mod or a score_mod, got {mod_fn!r}")
    if _takes_five_arguments(mod_fn):
        _validation.check_score_mod(mod_fn)
        score_mod = mod_fn

        def fn(b, h, q_idx, kv_idx):
            score = score_mod(jnp.zeros((), jnp.float32), b, h, q_idx, kv_idx)
            return ~jnp.isneginf(score)

    else:
        check_mask_mod(mod_fn, "mod_fn")
        fn = mod_fn
    _validation.check_extents(mod_fn, "mod_fn", batch=B, head=H, q=Q_LEN, kv=KV_LEN)
    idx = [jnp.arange(n, dtype=jnp.int32) for n in (B, H, Q_LEN, KV_LEN)]
    for axis in reversed(range(4)):
        fn = jax.vmap(fn, in_axes=tuple(0 if i == axis else None for i in range(4)))
    mask = fn(*idx)
    return mask if placement is None else _place(mask, placement)


def _takes_five_arguments(fn: Callable) -> bool:
    """Whether ``fn`` is called as a score_mod: it accepts five positional arguments and not four (a callable
    without a signature is taken for a mask_mod)."""
    return _validation.arity_error(fn, 5) is None and _validation.arity_error(fn, 4) is not None


# ----------------------------------------------------------------------------------- dense <-> block (the seed's)


def _boolean_array(x, name: str, what: str, given_a_block_mask: str) -> jax.Array:
    """x as a boolean array; a BlockMask (``given_a_block_mask`` says what to do instead) or an integer map is
    refused (an int map gave an int "mask")."""
    if isinstance(x, BlockMask):
        raise TypeError(f"{name} must be a boolean array ({what}), got a BlockMask; {given_a_block_mask}")
    x = jnp.asarray(x)
    if x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array ({what}), got {jnp.dtype(x.dtype).name}{list(x.shape)}")
    return x


def _broadcast_to_4d(mask: jax.Array) -> jax.Array:
    if mask.ndim > 4 or mask.ndim < 2:
        raise ValueError(f"a dense mask must be [Q_LEN, KV_LEN] up to [B, H, Q_LEN, KV_LEN], got shape {mask.shape}")
    return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def convert_mask_to_block_mask(
    mask: jax.Array, KV_BLOCK_SIZE: int = DEFAULT_BLOCK_SIZE, Q_BLOCK_SIZE: int = DEFAULT_BLOCK_SIZE
) -> jax.Array:
    """Dense boolean mask [.., Q_LEN, KV_LEN] -> block map [B, H, QB, KVB], True where a block has any True.

    Lengths that are not multiples of the block sizes are padded with False.
    """
    KV_BLOCK_SIZE = _validation.check_positive_int(KV_BLOCK_SIZE, "KV_BLOCK_SIZE")
    Q_BLOCK_SIZE = _validation.check_positive_int(Q_BLOCK_SIZE, "Q_BLOCK_SIZE")
    mask = _broadcast_to_4d(
        _boolean_array(
            mask, "mask", "a dense mask [.., Q_LEN, KV_LEN]", "its block map is already bm.to_dense().astype(bool)"
        )
    )
    b, h, q_len, kv_len = mask.shape
    qb, kvb = _cdiv(q_len, Q_BLOCK_SIZE), _cdiv(kv_len, KV_BLOCK_SIZE)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, qb * Q_BLOCK_SIZE - q_len), (0, kvb * KV_BLOCK_SIZE - kv_len)))
    return mask.reshape(b, h, qb, Q_BLOCK_SIZE, kvb, KV_BLOCK_SIZE).any(axis=(3, 5))


def convert_block_mask_to_mask(
    block_mask: jax.Array, KV_BLOCK_SIZE: int = DEFAULT_BLOCK_SIZE, Q_BLOCK_SIZE: int = DEFAULT_BLOCK_SIZE
) -> jax.Array:
    """Block map [B, H, QB, KVB] -> dense mask [B, H, QB * Q_BLOCK_SIZE, KVB * KV_BLOCK_SIZE], each block repeated.

    The block map is boolean: a BlockMask's is ``bm.to_dense().astype(bool)``.
    """
    KV_BLOCK_SIZE = _validation.check_positive_int(KV_BLOCK_SIZE, "KV_BLOCK_SIZE")
    Q_BLOCK_SIZE = _validation.check_positive_int(Q_BLOCK_SIZE, "Q_BLOCK_SIZE")
    block_mask = _boolean_array(
        block_mask, "block_mask", "a block map [B, H, QB, KVB]", "pass its block map, bm.to_dense().astype(bool)"
    )
    if block_mask.ndim != 4:
        raise ValueError(f"block_mask must be [B, H, QB, KVB], got shape {block_mask.shape}")
    return jnp.repeat(jnp.repeat(block_mask, Q_BLOCK_SIZE, axis=2), KV_BLOCK_SIZE, axis=3)


def create_block_mask_from_dense(mask: jax.Array, BLOCK_SIZE=DEFAULT_BLOCK_SIZE) -> BlockMask:
    """BlockMask of a dense boolean mask [.., Q_LEN, KV_LEN]; its mask_mod reads the mask (as a captured array).

    Call it outside ``jit``: the mask becomes part of the BlockMask's static mask_mod.
    """
    q_block, kv_block = _normalize_block_size(BLOCK_SIZE)
    mask = _broadcast_to_4d(
        _boolean_array(mask, "mask", "a dense mask [.., Q_LEN, KV_LEN]", "it is a BlockMask already")
    )
    b_size, h_size, q_len, kv_len = mask.shape
    any_map = convert_mask_to_block_mask(mask, kv_block, q_block)
    padded = jnp.pad(
        mask,
        ((0, 0), (0, 0), (0, any_map.shape[2] * q_block - q_len), (0, any_map.shape[3] * kv_block - kv_len)),
    )
    all_map = padded.reshape(b_size, h_size, any_map.shape[2], q_block, any_map.shape[3], kv_block).all(axis=(3, 5))

    def dense_mask(b, h, q_idx, kv_idx):
        b = b if b_size > 1 else jnp.zeros_like(b)
        h = h if h_size > 1 else jnp.zeros_like(h)
        return mask[b, h, q_idx, kv_idx]

    return BlockMask.from_block_maps(any_map & ~all_map, all_map, (q_block, kv_block), dense_mask, (q_len, kv_len))

