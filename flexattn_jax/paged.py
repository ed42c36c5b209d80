"""A paged key/value cache: fixed-size pages in one shared pool, a page table per sequence (PyTorch's experimental
paged attention, ``torch.nn.attention.experimental._paged_attention``, is the model).

Layout. The pool holds ``num_pages`` pages of ``page_size`` positions: ``key_pool`` [Hkv, num_pages * page_size, D]
(page p is rows [p * page_size, (p + 1) * page_size)), ``value_pool`` likewise. This is the layout PyTorch uses
(its cache is [1, H, num_pages * page_size, D]): the attention kernels read it as key/value of batch 1 shared by every
sequence, without a copy. ``page_table`` int32 [B, max_pages_per_seq] maps sequence b's logical page j (positions
[j * page_size, (j + 1) * page_size)) to a physical page, -1 where none is assigned; ``lengths`` int32 [B] counts
each sequence's positions (ragged lengths are fine).

Allocation. The free list is an array, ``page_free`` bool [num_pages], so every operation is a pure function of
arrays that works under ``jit`` (no host-side allocator): ``reserve`` gives each sequence the pages it needs for a
new length, taking the lowest-numbered free pages; ``erase`` returns a sequence's pages. Running out of pages cannot
be detected under ``jit``: sequences then share the last free pages and corrupt each other. Check
``num_free_pages`` on the host, or size the pool for the worst case.

Attention. ``convert_logical_block_mask`` turns a BlockMask over a sequence's logical positions (built with
KV_BLOCK = page_size) into one over the pool: each listed logical block becomes its physical page, and the mask_mod
(like ``convert_logical_score_mod`` for a score_mod) is wrapped to see the *logical* kv_idx again, through a
physical-to-logical page map. ``attention`` runs flex attention on the pool: where ``flex_attention`` would run
pallas_triton (implementation None on a GPU or with interpret=True, or 'pallas_triton') and at most
``MAX_DECODE_Q_LEN`` queries it calls the split-KV decode kernel directly on the pool with the physical BlockMask;
otherwise (the reference implementation, pallas_mosaic, or longer queries) it gathers each sequence's pages into
contiguous key/value and calls ``flex_attention`` with the logical mask. Both paths check the arguments as
``flex_attention`` does, before anything runs, and accept any mask_mod and score_mod. The decode kernel path is for
inference (not differentiable).

``PagedKVCache`` follows the ``flexattn_jax.nn.KVCache`` protocol (``query_positions`` / ``append`` / ``attend``),
so a layer takes it through ``init_cache(cache=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flexattn_jax import _validation
from flexattn_jax.api import AuxRequest, attention_results, check_implementation, check_return_aux, flex_attention
from flexattn_jax.backends import pallas_mosaic, pallas_triton
from flexattn_jax.backends.pallas_triton import decode as _decode
from flexattn_jax.block_mask import DEFAULT_BLOCK_SIZE, BlockMask, create_block_mask, mask_axes, noop_mask
from flexattn_jax.mods import identity
from flexattn_jax.nn._common import _check_dtype

__all__ = ["PagedKVCache"]

_NO_PAGE = -1


def _is_positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _per_sequence(name: str, x, batch: int, *, kind: str, meaning: str, hint: str = "") -> jax.Array:
    """x (an array or a list) as an array [batch] of integers (kind "int") or bools (kind "bool"); a TypeError for
    another dtype (ending in ``hint``) and a ValueError for another shape, naming ``name`` and saying what it holds
    (``meaning``)."""
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    dtype = jnp.dtype(x.dtype)
    fits = dtype == jnp.bool_ if kind == "bool" else jnp.issubdtype(dtype, jnp.integer)
    expected = f"{'a bool mask' if kind == 'bool' else 'an int array'} [B] = [{batch}] ({meaning})"
    if not fits:
        raise TypeError(f"{name} must be {expected}, got {dtype.name}{list(jnp.shape(x))}{hint}")
    if jnp.shape(x) != (batch,):
        raise ValueError(f"{name} must be {expected}, got shape {tuple(jnp.shape(x))}")
    return x


def _is_concrete(x) -> bool:
    """Whether x's values can be read on the host (not under jit, vmap or grad)."""
    return not isinstance(x, jax.core.Tracer)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["key_pool", "value_pool", "page_table", "lengths", "page_free"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """A paged key/value cache (an immutable pytree; every method returns a new cache).

    Attributes:
      key_pool: [Hkv, num_pages * page_size, D], the pages of every sequence.
      value_pool: [Hkv, num_pages * page_size, Dv].
      page_table: int32 [B, max_pages_per_seq]: sequence b's logical page j lives in physical page
        ``page_table[b, j]``; -1 where none is assigned.
      lengths: int32 [B], positions filled per sequence.
      page_free: bool [num_pages], the free list.

    >>> cache = PagedKVCache.create(batch_size=2, num_pages=8, page_size=16, max_pages_per_seq=4, num_kv_heads=1,
    ...                             head_dim=4)
    >>> cache = cache.append(jnp.ones((2, 20, 1, 4)), jnp.ones((2, 20, 1, 4)), num_new=jnp.array([20, 5]))
    >>> cache.lengths.tolist(), cache.page_table.tolist(), int(cache.num_free_pages)
    ([20, 5], [[0, 1, -1, -1], [2, -1, -1, -1]], 5)
    """

    key_pool: jax.Array
    value_pool: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    page_free: jax.Array

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        batch_size: int,
        num_pages: int,
        page_size: int,
        max_pages_per_seq: int,
        num_kv_heads: int,
        head_dim: int,
        value_dim: int | None = None,
        dtype=jnp.float32,
    ) -> "PagedKVCache":
        """An empty cache: every page free, no page assigned, every length 0.

        page_size must be a power of two of at least 16 (the kernels' tile sizes divide it); dtype float32, bfloat16
        or float16 (the attention kernels' dtypes).
        """
        value_dim = head_dim if value_dim is None else value_dim
        for name, value in (
            ("batch_size", batch_size),
            ("num_pages", num_pages),
            ("page_size", page_size),
            ("max_pages_per_seq", max_pages_per_seq),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("value_dim", value_dim),
        ):
            if not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two of at least 16, got {page_size}")
        _check_dtype("dtype", dtype, allow_none=False)
        rows = num_pages * page_size
        return cls(
            key_pool=jnp.zeros((num_kv_heads, rows, head_dim), dtype),
            value_pool=jnp.zeros((num_kv_heads, rows, value_dim), dtype),
            page_table=jnp.full((batch_size, max_pages_per_seq), _NO_PAGE, jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            page_free=jnp.ones((num_pages,), jnp.bool_),
        )

    # ---------------------------------------------------------------------------------------------- properties

    @property
    def batch_size(self) -> int:
        return self.page_table.shape[0]

    @property
    def num_pages(self) -> int:
        return self.page_free.shape[0]

    @property
    def page_size(self) -> int:
        return self.key_pool.shape[1] // self.num_pages

    @property
    def max_pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_length(self) -> int:
        """The longest sequence the page table can address."""
        return self.max_pages_per_seq * self.page_size

    @property
    def num_free_pages(self) -> jax.Array:
        return jnp.sum(self.page_free, dtype=jnp.int32)

    # ---------------------------------------------------------------------------------------------- allocation

    def reserve(self, new_lengths: jax.Array) -> "PagedKVCache":
        """Assigns pages so that sequence b can hold ``new_lengths[b]`` positions (int [B], each from 0 to
        ``max_length``; pages already held stay; lengths are unchanged). Takes the lowest-numbered free pages,
        sequence 0 first."""
        new_lengths = _per_sequence("new_lengths", new_lengths, self.batch_size, kind="int",
                                    meaning="positions each sequence is to hold")
        if _is_concrete(new_lengths):
            values = np.asarray(new_lengths)
            if values.min() < 0 or values.max() > self.max_length:
                raise ValueError(
                    f"new_lengths must be from 0 to max_length={self.max_length} (the positions the cache addresses "
                    f"per sequence: max_pages_per_seq {self.max_pages_per_seq} x page_size {self.page_size}), got "
                    f"{values.tolist()}"
                )
        return self._reserve(jnp.asarray(new_lengths, jnp.int32))

    def _reserve(self, new_lengths: jax.Array) -> "PagedKVCache":
        """``reserve`` without the checks (``append`` has made them on its own arguments)."""
        ps, max_pages = self.page_size, self.max_pages_per_seq
        held = jnp.sum(self.page_table >= 0, axis=1, dtype=jnp.int32)
        needed = jnp.minimum((new_lengths + (ps - 1)) // ps, max_pages)
        extra = jnp.maximum(needed - held, 0)
        first = jnp.cumsum(extra) - extra  # each sequence's offset into the free list
        free_ids = jnp.argsort(~self.page_free, stable=True).astype(jnp.int32)  # free pages first, in order
        slot = jnp.arange(max_pages, dtype=jnp.int32)[None, :]
        wanted = (slot >= held[:, None]) & (slot < needed[:, None])
        rank = jnp.clip(first[:, None] + slot - held[:, None], 0, self.num_pages - 1)
        new_pages = free_ids[rank]
        page_table = jnp.where(wanted, new_pages, self.page_table)
        taken = jnp.where(wanted, new_pages, self.num_pages)  # num_pages: dropped by the scatter
        page_free = self.page_free.at[taken.reshape(-1)].set(False, mode="drop")
        return dataclasses.replace(self, page_table=page_table, page_free=page_free)

    def erase(self, sequences: jax.Array) -> "PagedKVCache":
        """Releases the pages of the sequences where ``sequences`` (bool [B]) is True and resets their length to 0.
        The pages' contents stay in the pool until reused.

        A mask, not indices: an int array such as [0, 1] is refused, as casting it would erase sequence 1 alone. To
        erase by index, pass ``jnp.zeros(B, bool).at[indices].set(True)``."""
        batch = self.batch_size
        sequences = _per_sequence(
            "sequences", sequences, batch, kind="bool", meaning="True where a sequence is erased",
            hint=f"; to erase sequences by index, pass jnp.zeros({batch}, bool).at[indices].set(True)",
        )
        release = sequences[:, None] & (self.page_table >= 0)
        freed = jnp.where(release, self.page_table, self.num_pages)
        page_free = self.page_free.at[freed.reshape(-1)].set(True, mode="drop")
        page_table = jnp.where(sequences[:, None], _NO_PAGE, self.page_table)
        lengths = jnp.where(sequences, 0, self.lengths)
        return dataclasses.replace(self, page_table=page_table, lengths=lengths, page_free=page_free)

    # ----------------------------------------------------------------------------------------- writing tokens

    def query_positions(self, num_new: int) -> jax.Array:
        """int32 [B, num_new]: the positions the next tokens of each sequence will take (lengths may be ragged)."""
        return self.lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]

    def append(self, key: jax.Array, value: jax.Array, num_new: jax.Array | None = None) -> "PagedKVCache":
        """Writes key, value [B, L, Hkv, D] at each sequence's positions [lengths[b], lengths[b] + num_new[b]),
        reserving pages as needed. num_new: int [B] (each from 0 to L; ragged appends), or None for L each.

        Raises ValueError when a sequence would pass ``max_length`` (or num_new is outside [0, L]); the values are
        checked only where they are known on the host. Under ``jit`` an overflow cannot be detected: the tokens past
        max_length are dropped (no page addresses them) while lengths still count them."""
        for name, x in (("key", key), ("value", value)):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise TypeError(f"{name} must be an array [B, L, Hkv, D], got {type(x).__name__}")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{name} must be a floating array (the pool holds {self.key_pool.dtype.name}), got "
                                f"{jnp.dtype(x.dtype).name}")
        hkv, _, head_dim = self.key_pool.shape
        q_len = key.shape[1] if key.ndim == 4 else None
        expected = (self.batch_size, q_len, hkv, head_dim)
        if key.shape != expected or value.shape != expected[:3] + (self.value_pool.shape[-1],):
            raise ValueError(
                f"the cache holds batch {self.batch_size}, {hkv} kv heads of dim {head_dim}; the new keys and values "
                f"must be [B, L, Hkv, D] = {expected}, got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        if num_new is None:
            num_new = np.full((self.batch_size,), q_len, np.int32)
        num_new = _per_sequence("num_new", num_new, self.batch_size, kind="int",
                                meaning="tokens appended to each sequence")
        # One read of num_new (and of lengths) on the host where both are concrete; nothing is read under jit.
        if _is_concrete(num_new):
            counts = np.asarray(num_new)
            if counts.min() < 0 or counts.max() > q_len:
                raise ValueError(
                    f"num_new must be from 0 to L={q_len} (the tokens given) for each sequence, got {counts.tolist()}"
                )
            if _is_concrete(self.lengths):
                lengths = np.asarray(self.lengths)
                if (lengths + counts).max() > self.max_length:
                    raise ValueError(
                        f"the cache addresses max_length={self.max_length} positions per sequence (max_pages_per_seq "
                        f"{self.max_pages_per_seq} x page_size {self.page_size}); appending num_new="
                        f"{counts.tolist()} to lengths {lengths.tolist()} would give {(lengths + counts).tolist()}"
                    )
        num_new = jnp.asarray(num_new, jnp.int32)
        cache = self._reserve(self.lengths + num_new)
        ps = self.page_size
        positions = cache.lengths[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]  # [B, L] logical
        logical_page = jnp.clip(positions // ps, 0, self.max_pages_per_seq - 1)
        page = jnp.take_along_axis(cache.page_table, logical_page, axis=1)
        keep = (jnp.arange(q_len, dtype=jnp.int32)[None, :] < num_new[:, None]) & (page >= 0)
        keep = keep & (positions < self.max_length)
        rows = jnp.where(keep, page * ps + positions % ps, self.key_pool.shape[1])  # out of range: dropped
        key_pool = cache.key_pool.at[:, rows, :].set(
            jnp.moveaxis(key, 2, 0).astype(self.key_pool.dtype), mode="drop"
        )
        value_pool = cache.value_pool.at[:, rows, :].set(
            jnp.moveaxis(value, 2, 0).astype(self.value_pool.dtype), mode="drop"
        )
        lengths = cache.lengths + num_new
        return dataclasses.replace(cache, key_pool=key_pool, value_pool=value_pool, lengths=lengths)

    # ------------------------------------------------------------------------------------------------ reading

    def gather(self) -> tuple[jax.Array, jax.Array]:
        """Contiguous copies (key [B, Hkv, max_length, D], value [B, Hkv, max_length, Dv]); zeros where no page is
        assigned. For tests and the fallback path."""
        ps = self.page_size
        pos = jnp.arange(self.max_length, dtype=jnp.int32)
        page = self.page_table[:, pos // ps]  # [B, max_length]
        rows = jnp.where(page >= 0, page * ps + (pos % ps)[None, :], 0)
        present = (page >= 0)[:, None, :, None]

        def take(pool):
            x = jnp.moveaxis(pool[:, rows, :], 0, 1)  # [B, Hkv, max_length, D]
            return jnp.where(present, x, jnp.zeros((), pool.dtype))

        return take(self.key_pool), take(self.value_pool)

    def physical_to_logical(self) -> jax.Array:
        """int32 [B, num_pages]: the logical page each physical page holds for sequence b, -1 where none."""
        b = jnp.broadcast_to(jnp.arange(self.batch_size, dtype=jnp.int32)[:, None], self.page_table.shape)
        j = jnp.broadcast_to(jnp.arange(self.max_pages_per_seq, dtype=jnp.int32)[None, :], self.page_table.shape)
        page = jnp.where(self.page_table >= 0, self.page_table, self.num_pages)
        table = jnp.full((self.batch_size, self.num_pages), _NO_PAGE, jnp.int32)
        return table.at[b, page].set(j, mode="drop")

    def _logical_kv(self, physical_to_logical: jax.Array):
        shift = int(math.log2(self.page_size))
        ps = self.page_size

        def to_logical(b, kv_idx):
            logical_page = physical_to_logical[b, jnp.right_shift(kv_idx, jnp.int32(shift))]
            return logical_page, logical_page * ps + (kv_idx & (ps - 1))

        return to_logical

    def convert_logical_mask_mod(self, mask_mod: Callable | None) -> Callable:
        """mask_mod over logical positions -> one over the pool's rows (False on pages the sequence does not hold)."""
        mask_mod = noop_mask if mask_mod is None else mask_mod
        to_logical = self._logical_kv(self.physical_to_logical())

        def physical_mask(b, h, q_idx, kv_idx):
            logical_page, logical_kv = to_logical(b, kv_idx)
            return (logical_page >= 0) & mask_mod(b, h, q_idx, logical_kv)

        physical_mask.__name__ = f"paged_{getattr(mask_mod, '__name__', 'mask_mod')}"
        return physical_mask

    def convert_logical_score_mod(self, score_mod: Callable | None) -> Callable:
        """score_mod over logical positions -> one over the pool's rows."""
        score_mod = identity if score_mod is None else score_mod
        to_logical = self._logical_kv(self.physical_to_logical())

        def physical_score(score, b, h, q_idx, kv_idx):
            _, logical_kv = to_logical(b, kv_idx)
            return score_mod(score, b, h, q_idx, logical_kv)

        physical_score.__name__ = f"paged_{getattr(score_mod, '__name__', 'score_mod')}"
        return physical_score

    def convert_logical_block_mask(self, block_mask: BlockMask) -> BlockMask:
        """A BlockMask over logical positions [0, KV_LEN) of each sequence, with KV_BLOCK == page_size and
        KV_LEN <= max_length, -> the BlockMask over the pool (batch B, KV_LEN = num_pages * page_size) visiting the
        same positions; its mask_mod sees logical kv_idx. Blocks on pages a sequence does not hold are dropped."""
        held = self.held_block_mask(block_mask)
        width = self.num_pages
        mh, qb = held.kv_indices.shape[1:3]
        table = jnp.broadcast_to(self.page_table[:, None, None, :], (self.batch_size, mh, qb, self.max_pages_per_seq))

        def convert(num, indices):
            # Listed blocks are on held pages (held_block_mask), so each maps to a physical page.
            physical = jnp.take_along_axis(table, jnp.clip(indices, 0, self.max_pages_per_seq - 1), axis=-1)
            listed = jnp.arange(indices.shape[-1], dtype=jnp.int32)[None, None, None, :] < num[..., None]
            physical = jnp.where(listed, physical, 0)
            if physical.shape[-1] < width:
                physical = jnp.pad(physical, [(0, 0)] * 3 + [(0, width - physical.shape[-1])])
            else:
                physical = physical[..., :width]
            return num, physical.astype(jnp.int32)

        return _map_block_lists(
            held,
            convert,
            mask_mod=self.convert_logical_mask_mod(block_mask.mask_mod),
            seq_lengths=(block_mask.seq_lengths[0], self.num_pages * self.page_size),
        )

    def held_block_mask(self, block_mask: BlockMask) -> BlockMask:
        """A BlockMask over logical positions (KV_BLOCK == page_size, KV_LEN <= max_length) without the blocks on
        pages a sequence does not hold: batch B, still over logical positions. ``attention`` computes with it on
        every path, so a position no page holds is never attended, whichever kernel runs."""
        q_block, kv_block = block_mask.BLOCK_SIZE
        if kv_block != self.page_size:
            raise ValueError(
                f"the BlockMask's KV_BLOCK ({kv_block}) must equal the page size ({self.page_size}); build it with "
                f"BLOCK_SIZE=(Q_BLOCK, {self.page_size})"
            )
        if block_mask.seq_lengths[1] > self.max_length:
            raise ValueError(
                f"the BlockMask covers {block_mask.seq_lengths[1]} keys, more than the page table addresses "
                f"({self.max_length})"
            )
        batch = self.batch_size
        mb, mh, qb, _ = block_mask.kv_indices.shape
        if mb not in (1, batch):
            raise ValueError(f"the BlockMask has batch {mb}; expected 1 or {batch}")
        table = jnp.broadcast_to(self.page_table[:, None, None, :], (batch, mh, qb, self.max_pages_per_seq))

        def drop_unheld(num, indices):
            num = jnp.broadcast_to(num, (batch, mh, qb))
            indices = jnp.broadcast_to(indices, (batch, mh, qb, indices.shape[-1]))
            page = jnp.take_along_axis(table, jnp.clip(indices, 0, self.max_pages_per_seq - 1), axis=-1)
            listed = jnp.arange(indices.shape[-1], dtype=jnp.int32)[None, None, None, :] < num[..., None]
            valid = listed & (page >= 0)
            order = jnp.argsort(~valid, axis=-1, stable=True)  # held blocks first, in their order
            indices = jnp.take_along_axis(jnp.where(valid, indices, 0), order, axis=-1)
            return jnp.sum(valid, axis=-1, dtype=jnp.int32), indices.astype(jnp.int32)

        return _map_block_lists(
            block_mask, drop_unheld, mask_mod=block_mask.mask_mod, seq_lengths=block_mask.seq_lengths
        )

    def length_block_mask(self, q_len: int) -> BlockMask:
        """The BlockMask of ``attention``'s default: query [B, Hq, q_len] attends to each sequence's own
        ``lengths[b]`` cached positions (pages wholly inside full blocks, the last one partial)."""
        lengths = self.lengths
        start = jnp.arange(self.max_pages_per_seq, dtype=jnp.int32)[None, :] * self.page_size
        full = start + self.page_size <= lengths[:, None]
        partial = (start < lengths[:, None]) & ~full

        def within_length(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]

        return BlockMask.from_block_maps(
            partial[:, None, None, :],
            full[:, None, None, :],
            BLOCK_SIZE=(max(q_len, 1), self.page_size),
            mask_mod=within_length,
            seq_lengths=(q_len, self.max_length),
        )

    # ---------------------------------------------------------------------------------------------- attention

    def attention(
        self,
        query: jax.Array,
        score_mod: Callable | None = None,
        block_mask: BlockMask | None = None,
        scale: float | None = None,
        return_lse: bool = False,
        implementation: str | None = None,
        interpret: bool = False,
        kernel_options: Mapping[str, Any] | None = None,
        *,
        return_aux: AuxRequest | None = None,
    ):
        """flex attention of query [B, Hq, L, E] over each sequence's cached keys (GQA allowed).

        ``block_mask`` is over logical positions: Q_LEN = L, KV_LEN = max_length, KV_BLOCK = page_size; None
        attends to each sequence's ``lengths[b]`` cached positions (``length_block_mask``). A position on a page the
        sequence does not hold is never attended. score_mod and the mask see logical positions. Arguments otherwise
        as ``flex_attention``, and checked as it checks them on either path. A query in another floating dtype than
        the pool's is cast to the pool's. ``implementation='pallas_mosaic'`` runs ``flex_attention`` on the gathered
        keys (which says why where it cannot run, e.g. without a Hopper GPU); only pallas_triton has a decode
        kernel reading the pool.

        Returns:
          as ``flex_attention``: out [B, Hq, L, Ev]; with ``return_lse`` also lse [B, Hq, L]; with ``return_aux``,
          ``(out, AuxOutput)`` holding the requested lse and max_scores [B, Hq, L].
        """
        _validation.check_flags(return_lse=return_lse, interpret=interpret)
        check_return_aux(return_aux, return_lse)
        check_implementation(implementation)
        if not hasattr(query, "shape") or not hasattr(query, "dtype"):
            raise TypeError(f"query must be an array [B, Hq, L, E], got {type(query).__name__}")
        if query.ndim != 4:
            raise ValueError(f"query must have rank 4, [B, Hq, L, E], got shape {tuple(query.shape)}")
        batch, q_heads, q_len, head_dim = query.shape
        hkv = self.key_pool.shape[0]
        if batch != self.batch_size or q_heads % hkv or head_dim != self.key_pool.shape[2]:
            raise ValueError(
                f"query must be [B={self.batch_size}, Hq (a multiple of {hkv}), L, {self.key_pool.shape[2]}], got "
                f"{tuple(query.shape)}"
            )
        # flex_attention's checks, as it would make them on the gathered keys and values, on both paths: the decode
        # kernel would otherwise take a bad scale, score_mod or kernel_options, an int query (cast to the pool's
        # dtype) or an empty one without a word.
        keys = jax.ShapeDtypeStruct((batch, hkv, self.max_length, head_dim), query.dtype)
        values = jax.ShapeDtypeStruct((batch, hkv, self.max_length, self.value_pool.shape[-1]), query.dtype)
        _validation.check_qkv(query, keys, values, enable_gqa=True)
        _validation.check_scale(scale)
        _validation.check_score_mod(identity if score_mod is None else score_mod)
        kernel_options = _validation.pytorch_kernel_options(kernel_options)
        pallas_triton.check_kernel_options(kernel_options)
        pallas_mosaic.check_kernel_options(kernel_options)
        if block_mask is None:
            block_mask = self.length_block_mask(q_len)
        else:
            # As flex_attention checks it on the gather path: the decode kernel would read a mismatched mask silently.
            _validation.check_block_mask(block_mask, query, keys)
        if self._use_decode_kernel(query, block_mask, implementation, interpret, kernel_options):
            physical = self.convert_logical_block_mask(block_mask)
            with_max_scores = return_aux is not None and return_aux.max_scores
            out, lse, *max_scores = _decode.flex_decode(
                query.astype(self.key_pool.dtype),
                self.key_pool[None],
                self.value_pool[None],
                score_mod=self.convert_logical_score_mod(score_mod),
                mask_mod=physical.mask_mod,
                kv_num_blocks=physical.kv_num_blocks,
                kv_indices=physical.kv_indices,
                full_kv_num_blocks=physical.full_kv_num_blocks,
                full_kv_indices=physical.full_kv_indices,
                block_size=physical.BLOCK_SIZE,
                scale=float(1.0 / math.sqrt(head_dim) if scale is None else scale),
                kernel_options=kernel_options,
                interpret=interpret,
                with_max_scores=with_max_scores,
                no_gradient=_NO_DECODE_GRADIENT,
            )
            return attention_results(out, lse, *max_scores, return_lse=return_lse, return_aux=return_aux)
        # Both paths visit the same positions: the decode kernel's physical mask (above) holds no page nobody holds,
        # and the gathered keys (zeros there) would otherwise be attended.
        block_mask = self.held_block_mask(block_mask)
        key, value = self.gather()
        return flex_attention(
            query.astype(self.key_pool.dtype),
            key,
            value,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=True,
            return_lse=return_lse,
            implementation=implementation,
            interpret=interpret,
            kernel_options=kernel_options,
            return_aux=return_aux,
        )

    def _use_decode_kernel(self, query, block_mask, implementation, interpret, kernel_options) -> bool:
        # The decode kernel is pallas_triton's: pallas_mosaic goes to flex_attention on the gathered keys, which runs
        # it or says why it cannot (it has no interpret mode), as reference does.
        if implementation not in (None, "pallas_triton"):
            return False
        # Off a GPU the Triton kernels run in interpret mode only; without it flex_attention chooses the reference
        # (implementation None) or says that pallas_triton needs interpret=True.
        if not (jax.default_backend() == "gpu" or interpret):
            return False
        if query.shape[-1] > 256 or self.value_pool.shape[-1] > 256:
            return False
        reason = _decode.unsupported_reason(
            query.shape,
            (1, *self.key_pool.shape),
            mask_block_size=tuple(block_mask.BLOCK_SIZE),
            mask_num_blocks=tuple(block_mask.num_blocks),
            kernel_options=kernel_options,
        )
        return reason is None

    def attend(self, config, query: jax.Array, mods) -> jax.Array:
        """The KVCache protocol: query [B, L, Hq, D], the last L appended tokens of every sequence, over the cache;
        returns [B, L, Hq, Dv]. The mods see absolute positions; each sequence attends up to its own length."""
        if mods.block_mask is not None:
            raise ValueError(
                "a BlockMask is built for fixed lengths and cannot follow a growing cache; give a mask_mod for "
                "decoding (it sees absolute positions)"
            )
        batch, q_len = query.shape[:2]
        lengths = self.lengths
        q_offset = lengths - q_len
        user_score = identity if mods.score_mod is None else mods.score_mod
        user_mask = noop_mask if mods.mask_mod is None else mods.mask_mod

        def score_at_absolute_position(score, b, h, q_idx, kv_idx):
            return user_score(score, b, h, q_idx + q_offset[b], kv_idx)

        def mask_at_absolute_position(b, h, q_idx, kv_idx):
            return (kv_idx < lengths[b]) & user_mask(b, h, q_idx + q_offset[b], kv_idx)

        score_at_absolute_position.__name__ = f"offset_{getattr(user_score, '__name__', 'score_mod')}"
        mask_at_absolute_position.__name__ = f"offset_{getattr(user_mask, '__name__', 'mask_mod')}"
        # A mask_mod reading h gets a block map per head, named in mask_varies or not (as the layers' own masks).
        per_head = "head" in set(config.mask_varies) | mask_axes(user_mask)
        block_mask = create_block_mask(
            mask_at_absolute_position,
            batch,
            config.num_heads if per_head else None,
            q_len,
            self.max_length,
            BLOCK_SIZE=(DEFAULT_BLOCK_SIZE, self.page_size),
        )
        options = config.flex_options()
        out = self.attention(
            jnp.swapaxes(query, 1, 2),
            score_mod=score_at_absolute_position,
            block_mask=block_mask,
            implementation=options["implementation"],
            interpret=options["interpret"],
            kernel_options=options["kernel_options"],
        )
        return jnp.swapaxes(out, 1, 2)


def _map_block_lists(block_mask: BlockMask, convert: Callable, *, mask_mod, seq_lengths) -> BlockMask:
    """The BlockMask whose partial and full kv lists are ``convert(num, indices)`` of block_mask's."""
    num, indices = convert(block_mask.kv_num_blocks, block_mask.kv_indices)
    full_num = full_indices = None
    if block_mask.full_kv_num_blocks is not None:
        full_num, full_indices = convert(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return BlockMask.from_kv_blocks(
        num,
        indices,
        full_num,
        full_indices,
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=seq_lengths,
    )


# The decode kernel on the pool has no backward (its keys are shared by every batch through the page table).
_NO_DECODE_GRADIENT = (
    "PagedKVCache.attention on the decode kernel (short queries on a GPU, or interpret=True) is not "
    "differentiable; for gradients pass implementation='reference', or give cache.gather()'s keys and values to "
    "flex_attention"
)
