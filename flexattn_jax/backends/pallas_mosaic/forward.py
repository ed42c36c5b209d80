"""The flex-attention forward as a Pallas Mosaic GPU kernel for Hopper (sm90): TMA, wgmma, warpgroup specialisation.

A persistent grid: one program per SM, each taking work items (128 queries of one head of one batch row) in turn,
dealt in a snake order that balances heavy and light query tiles (``persistent_schedule``), with three warpgroups:

* the **memory warpgroup** walks the BlockMask row of its query tile (the partial blocks, then the full ones) and
  issues TMA copies of each key/value tile into a ring of ``num_stages`` shared-memory slots; a slot is refilled once
  both compute warpgroups have arrived on its "consumed" barrier;
* two **compute warpgroups**, 64 queries each, run S = Q K^T with wgmma into registers, apply the score_mod, the
  mask_mod (partial blocks only: a full block never evaluates it) and the bounds of a padded key tail, fold the tile
  into an online softmax, and accumulate P V with wgmma. A shared "schedule" barrier alternates the two warpgroups'
  use of the tensor cores, so that one computes its softmax while the other multiplies (the FlashAttention-3 ping-pong,
  Shah et al. 2024). With ``Config.overlap`` a warpgroup also overlaps its softmax with its own P V and the two hand
  the tensor cores over by turns instead (``overlapped_walk``; by default where no score_mod is left and the mask
  reads no array along the indices, at head dim 128: benchmarks/NOTES.md sections 12 and 54).
  Where shared memory allows, each compute warpgroup has two query buffers, so that the next item's queries are
  fetched while the current item runs (``Config.q_buffers``).

The mods see whole [64, BLOCK_N] index tiles in the wgmma register layout (``tile_avals(..., layout="full")``); arrays
they close over are read at scalar indices (``slopes[h]``, a 0-d offset) or with q_idx or kv_idx plus an offset
(``ids[q_idx]``: one vector load of the tile's slice, broadcast across it; ``analyze_reads``; ``ids[q_idx + start]``,
as a BlockMask's query-block selection makes, from a shifted copy of ``ids``: ``walked_consts``). Mosaic GPU has no
gather from registers, so ``unsupported_reason`` refuses any other read (``table[h, q_idx - kv_idx]``) and the
caller falls back to the Triton kernels. A float32 conversion of an index, or of the sum or difference of the two
(ALiBi), is built from float index tiles converted once per program (``IndexTiles``).

Softmax in base 2, as in ``pallas_triton._tile``, with the row maximum taken before scaling and the score_mod's
literal factors folded into the exponent (``_captures.SoftmaxScaling``): a row with nothing allowed keeps a running
maximum of -inf and is exponentiated against 0, never ``-inf - -inf``; it finishes with output 0 and lse -inf.
On bfloat16, where no score_mod is left to apply, the walk is anchored by default (``Config.anchored_shift``): the
first key tile's row maxima shift every later tile, which takes no maximum; a row whose sum then shows an overflow or
an underflow gets lse NaN, and ``flex_forward`` runs its work item again in a second launch on the running maximum,
writing in place.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from flexattn_jax.backends._arrays import pad_axis
from flexattn_jax.backends._captures import ModProgram, SoftmaxScaling, fold_scalings
from flexattn_jax.backends._device import num_sms

__all__ = [
    "BLOCK_M",
    "COMPUTE_WARPGROUPS",
    "Config",
    "BlockWalk",
    "ReadSite",
    "analyze_reads",
    "as_tile",
    "flex_forward",
    "is_everywhere",
    "site_load",
    "stream_key_values",
    "unsupported_mod_reason",
    "walked_consts",
]

BLOCK_M = 64  # query rows per compute warpgroup: one wgmma M tile
COMPUTE_WARPGROUPS = 2
Q_TILE = BLOCK_M * COMPUTE_WARPGROUPS  # queries per program
_LOG2_E = math.log2(math.e)
_LN_2 = math.log(2.0)
_NEG_INF = float("-inf")
# Primitives that run on the special-function unit (MUFU), beside the softmax's exp2 (Config.scale_queries).
SPECIAL_FUNCTIONS = ("tanh", "exp", "exp2", "log", "log1p", "expm1", "logistic", "sin", "cos", "tan", "atan2",
                     "erf", "erfc", "erf_inv", "pow", "sqrt", "rsqrt", "cbrt")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Static launch configuration.

    Attributes:
      block_n: keys per TMA copy and per wgmma tile (64 or 128).
      num_stages: shared-memory slots of the key/value ring (at least 2).
      q_buffers: query tiles in shared memory: 2 fetches the next item's queries during the current one.
      overlap: each compute warpgroup overlaps its softmax of one key tile with its own P V of the previous one.
        Unset: on at head dim 65 to 128 with 128-key tiles where no score_mod is left to apply (after its literal
        factors join the scale) and the mask_mod reads no captured array at q_idx or kv_idx (scalar reads, such
        as per-head window sizes, are fine): causal, sliding window, prefix LM, per-head windows, full attention
        (NOTES.md section 54).
      copy_warps: warps of the memory warpgroup that run its copy loop: 1, or all 4 (see ``in_copy_warps``).
      float_indices: the score_mod's float32 conversions of q_idx, kv_idx, their sum or difference are built from
        float index tiles computed once per program (``IndexTiles``), not converted score by score.
      scale_queries: where the score_mod needs the scaled score (``SoftmaxScaling.score_scale`` is not 1), each
        query tile is multiplied by that scale in shared memory once per work item, in place of one multiply per
        score of every key tile. The scaled queries are rounded to the input dtype, a relative error of at most
        one half unit in its last place per element, the size of the inputs' own rounding. None: unless the
        score_mod applies a special function (``SPECIAL_FUNCTIONS``) to every score, whose unit then bounds the step
        and leaves the multiply free (benchmarks/NOTES.md section 40: ALiBi 2-8% faster, soft-capping 0-4% slower);
        in a forward a backward follows, only where the scale is a power of two (``flex_forward``'s
        ``for_backward``).
      fixed_max: where the score_mod's result is bounded (soft-capping's tanh: ``ModProgram.output_range``), the
        online softmax subtracts that bound (rounded up to an integer in exp2's units, which ``exp2_polynomial``
        needs) instead of each row's running maximum: no maximum to reduce per key tile, no rescaling of the
        accumulator, and each score's exp2 need not wait for its row's other scores.
        Only where every probability stays a normal number of the input dtype relative to the bound
        (``FIXED_SHIFT_BELOW``; past that a shift below the bound, ``fixed_shift_of``), and not with
        ``with_max_scores``. On by default: on an H100, soft-capping's forward 5-10% faster at D=128, the same
        at D=64 (NOTES.md section 43).
      exp2_fma: of each key tile's columns how many (the last ones) take the softmax's exp2 from a polynomial on
        the FMA units (``exp2_polynomial``) instead of the special-function unit, which soft-capping's tanh
        shares (NOTES.md section 46). Only with the fixed maximum, whose shift bounds the argument; masked scores
        are zeroed after the exp2. 0: none. Unset: ``default_exp2_fma`` (80 of 128 columns) where the fixed
        maximum applies to a score_mod that applies a special function (soft-capping's tanh) and the head dim is
        at most 64, else 0 (NOTES.md sections 49 and 50).
      row_sum_fold: each thread adds its probabilities into partial row sums of its own columns
        (``ROW_SUM_COLUMNS``) and the row's four threads add theirs together once, after the walk, instead of
        exchanging them (two shuffles and adds a row) at every key tile (NOTES.md section 48). Unset: on at head
        dim 65 to 128 where the fixed maximum applies to a score_mod that applies a special function, or where
        no score_mod is left to apply and the mask_mod reads no captured array (sections 49, 51 and 53).
      max_tree: each key tile's row maxima taken by column halves before the exchange between threads
        (``row_maximum``), short dependent chains in place of one per row; the same maxima, bit for bit. On by
        default: on an H100 the forward 2-3% faster at D=64 and at B=8 S=2048 on full attention, level to 1% faster
        elsewhere (NOTES.md section 59).
      anchored_shift: where the softmax has no fixed shift (``fixed_max``), each row subtracts its maximum over
        the first key tile of its walk for the whole walk: later tiles take no maximum and the accumulator is never
        rescaled. Exact where no later score exceeds that maximum by more than ``FIXED_SHIFT_ABOVE`` (64 in exp2's
        units, 44 in natural units, for bfloat16); each row certifies that from its sum after the walk
        (``anchor_certificate``), and the work items of rows that fail run again on the running maximum (a second
        launch that skips every other item, ``flex_forward``). Only for bfloat16 inputs, whose P keeps float32's
        exponent range, and not with ``with_max_scores``. Unset: on where no score_mod is left to apply (after its
        literal factors join the scale): on an H200 the forward 6-20% faster at issue 8's shapes on full attention
        and causal (NOTES.md section 60). A score_mod may raise later scores far above the first tile's (ALiBi's
        bias rises along the keys), and every item then runs twice: on an H100 ALiBi's forward at half the
        running maximum's speed (section 66).
    """

    block_n: int
    num_stages: int
    q_buffers: int = 1
    overlap: bool | None = None
    copy_warps: int = 1
    float_indices: bool = True
    scale_queries: bool | None = None
    fixed_max: bool = True
    exp2_fma: int | None = None
    row_sum_fold: bool | None = None
    max_tree: bool = True
    anchored_shift: bool | None = None


@dataclasses.dataclass(frozen=True)
class ReadSite:
    """How the kernel reads a captured array at one indexing expression of a mod.

    kind: "whole" (a 0-d array), "scalar" (every index a scalar: ``slopes[h]``), "row" (``axis`` indexed by q_idx
    plus an offset, the others scalars: ``ids[q_idx]``, ``ids[b, q_idx]``, ``ids[q_idx + 256]``) or "column"
    (``axis`` indexed by kv_idx plus an offset). A row or column read is one contiguous vector load per tile,
    broadcast across the tile. const: which captured array is read. offset: what the read adds to q_idx or kv_idx,
    None when it comes from the captured values (``ids[q_idx + start]``, ``start`` captured) and is known only at run
    time. source: the kernel input that holds the array shifted by the offset (``walked_consts``), None when the
    read is of the array itself.
    """

    kind: str
    const: int
    axis: int = -1
    offset: int | None = 0
    source: int | None = None

    @property
    def along_indices(self) -> bool:
        """A row or column read: a vector load per tile, at q_idx or kv_idx plus the offset."""
        return self.kind in ("row", "column")


