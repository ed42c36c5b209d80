"""Context-parallel scaling: ring flex_attention on N devices against flex_attention on one, for growing lengths.

For each sequence length L (queries = keys = L), times

* ``single``: flex_attention on one device (skipped above ``--max-single-len``, where it would not fit);
* ``ring``: ring_flex_attention over all N devices (sequence sharded), contiguous chunks;
* ``ring_zigzag``: the same with load_balance=True (device i holds chunks i and 2N-1-i of 2N),

forward only, or forward + backward with ``--backward``. Each is jitted, run ``--warmup`` times, then timed
``--repeats`` times (median of wall-clock, ``block_until_ready``).

FLOP model: forward = 4 * B * Hq * E * (attended positions), with the attended positions counted at block
granularity from the BlockMask (the work a block-sparse kernel does: every position of every visited block);
backward = 2.5 x forward (FlashAttention-2's count: five matmuls to the forward's two). TFLOP/s is per device:
total FLOPs / time / devices; ``speedup`` is the single-device time over this one. ``balance`` is the largest
per-device share of visited blocks over the mean (1.0 is perfect; contiguous causal chunks approach 2.0).
``max abs error`` compares the ring's forward output with the single device's (where that ran).

Usage:

    python benchmarks/context_parallel.py                        # the GPUs present, bf16, causal, 8K..128K
    python benchmarks/context_parallel.py --tiny                 # tiny, on 4 CPU devices: checks the script runs
    python benchmarks/context_parallel.py --lengths 16384 65536 --mask sliding_window --backward

Writes ``context_parallel.json`` and ``context_parallel.md`` under ``$OUT`` when it is set, and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: import flexattn_jax from this repository
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MASKS = ("causal", "noop", "sliding_window", "document")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default 8K..128K (--tiny: 64 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8, help="query heads Hq")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads Hkv (GQA); default Hq")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--mask", choices=MASKS, default="causal")
    parser.add_argument("--window", type=int, default=4096, help="sliding_window: the window")
    parser.add_argument("--documents", type=int, default=8, help="document: packed documents of equal length")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--implementation", default=None, help="flex_attention's implementation= (default: best)")
    parser.add_argument("--devices", type=int, default=None, help="ring size (default: every device)")
    parser.add_argument("--max-single-len", type=int, default=65536, help="longest L timed on one device")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tiny", "--smoke", dest="smoke", action="store_true",
        help="tiny sizes on 4 CPU devices (a check that the script runs, not a measure)",
    )
    args = parser.parse_args(argv)
    if not args.smoke:
        args.lengths = args.lengths or [8192, 16384, 32768, 65536, 131072]
    else:
        args.lengths = args.lengths or [64, 128]
        args.heads, args.head_dim, args.block_size = 2, 16, 8
        args.window, args.max_single_len, args.warmup, args.repeats = 24, 128, 1, 2
        args.dtype = "float32"
    return args


def _mask_mod(fa, args, length):
    import jax.numpy as jnp

    if args.mask == "causal":
        return fa.causal_mask
    if args.mask == "sliding_window":
        return fa.sliding_window_mask(args.window)
    if args.mask == "document":
        ids = jnp.arange(length, dtype=jnp.int32) * args.documents // length
        return fa.and_masks(fa.causal_mask, fa.document_mask(ids))
    return None


def _time(fn, inputs, warmup, repeats):
    import jax

    compile_start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    compile_s = time.perf_counter() - compile_start
    for _ in range(warmup):
        jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times), compile_s


def run(args) -> dict:
    """Runs the sweep on the devices JAX sees; returns the record (context and rows)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import flexattn_jax as fa
    from flexattn_jax.sharding import ring_flex_attention
    from flexattn_jax.sharding.ring import work_per_device

    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    ring_size = len(devices)
    mesh = Mesh(np.array(devices), ("seq",))
    dtype = jnp.dtype(args.dtype)
    kv_heads = args.kv_heads or args.heads
    flex_kwargs = dict(enable_gqa=kv_heads != args.heads, implementation=args.implementation)

    def timed(attention, inputs):
        if args.backward:
            grad = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
            return _time(jax.jit(grad), inputs, args.warmup, args.repeats)
        return _time(jax.jit(attention), inputs, args.warmup, args.repeats)

    rows = []
    for length in args.lengths:
        # Ring chunks must be whole blocks: each length a multiple of 2N blocks.
        block_mask = None
        mask_mod = _mask_mod(fa, args, length)
        if mask_mod is not None:
            block_mask = fa.create_block_mask(mask_mod, None, None, length, length, BLOCK_SIZE=args.block_size)
        if block_mask is None:
            attended = float(length) ** 2
        else:
            attended = float(np.asarray(block_mask.to_dense()).sum()) * args.block_size**2
        flops = 4.0 * args.batch * args.heads * args.head_dim * attended * (3.5 if args.backward else 1.0)

        rng = np.random.default_rng(length)
        shapes = [(args.batch, args.heads, length, args.head_dim)] + [(args.batch, kv_heads, length, args.head_dim)] * 2
        host = [rng.standard_normal(s, np.float32).astype(dtype) for s in shapes]

        single_seconds = single_out = None

        def record(variant, seconds, compile_s, devices_used, balance, error=None):
            speedup = None if single_seconds is None else single_seconds / seconds
            rows.append(
                dict(
                    length=length,
                    variant=variant,
                    devices=devices_used,
                    ms=seconds * 1e3,
                    compile_s=compile_s,
                    tflops_per_device=flops / seconds / devices_used / 1e12,
                    balance=balance,
                    speedup_vs_single=speedup,
                    max_abs_error=error,
                )
            )
            print(
                f"L={length:>7} {variant:<12} devices={devices_used} {seconds * 1e3:10.3f} ms "
                f"{flops / seconds / devices_used / 1e12:8.3f} TFLOP/s/device  balance={balance:.2f}",
                flush=True,
            )

        if length <= args.max_single_len:
            inputs = [jax.device_put(x, devices[0]) for x in host]
            def single(q, k, v):
                return fa.flex_attention(q, k, v, block_mask=block_mask, **flex_kwargs)

            seconds, compile_s = timed(single, inputs)
            single_seconds = seconds
            single_out = np.asarray(jax.jit(single)(*inputs), np.float32)
            record("single", seconds, compile_s, 1, 1.0)

        sharding = NamedSharding(mesh, PartitionSpec(None, None, "seq"))
        inputs = [jax.device_put(x, sharding) for x in host]
        for load_balance in (False, True):
            balance = 1.0
            if block_mask is not None:
                work = work_per_device(block_mask, ring_size, load_balance)
                balance = float(work.max() / work.mean())

            def ring(q, k, v, load_balance=load_balance):
                return ring_flex_attention(
                    q, k, v, block_mask=block_mask, mesh=mesh, seq_axis="seq", load_balance=load_balance, **flex_kwargs
                )

            seconds, compile_s = timed(ring, inputs)
            error = None
            if single_out is not None:  # the ring's forward output against one device's
                error = float(np.max(np.abs(np.asarray(jax.jit(ring)(*inputs), np.float32) - single_out)))
            record("ring_zigzag" if load_balance else "ring", seconds, compile_s, ring_size, balance, error)

    context = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        devices=f"{ring_size} x {devices[0].device_kind}",
        platform=devices[0].platform,
        jax=jax.__version__,
        python=platform.python_version(),
        command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        config={k: v for k, v in vars(args).items()},
        flop_model="forward 4*B*Hq*E*(positions in visited blocks); backward 2.5x forward; TFLOP/s per device",
    )
    return dict(context=context, rows=rows)


def _markdown(record) -> str:
    c = record["context"]
    lines = [
        f"Context-parallel flex_attention, {c['date']}: {c['devices']} ({c['platform']}), JAX {c['jax']}.",
        f"Command: `{c['command']}`. FLOP model: {c['flop_model']}.",
        "",
        "| L | variant | devices | ms | TFLOP/s/device | speedup vs single | balance | compile s | max abs error |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        speedup = "" if r["speedup_vs_single"] is None else f"{r['speedup_vs_single']:.2f}x"
        error = "" if r["max_abs_error"] is None else f"{r['max_abs_error']:.2e}"
        lines.append(
            f"| {r['length']} | {r['variant']} | {r['devices']} | {r['ms']:.3f} | {r['tflops_per_device']:.3f} | "
            f"{speedup} | {r['balance']:.2f} | {r['compile_s']:.1f} | {error} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        import jax

        # Must happen before JAX starts its backends.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", 4)
    record = run(args)
    table = _markdown(record)
    print(table)
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "context_parallel.json"), "w") as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(out_dir, "context_parallel.md"), "w") as f:
            f.write(table)
    return record


if __name__ == "__main__":
    main()
