"""Timing that a GPU cannot fool: warm-up, fresh inputs rotated between runs, the median of many runs."""

from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import jax
import numpy as np


# PyTorch's timer (triton.testing.do_bench, below) warms up for 100 ms and times for 500.
TORCH_WARMUP_MS, TORCH_REP_MS = 100.0, 500.0


def time_jax(fn: Callable, input_sets: Sequence[tuple], warmup: int = 3, runs: int = 20, burst: int = 5,
             warmup_ms: float = 0.0, min_ms: float = 0.0) -> float:
    """Median milliseconds of fn(*inputs), rotating over ``input_sets``.

    Each run dispatches ``burst`` calls back to back and waits for the last: the host enqueues the next call while
    the device runs the current one, so the launch and synchronisation gaps of a single call (tens of microseconds,
    up to 2x at sub-millisecond sizes) stay out of the number, as they do for CUDA-event timings of the torch
    implementations. The median over the runs of (elapsed / burst) is returned.

    ``warmup_ms`` and ``min_ms`` stretch the warm-up and the timed runs to at least that long (more calls, never
    fewer than ``warmup`` and ``runs``). A GPU held at its power limit lowers its clock as the load goes on, so a
    number set beside ``time_torch``'s should load the GPU as long as it does: TORCH_WARMUP_MS, TORCH_REP_MS.
    """
    return time_bursts(fn, input_sets, jax.block_until_ready, warmup=warmup, runs=runs, burst=burst,
                       warmup_ms=warmup_ms, min_ms=min_ms)


def time_bursts(fn: Callable, input_sets: Sequence[tuple], wait: Callable, warmup: int = 3, runs: int = 20,
                burst: int = 5, warmup_ms: float = 0.0, min_ms: float = 0.0) -> float:
    """``time_jax`` for any framework: ``wait(outputs)`` returns once the device has computed ``outputs`` (a list
    of fn's results, or one result during the warm-up); for torch, ``torch_wait``."""
    call = 0
    start = time.perf_counter()
    while call < warmup or (time.perf_counter() - start) * 1e3 < warmup_ms:
        wait(fn(*input_sets[call % len(input_sets)]))
        call += 1
    times = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start) * 1e3 < min_ms:
        outs = []
        burst_start = time.perf_counter()
        for _ in range(burst):
            outs.append(fn(*input_sets[call % len(input_sets)]))
            call += 1
        wait(outs)
        times.append((time.perf_counter() - burst_start) / burst)
    return float(np.median(times)) * 1e3


def time_flushed(fn: Callable, input_sets: Sequence[tuple], wait: Callable, flush: Callable, **kwargs) -> float:
    """``time_bursts`` with ``flush()`` (a kernel that overwrites the L2 cache) before every call, the flush's own
    time (timed alone, the same way) taken off: each call starts cold and after an idle gap of the compute units,
    as ``triton.testing.do_bench`` times, for any framework. ``kwargs``: ``time_bursts``'."""
    flushed = time_bursts(lambda *inputs: (flush(), fn(*inputs))[1], input_sets, wait, **kwargs)
    flush_alone = time_bursts(lambda *_: flush(), input_sets, wait, **kwargs)
    if flushed <= flush_alone:
        raise ValueError(f"the call's time is lost in the flush's: {flushed:.4f} ms with the flush, {flush_alone:.4f} "
                         "ms for the flush alone (a call too short for --timer flushed, or no GPU)")
    return flushed - flush_alone


# The size triton.testing.do_bench overwrites before each timed call: more than any GPU's L2 cache.
FLUSH_BYTES = 256 * 2**20


@functools.cache
def jax_flush() -> Callable:
    """A JAX callable that writes FLUSH_BYTES of fresh memory, for ``time_flushed``; one for the process (its
    scratch and its compiled fill), however many timers take it."""
    import jax.numpy as jnp

    fill = jax.jit(lambda x: jnp.zeros_like(x))
    scratch = jnp.ones((FLUSH_BYTES // 4,), jnp.int32)
    return lambda: fill(scratch)


@functools.cache
def torch_flush() -> Callable:
    """The torch twin of ``jax_flush``: do_bench's own flush, FLUSH_BYTES zeroed in place, one for the process."""
    import torch

    scratch = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return scratch.zero_


def torch_wait(_outputs) -> None:
    """``time_bursts``' wait for torch: the device's queue drained."""
    import torch

    torch.cuda.synchronize()


def load_window(window_ms: float) -> dict:
    """``time_jax``'s ``warmup_ms`` and ``min_ms`` for a timed window of ``window_ms``, with a warm-up in PyTorch's
    proportion (TORCH_WARMUP_MS to TORCH_REP_MS); 0 or None: no window, ``warmup`` calls and ``runs`` bursts only."""
    if not window_ms:
        return {}
    return dict(warmup_ms=TORCH_WARMUP_MS * window_ms / TORCH_REP_MS, min_ms=window_ms)


def time_jax_unrolled(fn: Callable, input_sets: Sequence[tuple], runs: int = 10) -> float:
    """Median milliseconds of fn(*inputs) when one call per input set runs in a single program.

    One dispatch launches every call's kernels back to back, so no host work (dispatch, argument handling) stands
    between them: what is left is the device's time, as CUDA events would read it. ``time_jax`` against this
    shows how much of a sub-millisecond cell is the host's. The input sets must differ: XLA merges calls on the
    same arguments into one.
    """

    @jax.jit
    def program(sets):
        return [fn(*inputs) for inputs in sets]

    sets = list(input_sets)
    jax.block_until_ready(program(sets))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(program(sets))
        times.append((time.perf_counter() - start) / len(sets))
    return float(np.median(times)) * 1e3


def time_first_call(fn: Callable, args: tuple) -> float:
    """Seconds of the first call: tracing, compiling and one run."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def time_torch(fn: Callable, warmup_ms: float = TORCH_WARMUP_MS, rep_ms: float = TORCH_REP_MS) -> float:
    """Median milliseconds of a CUDA callable, timed with CUDA events by triton.testing.do_bench."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