# Where the analysis classifies the reads: far from 0, so that an index q_idx + offset is not negative (which jnp
# indexing would count from the end) for any offset a mod could use with an array it fits in memory.
_FAR = 1 << 24


class _SiteRecorder:
    """A ``ModProgram`` load that classifies each read from the index values it receives (``clamp_reads=False``).

    Without ``expected`` (a probe at ``_FAR``), a read whose index is q_idx (kv_idx) plus a constant is a row
    (column) read at that offset. With ``expected`` (the sites that probe found), each read must agree with its
    expected site, where an index that jnp's indexing counted from the end (q_idx + offset < 0, shifted by the
    axis's size) agrees too.
    """

    def __init__(self, q_idx, kv_idx, expected: Sequence[ReadSite] | None = None):
        self.q_idx, self.kv_idx = q_idx, kv_idx
        self.expected = None if expected is None else iter(expected)
        self.sites: list[ReadSite | str] = []  # a ReadSite, or what makes the read impossible in this kernel

    def __call__(self, const, ref, index):
        expected = None if self.expected is None else next(self.expected, None)
        if index is None:
            if ref.ndim:
                self.sites.append(f"uses the captured array {const} of shape {list(ref.shape)} whole")
            else:
                self.sites.append(ReadSite("whole", const))
            return ref[...]
        tiles = [d for d, i in enumerate(index) if jnp.ndim(i) > 0]
        site = None
        if not tiles:
            site = ReadSite("scalar", const)
        elif len(tiles) == 1 and jnp.shape(index[tiles[0]]) == self.q_idx.shape:
            tile, size = index[tiles[0]], ref.shape[tiles[0]]
            for kind, along in (("row", self.q_idx), ("column", self.kv_idx)):
                shift = tile - along
                if expected is None:
                    offset = int(shift[0, 0])
                    agrees = shift == offset
                elif expected.kind == kind and expected.axis == tiles[0]:
                    offset = expected.offset
                    agrees = (shift == offset) | ((shift == offset + size) & (along + offset < 0))
                else:
                    continue
                if bool(jnp.all(agrees)):
                    site = ReadSite(kind, const, tiles[0], offset)
                    break
        if site is None:
            site = (
                f"indexes the captured array {const} of shape {list(ref.shape)} with a function of q_idx or kv_idx "
                "other than q_idx or kv_idx plus an offset"
            )
        self.sites.append(site)
        return ref[tuple(index)]  # jnp indexing clamps, as the kernel's loads do


def _probe_tiles(program: ModProgram, q_start: int, kv_start: int) -> tuple[list, jax.Array, jax.Array]:
    """The arguments that probe ``program`` on its own tile shape: ``(score, q_idx, kv_idx)``, ``score`` a list of
    one zeros tile for a score_mod and empty for a mask_mod, the index tiles starting at ``q_start`` and
    ``kv_start``."""
    shape = program.jaxpr.invars[-1].aval.shape
    q_idx = lax.broadcasted_iota(jnp.int32, shape, 0) + q_start
    kv_idx = lax.broadcasted_iota(jnp.int32, shape, 1) + kv_start
    num_args = len(program.jaxpr.invars) - program.num_consts
    return ([jnp.zeros(shape, jnp.float32)] if num_args == 5 else []), q_idx, kv_idx


