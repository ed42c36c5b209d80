"""The GPU's clock and power while a forward runs back to back, against the same forward launched alone.

    python -m benchmarks.clocks [--case noop] [-D 128] [--seconds 8]
    python -m benchmarks.clocks --ramp [--case causal] [--idle-s 3] [--ramp-ms 1200]

NOTES.md section 31 found our Mosaic forward and cuDNN's 7-11% faster under Nsight Compute, which replays one
launch at a time, than back to back in the benchmark. This measures both conditions in one process, for each
implementation (``pallas_mosaic``, cuDNN through ``jax.nn.dot_product_attention``, and PyTorch's SDPA where torch
is installed):

* **alone**: calls separated by ``--gap-ms`` of idle time, each timed from dispatch to completion. The host's
  part is included, and after an idle gap it is large (0.1-0.6 ms on the H200 machine), so this row is for the
  clock it reads; Nsight Compute gives the kernel's own time;
* **back to back**: calls dispatched without waiting for ``--seconds``, timed over the whole window,

while ``nvidia-smi`` samples the SM clock, power draw and the active clock-limiting reasons every 100 ms. B=2,
H=16, S=8192, bf16. Prints one table row per implementation and condition.

``--ramp``: how the speed and the clock change over the first tenths of a second of load (NOTES.md section 52:
the former 45-85 ms timing window read our forward 9-13% above a 600 ms one). After ``--idle-s`` of idle, bursts
of five calls back to back for ``--ramp-ms``, each burst timed; one row per implementation and stretch of time
since the load began (``RAMP_EDGES_MS``), with its bursts' median TFLOP/s and the clock sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import jax_impls
from benchmarks.cases import CASES

# Field names of nvidia-smi --query-gpu; the clock-limiting reasons are a bit mask (0x1 idle, 0x4 software power
# cap, 0x20 software thermal slowdown, 0x40 hardware thermal slowdown, 0x80 hardware power brake).
# Older drivers name the last field clocks_throttle_reasons.active.
_FIELDS = ("clocks.sm", "power.draw", "temperature.gpu", "clocks_event_reasons.active")


def _query_fields() -> tuple[str, ...]:
    probe = subprocess.run(["nvidia-smi", f"--query-gpu={_FIELDS[-1]}", "--format=csv,noheader"],
                           capture_output=True, text=True)
    return _FIELDS if probe.returncode == 0 else (*_FIELDS[:-1], "clocks_throttle_reasons.active")


class Sampler:
    """nvidia-smi's readings every ``interval_ms``, in a background thread, kept with their host time."""

    def __init__(self, interval_ms: int = 100):
        self.samples: list[tuple[float, list[str]]] = []
        fields = _query_fields()
        self._process = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", f"-lms={interval_ms}"],
            stdout=subprocess.PIPE, text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self._process.stdout:
            self.samples.append((time.perf_counter(), [field.strip() for field in line.split(",")]))

    def between(self, start: float, end: float) -> str:
        """Median SM clock (MHz) and power (W), the highest temperature, and every reason mask seen."""
        rows = [fields for t, fields in self.samples if start <= t <= end and len(fields) == len(_FIELDS)]
        if not rows:
            return "no samples"
        clock = np.median([float(r[0]) for r in rows])
        power = np.median([float(r[1]) for r in rows])
        temperature = max(float(r[2]) for r in rows)
        reasons = sorted({r[3] for r in rows})
        return f"{clock:.0f} MHz, {power:.0f} W, {temperature:.0f} C, reasons {' '.join(reasons)} ({len(rows)} samples)"

    def close(self):
        self._process.terminate()


def measure(name: str, call, sync, flops: float, sampler: Sampler, *, seconds: float, gap_ms: float, alone: int):
    call()
    sync()
    start = time.perf_counter()
    times = []
    for _ in range(alone):
        time.sleep(gap_ms / 1e3)
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    end = time.perf_counter()
    ms = float(np.median(times)) * 1e3
    print(f"| {name} | alone | {ms:.3f} | {flops / ms / 1e9:.0f} | {sampler.between(start, end)} |", flush=True)
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            call()
        calls += 20
        sync()
    end = time.perf_counter()
    ms = (end - start) / calls * 1e3
    print(f"| {name} | back to back | {ms:.3f} | {flops / ms / 1e9:.0f} | {sampler.between(start, end)} |", flush=True)


