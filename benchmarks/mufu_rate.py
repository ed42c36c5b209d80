"""How many results a clock an SM's special-function unit gives, instruction by instruction.

    python -m benchmarks.mufu_rate [--iterations 4096] [--ops tanh_f32 ex2_f32 ...]

NOTES.md sections 40 to 65 model soft-capping's D=64 forward step by counting special-function (MUFU) instructions
at one rate for all of them, 8 clocks a warp instruction: 1472 clocks a pair of key tiles, under the 2060-2400
measured. Whether tanh.approx issues at exp2's rate, and whether tanh.approx.f16x2 is one instruction for two
results or two, decides whether soft-capping's step is the unit's (and which lever is left). This measures each
instruction alone: a Pallas Triton kernel in which every thread runs many independent chains of the one
instruction (inline PTX), one program per SM eight times over, timed in bursts (``timing.time_jax``).

Each chain feeds the instruction its own negated result, which keeps every value bounded (ex2 of a negative number
lies in (0, 1], tanh stays in (-1, 1), rcp alternates between [0.5, 1] and [-2, -1]); for float32 ptxas can fold
the negation into the instruction's operand, and where it does not, the negation runs on another pipe beside the
special-function unit, whose rate is the one measured. Each row's ``/clk/SM`` is its rate at the SM clock
nvidia-smi reads right after it. Where no clock can be read, ``fma_f32``'s rate stands for 128 results a clock (the
FMA lanes of a Hopper SM); on the H100 that estimate proved wrong (NOTES.md section 67: the chain of ``fma_f32`` ran at
59 results a clock by the clock read, issue-bound, not at the lanes' 128), so it is only the fallback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import subprocess

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from benchmarks import timing
from flexattn_jax.backends._device import num_sms

# Elements a program holds (its threads' independent chains: 32 a thread at 4 warps) and the chain steps written
# out in each loop iteration, so that the loop's own counter and branch are a few percent of the instructions.
BLOCK = 4096
NUM_WARPS = 4
STEPS_PER_ITERATION = 4
PROGRAMS_PER_SM = 8
FMA_RESULTS_PER_CLOCK = 128  # FP32 FMA lanes of a Hopper SM


@dataclasses.dataclass(frozen=True)
class Op:
    """One PTX instruction applied elementwise: ``pack`` elements of ``dtype`` per instance (2: a .f16x2 or
    .bf16x2 register)."""

    asm: str
    dtype: jnp.dtype
    pack: int = 1


OPS = {
    "fma_f32": Op("fma.rn.f32 $0, $1, 0f3F000000, 0f3E800000;", jnp.float32),  # x * 0.5 + 0.25
    "ex2_f32": Op("ex2.approx.ftz.f32 $0, $1;", jnp.float32),
    "tanh_f32": Op("tanh.approx.f32 $0, $1;", jnp.float32),
    "rcp_f32": Op("rcp.approx.ftz.f32 $0, $1;", jnp.float32),
    "ex2_f16x2": Op("ex2.approx.f16x2 $0, $1;", jnp.float16, 2),
    "tanh_f16x2": Op("tanh.approx.f16x2 $0, $1;", jnp.float16, 2),
    "ex2_bf16x2": Op("ex2.approx.ftz.bf16x2 $0, $1;", jnp.bfloat16, 2),
    "tanh_bf16x2": Op("tanh.approx.bf16x2 $0, $1;", jnp.bfloat16, 2),
}


def _chain_kernel(x_ref, o_ref, *, op: Op, iterations: int):
    def step(x):
        (y,) = pl_triton.elementwise_inline_asm(
            op.asm, args=[-x], constraints="=r,r", pack=op.pack,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
        )
        return y

    def iteration(_, x):
        for _ in range(STEPS_PER_ITERATION):
            x = step(x)
        return x

    o_ref[...] = lax.fori_loop(0, iterations, iteration, x_ref[...])


def chain(op: Op, num_programs: int, iterations: int):
    """A function of x (num_programs * BLOCK elements of op.dtype) running ``iterations * STEPS_PER_ITERATION``
    steps of op's chain on every element."""
    kernel = functools.partial(_chain_kernel, op=op, iterations=iterations)
    spec = pl.BlockSpec((BLOCK,), lambda i: (i,))
    return jax.jit(pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_programs * BLOCK,), op.dtype),
        grid=(num_programs,),
        in_specs=[spec],
        out_specs=spec,
        compiler_params=pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        name="mufu_rate_chain",
    ))


def _sm_clock_mhz() -> str:
    probe = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
    return probe.stdout.strip() or "?"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4096)
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS))
    args = parser.parse_args(argv)
    sms = num_sms()
    num_programs = sms * PROGRAMS_PER_SM
    steps = args.iterations * STEPS_PER_ITERATION
    key = jax.random.key(0)
    rates = {}
    print(f"{jax.devices()[0].device_kind}, {sms} SMs, {num_programs} programs of {BLOCK} elements, {NUM_WARPS} "
          f"warps, {steps} steps a chain")
    print("| instruction | ms | results/ns/SM | instructions/ns/SM | results/clk/SM | SM clock MHz |")
    print("|---|---|---|---|---|---|")
    for name in args.ops:
        op = OPS[name]
        x = jax.random.uniform(key, (num_programs * BLOCK,), jnp.float32, 0.5, 1.0).astype(op.dtype)
        fn = chain(op, num_programs, args.iterations)
        try:
            ms = timing.time_jax(fn, [(x,)], warmup=2, runs=10, burst=3)
        except Exception as error:  # an instruction this GPU or ptxas refuses: say so and go on
            print(f"| {name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:80]} | | | | |")
            continue
        results = num_programs * BLOCK * steps / (ms * 1e6) / sms
        rates[name] = results
        clock_mhz = _sm_clock_mhz()
        if clock_mhz.isdigit():
            per_clock = f"{results / (int(clock_mhz) / 1000):.1f}"
        elif "fma_f32" in rates:
            per_clock = f"{results / rates['fma_f32'] * FMA_RESULTS_PER_CLOCK:.1f} (fma_f32 = 128)"
        else:
            per_clock = "–"
        print(f"| {name} | {ms:.3f} | {results:.2f} | {results / op.pack:.2f} | {per_clock} | {clock_mhz} |")


if __name__ == "__main__":
    main()