# Bits of what a value in a mod's index arithmetic is computed from (``_index_forms``).
_FROM_CAPTURED, _FROM_TILE, _FROM_PROGRAM = 1, 2, 4  # captured arrays; q_idx or kv_idx; b or h
# Equations that pass a value on unchanged but for its shape or integer type.
_PASS_THROUGH = frozenset({"convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "copy"})


@dataclasses.dataclass(frozen=True)
class _IndexForm:
    """How one read of a captured array indexes it, from the jaxpr of its indices.

    captured: some index is computed from captured values.
    components: per index, "free" (computed without q_idx and kv_idx), "q_idx" or "kv_idx" (that index plus
      terms computed from constants and captured values alone), or "other".
    """

    captured: bool
    components: tuple[str, ...]


def _index_forms(program: ModProgram) -> list[_IndexForm]:
    """For each read of a captured array, in the interpreter's order, its ``_IndexForm``: the jaxpr of the reads'
    indices as functions of the captured arrays, b, h, q_idx and kv_idx, each index taken apart into a sum of
    terms. An equation's outputs depend on everything its inputs depend on, so the answer may say "computed
    from" where the values cancel, never not where they count; and an index is "q_idx" only where it is q_idx plus
    an offset for every value of the captured arrays, not only those the probes of ``analyze_reads`` hold."""
    score, q_idx, kv_idx = _probe_tiles(program, _FAR, _FAR)
    index_lengths = []

    def indices(consts, b, h, q_idx, kv_idx):
        found = []

        def load(const, ref, index):
            index_lengths.append(None if index is None else len(index))
            if index is None:
                return ref[...]
            found.extend(jnp.asarray(i) for i in index)
            return ref[tuple(index)]

        program(consts, *score, b, h, q_idx, kv_idx, load=load, clamp_reads=False)
        return found

    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in program.const_avals]
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    jaxpr = jax.make_jaxpr(indices)(avals, scalar, scalar, q_idx, kv_idx).jaxpr
    *const_vars, b_var, h_var, q_var, kv_var = jaxpr.invars
    sources = {v: _FROM_CAPTURED for v in const_vars}
    sources.update({b_var: _FROM_PROGRAM, h_var: _FROM_PROGRAM, q_var: _FROM_TILE, kv_var: _FROM_TILE})
    producers = {}
    for eqn in jaxpr.eqns:
        found = 0
        for v in eqn.invars:
            if isinstance(v, jex_core.Var):
                found |= sources.get(v, 0)
        for out in eqn.outvars:
            sources[out] = found
            producers[out] = eqn

    def source(v):
        return sources.get(v, 0) if isinstance(v, jex_core.Var) else 0

    def is_literal(v, value=None):
        return isinstance(v, jex_core.Literal) and (value is None or v.val == value)

    def terms(v, sign: int) -> list | None:
        """v as a sum of signed terms: ("q_idx" or "kv_idx", sign) or ("offset", sources), or None."""
        if not source(v) & _FROM_TILE:
            return [("offset", source(v))]
        if v is q_var or v is kv_var:
            return [("q_idx" if v is q_var else "kv_idx", sign)]
        eqn = producers.get(v)
        if eqn is None:
            return None
        name, args = eqn.primitive.name, eqn.invars
        if name in _PASS_THROUGH:
            return terms(args[0], sign)
        if name == "neg":
            return terms(args[0], -sign)
        if name in ("add", "sub"):
            first, second = terms(args[0], sign), terms(args[1], sign if name == "add" else -sign)
            return None if first is None or second is None else first + second
        if name == "select_n" and len(args) == 3:
            # jnp's indexing counts a negative index from the end: select_n(x < 0, x, x + size). The kernel's
            # shifted copies follow it (``walked_consts``), so the index is x's.
            x = args[1]
            test, wrapped = (producers.get(a) if isinstance(a, jex_core.Var) else None for a in (args[0], args[2]))
            if (
                test is not None and test.primitive.name == "lt" and test.invars[0] is x
                and is_literal(test.invars[1], 0)
                and wrapped is not None and wrapped.primitive.name == "add" and wrapped.invars[0] is x
                and is_literal(wrapped.invars[1])
            ):
                return terms(x, sign)
        return None

    def component(v) -> str:
        if not source(v) & _FROM_TILE:
            return "free"
        found = terms(v, 1)
        if found is None:
            return "other"
        walked = [term for term in found if term[0] != "offset"]
        offsets_ok = all(not (term[1] & _FROM_PROGRAM) for term in found if term[0] == "offset")
        if len(walked) == 1 and walked[0][1] == 1 and offsets_ok:
            return walked[0][0]
        return "other"

    outputs = iter(jaxpr.outvars)
    forms = []
    for n in index_lengths:
        index = [next(outputs) for _ in range(n or 0)]
        forms.append(_IndexForm(any(source(v) & _FROM_CAPTURED for v in index), tuple(component(v) for v in index)))
    return forms


def _form_problem(site, form: _IndexForm) -> str | None:
    """What the jaxpr shows wrong with a read the probes classified as ``site``, or None."""
    if not isinstance(site, ReadSite) or site.kind == "whole":
        return None
    walked = {"row": "q_idx", "column": "kv_idx"}.get(site.kind)
    wanted = tuple(walked if walked is not None and d == site.axis else "free" for d in range(len(form.components)))
    if form.components == wanted:
        return None
    return (
        f"indexes the captured array {site.const} with a function of q_idx or kv_idx other than q_idx or kv_idx plus "
        "an offset of constants and captured values (it is one for the values probed, not for every value)"
    )


def analyze_reads(program: ModProgram, block_n: int) -> tuple[tuple[ReadSite, ...] | None, str | None]:
    """Classifies every read of a captured array in ``program`` (traced for whole [BLOCK_M, block_n] tiles).

    Returns ``(sites, None)`` in the order the interpreter performs the reads, or ``(None, why)`` when a read has no
    Mosaic GPU form (a gather at a computed index, such as ``table[h, q_idx - kv_idx]``). The reads are classified
    at q_idx, kv_idx near ``_FAR``, and every other probe must agree:

    * at the start, the middle and the end of each array that a row or column read walks, so that an index that
      only agrees with q_idx + offset somewhere (``ids[jnp.minimum(q_idx, 100)]``) is refused;
    * at another b and h, so that an offset that depends on them (``ids[q_idx + h]``) is refused: the kernel reads
      one offset for every program;
    * with other values in the captured arrays (all 3s, a large value, a negative one; a ramp at two b and h).
      A read whose kind changes with them is refused, as is an offset that changes with b or h there.

    The probes see a few positions and a few values; the jaxpr of the indices (``_index_forms``) must then show
    each row (column) read's index to be q_idx (kv_idx) plus a sum of constants and captured values, for every
    position and value, and every other index free of q_idx and kv_idx. So a read that is q_idx plus an offset
    only where the probes look is refused: ``ids[jnp.where(q_idx == 777, 0, q_idx)]``, or
    ``ids[jnp.where(q_idx + start == q_idx + 7, 2 * q_idx, q_idx)]`` with ``start`` captured. An offset computed
    from captured values (``ids[q_idx + start]``, as a query-block selection at a traced index makes) is marked as
    known at run time (``offset`` None), and ``walked_consts`` takes it from the real values.

    The answer depends on the program alone (the probes fill the captured arrays themselves), and is kept by the
    program's text: outside ``jit`` every call of ``flex_attention`` traces the mods again, and the probes cost
    tens of milliseconds of host time.
    """
    key = (str(program.jaxpr), program.num_consts, program.const_avals, program.exact_indices, block_n)
    answer = _ANALYSES.get(key)
    if answer is None:
        answer = _analyze_reads(program, block_n)
        if len(_ANALYSES) >= _MAX_ANALYSES:
            _ANALYSES.pop(next(iter(_ANALYSES)))
        _ANALYSES[key] = answer
    return answer


_ANALYSES: dict[tuple, tuple] = {}  # analyze_reads's answers by program text, oldest first
_MAX_ANALYSES = 256


def _analyze_reads(program: ModProgram, block_n: int) -> tuple[tuple[ReadSite, ...] | None, str | None]:
    """``analyze_reads``'s answer, computed."""
    if not program.num_consts:
        return (), None

    def record(consts, q_start: int = _FAR, kv_start: int = _FAR, bh: int = 0, expected=None):
        score, q_idx, kv_idx = _probe_tiles(program, q_start, kv_start)
        recorder = _SiteRecorder(q_idx, kv_idx, expected)
        program(consts, *score, jnp.int32(bh), jnp.int32(bh), q_idx, kv_idx, load=recorder, clamp_reads=False)
        return recorder.sites

    def without_offsets(sites):
        return [dataclasses.replace(site, offset=0) if isinstance(site, ReadSite) else site for site in sites]

    def problem_of(sites, otherwise: str | None) -> str | None:
        return next((site for site in sites if isinstance(site, str)), otherwise)

    # Made here, not traced: inside the caller's jit a zeros array would be a tracer, and so would every index
    # computed from it.
    with jax.default_device(jax.devices("cpu")[0]), jax.ensure_compile_time_eval():
        zeros = [jnp.zeros(a.shape, a.dtype) for a in program.const_avals]
        # Filled with 3, a large value and a negative one (wrapped for unsigned types), so that an offset the
        # captured values set only past some threshold ((start > 300) * 100) is seen to change.
        fills = [[jnp.full(a.shape, v, jnp.int32).astype(a.dtype) for a in program.const_avals]
                 for v in (3, 100_003, -5)]
        ramps = [(jnp.arange(a.size, dtype=jnp.int32).reshape(a.shape) % 251 + 1).astype(a.dtype)
                 for a in program.const_avals]
        first = record(zeros)
        problem = problem_of(first, None)
        if problem is not None:
            return None, problem

        def room(kind: str, size: int) -> int:
            lengths = [program.const_avals[site.const].shape[site.axis] for site in first if site.kind == kind]
            return max(min(lengths, default=size) - size, 0)

        q_room, kv_room = room("row", BLOCK_M), room("column", block_n)
        for q_start, kv_start in ((0, 0), (q_room // 2, kv_room // 2), (q_room, kv_room)):
            again = record(zeros, q_start, kv_start, expected=first)
            if again != first:
                return None, problem_of(again, "reads its captured arrays differently at different positions")
        if record(zeros, bh=1) != first:
            return None, ("reads a captured array at an offset from q_idx or kv_idx that depends on b or h; "
                          "pallas_mosaic takes one offset for every b and h")
        filled = [record(consts) for consts in fills]
        ramp, ramp_elsewhere = record(ramps), record(ramps, bh=1)
        for again in (*filled, ramp, ramp_elsewhere):
            if without_offsets(again) != without_offsets(first):
                return None, problem_of(again, "reads its captured arrays differently when they hold other values")
        if ramp != ramp_elsewhere:
            return None, ("reads a captured array at an offset from q_idx or kv_idx that other captured values give "
                          "differently for each b or h; pallas_mosaic takes one offset for every b and h")
        # Every offset the probes saw change is computed from captured values, so the jaxpr's answer covers theirs.
        forms = _index_forms(program)
    problem = next(filter(None, map(_form_problem, first, forms)), None)
    if problem is not None:
        return None, problem
    return tuple(
        dataclasses.replace(site, offset=None) if site.along_indices and form.captured else site
        for site, form in zip(first, forms)
    ), None


def unsupported_mod_reason(program: ModProgram, block_n: int) -> str | None:
    """None when the kernel can evaluate ``program``; else what it does that Mosaic GPU cannot (a gather)."""
    _, problem = analyze_reads(program, block_n)
    if problem is None:
        return None
    return (
        f"{program.name} {problem}; pallas_mosaic reads arrays a mod closes over at scalar indices (b, h), with "
        "q_idx or kv_idx plus one offset for every b and h (ids[q_idx], ids[b, kv_idx], ids[q_idx + start]), or "
        "whole when 0-d"
    )


def _vector_load(ref, index: tuple, axis: int):
    # The vector's layout is the tile's with the other axis reduced away.
    return plgpu.load(ref.at[index], layout=plgpu.Layout.WGMMA.reduce(1 - axis), optimized=False)


def site_load(sites: Sequence[ReadSite], refs: Sequence, q_start, kv_start, shape: tuple[int, int], *,
              transposed: bool = False, vector_load: Callable = _vector_load):
    """A ``ModProgram`` load performing the reads ``analyze_reads`` classified, in the same order.

    The tile is ``shape`` in the wgmma register layout: [queries, keys], or [keys, queries] when ``transposed`` (the
    dK/dV kernel's S^T). A row read (q_idx) loads ``ids[q_start : q_start + queries]`` as one vector along the
    queries' axis, a column read the keys' slice along theirs, each broadcast across the tile; a read at an offset
    loads the same slice of its shifted copy, ``refs[site.source]`` (``walked_consts``). ``vector_load(ref, index,
    axis)`` makes the vector read (``index`` has a ``pl.ds`` on the walked axis; ``axis`` is the tile's axis it
    lies along); the tests pass one of plain arrays, to check the reads on the CPU.
    """
    remaining = iter(sites)
    q_axis = 1 if transposed else 0

    def load(const, ref, index):
        site = next(remaining)
        if site.kind == "whole":
            return ref[...]
        if site.kind == "scalar":
            return ref[tuple(index)]
        if site.source is not None:
            ref = refs[site.source]
        index = list(index)
        axis = q_axis if site.kind == "row" else 1 - q_axis
        index[site.axis] = pl.ds(q_start if site.kind == "row" else kv_start, shape[axis])
        return lax.broadcast_in_dim(vector_load(ref, tuple(index), axis), shape, (axis,))

    return load


def as_tile(x, shape: tuple[int, int], dtype) -> jax.Array:
    """A mod's value as a ``dtype`` tile of ``shape`` in the wgmma register layout. A mod that returns a constant
    or a value of b and h alone (``return 1.0``, ``return bias[h]``, ``return h < 4``) gives a literal or a 0-d
    value, broadcast here: the tile's layout must be given, as no index tile carries it."""
    x = jnp.asarray(x).astype(dtype)
    if x.shape == shape:
        return x
    return plgpu.layout_cast(jnp.broadcast_to(x, shape), plgpu.Layout.WGMMA)


def is_everywhere(program: ModProgram) -> bool:
    """The mask_mod allows every position (a literal True, broadcast or not)."""
    jaxpr = program.jaxpr
    if len(jaxpr.eqns) > 1:
        return False
    out = jaxpr.outvars[0]
    if jaxpr.eqns:
        eqn = jaxpr.eqns[0]
        if eqn.primitive.name != "broadcast_in_dim" or eqn.outvars[0] is not out:
            return False
        out = eqn.invars[0]
    return hasattr(out, "val") and bool(out.val)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts of one launch."""

    q_heads: int
    group: int  # query heads per key/value head
    shared_kv: bool  # key and value of batch 1, read by every query batch
    mask_batch: int  # 1 (broadcast) or B
    mask_heads: int  # 1 (broadcast) or Hq
    q_tiles_per_row: int  # query tiles (of Q_TILE) per mask block row; 0 when the mask has a single row
    kv_tiles_per_block: int  # key tiles (of block_n) per mask block
    kv_block: int  # keys per mask block (the padded length when the mask has one column)
    kv_len: int
    mask_kv_bounds: bool  # some visited key tile reaches past kv_len
    has_full: bool
    apply_mask_mod: bool
    scaling: SoftmaxScaling
    query_scale: float  # multiplies each query tile in shared memory (Config.scale_queries); 1.0: not applied
    fixed_shift: int | None  # the softmax's fixed shift in exp2's units (Config.fixed_max); None: running maximum
    exp2_fma: int  # key columns whose exp2 is a polynomial, with the fixed maximum only (Config.exp2_fma)
    row_sum_fold: bool  # per-thread partial row sums, reduced after the walk (Config.row_sum_fold)
    max_tree: bool  # row maxima by column halves (Config.max_tree)
    anchored: bool  # the first key tile's row maxima shift the whole walk, certified after it (Config.anchored_shift)
    repair: bool  # the launch that reruns the items a certificate failed, on the running maximum, and only those
    num_score_consts: int
    num_mask_consts: int
    block_n: int
    num_stages: int
    q_buffers: int
    overlap: bool
    copy_warps: int
    dtype: jnp.dtype
    score_sites: tuple[ReadSite, ...]
    mask_sites: tuple[ReadSite, ...]
    float_index_signs: frozenset  # the (q_sign, kv_sign) the score_mod converts to float32 (IndexTiles)
    with_max_scores: bool  # a third output: each row's maximum modified score


class BlockWalk:
    """The tiles a program visits along one row of the BlockMask's lists: the partial blocks (``num`` / ``indices``),
    then the full ones, each block of ``block`` rows walked as ``block // tile`` consecutive tiles.

    ``refs`` are the (num, indices, full_num, full_indices) refs, the full pair None when absent; ``mb``, ``mh`` and
    ``row`` select the row. ``start(step)`` is the first row of tile ``step``.
    """

    def __init__(self, refs, mb, mh, row, *, block: int, tile: int, has_full: bool):
        num_ref, self.idx_ref, full_num_ref, self.full_idx_ref = refs
        self.mb, self.mh, self.row = mb, mh, row
        self.block, self.tile, self.sub, self.has_full = block, tile, block // tile, has_full
        self.num_partial = num_ref[mb, mh, row] * self.sub
        num_full = full_num_ref[mb, mh, row] * self.sub if has_full else jnp.int32(0)
        self.num_steps = self.num_partial + num_full

    def _listed(self, ref, t):
        sub = self.sub
        block = t if sub == 1 else lax.div(t, jnp.int32(sub))
        start = ref[self.mb, self.mh, self.row, block] * self.block
        return start if sub == 1 else start + lax.rem(t, jnp.int32(sub)) * self.tile

    def start(self, step):
        if not self.has_full:
            return self._listed(self.idx_ref, step)
        in_partial = step < self.num_partial
        # Both reads are in range: the index arrays are [..., C] and each t is clamped to 0 when unused.
        partial = self._listed(self.idx_ref, jnp.where(in_partial, step, 0))
        full = self._listed(self.full_idx_ref, jnp.where(in_partial, 0, step - self.num_partial))
        return jnp.where(in_partial, partial, full)


def in_copy_warps(loop: Callable[[], object], copy_warps: int) -> None:
    """Runs a memory warpgroup's copy ``loop`` in its first warp alone (``copy_warps`` 1) or in all four (4).

    One thread issues each copy either way. With all four warps, the three others repeat the loop's index
    arithmetic and barrier waits, one warp on each of the SM's four schedulers, where they take issue slots from
    the compute warps: in the forward at head dim 128 that was 9% of the instructions the SM issued
    (benchmarks/NOTES.md section 31).
    """
    if copy_warps == 4:
        loop()
        return

    @plgpu.warp_map
    def _(warp):
        @pl.when(warp == 0)
        def _():
            loop()  # its value (a loop's carry) is dropped: pl.when's branch returns nothing


def stream_key_values(k_ref, v_ref, head: tuple, k_ring, v_ring, ready, consumed, *, walk: BlockWalk, base,
                      stages: int):
    """The memory warpgroup's loop: TMA-copies the key and value tiles of ``walk`` from ``k_ref[head]`` /
    ``v_ref[head]`` (``head`` the (batch, key/value head) indices of [B, H, S, D] refs) into the rings' slots, step
    ``base + t`` into slot ``(base + t) % stages`` (``base`` None: 0). A slot's first use needs no wait; later ones
    wait until both compute warpgroups have arrived on its consumed barrier. Returns the step count after the walk.
    """
    (k_ready, v_ready), (k_consumed, v_consumed) = ready, consumed

    @pl.loop(0, walk.num_steps)
    def _(step):
        count = step if base is None else base + step
        slot = lax.rem(count, jnp.int32(stages))
        rows = pl.ds(walk.start(step), walk.tile)
        reused = count >= stages

        @pl.when(reused)
        def _():
            plgpu.barrier_wait(k_consumed.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[(*head, rows)], k_ring.at[slot], k_ready.at[slot])

        @pl.when(reused)
        def _():
            plgpu.barrier_wait(v_consumed.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[(*head, rows)], v_ring.at[slot], v_ready.at[slot])

    return walk.num_steps if base is None else base + walk.num_steps


def _item_coordinates(work, plan: "_Plan", num_q_tiles: int):
    """(query tile, head, batch) of work item number ``work`` of ``num_q_tiles * Hq * B``."""
    q_tile_rev = lax.rem(work, jnp.int32(num_q_tiles))
    bh = lax.div(work, jnp.int32(num_q_tiles))
    # Within a head, the heaviest query tiles of a causal mask (the last ones) come first.
    return num_q_tiles - 1 - q_tile_rev, lax.rem(bh, jnp.int32(plan.q_heads)), lax.div(bh, jnp.int32(plan.q_heads))


class _Item:
    """One unit of work, (query tile, head, batch) number ``work`` of ``num_q_tiles * Hq * B``, and its mask row."""

    def __init__(self, work, plan: "_Plan", num_q_tiles: int, refs, needs_ref=None):
        self.q_tile, self.h, self.b = _item_coordinates(work, plan, num_q_tiles)
        self.kv_head = lax.div(self.h, jnp.int32(plan.group)) if plan.group > 1 else self.h
        self.kv_batch = jnp.int32(0) if plan.shared_kv else self.b
        mb = self.b if plan.mask_batch > 1 else jnp.int32(0)
        mh = self.h if plan.mask_heads > 1 else jnp.int32(0)
        row = lax.div(self.q_tile, jnp.int32(plan.q_tiles_per_row)) if plan.q_tiles_per_row else jnp.int32(0)
        self.walk = BlockWalk(refs, mb, mh, row, block=plan.kv_block, tile=plan.block_n, has_full=plan.has_full)
        self.needed = None  # the repair launch's flag: this item runs again (None: every item runs)
        if needs_ref is not None:
            self.needed = needs_ref[self.b, self.h, self.q_tile] != 0
            self.walk.num_partial = jnp.where(self.needed, self.walk.num_partial, 0)
            self.walk.num_steps = jnp.where(self.needed, self.walk.num_steps, 0)
        self.num_partial, self.num_steps = self.walk.num_partial, self.walk.num_steps

    def when_needed(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` where this item runs at all (always, outside the repair launch)."""
        if self.needed is None:
            fn()
        else:
            pl.when(self.needed)(fn)


class IndexTiles:
    """The float32 index tiles a score_mod converts (``ModProgram.__call__``'s ``float_indices``), for one
    warpgroup's [BLOCK_M, block_n] tile in the wgmma layout.

    A conversion of ``kv_idx - q_idx`` (ALiBi) on the integer tiles costs an integer add and subtract and an
    int-to-float conversion per score. Here the offsets within the tile (column minus row, and the like) are
    converted once per program, so each key tile pays one float add per score of a per-tile scalar. Exact where
    every index lies below 2^23 (``flex_forward`` checks the padded lengths): the corner and the offsets then convert
    exactly, and their sum, below 2^24 in magnitude, is rounded once. ``signs``: the (q_sign, kv_sign) patterns.
    """

    def __init__(self, signs, block_n: int):
        shape = (BLOCK_M, block_n)
        rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
        columns = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)

        def offsets(q_sign, kv_sign):
            terms = [t if sign == 1 else -t for sign, t in ((q_sign, rows), (kv_sign, columns)) if sign]
            return functools.reduce(jnp.add, terms).astype(jnp.float32)

        self.offsets = {pattern: offsets(*pattern) for pattern in signs}

    def at(self, q_base, first_key):
        """The hook for the tile whose first row is query ``q_base`` and first column key ``first_key``."""

        def float_indices(q_sign, kv_sign):
            corner = q_sign * q_base + kv_sign * first_key
            return corner.astype(jnp.float32) + self.offsets[q_sign, kv_sign]

        return float_indices


# 2**f on [-1/2, 1/2] to a relative error of 7.5e-5 (a cubic fitted to the relative error by reweighted least
# squares), below the rounding of P to bfloat16 (3.9e-3) or float16 (4.9e-4) before it multiplies V. Highest degree
# first, evaluated by Horner's rule.
_EXP2_COEFFICIENTS = (0.05517111799717522, 0.24260978234093275, 0.6932609536727427, 0.999928156505169)
_ROUNDING_MAGIC = 12582912.0  # 1.5 * 2**23: x + this rounds x to an integer held in the low mantissa bits


def exp2_polynomial(y, scale, shift: int):
    """2**(y * scale - shift) for an integer ``shift`` (the fixed maximum's, ``fixed_shift_of``) and arguments whose
    result is a normal float32 (-126 < x < 128), with FMA-unit arithmetic only: the argument is n + f with n an
    integer and |f| <= 1/2, 2**f comes from a cubic and n is added into the exponent bits. Seven instructions in
    place of a multiply-add and one exp2 on the special-function unit (16 results a clock per SM, shared with
    tanh).

    The integer shift goes into the rounding constant, so that one FMA rounds the argument (y * scale + M - shift
    is M + n) and a second gives f = y * scale - (n + shift) with one rounding: an instruction fewer than rounding
    the argument after subtracting the shift (NOTES.md section 50). The rounding relies on (.. + M) - M being
    evaluated as written: so it is in the kernel (Mosaic GPU's float adds carry only LLVM's ``contract`` flag), but
    XLA's CPU compiler folds it under ``jax.jit``."""
    magic_less_shift = jnp.float32(_ROUNDING_MAGIC - shift)  # exact: an integer below 2**24
    scaled = y * jnp.float32(scale)
    shifted = scaled + magic_less_shift  # M + n, n = round(y * scale - shift); NVPTX fuses the multiply into both
    fraction = scaled - (shifted - magic_less_shift)  # shifted - (M - shift) = n + shift exactly
    mantissa = jnp.float32(_EXP2_COEFFICIENTS[0])
    for coefficient in _EXP2_COEFFICIENTS[1:]:
        mantissa = mantissa * fraction + jnp.float32(coefficient)
    # The low bits of ``shifted`` hold n (two's complement): shifted left by 23 they are n in the exponent field.
    bits = lax.bitcast_convert_type(mantissa, jnp.int32) + lax.shift_left(
        lax.bitcast_convert_type(shifted, jnp.int32), jnp.int32(23)
    )
    return lax.bitcast_convert_type(bits, jnp.float32)


def exp2_split(y, scale, shift: int, on_fma: int):
    """2**(y * scale - shift) of a [rows, columns] tile: the last ``on_fma`` columns by ``exp2_polynomial``, the
    others on the special-function unit."""
    def on_the_unit(x):
        return jnp.exp2(x * jnp.float32(scale) - jnp.float32(shift))

    on_unit = y.shape[1] - on_fma
    if on_fma == 0:
        return on_the_unit(y)
    if on_unit == 0:
        return exp2_polynomial(y, scale, shift)
    return jnp.concatenate([on_the_unit(y[:, :on_unit]), exp2_polynomial(y[:, on_unit:], scale, shift)], axis=1)


def default_exp2_fma(block_n: int) -> int:
    """Config.exp2_fma's default where it applies: five eighths of the key tile in whole 16-column steps (80 of
    128, 32 of 64), the fastest of 64, 80, 96 and 112 on an H100 at D=64 soft-capping (NOTES.md section 50)."""
    return block_n * 5 // 8 // 16 * 16


# The columns of a per-thread partial row sum (Config.row_sum_fold): in the wgmma layout a thread holds two
# adjacent columns of every eight, so an eight-column tile is the narrowest whose sum needs no other thread.
ROW_SUM_COLUMNS = 8


def fold_columns(x, columns: int, combine: Callable = jnp.add):
    """A [rows, n] tile's column blocks of width ``columns`` combined (added, by default): [rows, columns], by halves
    (no exchange between threads in the wgmma layout while ``columns`` is at least 8)."""
    while x.shape[1] > columns:
        half = x.shape[1] // 2
        x = combine(x[:, :half], x[:, half:])
    return x


def row_maximum(y, *, tree: bool):
    """Each row's maximum of a [rows, n] tile in the wgmma layout. ``tree``: the column halves' maxima first, down to
    ``ROW_SUM_COLUMNS`` (each step one independent max per register, no exchange between threads), then the rest;
    without, Mosaic GPU's reduction, one dependent chain per row and vector lane (Config.max_tree)."""
    if tree:
        y = fold_columns(y, ROW_SUM_COLUMNS, jnp.maximum)
    return y.max(axis=1)


def rescaled(acc, correction):
    """The accumulator's rows multiplied by the online softmax's correction (a [rows] vector). One function for
    both walks, which ``benchmarks.mosaic_sweep``'s no_rescale bound replaces (NOTES.md section 59)."""
    return acc * lax.broadcast_in_dim(correction, acc.shape, [0])


def persistent_schedule(program, total: int, num_programs: int):
    """Which work items persistent program ``program`` runs: (how many, the item number of its i-th).

    Items are dealt in rounds of ``num_programs``, one to each program, and every other round in reverse program
    order (a snake): program p takes p, 2P - 1 - p, 2P + p, ... Items are numbered head by head, the heaviest query
    tiles of a head first, so a plain round-robin hands some programs the heavy end of every head and others the
    light end (at 16 query tiles a head and 132 programs, 1.21× the mean load of a causal mask on the busiest
    program); reversing every other round pairs heavy with light (1.03×). Items in flight at once stay one round
    of consecutive items, a few heads whose keys and values are shared in L2. ``program`` may be traced.
    """
    full_rounds, last = divmod(total, num_programs)
    # The last round, partial, reaches the programs at its start: the first ones, or the last ones when reversed.
    in_last = program < last if full_rounds % 2 == 0 else program >= num_programs - last
    num_items = jnp.int32(full_rounds) + jnp.asarray(in_last).astype(jnp.int32)

    def work_of(i):
        position = jnp.where(lax.rem(i, 2) == 0, program, num_programs - 1 - program)
        return i * num_programs + position

    return num_items, work_of


def _kernel(*refs, plan: _Plan, score_mod: ModProgram, mask_mod: ModProgram, num_q_tiles: int, num_programs: int):
    q_ref, k_ref, v_ref, num_ref, idx_ref, *refs = refs
    full_num_ref = full_idx_ref = None
    if plan.has_full:
        full_num_ref, full_idx_ref, *refs = refs
    score_refs = refs[: plan.num_score_consts]
    mask_refs = refs[plan.num_score_consts : plan.num_score_consts + plan.num_mask_consts]
    refs = refs[plan.num_score_consts + plan.num_mask_consts :]
    # The repair launch reads which items run again and whether any does, and writes into the first launch's out
    # and lse (jax Refs).
    needs_ref = any_needed_ref = None
    if plan.repair:
        needs_ref, any_needed_ref, *refs = refs
    out_ref, lse_ref, *max_ref = refs
    # Only the one-buffer query fetch is gated by the repair's flags (``_Item.when_needed``).
    assert not plan.repair or plan.q_buffers == 1, plan
    block_n, stages, dtype = plan.block_n, plan.num_stages, plan.dtype
    value_dim = v_ref.shape[-1]
    head_dim = q_ref.shape[-1]
    list_refs = (num_ref, idx_ref, full_num_ref, full_idx_ref)

    # A persistent grid (see ``persistent_schedule``). The key/value ring and its barriers carry on from one item to
    # the next (``base`` counts the steps before the item), so the memory warpgroup fetches the next item's first
    # tiles while the compute warpgroups finish the current one.
    program = lax.axis_index("sm")
    total = num_q_tiles * plan.q_heads * out_ref.shape[0]
    num_items, work_of = persistent_schedule(program, total, num_programs)
    if plan.repair:
        # Where no item runs again (the common case), every program ends after one read, not after reading each of
        # its items' flags in turn.
        num_items = jnp.where(any_needed_ref[0] != 0, num_items, 0)

    def item(i):
        return _Item(work_of(i), plan, num_q_tiles, list_refs, needs_ref)

    def body(smem, ready, consumed, schedule, turns):
        q_buffers, k_smem, v_smem, lse_buffers, *max_buffers = smem
        k_ready, v_ready, q_ready = ready
        k_consumed, v_consumed = consumed
        wg = lax.axis_index("wg")

        def schedule_barrier():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        @pl.when(wg < COMPUTE_WARPGROUPS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            index_tiles = IndexTiles(plan.float_index_signs, block_n) if plan.float_index_signs else None

            # With two query buffers, item i's queries land in buffer i % 2 while item i - 1 runs; with one, at
            # the start of item i. Each item's output is staged back through its query buffer.
            def fetch_queries(i):
                q_tile, h, b = _item_coordinates(work_of(i), plan, num_q_tiles)
                buffer = lax.rem(i, plan.q_buffers)
                rows = pl.ds(q_tile * Q_TILE + wg * BLOCK_M, BLOCK_M)
                plgpu.copy_gmem_to_smem(
                    q_ref.at[b, h, rows], q_buffers.at[buffer, wg], q_ready.at[buffer * COMPUTE_WARPGROUPS + wg]
                )

            def run_item(i, base):
                it = item(i)
                b, h = it.b, it.h
                num_steps = it.num_steps
                q_base = it.q_tile * Q_TILE + wg * BLOCK_M
                buffer = lax.rem(i, plan.q_buffers)
                q_smem, lse_smem = q_buffers.at[buffer, wg], lse_buffers.at[buffer, wg]
                # The buffer about to be filled staged item i - 1's output: wait until that copy has read it.
                if plan.q_buffers == 2:

                    @pl.when(i + 1 < num_items)
                    def _():
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        fetch_queries(i + 1)

                else:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    it.when_needed(lambda: fetch_queries(i))

                def take_queries():
                    plgpu.barrier_wait(q_ready.at[buffer * COMPUTE_WARPGROUPS + wg])
                    if plan.query_scale != 1.0:
                        # Once per item here, in place of a multiply per score of every key tile
                        # (Config.scale_queries).
                        q = plgpu.load(q_smem, layout=plgpu.Layout.WGMMA)
                        q_smem[...] = (q.astype(jnp.float32) * jnp.float32(plan.query_scale)).astype(dtype)
                        plgpu.commit_smem()  # visible to the wgmmas, which read it through the async proxy

                it.when_needed(take_queries)

                row_layout = plgpu.Layout.WGMMA.reduce(1)
                # With the fixed shift the row maximum stays that shift in the values' units (never read).
                fixed_shift = plan.fixed_shift
                initial_max = _NEG_INF if fixed_shift is None else fixed_shift / plan.scaling.exp_scale
                row_max = plgpu.layout_cast(jnp.full((BLOCK_M,), initial_max, jnp.float32), row_layout)
                # With row_sum_fold each thread keeps its own columns' partial sums (ROW_SUM_COLUMNS of them a
                # row), reduced across the row's threads once, after the walk.
                row_sum = (plgpu.layout_cast(jnp.full((BLOCK_M, ROW_SUM_COLUMNS), 0.0, jnp.float32),
                                             plgpu.Layout.WGMMA)
                           if plan.row_sum_fold else
                           plgpu.layout_cast(jnp.full((BLOCK_M,), 0.0, jnp.float32), row_layout))
                acc = plgpu.layout_cast(jnp.full((BLOCK_M, value_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

                @pl.when(num_steps > 0)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(base, jnp.int32(stages))])

                if not plan.overlap:  # the overlapped walk hands turns over instead (see there)
                    pl.when(wg == 1)(schedule_barrier)

                def shift_of(row_max):
                    """A row maximum as the softmax's shift, in exp2's units: 0 for a row that has seen nothing
                    allowed, never -inf - -inf."""
                    return jnp.where(row_max == _NEG_INF, jnp.float32(0.0),
                                     row_max * jnp.float32(plan.scaling.exp_scale))

                def probabilities(s, step, row_max, row_sum, *, partial, convert=True, first=False):
                    """The online softmax of the scores of key tile ``step``: (P in the input dtype, or float32
                    without ``convert``; the new row maximum, the new row sum, the factor that rescales the
                    accumulator to the new maximum, None where it needs none). ``partial``: apply mask_mod (True),
                    not (False), or where a traced flag says. ``first``: the walk's first tile, whose maxima
                    anchor an anchored walk."""
                    apply_mask = plan.apply_mask_mod and partial is not False
                    needs_mask = plan.mask_kv_bounds or apply_mask
                    scaling = plan.scaling
                    if scaling.apply_score_mod or needs_mask:
                        first_key = it.walk.start(step)
                        q_idx = q_base + plgpu.broadcasted_iota(
                            jnp.int32, (BLOCK_M, block_n), 0, layout=plgpu.Layout.WGMMA
                        )
                        kv_idx = first_key + plgpu.broadcasted_iota(
                            jnp.int32, (BLOCK_M, block_n), 1, layout=plgpu.Layout.WGMMA
                        )
                    # The row maximum is taken before the softmax's scaling (SoftmaxScaling): one FMA a score.
                    y = s
                    if scaling.apply_score_mod:
                        if scaling.score_scale != 1.0:
                            y = y * jnp.float32(scaling.score_scale)
                        load = site_load(plan.score_sites, score_refs, q_base, first_key, (BLOCK_M, block_n))
                        float_indices = index_tiles.at(q_base, first_key) if index_tiles else None
                        y = as_tile(score_mod(
                            score_refs[: score_mod.num_consts], y, b, h, q_idx, kv_idx, load=load,
                            float_indices=float_indices,
                        ), (BLOCK_M, block_n), jnp.float32)
                    if scaling.value_scale != 1.0:
                        y = y * jnp.float32(scaling.value_scale)
                    if needs_mask:
                        allowed = None
                        if apply_mask:
                            load = site_load(plan.mask_sites, mask_refs, q_base, first_key, (BLOCK_M, block_n))
                            allowed = as_tile(mask_mod(mask_refs[: mask_mod.num_consts], b, h, q_idx, kv_idx,
                                                       load=load), (BLOCK_M, block_n), jnp.bool_)
                            if partial is not True:  # a traced flag: a full block allows every key
                                allowed = allowed | jnp.logical_not(partial)
                        if plan.mask_kv_bounds:
                            in_bounds = kv_idx < plan.kv_len
                            allowed = in_bounds if allowed is None else allowed & in_bounds
                        if not plan.exp2_fma:  # the polynomial takes finite values only: masked after it
                            y = jnp.where(allowed, y, jnp.float32(_NEG_INF))

                    exp_scale = jnp.float32(scaling.exp_scale)
                    if fixed_shift is not None:
                        # Every value lies within a known range of the shift: exp2 against it, a constant
                        # (Config.fixed_max, fixed_shift_of).
                        p = exp2_split(y, scaling.exp_scale, fixed_shift, plan.exp2_fma)
                        if plan.exp2_fma and needs_mask:
                            p = jnp.where(allowed, p, jnp.float32(0.0))
                        row_sum = row_sum + tile_row_sum(p)
                        return (p.astype(dtype) if convert else p), row_max, row_sum, None
                    if plan.anchored:
                        # The first tile's maxima stay the shift: no maximum, no rescaling after it.
                        if first:
                            row_max = row_maximum(y, tree=plan.max_tree)
                        shift = shift_of(row_max)
                        p = jnp.exp2(y * exp_scale - lax.broadcast_in_dim(shift, y.shape, [0]))
                        row_sum = row_sum + tile_row_sum(p)
                        return (p.astype(dtype) if convert else p), row_max, row_sum, None
                    new_max = jnp.maximum(row_max, row_maximum(y, tree=plan.max_tree))
                    # A row that has seen nothing allowed keeps -inf: exponentiate against 0.
                    shift = shift_of(new_max)
                    correction = jnp.exp2(row_max * exp_scale - shift)
                    p = jnp.exp2(y * exp_scale - lax.broadcast_in_dim(shift, y.shape, [0]))
                    rescale = lax.broadcast_in_dim(correction, row_sum.shape, [0]) if plan.row_sum_fold else correction
                    row_sum = row_sum * rescale + tile_row_sum(p)
                    return (p.astype(dtype) if convert else p), new_max, row_sum, correction

                def tile_row_sum(p):
                    return fold_columns(p, ROW_SUM_COLUMNS) if plan.row_sum_fold else p.sum(axis=1)

                def slot_of(step):
                    return lax.rem(base + step, jnp.int32(stages))

                def step_fn(step, carry, *, partial, first: bool = False):
                    acc, row_max, row_sum = carry
                    slot = slot_of(step)

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                        schedule_barrier()
                        return acc_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((BLOCK_M, block_n), jnp.float32))
                    plgpu.barrier_arrive(k_consumed.at[slot])
                    p_low, new_max, row_sum, correction = probabilities(
                        s, step, row_max, row_sum, partial=partial, first=first
                    )
                    if correction is not None:
                        acc = rescaled(acc, correction)
                    # Keep the softmax ahead of the barriers (LLVM would otherwise sink it past them; ptxas still
                    # moves the arrival up to the softmax's start, and keeping it after measured slower: NOTES.md
                    # section 72).
                    acc, row_sum, new_max, p_low = lax.optimization_barrier((acc, row_sum, new_max, p_low))
                    plgpu.barrier_arrive(schedule)
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_wait(schedule)

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p_low, v_smem.at[slot])
                        next_step = step + 1

                        @pl.when(next_step < num_steps)
                        def _():
                            plgpu.barrier_wait(k_ready.at[slot_of(next_step)])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_consumed.at[slot])
                    return acc, new_max, row_sum

                def overlapped_walk(s_ref, o_ref):
                    """The walk with each warpgroup's softmax of key tile j + 1 overlapping its own P V of tile j
                    (FlashAttention-3's intra-warpgroup pipelining): one turn on the tensor cores issues Q K^T of
                    tile j + 1 and P V of tile j together; the softmax waits for the first only, and the
                    accumulator is rescaled after the second. The warpgroups pass the tensor cores to each other
                    with a barrier each (wait for my turn, issue, hand over) rather than meeting on the shared
                    schedule barrier, so that one's softmax need not wait for the other's to end."""

                    def take_turn():
                        plgpu.barrier_wait(turns.at[wg])

                    def hand_over():
                        plgpu.barrier_arrive(turns.at[1 - wg])

                    def prologue(stats):
                        row_max, row_sum = stats
                        take_turn()
                        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot_of(0)].transpose((1, 0)))
                        hand_over()
                        s = s_ref[...]
                        plgpu.barrier_arrive(k_consumed.at[slot_of(0)])
                        p_low, row_max, row_sum, _ = probabilities(
                            s, jnp.int32(0), row_max, row_sum, partial=first_partial, first=True
                        )
                        return lax.optimization_barrier((p_low, row_max, row_sum))

                    def turn(j, carry, *, partial: bool):
                        p_low, row_max, row_sum = carry
                        slot, next_slot = slot_of(j), slot_of(j + 1)
                        plgpu.barrier_wait(k_ready.at[next_slot])
                        plgpu.barrier_wait(v_ready.at[slot])
                        take_turn()
                        s_ref[...] = plgpu.layout_cast(
                            jnp.full((BLOCK_M, block_n), 0.0, jnp.float32), plgpu.Layout.WGMMA
                        )
                        plgpu.wgmma(s_ref, q_smem, k_smem.at[next_slot].transpose((1, 0)))
                        plgpu.wgmma(o_ref, p_low, v_smem.at[slot])
                        hand_over()
                        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
                        plgpu.barrier_arrive(k_consumed.at[next_slot])
                        p, row_max, row_sum, correction = probabilities(
                            s, j + 1, row_max, row_sum, partial=partial, convert=False
                        )
                        o = plgpu.wgmma_accumulator_load(o_ref, wait_n=0)
                        plgpu.barrier_arrive(v_consumed.at[slot])
                        # A register operand of a wgmma defined while another wgmma is in flight makes ptxas
                        # serialize every wgmma of the kernel (its warning C7513): the new P, the operand of the
                        # next P V, is converted only now that this P V, reading the old one, has completed (the
                        # barrier orders the conversion after the wait), and the rescaled accumulator and P are
                        # computed here rather than sunk by LLVM towards their use behind the next Q K^T.
                        o, p = lax.optimization_barrier((o, p))
                        if correction is not None:
                            o = rescaled(o, correction)
                        p_low = p.astype(dtype)
                        o, p_low, row_max, row_sum = lax.optimization_barrier((o, p_low, row_max, row_sum))
                        o_ref[...] = o
                        return p_low, row_max, row_sum

                    def walk(stats):
                        carry = prologue(stats)
                        last = num_steps - 1
                        # Turn j computes the softmax of tile j + 1: partial while j + 1 < num_partial.
                        boundary = jnp.maximum(it.num_partial - 1, 0)
                        carry = lax.fori_loop(0, boundary, functools.partial(turn, partial=True), carry)
                        carry = lax.fori_loop(boundary, last, functools.partial(turn, partial=not plan.has_full),
                                              carry)
                        p_low, row_max, row_sum = carry
                        slot = slot_of(last)
                        plgpu.barrier_wait(v_ready.at[slot])
                        take_turn()
                        plgpu.wgmma(o_ref, p_low, v_smem.at[slot])
                        hand_over()
                        plgpu.wgmma_accumulator_load(o_ref, wait_n=0)
                        plgpu.barrier_arrive(v_consumed.at[slot])
                        return row_max, row_sum

                    stats = lax.cond(num_steps > 0, walk, lambda stats: stats, (row_max, row_sum))
                    return (o_ref[...], *stats)

                # Step 0 is a partial block unless the row lists none.
                first_partial = True if not plan.has_full else it.num_partial > 0
                if plan.overlap:
                    acc, row_max, row_sum = pl.run_scoped(
                        overlapped_walk,
                        plgpu.ACC((BLOCK_M, block_n), jnp.float32),
                        plgpu.ACC((BLOCK_M, value_dim), jnp.float32),
                    )
                else:
                    carry = (acc, row_max, row_sum)
                    if plan.anchored:  # the first step, anchoring the walk, on its own (none for an empty row)
                        carry = lax.fori_loop(0, jnp.minimum(num_steps, 1), functools.partial(
                            step_fn, partial=first_partial, first=True), carry)
                    carry = lax.fori_loop(int(plan.anchored), it.num_partial, functools.partial(step_fn, partial=True),
                                          carry)
                    if plan.has_full:
                        first_full = jnp.maximum(it.num_partial, 1) if plan.anchored else it.num_partial
                        carry = lax.fori_loop(first_full, num_steps, functools.partial(step_fn, partial=False), carry)
                    acc, row_max, row_sum = carry
                if not plan.overlap:
                    pl.when(wg == 0)(schedule_barrier)

                if plan.row_sum_fold:
                    row_sum = row_sum.sum(axis=1)
                has_any = row_sum > 0
                inverse = jnp.where(has_any, 1.0 / jnp.where(has_any, row_sum, 1.0), 0.0)
                out = acc * lax.broadcast_in_dim(inverse, acc.shape, [0])
                log2_sum = jnp.log2(jnp.where(has_any, row_sum, 1.0))
                # lse adds back the very shift the probabilities subtracted (the anchored walk's is 0 where its
                # first tile allowed nothing, and its row may still have a sum).
                max_shift = jnp.float32(fixed_shift) if fixed_shift is not None else shift_of(row_max)
                lse = jnp.where(has_any, (max_shift + log2_sum) * _LN_2, _NEG_INF)
                if plan.anchored:
                    # A row whose certificate fails gets lse NaN: its item runs again (flex_forward).
                    lse = jnp.where(anchor_certificate(row_max, row_sum, num_steps, plan), lse, jnp.nan)

                def write_back():
                    # The query tile is free again: stage the output through it (the next item waits for the
                    # reads).
                    q_smem[...] = out.astype(dtype)
                    lse_smem[...] = lse
                    if plan.with_max_scores:
                        # The maximum is of the value whose exp2(value * exp_scale) is exp(score) (SoftmaxScaling).
                        max_scores = row_max * jnp.float32(plan.scaling.exp_scale * _LN_2)
                        max_buffers[0].at[buffer, wg][...] = jnp.where(has_any, max_scores, _NEG_INF)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, h, pl.ds(q_base, BLOCK_M)])
                    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_base, BLOCK_M)])
                    if plan.with_max_scores:
                        plgpu.copy_smem_to_gmem(max_buffers[0].at[buffer, wg],
                                                max_ref[0].at[b, h, pl.ds(q_base, BLOCK_M)])

                it.when_needed(write_back)
                return base + num_steps

            if plan.overlap:
                # Warpgroup 0 has the first turn; from then on each turn's hand-over gives the next.
                pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turns.at[0]))
            if plan.q_buffers == 2:
                pl.when(num_items > 0)(lambda: fetch_queries(jnp.int32(0)))
            lax.fori_loop(0, num_items, run_item, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WARPGROUPS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def run_item(i, base):
                it = item(i)
                return stream_key_values(
                    k_ref, v_ref, (it.kv_batch, it.kv_head), k_smem, v_smem, (k_ready, v_ready),
                    (k_consumed, v_consumed), walk=it.walk, base=base, stages=stages,
                )

            in_copy_warps(lambda: lax.fori_loop(0, num_items, run_item, jnp.int32(0)), plan.copy_warps)

    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    pl.run_scoped(
        body,
        (
            plgpu.SMEM((plan.q_buffers, COMPUTE_WARPGROUPS, BLOCK_M, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_n, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_n, value_dim), dtype, transforms=transforms),
            *[plgpu.SMEM((plan.q_buffers, COMPUTE_WARPGROUPS, BLOCK_M), jnp.float32)] * (2 if plan.with_max_scores else 1),
        ),
        (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=plan.q_buffers * COMPUTE_WARPGROUPS),
        ),
        (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
        plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS) if plan.overlap else (),
        collective_axes="wg",
    )


