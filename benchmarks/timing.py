"""Timing that a GPU cannot fool: warm-up, fresh inputs rotated between runs, the median of many runs."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np


def time_jax(fn: Callable, input_sets: Sequence[tuple], warmup: int = 3, runs: int = 20) -> float:
    """Median milliseconds of fn(*inputs), rotating over ``input_sets``; each run synchronised with
    block_until_ready, so the host clock brackets the device work."""
    for i in range(warmup):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    times = []
    for i in range(runs):
        args = input_sets[i % len(input_sets)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def time_first_call(fn: Callable, args: tuple) -> float:
    """Seconds of the first call: tracing, compiling and one run."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def time_torch(fn: Callable, warmup_ms: float = 100, rep_ms: float = 500) -> float:
    """Median milliseconds of a CUDA callable, timed with CUDA events by triton.testing.do_bench."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