RAMP_EDGES_MS = (0, 25, 50, 100, 200, 400, 800, 1600)


def ramp(name: str, call, sync, flops: float, sampler: Sampler, *, idle_s: float, ramp_ms: float, burst: int = 5):
    """Bursts of ``burst`` back-to-back calls for ``ramp_ms`` after ``idle_s`` of idle; prints per stretch of
    ``RAMP_EDGES_MS`` (a burst counted in the stretch where it ends) its bursts' median TFLOP/s and the clock."""
    call()
    sync()
    time.sleep(idle_s)
    bursts = []
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < ramp_ms:
        t0 = time.perf_counter()
        for _ in range(burst):
            call()
        sync()
        t1 = time.perf_counter()
        bursts.append((t1 - start, (t1 - t0) / burst))
    for low, high in zip(RAMP_EDGES_MS, RAMP_EDGES_MS[1:]):
        times = [seconds for end, seconds in bursts if low <= end * 1e3 < high]
        if not times:
            continue
        tflops = flops / float(np.median(times)) / 1e12
        clock = sampler.between(start + low / 1e3, start + high / 1e3)
        print(f"| {name} | {low}-{high} ms | {len(times)} | {tflops:.0f} | {clock} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="noop", choices=("noop", "causal"))
    parser.add_argument("-D", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the back-to-back window")
    parser.add_argument("--gap-ms", type=float, default=50.0, help="idle time before each lone call")
    parser.add_argument("--alone", type=int, default=30, help="lone calls")
    parser.add_argument("--ramp", action="store_true", help="the first tenths of a second of load, stretch by stretch")
    parser.add_argument("--idle-s", type=float, default=3.0, help="--ramp: idle time before the load")
    parser.add_argument("--ramp-ms", type=float, default=1200.0, help="--ramp: how long the load lasts")
    args = parser.parse_args()
    B, H, S, D = 2, 16, 8192, args.D
    case = CASES[args.case]
    flops = 4 * B * H * S * S * D * case.density(B, H, S, S)
    q, k, v = (jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 3))
    sampler = Sampler(20 if args.ramp else 100)
    time.sleep(1.0)
    print(f"{jax.devices()[0].device_kind}, {args.case}, B={B} H={H} S={S} D={D} bf16")
    if args.ramp:
        print(f"After {args.idle_s:g} s idle, bursts of 5 calls for {args.ramp_ms:g} ms; a burst counts where it ends.")
        print("| implementation | since the load began | bursts | TFLOP/s "
              "| SM clock, power, temperature, limiting reasons |")
    else:
        print("| implementation | launched | ms | TFLOP/s | SM clock, power, temperature, limiting reasons |")
    print("|---|---|---|---|---|")

    def timed(name, call, sync):
        if args.ramp:
            ramp(name, call, sync, flops, sampler, idle_s=args.idle_s, ramp_ms=args.ramp_ms)
        else:
            measure(name, call, sync, flops, sampler, seconds=args.seconds, gap_ms=args.gap_ms, alone=args.alone)

    try:
        implementations = [("flexattn_jax:pallas_mosaic", jax_impls.flexattn(case, "pallas_mosaic", B, H, S, S)),
                           ("jax.nn:cudnn", jax_impls.dot_product_attention(case, "cudnn", B, H, S, S))]
        for name, forward in implementations:
            outs = []
            timed(name, lambda f=forward: outs.append(f(q, k, v)), lambda: (jax.block_until_ready(outs), outs.clear()))
        try:
            import torch
        except ImportError:
            return
        from benchmarks import torch_impls

        qt, kt, vt = (torch_impls.from_jax(x) for x in (q, k, v))
        sdpa = torch_impls.sdpa(case)
        timed("torch:sdpa", lambda: sdpa(qt, kt, vt), torch.cuda.synchronize)
    finally:
        sampler.close()


if __name__ == "__main__":
    main()