def smem_bytes(head_dim: int, value_dim: int, block_n: int, num_stages: int, q_buffers: int) -> int:
    """Shared memory of the forward's buffers (2-byte inputs): query tiles, the key/value ring, the lse tiles and
    the max_scores tiles (counted whether or not they are asked for, so that a configuration fits either way)."""
    row_stats = 2 * 4 * q_buffers * Q_TILE
    return 2 * (q_buffers * Q_TILE * head_dim + num_stages * block_n * (head_dim + value_dim)) + row_stats


def walked_consts(program: ModProgram, consts: Sequence[jax.Array], sites: Sequence[ReadSite], q_pad: int,
                  kv_pad: int) -> tuple[tuple[jax.Array, ...], tuple[ReadSite, ...]]:
    """The kernel's inputs for ``program``'s captured arrays, and the sites that read them.

    A row (column) read at q_idx (kv_idx) itself walks its array's axis: padded to q_pad (kv_pad), repeating the
    last entry. A read at an offset gets a copy of its array of its own, appended to the consts (the site's
    ``source``), whose entry i along the axis is the array's entry i + offset, found as jnp indexing finds it (a
    negative position counts from the end, then positions are clamped into the array), so that the kernel reads
    the copy at q_idx. An offset known only at run time (``site.offset`` None) is computed here from the captured
    values, by evaluating the program's reads at ``_FAR``, as ``analyze_reads`` does.
    """
    originals, consts = tuple(consts), list(consts)
    runtime = _runtime_offsets(program, originals, sites) if any(s.offset is None for s in sites) else {}
    walked = []
    for number, site in enumerate(sites):
        if site.along_indices:
            target = q_pad if site.kind == "row" else kv_pad
            offset = runtime[number] if site.offset is None else site.offset
            if site.offset == 0:
                consts[site.const] = pad_axis(consts[site.const], site.axis, target, mode="edge")
            else:
                consts.append(_shifted(originals[site.const], site.axis, offset, target))
                site = dataclasses.replace(site, source=len(consts) - 1)
        walked.append(site)
    return tuple(consts), tuple(walked)


