"""Mods inside kernels: hoisting the arrays they close over, and reading those arrays through refs.

A score_mod or mask_mod may close over arrays: document ids, a relative-position bias table, ALiBi slopes, a scalar
offset; concrete arrays or tracers of an outer ``jit``/``grad``/``vmap``. A Pallas kernel body may not close over
arrays ("captures constants ... pass them as inputs"), and the Triton lowering has no rule for ``gather`` on a
loaded value. So each mod goes through three steps:

1. **Trace** (``trace_mod``, in the same trace as the kernel call): the mod becomes a jaxpr for tile-shaped
   arguments; ``jax.make_jaxpr`` lists every captured array (concrete or traced) in its consts.
2. **Hoist**: the work that depends on captured arrays alone (``table * 2``, ``slopes.astype(...)``) runs now,
   outside the kernel, as ordinary JAX operations. What is left is a ``ModProgram`` (static: a jaxpr and some
   metadata, no arrays) and its ``consts``: the arrays the kernel must receive as inputs.
3. **Evaluate** (``ModProgram.__call__``, inside the kernel body): a small interpreter binds every primitive of the
   program on tile values, except that a read of a const (``gather``, ``dynamic_slice``) becomes a load from the
   const's ref with clamped integer index tiles, which lowers to pointer arithmetic. Any other use of a const loads
   it whole (``ref[...]``; a 0-d const is one scalar load).

For the backward pass, ``ModProgram.vjp`` turns every read of a floating const into an explicit input (the gathered
tile), differentiates the mod with respect to (score, gathered tiles) with ``jax.vjp``, and its pullback adds the
gathered tiles' cotangents into float32 gradient refs with ``jax.ref.addupdate`` (an atomic add on the GPU; repeated
indices add up). Hoisting happens *outside* any ``custom_vjp``: pass ``consts`` to it as differentiable primal
inputs, and JAX's own autodiff carries their gradients back through the hoisted work (``table * 2``) to the user's
arrays.

What a mod may do inside a kernel:

* any elementwise ``jnp``/``lax`` arithmetic, comparisons, ``where``, casts, broadcasting of the index tiles;
  ``jax.nn`` functions and ``jnp.clip`` (calls of ``jit``-ed, ``custom_jvp``, ``custom_vjp`` or ``checkpoint``-ed
  functions are inlined; where the mod is differentiated, a ``custom_jvp`` or ``custom_vjp`` call whose floating
  arguments are all tile-shaped, and which reads no captured array, is bound whole so that its rule gives the
  gradient; other such calls are inlined, and their body's derivative is taken);
* index captured arrays with the indices, in any combination, in one indexing expression each: ``ids[q_idx]``,
  ``ids[b, kv_idx]``, ``table[h, clip(q_idx - kv_idx, ...)]``, ``slopes[h]``, ``mask[b, h, q_idx, kv_idx]``,
  ``jnp.take``; negative indices wrap as in NumPy and out-of-range ones are clamped (``mode="fill"`` reads give the
  fill value);
* compute on captured arrays alone (that work is hoisted out of the kernel).

What raises a ``ValueError`` naming the mod when it is traced: indexing an array *computed inside the kernel*
(``jnp.arange(8)[h]``: index a captured array instead; ``table[h][column]``: write ``table[h, column]``), and passing captured arrays into ``cond``, ``while`` or
``scan``. On the GPU, every array value must have power-of-two dimensions; the index tiles already do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

__all__ = [
    "ModProgram",
    "peel_scalings",
    "SoftmaxScaling",
    "fold_scalings",
    "trace_mod",
    "trace_score_mod",
    "trace_mask_mod",
    "trace_for_tiles",
    "tile_avals",
    "tile_shape",
]

# Primitives whose body is inlined by the interpreter (so that reads of captured arrays inside them become ref loads),
# mapped to the parameter holding the body.
_INLINED_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "eval_jaxpr": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
}
# Calls carrying a user's derivative rule (jax.custom_jvp, jax.custom_vjp): inlined to evaluate, bound whole where
# the mod is differentiated, so that the rule, not the derivative of the primal body, applies.
_CUSTOM_RULE_CALLS = ("custom_jvp_call", "custom_vjp_call")
# Primitives that read a const through integer indices and become ref loads.
_READS = ("gather", "dynamic_slice")


def _body(eqn) -> tuple[jex_core.Jaxpr, Sequence[Any]] | None:
    """(jaxpr, consts) of an inlined call, or None if the equation is not one."""
    param = _INLINED_CALLS.get(eqn.primitive.name)
    if param is None or param not in eqn.params:
        return None
    body = eqn.params[param]
    if isinstance(body, jex_core.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


# ------------------------------------------------------------------------------------------------ the program


@dataclasses.dataclass(frozen=True, eq=False)
class _Site:
    """One read of a const: ``const[index]`` (``index`` None: the whole const), and its in-bounds mask."""

    const: int
    index: tuple[jax.Array, ...] | None
    value: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class ModProgram:
    """A mod traced for tiles, with its captured arrays hoisted out; static (holds no arrays), hashed by identity.

    Attributes:
      name: the mod's ``__name__``, for error messages.
      jaxpr: the program; its invars are ``num_consts`` const vars followed by the mod's arguments.
      num_consts: how many consts the kernel receives (``len(consts)`` from ``trace_mod``).
      const_avals: shape and dtype of each const.
      out_aval: shape and dtype of the mod's result.
      exact_indices: q_idx and kv_idx (the last two arguments) are known to lie in [0, 2^24), where float32 holds
        every int32 exactly (``with_index_bound``).
    """

    name: str
    jaxpr: jex_core.Jaxpr
    num_consts: int
    const_avals: tuple[jax.ShapeDtypeStruct, ...]
    out_aval: jax.ShapeDtypeStruct
    exact_indices: bool = False

    def with_index_bound(self, bound: int) -> ModProgram:
        """This program, told that its q_idx and kv_idx lie in [0, bound).

        Below 2^24 the interpreter evaluates ``float32(q_idx - kv_idx)`` (and ``+``) as ``float32(q_idx) -
        float32(kv_idx)``: the same bits, with one conversion per row or column of the tile instead of one per
        score, where the kernel passes the indices as vectors ([BM, 1] and [1, BN], as the Triton kernels do; with
        whole-tile indices it would cost a conversion more). A kernel whose per-score instructions bound it (the
        Triton forward at head dim 64 with ALiBi, benchmarks/NOTES.md section 25) saves an int-to-float conversion
        and an integer subtract per score.
        """
        return dataclasses.replace(self, exact_indices=True) if bound <= 2**24 else self

    def _interpreter(self, const_refs, load, fma=None, float_indices=None, differentiated=False, clamp_reads=True):
        index_vars = tuple(self.jaxpr.invars[-2:]) if self.exact_indices else ()
        return _Interpreter(const_refs, load, index_vars, fma, float_indices, keep_custom_rules=differentiated,
                            clamp_reads=clamp_reads)

    def calls(self, primitive_name: str) -> bool:
        """Whether the program, or a call inlined in it, binds ``primitive_name`` (``"custom_vjp_call"``)."""
        return self._binds(lambda eqn: eqn.primitive.name == primitive_name)

    def applies_to_tiles(self, primitive_names: Sequence[str]) -> bool:
        """Whether the program, or a call inlined in it, binds one of ``primitive_names`` to a value of more than one
        element (once per score, not once per tile as ALiBi's ``exp2`` of the head index)."""
        return self._binds(lambda eqn: eqn.primitive.name in primitive_names and _on_tiles(eqn))

    def _binds(self, matches: Callable) -> bool:
        def found(jaxpr) -> bool:
            return any(matches(eqn) or any(found(inner) for inner in _sub_jaxprs(eqn))
                       or (_body(eqn) is not None and found(_body(eqn)[0])) for eqn in jaxpr.eqns)

        return found(self.jaxpr)

    def float_index_uses(self) -> frozenset[tuple[int, int]]:
        """The (q_sign, kv_sign) of each float32 conversion of an index expression at the program's top level that
        a ``float_indices`` hook would serve (``float_index_signs``); empty unless ``exact_indices``."""
        if not self.exact_indices:
            return frozenset()
        index_vars = tuple(self.jaxpr.invars[-2:])
        producers = {v: eqn for eqn in self.jaxpr.eqns for v in eqn.outvars}
        uses = set()
        for eqn in self.jaxpr.eqns:
            if eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == jnp.float32:
                signs = float_index_signs(eqn.invars[0], index_vars, producers)
                if signs is not None:
                    uses.add(signs)
        return frozenset(uses)

    @property
    def output_range(self) -> tuple[float, float] | None:
        """Bounds of every value the program returns, where its last equation bounds it (tanh: [-1, 1], logistic:
        [0, 1]); None otherwise."""
        out = self.jaxpr.outvars[0]
        last = next((e for e in self.jaxpr.eqns if e.outvars[0] is out), None)
        return None if last is None else _BOUNDED_PRIMITIVES.get(last.primitive.name)

    @property
    def is_identity(self) -> bool:
        """A score_mod that returns its score argument unchanged (no equations)."""
        return not self.jaxpr.eqns and self.jaxpr.outvars[0] is self.jaxpr.invars[self.num_consts]

    @property
    def differentiable(self) -> tuple[bool, ...]:
        """For each const, whether it is floating (gets a gradient in the backward pass)."""
        return tuple(bool(jnp.issubdtype(a.dtype, jnp.inexact)) for a in self.const_avals)

    def __call__(
        self,
        const_refs: Sequence[Any],
        *args,
        load: Callable | None = None,
        fma: Callable | None = None,
        float_indices: Callable | None = None,
        clamp_reads: bool = True,
    ):
        """Evaluates the mod on tiles; ``const_refs`` are the consts' refs (or the arrays themselves, off-kernel).

        ``load(const, ref, index)`` reads a const (``index`` None: the whole const, else a tuple of int scalars or
        tiles); the default indexes the ref, which suits the Triton lowering. ``fma(a, b, c)``, if given, computes
        ``a * b + c`` rounded once: a float32 product used only by a sum (``x * y + z``, ``z + x * y``,
        ``x * y - z``) is evaluated through it, the contraction that the GPU compiler does not make by itself for
        the Triton kernels (benchmarks/NOTES.md section 29). Not for differentiation: ``vjp`` and ``derivative``
        evaluate products and sums apart.

        ``float_indices(q_sign, kv_sign)``, if given (and ``exact_indices``), returns the float32 tile of ``q_sign *
        q_idx + kv_sign * kv_idx`` (each sign -1, 0 or 1), built as the kernel finds cheapest: a conversion to
        float32 of ``q_idx``, ``kv_idx``, their sum or either difference is taken from it instead of converting
        the integer tile score by score (``float_index_signs``).

        ``clamp_reads=False`` gives ``load`` the indices as the mod computes them, not clamped into the const (for
        an analysis of the reads; the loads themselves must then clamp).
        """
        interpreter = self._interpreter(const_refs, load or _plain_load, fma, float_indices, clamp_reads=clamp_reads)
        return interpreter(self.jaxpr, args)

    def vjp(self, const_refs: Sequence[Any], *args, load: Callable | None = None):
        """Evaluates the mod and returns ``(out, pullback)``, differentiating with respect to ``args[0]``.

        ``pullback(d_out, grad_refs)`` returns the cotangent of ``args[0]`` (the score tile) and adds the cotangents
        of the floating consts into ``grad_refs`` (one float32 ref per const, of the const's shape, or None to skip
        it) with ``jax.ref.addupdate``. ``d_out`` must be zero at positions that are masked or out of bounds: their
        indices may repeat real positions' indices (they are clamped). ``load`` as for ``__call__``; it is called
        once per read (the differentiated evaluation reuses the values read).
        """
        recorder = _Recorder(load or _plain_load)
        self._interpreter(const_refs, recorder.load)(self.jaxpr, args)
        sites = recorder.sites

        def with_reads(first, values):
            substitute = _Substitute(self.differentiable, sites, values)
            interpreter = self._interpreter(const_refs, substitute.load, differentiated=True)
            return interpreter(self.jaxpr, (first, *args[1:]))

        differentiable_sites = [site for site in sites if self.differentiable[site.const]]
        out, vjp_fn = jax.vjp(with_reads, args[0], [site.value for site in differentiable_sites])

        def pullback(d_out, grad_refs: Sequence[Any]):
            d_first, d_values = vjp_fn(d_out)
            for site, d_value in zip(differentiable_sites, d_values):
                grad_ref = grad_refs[site.const]
                if grad_ref is None:
                    continue
                d_value = d_value.astype(jnp.float32)
                jax.ref.addupdate(grad_ref, ... if site.index is None else site.index, d_value)
            return d_first

        return out, pullback

    def derivative(self, const_refs: Sequence[Any], *args, ones=None, load: Callable | None = None,
                   replay_reads: bool = False):
        """Evaluates the mod and its derivative with respect to ``args[0]``: ``(out, d out / d args[0])``.

        A score_mod is a function of each score alone (the reference applies it to one score at a time), so its
        Jacobian on a tile is diagonal and one forward-mode pass with a tangent of ones gives the whole of it: the
        score's cotangent is then ``derivative * d_out``, a product that can be formed before ``d_out`` is known.
        No gradient reaches the consts. ``ones``: the tangent, where a kernel needs it built in its own layout
        (default ``ones_like(args[0])``); ``load`` as for ``__call__``. ``replay_reads``: ``load`` makes reads that
        have no differentiation rule (Mosaic GPU's vector loads): they are made before the differentiated
        evaluation, which replays their values.
        """
        load = load or _plain_load
        if replay_reads and self.num_consts:
            # A load of a ref is differentiated even when no tangent reaches it, and a kernel's own loads have no
            # rule. The first evaluation's arithmetic is dead code.
            recorder = _Recorder(load)
            self._interpreter(const_refs, recorder.load)(self.jaxpr, args)
            load = _Substitute([False] * self.num_consts, recorder.sites, ()).load
        interpreter = self._interpreter(const_refs, load, differentiated=True)
        tangent = jnp.ones_like(args[0]) if ones is None else ones
        return jax.jvp(lambda first: interpreter(self.jaxpr, (first, *args[1:])), (args[0],), (tangent,))


def _plain_load(const: int, ref, index):
    return ref[...] if index is None else ref[index]


class _Recorder:
    """Loads consts through ``load`` and records each read, in evaluation order."""

    def __init__(self, load: Callable):
        self.inner = load
        self.sites: list[_Site] = []

    def load(self, const, ref, index):
        value = self.inner(const, ref, index)
        self.sites.append(_Site(const, index, value))
        return value


class _Substitute:
    """Replays the recorded reads in evaluation order: the floating consts' by the given values (the vjp's inputs),
    the others by the values read."""

    def __init__(self, differentiable, sites, values):
        self.differentiable = differentiable
        self.sites = iter(sites)
        self.values = iter(values)

    def load(self, const, ref, index):
        site = next(self.sites)
        assert site.const == const, (site.const, const)
        return next(self.values) if self.differentiable[const] else site.value


# --------------------------------------------------------------------------------------------- the interpreter


def float_index_signs(x, index_vars: tuple, producers: Mapping) -> tuple[int, int] | None:
    """Whether integer var ``x`` is ``q_sign * q_idx + kv_sign * kv_idx`` with each sign -1, 0 or 1 (one index, the
    sum of the two or a difference, written directly on the mod's arguments): the signs, else None. ``index_vars``
    is (q_idx, kv_idx), or empty where the indices may not convert to float32 exactly."""
    if not index_vars or isinstance(x, jex_core.Literal):
        return None
    q_var, kv_var = index_vars
    if x is q_var:
        return 1, 0
    if x is kv_var:
        return 0, 1
    producer = producers.get(x)
    if producer is None or producer.primitive.name not in ("add", "sub"):
        return None
    first, second = producer.invars
    if {id(first), id(second)} != {id(q_var), id(kv_var)}:
        return None
    sign = -1 if producer.primitive.name == "sub" else 1
    return (1, sign) if first is q_var else (sign, 1)


@dataclasses.dataclass(frozen=True, eq=False)
class _ConstRef:
    """An environment entry standing for const number ``const``, read through ``ref``."""

    const: int
    ref: Any
    aval: Any


# Primitives whose every result lies in a fixed interval (ModProgram.output_range).
_BOUNDED_PRIMITIVES = {"tanh": (-1.0, 1.0), "logistic": (0.0, 1.0)}


def _on_tiles(eqn) -> bool:
    """Whether the equation makes a value of more than one element: once per score, not once per tile (a function of
    the head index)."""
    return any(math.prod(getattr(v.aval, "shape", ())) > 1 for v in eqn.outvars)


class _Interpreter:
    """Evaluates a program on demand, from its outputs back, so that index arithmetic jnp builds for a gather
    (``concatenate`` of broadcast index tiles, 3-D values the Triton lowering would reject) is never materialised:
    a read of a const takes the concatenated pieces directly."""

    def __init__(
        self,
        const_refs,
        load: Callable,
        index_vars: tuple = (),
        fma: Callable | None = None,
        float_indices: Callable | None = None,
        keep_custom_rules: bool = False,
        clamp_reads: bool = True,
    ):
        self.const_refs = const_refs
        self.load = load
        self.index_vars = index_vars  # the top-level (q_idx, kv_idx) vars, where ModProgram.exact_indices
        self.fma = fma  # a * b + c rounded once, for float32 products used only by a sum (ModProgram.__call__)
        self.float_indices = float_indices  # (q_sign, kv_sign) -> float32 tile (ModProgram.__call__)
        self.whole = {}  # const -> value loaded whole, so that each const is loaded at most once
        # Where the mod is differentiated, custom derivative rules are kept (_CUSTOM_RULE_CALLS).
        self.keep_custom_rules = keep_custom_rules
        self.clamp_reads = clamp_reads  # False: loads see the indices as computed (ModProgram.__call__)

    def __call__(self, jaxpr, args):
        assert len(self.const_refs) <= len(jaxpr.invars)
        consts = [_ConstRef(i, ref, v.aval) for i, (ref, v) in enumerate(zip(self.const_refs, jaxpr.invars))]
        return self.run(jaxpr, (), [*consts, *args])[0]

    def run(self, jaxpr, consts, args):
        env: dict[Any, Any] = {}
        producers = {}
        uses: dict[Any, int] = {}
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                producers[v] = eqn
            for v in eqn.invars:
                if isinstance(v, jex_core.Var):
                    uses[v] = uses.get(v, 0) + 1
        for v in jaxpr.outvars:
            if isinstance(v, jex_core.Var):
                uses[v] = uses.get(v, 0) + 1
        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, args):
            env[v] = x

        def read_raw(v):
            """The environment entry of v (a _ConstRef stays one), evaluating its equation first if needed."""
            if isinstance(v, jex_core.Literal):
                return v.val
            if v not in env:
                eqn = producers[v]
                outs = self.eval_eqn(eqn, read_raw, producers, uses)
                for o, x in zip(eqn.outvars, outs):
                    env[o] = x
            return env[v]

        return [self.value(read_raw(v)) for v in jaxpr.outvars]

    def value(self, x):
        """A plain value: a const is loaded whole (once)."""
        if isinstance(x, _ConstRef):
            if x.const not in self.whole:
                self.whole[x.const] = self.load(x.const, x.ref, None)
            return self.whole[x.const]
        return x

    def eval_eqn(self, eqn, read_raw, producers, uses):
        name = eqn.primitive.name
        if name == "convert_element_type" and self.index_vars:
            converted = self.float_index_sum(eqn, read_raw, producers)
            if converted is not None:
                return [converted]
        if name in ("add", "sub") and self.fma is not None:
            contracted = self.contract(eqn, read_raw, producers, uses)
            if contracted is not None:
                return [contracted]
        if name in _READS:
            operand = read_raw(eqn.invars[0])
            if isinstance(operand, _ConstRef):
                if name == "gather":
                    return [self.gather(eqn, operand, read_raw, producers)]
                return [self.dynamic_slice(eqn, operand, read_raw)]
        body = _body(eqn)
        if body is not None and self.keep_custom_rules and name in _CUSTOM_RULE_CALLS:
            args = [read_raw(v) for v in eqn.invars]
            # Bound whole, so that JAX's autodiff applies the user's rule, not the derivative of the body; only
            # where the call is elementwise on the tile: its floating arguments of the result's shape (a rule for a
            # scalar table[h] would give a tile's cotangent) and no captured array (read through its indices).
            shape = eqn.outvars[0].aval.shape
            if not any(isinstance(x, _ConstRef) for x in args) and all(
                jnp.shape(x) == shape for x in args if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
            ):
                return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
        if body is not None:
            jaxpr, consts = body
            args = [read_raw(v) for v in eqn.invars]
            return self.run(jaxpr, consts, args)
        args = [self.value(read_raw(v)) for v in eqn.invars]
        outs = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
        return outs if eqn.primitive.multiple_results else [outs]

    def contract(self, eqn, read_raw, producers, uses):
        """A float32 ``x * y + z``, ``z + x * y`` or ``x * y - z`` as ``fma(x, y, +-z)``, where the product is used
        by this sum alone (so it is never needed apart); else None."""
        if eqn.outvars[0].aval.dtype != jnp.float32:
            return None
        operands = list(eqn.invars)
        # For "sub" only the minuend may be the product: z - x * y would need a negated product.
        candidates = (0,) if eqn.primitive.name == "sub" else (0, 1)
        for position in candidates:
            v = operands[position]
            product = producers.get(v) if isinstance(v, jex_core.Var) else None
            if (
                product is None
                or product.primitive.name != "mul"
                or uses.get(v) != 1
                or any(u.aval.dtype != jnp.float32 for u in product.invars)
            ):
                continue
            x, y = (self.value(read_raw(u)) for u in product.invars)
            z = self.value(read_raw(operands[1 - position]))
            return self.fma(x, y, -z if eqn.primitive.name == "sub" else z)
        return None

    def float_index_sum(self, eqn, read_raw, producers):
        """``float32(i - j)`` or ``float32(i + j)`` of the index arguments as ``float32(i) -/+ float32(j)``, else None.

        The same bits for indices in [0, 2^24): both convert exactly, neither int32 sum overflows, and both sides
        round the exact result once. Where the indices are [BM, 1] and [1, BN] vectors, the conversions act on them,
        not on the [BM, BN] tile. With a ``float_indices`` hook, that conversion and the bare ``float32(i)`` come
        from the hook.
        """
        (x,) = eqn.invars
        if eqn.params["new_dtype"] != jnp.float32:
            return None
        signs = float_index_signs(x, self.index_vars, producers)
        if signs is None:
            return None
        if self.float_indices is not None:
            return self.float_indices(*signs)
        if 0 in signs:  # a bare index: its own conversion is the cheapest
            return None
        first, second = (self.value(read_raw(v)).astype(jnp.float32) for v in producers[x].invars)
        return first - second if producers[x].primitive.name == "sub" else first + second

    # -------------------------------------------------------------------------------------- reads of consts

    def read_const(self, operand: _ConstRef, starts, slice_sizes, offset_dims, out_shape, fill_value, fill):
        """``out[...] = const[starts + offsets]`` for every output element.

        starts[d]: an int value broadcastable to ``out_shape`` (or a scalar), the start in operand dim d;
        offset_dims[d]: the output dim walking operand dim d (its slice has more than one element), or None.
        """
        shape = operand.aval.shape
        index = []
        in_bounds = None
        for d, (start, size) in enumerate(zip(starts, slice_sizes)):
            start = jnp.asarray(start).astype(jnp.int32)
            upper = shape[d] - size
            if fill:
                ok = (start >= 0) & (start <= upper)
                in_bounds = ok if in_bounds is None else in_bounds & ok
            # Out-of-range reads are not checked on the GPU: clamp, as XLA's gather does.
            if self.clamp_reads:
                start = jnp.clip(start, 0, upper)
            if offset_dims[d] is not None:
                iota_shape = [1] * len(out_shape)
                iota_shape[offset_dims[d]] = size
                offsets = lax.broadcasted_iota(jnp.int32, tuple(iota_shape), offset_dims[d])
                start = start + offsets  # start is a scalar or already has the output's rank
            index.append(start)
        if any(i.ndim for i in index):
            index = [i if i.ndim == 0 else jnp.broadcast_to(i, out_shape) for i in index]
        value = self.load(operand.const, operand.ref, tuple(index))
        if value.shape != tuple(out_shape):
            value = lax.broadcast_in_dim(value, out_shape, ()) if value.ndim == 0 else value.reshape(out_shape)
        if in_bounds is not None:
            if in_bounds.shape != tuple(out_shape):
                in_bounds = jnp.broadcast_to(in_bounds, out_shape)
            value = jnp.where(in_bounds, value, jnp.asarray(fill_value, value.dtype))
        return value

    def index_components(self, var, count, read_raw, producers):
        """The ``count`` index columns of a gather's indices [..., count], without building the [..., count] array
        when jnp built it by concatenating broadcast pieces."""
        eqn = producers.get(var)
        rank = var.aval.ndim
        if eqn is not None and eqn.primitive.name == "concatenate" and eqn.params["dimension"] == rank - 1:
            pieces = []
            for piece in eqn.invars:
                width = piece.aval.shape[-1]
                if width == 1:
                    pieces.append(self.squeeze_last(piece, read_raw, producers))
                else:
                    value = self.value(read_raw(piece))
                    pieces.extend(value[..., k] for k in range(width))
            if len(pieces) == count:
                return pieces
        value = self.value(read_raw(var))
        return [value[..., k] for k in range(count)]

    def squeeze_last(self, var, read_raw, producers):
        """var [..., 1] without its last axis, reading through a broadcast_in_dim that only appended it; a scalar
        broadcast to a tile (``ids[b, q_idx]`` broadcasts b) stays the scalar."""
        eqn = producers.get(var)
        if eqn is not None and eqn.primitive.name == "broadcast_in_dim":
            src = eqn.invars[0]
            rank = var.aval.ndim
            if (
                tuple(eqn.params["broadcast_dimensions"]) == tuple(range(rank - 1))
                and tuple(src.aval.shape) == tuple(var.aval.shape[:-1])
            ):
                inner = producers.get(src)
                if (
                    inner is not None
                    and inner.primitive.name == "broadcast_in_dim"
                    and not isinstance(inner.invars[0], jex_core.Literal)
                    and inner.invars[0].aval.ndim == 0
                ):
                    return self.value(read_raw(inner.invars[0]))
                return self.value(read_raw(src))
        return self.value(read_raw(var))[..., 0]

    def gather(self, eqn, operand: _ConstRef, read_raw, producers):
        dnums = eqn.params["dimension_numbers"]
        slice_sizes = tuple(eqn.params["slice_sizes"])
        mode = eqn.params["mode"]
        out_shape = tuple(eqn.outvars[0].aval.shape)
        indices_var = eqn.invars[1]
        columns = self.index_components(indices_var, len(dnums.start_index_map), read_raw, producers)
        batch_rank = indices_var.aval.ndim - 1
        batch_positions = [p for p in range(len(out_shape)) if p not in dnums.offset_dims]
        assert len(batch_positions) == batch_rank, (batch_positions, indices_var.aval)

        def to_output_rank(x):
            # An index column has the indices' batch shape; put its axes at the output's batch positions.
            x = jnp.asarray(x)
            if x.ndim == 0:
                return x
            return lax.broadcast_in_dim(
                x, tuple(out_shape[p] if p in batch_positions else 1 for p in range(len(out_shape))), batch_positions
            ) if x.shape != tuple(out_shape) else x

        rank = len(operand.aval.shape)
        starts = [jnp.int32(0)] * rank
        for k, d in enumerate(dnums.start_index_map):
            starts[d] = to_output_rank(columns[k])
        for operand_dim, indices_dim in zip(dnums.operand_batching_dims, dnums.start_indices_batching_dims):
            position = batch_positions[indices_dim]
            starts[operand_dim] = lax.broadcasted_iota(
                jnp.int32, tuple(out_shape[p] if p == position else 1 for p in range(len(out_shape))), position
            )
        walking = [
            d for d in range(rank) if d not in dnums.collapsed_slice_dims and d not in dnums.operand_batching_dims
        ]
        offset_dims = [None] * rank
        for d, position in zip(walking, dnums.offset_dims):
            offset_dims[d] = position
        fill = mode == lax.GatherScatterMode.FILL_OR_DROP
        fill_value = eqn.params["fill_value"]
        if fill and fill_value is None:
            fill_value = _default_fill(operand.aval.dtype)
        return self.read_const(operand, starts, slice_sizes, offset_dims, out_shape, fill_value, fill)

    def dynamic_slice(self, eqn, operand: _ConstRef, read_raw):
        slice_sizes = tuple(eqn.params["slice_sizes"])
        starts = [self.value(read_raw(v)) for v in eqn.invars[1 : 1 + len(slice_sizes)]]
        out_shape = tuple(eqn.outvars[0].aval.shape)
        offset_dims = [d if size > 1 else None for d, size in enumerate(slice_sizes)]
        return self.read_const(operand, starts, slice_sizes, offset_dims, out_shape, None, False)


