"""Whether the timers' gaps move the forward's rate (NOTES.md section 56): full attention, D=128, at B=8 S=2048
and at 8K, each timed four ways over the same 100 + 500 ms window, in interleaved rounds.

    python3 -m benchmarks.timer_gaps [--rounds 2]

- ours, ``timing.time_jax``: bursts of five calls back to back, as ``benchmarks.run`` times every JAX cell;
- ours with gaps: each call after a 256 MB read and write (a DRAM-bound kernel of about 0.2 ms), that kernel's
  own time (timed alone, the same way) taken off;
- SDPA, ``timing.time_torch`` (``triton.testing.do_bench``, as ``benchmarks.run`` times the anchors): one call
  per CUDA-event pair, a 256 MB L2 flush before each;
- SDPA in bursts: ``timing.time_bursts``: our timer with torch's synchronisation, no flush.

If the flushes' idle power lets the clock stay higher under the power cap, SDPA reads higher by ``do_bench`` than
in bursts, and most where a call is short (B=8 S=2048: 0.4 ms against 1.6 ms at 8K).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import jax_impls, timing
from benchmarks.cases import CASES

SHAPES = ((8, 2048), (2, 8192))
H, D = 16, 128
WINDOW_MS = 500.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    from benchmarks import torch_impls

    case = CASES["noop"]
    window = timing.load_window(WINDOW_MS)
    scratch = jnp.zeros((64 * 2**20,), jnp.int32)
    touch = jax.jit(lambda x: x + 1)  # reads and writes 256 MB: the GPU's compute units mostly idle meanwhile
    print("| shape | round | ours, bursts | ours, with gaps | SDPA, do_bench | SDPA, bursts |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    for B, S in SHAPES:
        flops = 4 * B * H * S * S * D
        keys = jax.random.split(jax.random.key(0), 12)
        sets = [tuple(jax.random.normal(keys[3 * i + j], (B, H, S, D), jnp.bfloat16) for j in range(3))
                for i in range(4)]
        forward = jax_impls.flexattn(case, "pallas_mosaic", B, H, S, S)
        jax.block_until_ready(forward(*sets[0]))
        jax.block_until_ready(touch(scratch))

        qt, kt, vt = (torch_impls.from_jax(x) for x in sets[0])
        sdpa = torch_impls.sdpa(case)
        sdpa(qt, kt, vt)
        torch.cuda.synchronize()
        for round_ in range(args.rounds):
            ours = timing.time_jax(forward, sets, runs=10, **window)
            gaps = timing.time_flushed(forward, sets, jax.block_until_ready, lambda: touch(scratch), runs=10,
                                       **window)
            theirs = timing.time_torch(lambda: sdpa(qt, kt, vt))
            theirs_bursts = timing.time_bursts(lambda: sdpa(qt, kt, vt), [()], timing.torch_wait,
                                               runs=10, **window)
            cells = [flops / (ms * 1e-3) / 1e12 for ms in (ours, gaps, theirs, theirs_bursts)]
            print(f"| {B}x{H}x{S}x{D} | {round_} | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