def _runtime_offsets(program: ModProgram, consts: Sequence[jax.Array], sites: Sequence[ReadSite]) -> dict:
    """{site number: the offset, an int32 scalar} of each row or column read of ``program`` on ``consts``.

    Read at ``_FAR``, as ``analyze_reads`` classifies them."""
    score, q_idx, kv_idx = _probe_tiles(program, _FAR, _FAR)
    remaining, offsets = iter(enumerate(sites)), {}

    def load(const, ref, index):
        number, site = next(remaining)
        if index is None:
            return ref[...]
        if site.along_indices:
            offsets[number] = jnp.asarray(index[site.axis], jnp.int32)[0, 0] - _FAR
        return ref[tuple(index)]  # clamped by jnp indexing

    program(consts, *score, jnp.int32(0), jnp.int32(0), q_idx, kv_idx, load=load, clamp_reads=False)
    return offsets


def _shifted(array: jax.Array, axis: int, offset, length: int) -> jax.Array:
    """``array`` along ``axis`` at positions offset, offset + 1, ... (``length`` of them), indexed as jnp indexes."""
    size = array.shape[axis]
    positions = jnp.arange(length, dtype=jnp.int32) + jnp.asarray(offset, jnp.int32)
    positions = jnp.where(positions < 0, positions + size, positions)
    return jnp.take(array, jnp.clip(positions, 0, size - 1), axis=axis)