def _default_fill(dtype):
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return np.nan
    if jnp.issubdtype(dtype, jnp.signedinteger):
        return jnp.iinfo(dtype).min
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        return jnp.iinfo(dtype).max
    return True


# ----------------------------------------------------------------------------------------- tracing, hoisting


TILE_LAYOUTS = ("broadcast", "full", "transposed")


def tile_shape(block_m: int, block_n: int, layout: str = "broadcast") -> tuple[int, int]:
    """The score tile's shape for ``block_m`` queries and ``block_n`` keys: [BN, BM] when transposed."""
    return (block_n, block_m) if layout == "transposed" else (block_m, block_n)


def tile_avals(
    block_m: int, block_n: int, *, score: bool, layout: str = "broadcast"
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The abstract arguments mods receive in kernels: (score f32,) b, h, q_idx, kv_idx for a tile of ``block_m``
    queries and ``block_n`` keys. ``layout`` says how a kernel holds the tile:

    * ``"broadcast"``: score [BM, BN], q_idx [BM, 1], kv_idx [1, BN] (the Triton kernels);
    * ``"full"``: both index tiles [BM, BN] too (the Mosaic GPU kernels, whose register layouts are whole tiles);
    * ``"transposed"``: score [BN, BM], q_idx [1, BM], kv_idx [BN, 1] (a dK/dV kernel computing S^T = K Q^T).
    """
    if layout not in TILE_LAYOUTS:
        raise ValueError(f"tile layout must be one of {TILE_LAYOUTS}, got {layout!r}")
    i32 = jnp.int32
    shape = tile_shape(block_m, block_n, layout)
    q_shape = {"broadcast": (block_m, 1), "full": shape, "transposed": (1, block_m)}[layout]
    kv_shape = {"broadcast": (1, block_n), "full": shape, "transposed": (block_n, 1)}[layout]
    avals = (
        jax.ShapeDtypeStruct((), i32),
        jax.ShapeDtypeStruct((), i32),
        jax.ShapeDtypeStruct(q_shape, i32),
        jax.ShapeDtypeStruct(kv_shape, i32),
    )
    return ((jax.ShapeDtypeStruct(shape, jnp.float32),) if score else ()) + avals


def trace_mod(fn: Callable, arg_avals: Sequence[jax.ShapeDtypeStruct], *, name: str = "mod"):
    """Traces ``fn`` for ``arg_avals`` and hoists the work on its captured arrays.

    Call it in the trace where the kernel is called (never cache the consts across traces: they may be tracers).

    Args:
      fn: the mod.
      arg_avals: its arguments' shapes and dtypes (see ``tile_avals``).
      name: what the mod is, for error messages (``"score_mod"``, ``"mask_mod"``).

    Returns:
      ``(program, consts)``: a static ``ModProgram`` and a tuple of arrays to pass to the kernel as inputs, in
      order; inside the kernel, call ``program(const_refs, *args)``.

    Raises:
      ValueError: the mod does something that cannot run inside a kernel (see the module docstring).
    """
    # Through a new function: make_jaxpr keeps the trace of a function it has seen, with the arrays it read then
    # (a global rebound since, ``doc_ids = batch_ids``, would be missed).
    closed = jax.make_jaxpr(lambda *args: fn(*args))(*arg_avals)
    jaxpr = closed.jaxpr
    label = f"{name} {getattr(fn, '__name__', repr(fn))!r}"

    # Hoist: evaluate, here, the equations whose inputs derive from captured arrays alone. Not a broadcast to the
    # shape of an argument (``jnp.full_like(score, c)``): its result would depend on the tile, which differs from
    # kernel to kernel, and the kernel broadcasts in registers for free.
    tile_shapes = {tuple(a.shape) for a in arg_avals if len(a.shape)}
    known: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts))
    kept = []
    for eqn in jaxpr.eqns:
        var_inputs = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
        to_tile = eqn.primitive.name == "broadcast_in_dim" and tuple(eqn.params["shape"]) in tile_shapes
        if var_inputs and all(v in known for v in var_inputs) and not eqn.effects and not to_tile:
            args = [v.val if isinstance(v, jex_core.Literal) else known[v] for v in eqn.invars]
            outs = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
            for v, x in zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]):
                known[v] = x
        else:
            kept.append(eqn)

    # The consts the remaining program reads, in a fixed order.
    used = []
    for eqn in kept:
        used.extend(v for v in eqn.invars if not isinstance(v, jex_core.Literal) and v in known)
    used.extend(v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal) and v in known)
    const_vars = list(dict.fromkeys(used))
    consts = tuple(jnp.asarray(known[v]) for v in const_vars)

    program_jaxpr = jaxpr.replace(constvars=[], invars=[*const_vars, *jaxpr.invars], eqns=kept)
    _check_kernel_safe(program_jaxpr, set(const_vars), label)
    out_aval = jax.ShapeDtypeStruct(jaxpr.outvars[0].aval.shape, jaxpr.outvars[0].aval.dtype)
    const_avals = tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in consts)
    program = ModProgram(label, program_jaxpr, len(consts), const_avals, out_aval)
    return program, consts


def _is_in(v, variables: set) -> bool:
    return not isinstance(v, jex_core.Literal) and v in variables


def _check_kernel_safe(jaxpr, const_vars: set, label: str) -> None:
    """Raises for reads of arrays computed inside the kernel, and captured arrays passed into control flow."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _READS and not _is_in(eqn.invars[0], const_vars):
            raise ValueError(
                f"{label} indexes an array computed from its arguments ({name} of "
                f"{eqn.invars[0].aval.str_short()}); inside a kernel only arrays the mod closes over can be indexed, "
                "each in one indexing expression (table[h, column], not table[h][column]). Build the array outside "
                "the mod and close over it"
            )
        body = _body(eqn)
        if body is not None:
            inner, inner_consts = body
            if inner_consts:
                raise ValueError(f"{label} calls a function with embedded constants ({name}); close over them instead")
            inner_const_vars = {iv for iv, v in zip(inner.invars, eqn.invars) if _is_in(v, const_vars)}
            _check_kernel_safe(inner, inner_const_vars, label)
            continue
        if any(True for _ in _sub_jaxprs(eqn)):
            if any(_is_in(v, const_vars) for v in eqn.invars):
                raise ValueError(
                    f"{label} passes an array it closes over into {name}; inside a kernel captured arrays can be "
                    "indexed and combined elementwise, not used in control flow"
                )
            for inner in _sub_jaxprs(eqn):
                _check_kernel_safe(inner, set(), label)


def trace_score_mod(score_mod: Callable, block_m: int, block_n: int, layout: str = "broadcast"):
    """``trace_mod`` for a score_mod on tiles of ``block_m`` queries and ``block_n`` keys (``tile_avals``); checks
    it returns a floating tile."""
    program, consts = trace_mod(score_mod, tile_avals(block_m, block_n, score=True, layout=layout), name="score_mod")
    _check_out(program, block_m, block_n, layout, floating=True)
    return program, consts


def trace_mask_mod(mask_mod: Callable, block_m: int, block_n: int, layout: str = "broadcast"):
    """``trace_mod`` for a mask_mod on tiles of ``block_m`` queries and ``block_n`` keys (``tile_avals``); checks it
    returns a boolean tile."""
    program, consts = trace_mod(mask_mod, tile_avals(block_m, block_n, score=False, layout=layout), name="mask_mod")
    _check_out(program, block_m, block_n, layout, floating=False)
    return program, consts


def _check_out(
    program: ModProgram, block_m: int, block_n: int, layout: str = "broadcast", *, floating: bool
) -> None:
    out = program.out_aval
    tile = tile_shape(block_m, block_n, layout)
    try:
        shape = np.broadcast_shapes(out.shape, tile)
    except ValueError:
        shape = None
    ok_dtype = jnp.issubdtype(out.dtype, jnp.floating) if floating else out.dtype == jnp.bool_
    if shape != tile or not ok_dtype:
        expected = "a floating" if floating else "a boolean"
        *_, q_aval, kv_aval = tile_avals(block_m, block_n, score=False, layout=layout)
        raise TypeError(
            f"{program.name} must return {expected} value broadcastable to the tile {list(tile)} for "
            f"q_idx {list(q_aval.shape)} and kv_idx {list(kv_aval.shape)}, got "
            f"{jnp.dtype(out.dtype).name}{list(out.shape)}; write it with broadcasting jnp operations"
        )


def trace_for_tiles(mod: Callable, tiles: Sequence[tuple], *, score: bool):
    """Traces one mod for several tile shapes (forward and backward kernels) with one set of consts.

    Each tile is ``(block_m, block_n)`` or ``(block_m, block_n, layout)`` (see ``tile_avals``).

    The work hoisted out of the kernel does not depend on the tile shape, so every tracing hoists the same arrays;
    the first tracing's consts serve all programs (pass them once, e.g. as a ``custom_vjp``'s primal inputs).

    Returns:
      ``(programs, consts)``: one ModProgram per tile shape, in order, and the shared consts.
    """
    trace = trace_score_mod if score else trace_mask_mod
    programs, consts = [], None
    for block_m, block_n, *layout in tiles:
        program, these = trace(mod, block_m, block_n, *layout)
        if consts is None:
            consts = these
        if programs and program.const_avals != programs[0].const_avals:
            raise ValueError(
                f"{program.name} computes, from the arrays it closes over alone, values whose shapes depend on the "
                f"tile ({[list(a.shape) for a in programs[0].const_avals]} for one kernel's tile, "
                f"{[list(a.shape) for a in program.const_avals]} for another's); derive such values from the score "
                "or the indices inside the mod"
            )
        programs.append(program)
    return tuple(programs), consts


def _scalar_literal(atom) -> float | None:
    """The value of a scalar floating literal, else None."""
    if not isinstance(atom, jex_core.Literal) or np.ndim(atom.val) or not jnp.issubdtype(atom.aval.dtype, jnp.floating):
        return None
    return float(atom.val)


def peel_scalings(program: ModProgram) -> tuple[ModProgram, float, float]:
    """Splits a score_mod into ``out_factor * program'(in_factor * score, ...)``, both factors scalar literals.

    A kernel folds ``in_factor`` into its own scaling of q.k and ``out_factor`` into the log2(e) of its base-2
    softmax, which saves two multiplies per score (soft-capping's ``cap * tanh(score / cap)`` becomes
    ``tanh(score)`` between the kernel's multiplies). Peeled: leading multiplies or divides of the score by a literal
    (when nothing else uses the score), and trailing multiplies or divides of the result by a positive literal (a
    positive factor keeps the row maximum where it is). Returns the program unchanged, with factors 1, otherwise.
    """
    jaxpr = program.jaxpr
    score = jaxpr.invars[program.num_consts]
    eqns = list(jaxpr.eqns)
    outvars = list(jaxpr.outvars)
    in_factor = out_factor = 1.0

    def uses(var) -> int:
        return sum(v is var for e in eqns for v in e.invars) + sum(v is var for v in outvars)

    def scaling(eqn, var) -> float | None:
        """The factor ``eqn`` multiplies ``var`` by, if it is ``var * c``, ``c * var`` or ``var / c``."""
        name, (x, y) = eqn.primitive.name, (eqn.invars + [None, None])[:2]
        if name == "mul" and x is var:
            return _scalar_literal(y)
        if name == "mul" and y is var:
            return _scalar_literal(x)
        if name == "div" and x is var:
            c = _scalar_literal(y)
            return None if not c else 1.0 / c
        return None

    while uses(score) == 1:
        first = next((e for e in eqns if any(v is score for v in e.invars)), None)
        factor = None if first is None else scaling(first, score)
        if not factor or first.outvars[0].aval.dtype != score.aval.dtype:
            break
        (result,) = first.outvars
        eqns.remove(first)
        eqns = [e.replace(invars=[score if v is result else v for v in e.invars]) for e in eqns]
        outvars = [score if v is result else v for v in outvars]
        in_factor *= factor
    while not isinstance(outvars[0], jex_core.Literal) and uses(outvars[0]) == 1:
        last = next((e for e in eqns if e.outvars[0] is outvars[0]), None)
        if last is None or last.primitive.name not in ("mul", "div"):
            break
        inner = [v for v in last.invars if not isinstance(v, jex_core.Literal)]
        factor = scaling(last, inner[0]) if len(inner) == 1 else None
        if not factor or factor <= 0 or inner[0].aval.shape != outvars[0].aval.shape:
            break
        eqns.remove(last)
        outvars = [inner[0]]
        out_factor *= factor
    if in_factor == 1.0 and out_factor == 1.0:
        return program, 1.0, 1.0
    peeled = dataclasses.replace(program, jaxpr=jaxpr.replace(eqns=eqns, outvars=outvars))
    return peeled, in_factor, out_factor


@dataclasses.dataclass(frozen=True)
class SoftmaxScaling:
    """Where a forward kernel applies the scale, literal factors of the score_mod and log2(e).

    The kernel computes ``value = score_mod'(score_scale * q.k) * value_scale`` (the multiplies skipped when 1, the
    score_mod when it is the identity) and its online softmax as ``exp2(value * exp_scale - max * exp_scale)``,
    with ``exp_scale`` positive so that each row's maximum is taken on ``value`` itself: one FMA per score. Its lse
    is ``(max * exp_scale + log2(sum)) * ln 2``.
    """

    apply_score_mod: bool
    score_scale: float
    value_scale: float
    exp_scale: float


def fold_scalings(score_mod: ModProgram, scale: float) -> tuple[ModProgram, SoftmaxScaling]:
    """``score_mod`` with its literal factors peeled (``peel_scalings``), and where the kernel applies them."""
    program, in_factor, out_factor = peel_scalings(score_mod)
    apply = not program.is_identity
    factor = out_factor * math.log2(math.e) * (1.0 if apply else scale * in_factor)
    # A positive factor keeps each row's maximum where it is, so it can be applied after taking it.
    value_scale, exp_scale = (1.0, factor) if factor > 0 else (factor, 1.0)
    return program, SoftmaxScaling(apply, float(scale * in_factor) if apply else 1.0, value_scale, exp_scale)