# The softmax's fixed shift (Config.fixed_max), in log2 units (exp2's argument): how far below it a value may lie, so
# that its probability stays a normal number of P's dtype (2^-120 for bfloat16: float32's exponent range, 6 binades
# to spare; 2^-14 for float16), and how far above, so that neither P nor a row's sum over 2^30 keys of P times a
# value up to 2^30 overflows (2^64 for bfloat16 with float32 sums; 2^15 for float16's P, whose largest is 65504).
FIXED_SHIFT_BELOW = {jnp.dtype(jnp.bfloat16): 120.0, jnp.dtype(jnp.float16): 14.0}
FIXED_SHIFT_ABOVE = {jnp.dtype(jnp.bfloat16): 64.0, jnp.dtype(jnp.float16): 15.0}


def fixed_shift_of(score_mod: ModProgram, scaling: SoftmaxScaling, dtype) -> int | None:
    """The fixed shift of the softmax (Config.fixed_max), in exp2's units (values times ``exp_scale``), where
    ``score_mod`` is applied and bounds its result (``ModProgram.output_range``) to values (times ``value_scale``)
    in [low, high]; else None. An integer, which ``exp2_polynomial`` folds into its rounding: the bound rounded up
    where low then lies within ``FIXED_SHIFT_BELOW`` of it; else the lowest integer shift that keeps low within
    that distance, where high then lies within ``FIXED_SHIFT_ABOVE`` above it; else None. Soft-capping at
    cap c: values in [-1, 1] with ``exp_scale`` c log2(e), a span of 2.9 c: in bfloat16 the rounded bound up to a
    cap of 41, a shift below it up to 63 (Gemma 2's 50); in float16 up to 4.8 and 9.7."""
    bounds = score_mod.output_range if scaling.apply_score_mod else None
    if bounds is None:
        return None
    low, high = sorted(b * scaling.value_scale * scaling.exp_scale for b in bounds)
    dtype = jnp.dtype(dtype)
    below, above = FIXED_SHIFT_BELOW.get(dtype, 0.0), FIXED_SHIFT_ABOVE.get(dtype, 0.0)
    shift = math.ceil(high)
    if shift - low > below:
        shift = math.floor(low + below)
        if high - shift > above:
            return None
    if abs(shift) >= 2**22:  # exp2_polynomial's rounding constant less the shift must stay exact
        return None
    return shift


def anchor_certificate(row_max, row_sum, num_steps, plan: "_Plan"):
    """Whether each row of an anchored walk (Config.anchored_shift) is exact: its sum of probabilities at most
    2^FIXED_SHIFT_ABOVE (so no probability, sum or output overflowed), and, for a row the first tile allowed nothing
    (shifted by 0), at least kv_len 2^-(FIXED_SHIFT_BELOW - 10) (its largest probability then lies 16 binades or more
    above float32's smallest normal), or a walk of no tiles at all (nothing allowed: output 0, lse -inf). A row
    with a finite anchor has a sum of at least 1 by construction (its first tile's maximum gives 2^0). NaN sums
    fail.

    No headroom above the anchor: subtracting a further 40 (in exp2's units) would let later scores rise 40 more
    before a repair, but puts the largest probabilities' exp2 arguments near -40, where float32's spacing (2^-18) is
    8 times or more that of arguments within 8 of 0; a learned ALiBi slope's gradient, a sum over many keys that
    cancels, then missed the 1e-2 bound against the reference (1.08e-2 on an H200; NOTES.md section 60)."""
    above, below = FIXED_SHIFT_ABOVE[plan.dtype], FIXED_SHIFT_BELOW[plan.dtype]
    floor = jnp.float32(plan.kv_len * 2.0 ** -(below - 10))
    anchored = (row_max > _NEG_INF) | (row_sum >= floor) | (num_steps == 0)
    return (row_sum <= jnp.float32(2.0**above)) & anchored


def repair_gate(needs):
    """Whether any item runs again, as the repair launch reads it: [1] int32. Every program reads it first; without
    it each read every one of its items' flags in turn, about 4 µs a call (1.5% of the forward at B=8 S=2048 on an
    H100, NOTES.md section 61)."""
    return needs.max().reshape(1)


def repair_failed_items(repair_launch, inputs, out, lse, q_len: int):
    """The anchored walk's repair: the work items holding a row whose certificate failed (lse NaN) run again on the
    running maximum, writing over ``out`` and ``lse`` in place; the others only read their flag, and where none
    failed every program ends after reading ``repair_gate``. Rows past ``q_len`` (padding) are dropped anyway.
    ``repair_launch`` is the kernel of the repair plan, called on ``inputs``, the flags, the gate and the two refs.
    """
    batch, q_heads, q_pad = lse.shape
    failed = jnp.isnan(lse) & (jnp.arange(q_pad) < q_len)[None, None, :]
    needs = failed.reshape(batch, q_heads, q_pad // Q_TILE, Q_TILE).any(axis=-1).astype(jnp.int32)
    out_ref, lse_ref = jax.new_ref(out), jax.new_ref(lse)
    repair_launch(*inputs, needs, repair_gate(needs), out_ref, lse_ref)
    return out_ref[...], lse_ref[...]


def is_power_of_two(x: float) -> bool:
    """Whether ``x`` is a positive power of two (0.125 for head dim 64; not 128's 0.0884...)."""
    mantissa, _ = math.frexp(x)
    return x > 0 and mantissa == 0.5


def flex_forward(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_consts: Sequence[jax.Array],
    mask_consts: Sequence[jax.Array],
    kv_num_blocks: jax.Array,
    kv_indices: jax.Array,
    full_kv_num_blocks: jax.Array | None,
    full_kv_indices: jax.Array | None,
    *,
    score_mod: ModProgram,
    mask_mod: ModProgram,
    config: Config,
    mask_block_size: tuple[int, int],
    scale: float,
    with_max_scores: bool = False,
    for_backward: bool = False,
) -> tuple[jax.Array, ...]:
    """The forward kernel on plain arrays.

    Args:
      query [B, Hq, L, E], key [B, Hkv, S, E], value [B, Hkv, S, E]: bfloat16 or float16, E a multiple of 64 up
        to 256; Hq a multiple of Hkv. Key and value may have batch 1 (a cache every query batch reads, one copy).
      score_consts, mask_consts: the arrays hoisted for the mods (read at scalar indices only).
      kv_num_blocks [Bm, Hm, QB], kv_indices [Bm, Hm, QB, KVB] and the full pair (or None): the BlockMask. Its
        Q_BLOCK is a multiple of 128 and its KV_BLOCK of ``config.block_n``, unless it has one block on that axis.
      score_mod, mask_mod: programs traced for whole [64, block_n] tiles.
      config: the key tile and pipeline depth.
      mask_block_size: the BlockMask's (Q_BLOCK, KV_BLOCK).
      scale: multiplies q.k before score_mod.
      with_max_scores: also return each query's maximum modified score.
      for_backward: a backward will recompute the scores from the unscaled queries and take each probability as
        exp(score - lse). ``config.scale_queries`` unset then scales the queries only by a power of two, which
        their dtype holds exactly: lse of rounded scaled queries breaks the rows' sums of those probabilities
        by their rounding, and a gradient that sums score gradients over many keys (learned ALiBi slopes) loses
        its cancellation (1.6e-2 relative error measured on an H200, where bfloat16's rounding of the output alone
        gives 3e-3).

    Returns:
      out [B, Hq, L, E] in the query's dtype, lse [B, Hq, L] float32 (natural log; -inf and out 0 where a query
      attends nowhere), and with ``with_max_scores`` max_scores [B, Hq, L] float32 (-inf where it attends nowhere).
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len, value_dim = key.shape[1], key.shape[2], value.shape[3]
    mask_q_block, mask_kv_block = mask_block_size
    num_q_blocks, num_kv_blocks = kv_indices.shape[-2:]
    block_n = config.block_n
    assert num_q_blocks == 1 or mask_q_block % Q_TILE == 0, mask_block_size
    assert num_kv_blocks == 1 or mask_kv_block % block_n == 0, (mask_block_size, config)

    q_pad = -(-q_len // Q_TILE) * Q_TILE
    if num_kv_blocks == 1:
        kv_pad = -(-kv_len // block_n) * block_n
        kv_block = kv_pad
    else:
        kv_block = mask_kv_block
        kv_pad = num_kv_blocks * mask_kv_block
    # Literal factors around the score_mod (soft-capping's cap and 1 / cap) join the kernel's own multiplies.
    score_mod, scaling = fold_scalings(score_mod, scale)
    query_scale = 1.0
    scale_queries = config.scale_queries
    if scale_queries is None:
        scale_queries = not score_mod.applies_to_tiles(SPECIAL_FUNCTIONS) and (
            not for_backward or is_power_of_two(scaling.score_scale))
    if scale_queries and scaling.apply_score_mod and scaling.score_scale != 1.0:
        query_scale, scaling = scaling.score_scale, dataclasses.replace(scaling, score_scale=1.0)
    fixed_shift = None
    if config.fixed_max and not with_max_scores:
        fixed_shift = fixed_shift_of(score_mod, scaling, jnp.dtype(query.dtype))
    # bfloat16 only: float16's P overflows past 2^15, so later scores could rise only 10 (natural units) above the
    # anchor before an item runs again (Config.anchored_shift).
    anchored_shift = config.anchored_shift
    if anchored_shift is None:
        anchored_shift = not scaling.apply_score_mod
    anchored = (anchored_shift and fixed_shift is None and not with_max_scores
                and jnp.dtype(query.dtype) == jnp.bfloat16)
    # Soft-capping's tanh shares the special-function unit with the softmax's exp2: where that unit bounds the step
    # (head dim 64), most of the exp2 move to the FMA units; at 128, the row sums' exchanges go (NOTES.md sections
    # 49 and 50).
    # Both measured on an H100 only with the fixed maximum (which the polynomial needs), and only at 64 and 128.
    special_bounded = fixed_shift is not None and score_mod.applies_to_tiles(SPECIAL_FUNCTIONS)
    exp2_fma = config.exp2_fma
    if exp2_fma is None:
        exp2_fma = default_exp2_fma(block_n) if special_bounded and head_dim <= 64 else 0
    if fixed_shift is None:
        exp2_fma = 0  # the polynomial takes the fixed maximum's bounded argument only
    row_sum_fold = config.row_sum_fold
    if row_sum_fold is None:
        # Without a score_mod left to apply, and with a mask_mod of the indices alone (no captured array): full
        # attention +3% at 128 (section 51), causal +1-3%, prefix LM +2-3%, sliding window level (section 53).
        # Not with a score_mod (ALiBi folded -6-7%), nor with a mask reading an array: the document mask's partial
        # tiles compile to a longer loop folded, -10-20% (section 50).
        plain_mods = not scaling.apply_score_mod and not mask_consts
        row_sum_fold = (special_bounded or plain_mods) and 64 < head_dim <= 128
    float_index_signs = frozenset()
    # Below 2^23 a sum of two indices stays below 2^24, where float32 holds every integer (IndexTiles).
    if config.float_indices and max(q_pad, kv_pad) <= 2**23:
        score_mod = score_mod.with_index_bound(max(q_pad, kv_pad))
        float_index_signs = score_mod.float_index_uses()
    score_sites, problem = analyze_reads(score_mod, block_n)
    assert problem is None, problem
    mask_sites, problem = analyze_reads(mask_mod, block_n)
    assert problem is None, problem
    overlap = config.overlap
    if overlap is None:
        # Measured over the sustained window at 8K D=128 (section 54): causal +2%, sliding window +4%, prefix LM +2%,
        # per-head windows (a scalar read) +2-3%, full attention level; with a score_mod left (ALiBi -14%,
        # soft-capping -7%) or a mask reading an array along q_idx or kv_idx (document -9%) slower, and at D=64
        # slower on causal (-2-4%).
        reads_along_indices = any(site.along_indices for site in mask_sites)
        overlap = not scaling.apply_score_mod and not reads_along_indices and 64 < head_dim <= 128 and block_n == 128
    # Row and column reads load whole tiles: reach the padded lengths (the values there are masked or dropped).
    score_consts, score_sites = walked_consts(score_mod, score_consts, score_sites, q_pad, kv_pad)
    mask_consts, mask_sites = walked_consts(mask_mod, mask_consts, mask_sites, q_pad, kv_pad)
    query = pad_axis(query, 2, q_pad)
    key = pad_axis(key, 2, kv_pad)
    value = pad_axis(value, 2, kv_pad)
    has_full = full_kv_num_blocks is not None
    plan = _Plan(
        q_heads=q_heads,
        group=q_heads // kv_heads,
        shared_kv=key.shape[0] == 1 < batch,
        mask_batch=kv_num_blocks.shape[0],
        mask_heads=kv_num_blocks.shape[1],
        q_tiles_per_row=0 if num_q_blocks == 1 else mask_q_block // Q_TILE,
        kv_tiles_per_block=kv_block // block_n,
        kv_block=kv_block,
        kv_len=kv_len,
        mask_kv_bounds=kv_pad > kv_len,
        has_full=has_full,
        apply_mask_mod=not is_everywhere(mask_mod),
        scaling=scaling,
        query_scale=query_scale,
        fixed_shift=fixed_shift,
        exp2_fma=exp2_fma,
        row_sum_fold=row_sum_fold,
        max_tree=config.max_tree,
        anchored=anchored,
        repair=False,
        num_score_consts=len(score_consts),
        num_mask_consts=len(mask_consts),
        block_n=block_n,
        num_stages=config.num_stages,
        q_buffers=config.q_buffers,
        overlap=overlap,
        copy_warps=config.copy_warps,
        dtype=jnp.dtype(query.dtype),
        score_sites=score_sites,
        mask_sites=mask_sites,
        float_index_signs=float_index_signs,
        with_max_scores=with_max_scores,
    )
    num_q_tiles = q_pad // Q_TILE
    inputs = [query, key, value, kv_num_blocks.astype(jnp.int32), kv_indices.astype(jnp.int32)]
    if has_full:
        inputs += [full_kv_num_blocks.astype(jnp.int32), full_kv_indices.astype(jnp.int32)]
    inputs += [*score_consts, *mask_consts]
    num_programs = min(num_q_tiles * q_heads * batch, num_sms())
    kernel = functools.partial(
        _kernel, plan=plan, score_mod=score_mod, mask_mod=mask_mod, num_q_tiles=num_q_tiles, num_programs=num_programs
    )
    row_stats = 2 if with_max_scores else 1  # lse, and max_scores when asked for
    launch = functools.partial(
        plgpu.kernel,
        grid=(num_programs,),
        grid_names=("sm",),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    out, lse, *max_scores = launch(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct((batch, q_heads, q_pad, value_dim), query.dtype),
            *[jax.ShapeDtypeStruct((batch, q_heads, q_pad), jnp.float32)] * row_stats,
        ],
        kernel_name="flex_attention_forward_mosaic",  # what profilers list it as
    )(*inputs)
    if anchored:
        repair = dataclasses.replace(plan, anchored=False, repair=True, q_buffers=1)
        out, lse = repair_failed_items(
            launch(functools.partial(kernel, plan=repair), out_type=(),
                   kernel_name="flex_attention_forward_mosaic_repair"),
            inputs, out, lse, q_len,
        )
    if q_pad != q_len:
        out, lse, *max_scores = (x[:, :, :q_len] for x in (out, lse, *max_scores))
    return (out, lse, *max_scores)
