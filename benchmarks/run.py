"""Benchmark flexattn_jax beside PyTorch FlexAttention, SDPA, cuDNN and XLA, in one process run.

    python -m benchmarks.run                       # the full GPU suite (prefill, decode, mask construction)
    python -m benchmarks.run --tiny                # a seconds-long smoke run that works on a CPU
    python -m benchmarks.run --suite prefill --shapes 2x16x8192x128 --cases causal,document

Writes results.json (every number and its context), results.md (tables) and tflops.png to --out (default: $OUT if
set, else benchmarks/out/). FLOP model: forward = 4 * B * H * L * S * D * density, forward+backward = 3.5x that
(the backward counted as 2.5x the forward); density = allowed (query, key) pairs / (L * S), counted exactly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

# JAX and PyTorch share the GPU in one process: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flexattn_jax as fa  # noqa: E402
from benchmarks import jax_impls, timing  # noqa: E402
from benchmarks.cases import CASES  # noqa: E402

FULL_SHAPES = "2x16x8192x128,2x16x8192x64,8x16x2048x128"
DECODE_LENGTHS = (4096, 16384, 32768, 65536, 131072)
MASK_LENGTHS = (8192, 16384, 32768, 65536, 131072)
# The dense reference is timed only where its L x S score matrices stay small.
MAX_REFERENCE_ELEMENTS = 1 << 28


def _parse_shapes(text: str):
    return [tuple(int(x) for x in shape.split("x")) for shape in text.split(",") if shape]


def _torch():
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        from benchmarks import torch_impls

        return torch_impls
    except Exception:  # noqa: BLE001 - any import failure means: no torch anchors in this run
        return None


def _relative_error(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _context(args) -> dict:
    window = timing.load_window(args.window_ms)
    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.run", *sys.argv[1:]]),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
        "flexattn_jax": fa.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "python": platform.python_version(),
        "flop_model": "forward 4*B*H*L*S*D*density; forward+backward 3.5x forward",
        "dtype": args.dtype,
        "timer": args.timer,
        "timing": _timing_text(args, window),
    }
    try:
        import torch
        import triton

        context.update(torch=torch.__version__, triton=triton.__version__)
    except Exception:  # noqa: BLE001
        pass
    return context


TIMERS = ("bursts", "flushed", "do_bench")


def _timing_text(args, window: dict) -> str:
    bursts = (f"median of bursts of 5 calls back to back, at least {args.runs} bursts"
              + (f" over at least {window['min_ms']:.0f} ms after a {window['warmup_ms']:.0f} ms warm-up"
                 if window else ""))
    if args.timer == "bursts":
        return f"every implementation, JAX and torch: {bursts}"
    if args.timer == "flushed":
        return (f"every implementation, JAX and torch: {bursts}, each call after a "
                f"{timing.FLUSH_BYTES >> 20} MB write, that write's own time taken off")
    return (f"JAX: {bursts}; torch: triton.testing.do_bench, median, {timing.TORCH_WARMUP_MS:.0f} ms warm-up, "
            f"{timing.TORCH_REP_MS:.0f} ms timed, a {timing.FLUSH_BYTES >> 20} MB write before each call")


def _timer(args, kind: str):
    """``(fn, input_sets) -> milliseconds`` for a JAX (``kind`` "jax") or torch callable, as ``--timer`` says.

    do_bench writes 256 MB before each call it times, and the GPU's clock, held by its power limit, runs higher after
    those idle gaps than under calls back to back: up to 16% at B=8, S=2048 (NOTES.md section 56). So "bursts" and
    "flushed" time JAX and torch the same way; "do_bench" is the timing of runs before the thirty-second session.
    """
    window = timing.load_window(args.window_ms)
    if kind == "jax":
        wait, make_flush = jax.block_until_ready, timing.jax_flush
    else:
        wait, make_flush = timing.torch_wait, timing.torch_flush
    if args.timer == "do_bench" and kind == "torch":
        return lambda fn, input_sets: timing.time_torch(lambda: fn(*input_sets[0]))
    if args.timer == "flushed":
        flush = make_flush()
        return lambda fn, input_sets: timing.time_flushed(fn, input_sets, wait, flush, runs=args.runs, **window)
    return lambda fn, input_sets: timing.time_bursts(fn, input_sets, wait, runs=args.runs, **window)


def measure_ceilings(tiny: bool, window: dict | None = None) -> dict:
    """The GPU's bf16 matmul rate and copy bandwidth, measured in this run (``window``: time_jax's warm-up and
    timed milliseconds, as the implementations are timed)."""
    window = window or {}
    n = 256 if tiny else 8192
    a, b = (jax.random.normal(key, (n, n), jnp.bfloat16) for key in jax.random.split(jax.random.key(1), 2))
    matmul = jax.jit(lambda a, b: a @ b)
    ms = timing.time_jax(matmul, [(a, b), (b, a)], runs=5 if tiny else 20, **window)
    elements = (1 << 16) if tiny else (1 << 30)
    x = jax.random.normal(jax.random.key(2), (elements,), jnp.bfloat16)
    copy_ms = timing.time_jax(jax.jit(lambda x: x + 1), [(x,)], runs=5 if tiny else 20, **window)
    return {
        "matmul_tflops": 2 * n**3 / (ms * 1e-3) / 1e12,
        "copy_gbps": 2 * elements * 2 / (copy_ms * 1e-3) / 1e9,
    }


def _inputs(B, H, L, S, D, dtype, seed, sets=2):
    out = []
    for i in range(sets):
        keys = jax.random.split(jax.random.key(seed * 10 + i), 4)
        q = jax.random.normal(keys[0], (B, H, L, D), jnp.float32).astype(dtype)
        k = jax.random.normal(keys[1], (B, H, S, D), jnp.float32).astype(dtype)
        v = jax.random.normal(keys[2], (B, H, S, D), jnp.float32).astype(dtype)
        do = jax.random.normal(keys[3], (B, H, L, D), jnp.float32).astype(dtype)
        out.append((q, k, v, do))
    return out


def prefill_suite(args, torch_impls, ceilings, results, progress):
    dtype = jnp.dtype(args.dtype)
    implementations = [i for i in fa.IMPLEMENTATIONS if i != "reference"] if not args.tiny else ["reference"]
    if args.implementations:
        implementations = args.implementations.split(",")
    deadline = time.time() + args.budget_s
    for B, H, L, D in _parse_shapes(args.shapes):
        S = L
        input_sets = _inputs(B, H, L, S, D, dtype, seed=L + D)
        for case_name in args.cases.split(","):
            case = CASES[case_name]
            progress.set_description(f"{case_name} B={B} H={H} S={S} D={D}")
            progress.update(1)
            if time.time() > deadline:
                results.append(dict(suite="prefill", case=case_name, shape=[B, H, L, D], error="skipped: time budget"))
                continue
            density = case.density(B, H, L, S)
            flops = 4 * B * H * L * S * D * density
            candidates = {}  # label -> (forward, kind)
            for implementation in implementations:
                candidates[f"flexattn_jax:{implementation}"] = (
                    lambda impl=implementation: jax_impls.flexattn(case, impl, B, H, L, S), "jax")
            if B * H * L * S <= MAX_REFERENCE_ELEMENTS and "reference" not in implementations:
                candidates["flexattn_jax:reference"] = (
                    lambda: jax_impls.flexattn(case, "reference", B, H, L, S), "jax")
            if jax.default_backend() == "gpu":
                candidates["jax.nn:cudnn"] = (
                    lambda: jax_impls.dot_product_attention(case, "cudnn", B, H, L, S), "jax")
            if B * H * L * S <= MAX_REFERENCE_ELEMENTS:  # XLA's attention builds the L x S scores too
                candidates["jax.nn:xla"] = (lambda: jax_impls.dot_product_attention(case, "xla", B, H, L, S), "jax")
            if torch_impls is not None:
                candidates["torch:flex_attention"] = (lambda: torch_impls.flex(case, B, H, L, S), "torch")
                candidates["torch:sdpa"] = (lambda: torch_impls.sdpa(case), "torch")

            for row in _time_cell(candidates, input_sets, args, torch_impls, flops, ceilings,
                                  dict(suite="prefill", case=case_name, shape=[B, H, L, D], density=density)):
                results.append(row)
            if torch_impls is not None:  # the cell's tensors went with _time_cell's frame
                import torch

                torch.cuda.empty_cache()


def _time_cell(candidates, input_sets, args, torch_impls, flops, ceilings, cell: dict) -> list[dict]:
    """One prefill cell: each candidate's row (``cell``'s fields and its own), its output checked against the
    first candidate's, its times over ``args.rounds`` rounds."""
    check_out = None  # the output every implementation is compared with: the first one that ran
    check_label = None
    rows = []  # the cell's rows in the candidates' order, less the candidates that do not apply
    timed = {}  # label -> (row, {field: timer})
    for label, (build, kind) in candidates.items():
        row = dict(cell, implementation=label)
        try:
            prepared = _prepare(build, kind, input_sets, args, torch_impls, row)
            if prepared is None:
                continue
            out, timers = prepared
            if check_out is None:
                check_out, check_label = out, label
                row["checked_against"] = "itself (first to run)"
            else:
                row["checked_against"] = check_label
                row["relative_error"] = _relative_error(out, check_out)
            timed[label] = (row, timers)
        except Exception as error:  # noqa: BLE001 - one failing case must not end the run
            _record_error(row, error, args)
        rows.append(row)
    # Every implementation is timed once per round, in turn: the GPU's clock drifts with its power state, and
    # interleaved rounds spread that drift over all of them instead of handing it to whichever ran last. Each round
    # starts one implementation later: the first timing of a cell follows its compiles, through which the GPU idled
    # and cooled, and that advantage under the power limit should not always go to the same implementation.
    samples = {label: {} for label in timed}
    labels = list(timed)
    for round_ in range(args.rounds):
        start = round_ % len(labels) if labels else 0
        for label in labels[start:] + labels[:start]:
            row, timers = timed[label]
            if "error" in row:
                continue
            try:
                for field, timer in timers.items():
                    samples[label].setdefault(field, []).append(timer())
            except Exception as error:  # noqa: BLE001
                _record_error(row, error, args)
    for label, (row, _) in timed.items():
        if "error" not in row:
            _add_times(row, samples[label], flops, ceilings, args.rounds)
    return rows


def _record_error(row: dict, error: Exception, args) -> None:
    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    if args.verbose:
        traceback.print_exc()


def _prepare(build, kind, input_sets, args, torch_impls, row):
    """One candidate ready to time: its output on the first input set and its timers (field -> milliseconds), or
    None where the candidate does not apply. Compiles (JAX) or warms up (torch) on the way."""
    forward = build()
    if forward is None:
        return None
    timers = {}
    if kind == "jax":
        q, k, v, do = input_sets[0]
        row["first_call_s"] = timing.time_first_call(forward, (q, k, v))
        out = forward(q, k, v)
        measure = _timer(args, "jax")
        timers["forward_ms"] = lambda: measure(forward, [s[:3] for s in input_sets])
        if "fwdbwd" in args.modes:
            grad = jax_impls.forward_backward(forward)
            jax.block_until_ready(grad(*input_sets[0]))  # compiled here, not inside the timer's warm-up window
            timers["fwd_bwd_ms"] = lambda: measure(grad, input_sets)
        return out, timers
    q, k, v, do = (torch_impls.from_jax(x) for x in input_sets[0])
    out = jnp.asarray(forward(q, k, v).float().cpu().numpy())
    measure = _timer(args, "torch")
    timers["forward_ms"] = lambda: measure(forward, [(q, k, v)])
    if "fwdbwd" in args.modes:
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        do_t = do.to(q.dtype)

        def step():
            forward(qg, kg, vg).backward(do_t)

        timers["fwd_bwd_ms"] = lambda: measure(step, [()])
    return out, timers


def _add_times(row, samples, flops, ceilings, rounds):
    """The row's times: the median of its rounds' (each round's own median of runs), every round kept."""
    for field, values in samples.items():
        row[field] = float(np.median(values))
        if rounds > 1:
            row[f"{field}_rounds"] = values
    if "forward_ms" in row:
        row["forward_tflops"] = flops / (row["forward_ms"] * 1e-3) / 1e12
        row["forward_fraction_of_matmul"] = row["forward_tflops"] / ceilings["matmul_tflops"]
    if "fwd_bwd_ms" in row:
        row["fwd_bwd_tflops"] = 3.5 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12


def decode_suite(args, torch_impls, ceilings, results, progress):
    B, Hq, Hkv, D = (1, 4, 2, 16) if args.tiny else (8, 32, 8, 128)
    lengths = (256, 512) if args.tiny else DECODE_LENGTHS
    dtype = jnp.dtype(args.dtype)
    for S in lengths:
        progress.set_description(f"decode S={S}")
        progress.update(1)
        keys = jax.random.split(jax.random.key(S), 3)
        q = jax.random.normal(keys[0], (B, Hq, 1, D), jnp.float32).astype(dtype)
        k = jax.random.normal(keys[1], (B, Hkv, S, D), jnp.float32).astype(dtype)
        v = jax.random.normal(keys[2], (B, Hkv, S, D), jnp.float32).astype(dtype)
        kv_bytes = 2 * B * Hkv * S * D * dtype.itemsize
        candidates = {
            "flexattn_jax:default": jax.jit(lambda q, k, v: fa.flex_attention(q, k, v, enable_gqa=True)),
        }
        if jax.default_backend() == "gpu":
            candidates["jax.nn:cudnn"] = jax.jit(
                lambda q, k, v: jnp.swapaxes(
                    jax.nn.dot_product_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), implementation="cudnn"),
                    1, 2)
            )
        check = None
        for label, forward in candidates.items():
            row = dict(suite="decode", shape=[B, Hq, Hkv, S, D], implementation=label)
            try:
                out = forward(q, k, v)
                if check is None:
                    check = out
                else:
                    row["relative_error"] = _relative_error(out, check)
                ms = _timer(args, "jax")(forward, [(q, k, v)])
                row.update(ms=ms, gbps=kv_bytes / (ms * 1e-3) / 1e9, fraction_of_copy=kv_bytes / (ms * 1e-3) / 1e9 /
                           ceilings["copy_gbps"])
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            results.append(row)
        if torch_impls is not None:
            row = dict(suite="decode", shape=[B, Hq, Hkv, S, D], implementation="torch:flex_attention")
            try:
                import torch

                qt, kt, vt = (torch_impls.from_jax(x) for x in (q, k, v))
                compiled = torch_impls._compiled_flex_attention()
                ms = _timer(args, "torch")(lambda: compiled(qt, kt, vt, enable_gqa=True), [()])
                row.update(ms=ms, gbps=kv_bytes / (ms * 1e-3) / 1e9,
                           fraction_of_copy=kv_bytes / (ms * 1e-3) / 1e9 / ceilings["copy_gbps"])
                del qt, kt, vt
                torch.cuda.empty_cache()
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            results.append(row)


def mask_suite(args, torch_impls, results, progress):
    lengths = (512, 1024) if args.tiny else MASK_LENGTHS
    for case_name in ("sliding_window", "causal", "document"):
        case = CASES[case_name]
        for L in lengths:
            progress.set_description(f"create_block_mask {case_name} {L}")
            progress.update(1)
            row = dict(suite="create_block_mask", case=case_name, length=L)
            try:
                mask_mod, _, _ = case.mods(1, 1, L, L)
                build = lambda mask_mod=mask_mod, L=L: fa.create_block_mask(mask_mod, None, None, L, L)  # noqa: E731
                start = time.perf_counter()
                block_mask = jax.block_until_ready(build())
                row["first_call_s"] = time.perf_counter() - start
                start = time.perf_counter()
                block_mask = jax.block_until_ready(build())
                row["seconds"] = time.perf_counter() - start
                row["block_mask_bytes"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(block_mask))
                # Peak memory of the build as XLA plans it: its temporaries plus its outputs (it takes no inputs).
                memory = jax.jit(build).lower().compile().memory_analysis()
                if memory is not None:
                    row["peak_bytes"] = int(memory.temp_size_in_bytes + memory.output_size_in_bytes)
                if torch_impls is not None:
                    try:
                        row["torch_seconds"] = torch_impls.create_block_mask_seconds(case, 1, L)
                    except Exception as error:  # noqa: BLE001 - PyTorch's failure does not void our numbers
                        row["torch_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            results.append(row)


class _SavedResults(list):
    """The result rows, rewritten to results.json at every row: a run cut short still leaves what it measured."""

    def __init__(self, path: str, context: dict, ceilings: dict):
        super().__init__()
        self.path, self.context, self.ceilings = path, context, ceilings

    def append(self, row: dict) -> None:
        super().append(row)
        self.save()

    def save(self) -> None:
        with open(self.path, "w") as f:
            json.dump({"context": self.context, "ceilings": self.ceilings, "results": list(self)}, f, indent=1)


def _fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results, context, ceilings) -> str:
    lines = [
        f"Run {context['date']} on {context['device']} ({context['backend']}), jax {context['jax']}"
        + (f", torch {context['torch']}, triton {context['triton']}" if "torch" in context else "")
        + f"; `{context['command']}`.",
        f"Measured ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s.",
        f"FLOP model: {context['flop_model']}. Density-adjusted TFLOP/s, forward / forward+backward; "
        "relative error of the forward output against the first implementation listed for that case.",
        f"Timing: {context['timing']}." if "timing" in context else "",
        "",
    ]
    rounds = max((len(r["forward_ms_rounds"]) for r in results if "forward_ms_rounds" in r), default=1)
    if rounds > 1:
        lines[-1:-1] = [f"Prefill cells: the median of {rounds} rounds, every implementation of a cell timed once a "
                        "round, in turn (each round's times in results.json).", ]
    prefill = [r for r in results if r["suite"] == "prefill"]
    for shape in sorted({tuple(r["shape"]) for r in prefill}, key=lambda s: (-s[2], -s[3])):
        rows = [r for r in prefill if tuple(r["shape"]) == shape]
        labels = list(dict.fromkeys(r["implementation"] for r in rows if "implementation" in r))
        B, H, L, D = shape
        lines += [f"### B={B}, H={H}, S={L}, D={D}, {context['dtype']}", ""]
        lines.append("| mask | density | " + " | ".join(labels) + " |")
        lines.append("|---|---|" + "---|" * len(labels))
        for case in dict.fromkeys(r["case"] for r in rows):
            cells = []
            density = next((r["density"] for r in rows if r["case"] == case and "density" in r), None)
            for label in labels:
                match = [r for r in rows if r["case"] == case and r.get("implementation") == label]
                if not match:
                    cells.append("–")
                elif "error" in match[0]:
                    cells.append("error")
                else:
                    r = match[0]
                    cell = f"{_fmt(r.get('forward_tflops'), 0)} / {_fmt(r.get('fwd_bwd_tflops'), 0)}"
                    if "relative_error" in r:
                        cell += f" ({r['relative_error']:.0e})"
                    cells.append(cell)
            lines.append(f"| {case} | {_fmt(density, 4)} | " + " | ".join(cells) + " |")
        lines.append("")
    decode = [r for r in results if r["suite"] == "decode"]
    if decode:
        lines += ["### Decoding: one query token, GB/s of K/V read (fraction of measured copy bandwidth)", "",
                  "| cache length | implementation | ms | GB/s | fraction |", "|---|---|---|---|---|"]
        for r in decode:
            if "error" in r:
                lines.append(f"| {r['shape'][3]} | {r['implementation']} | error | | |")
            else:
                lines.append(f"| {r['shape'][3]} | {r['implementation']} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                             f"{r['fraction_of_copy']:.2f} |")
        lines.append("")
    masks = [r for r in results if r["suite"] == "create_block_mask"]
    if masks:
        lines += ["### create_block_mask (B=H=1, block 128): seconds (first call incl. compile), torch seconds", "",
                  "| mask | length | seconds | first call | peak MB | BlockMask bytes | torch seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in masks:
            if "error" in r:
                lines.append(f"| {r['case']} | {r['length']} | error | | | | |")
            else:
                peak_mb = r["peak_bytes"] / 2**20 if "peak_bytes" in r else None
                lines.append(f"| {r['case']} | {r['length']} | {r['seconds']:.3f} | {r['first_call_s']:.2f} | "
                             f"{_fmt(peak_mb)} | {r['block_mask_bytes']} | "
                             f"{'error' if 'torch_error' in r else _fmt(r.get('torch_seconds'), 3)} |")
        lines.append("")
    errors = [r for r in results if "error" in r]
    if errors:
        lines += ["Errors:", ""] + [f"- {r.get('case', '')} {r.get('implementation', '')}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefill = [r for r in results if r["suite"] == "prefill" and "forward_tflops" in r]
    shapes = sorted({tuple(r["shape"]) for r in prefill})
    fig, axes = plt.subplots(len(shapes) or 1, 1, figsize=(11, 3.2 * max(1, len(shapes))), squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes):
        rows = [r for r in prefill if tuple(r["shape"]) == shape]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        labels = list(dict.fromkeys(r["implementation"] for r in rows))
        width = 0.8 / max(1, len(labels))
        for i, label in enumerate(labels):
            values = [next((r["forward_tflops"] for r in rows if r["case"] == c and r["implementation"] == label), 0)
                      for c in cases]
            ax.bar(np.arange(len(cases)) + i * width, values, width, label=label)
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, cases)
        ax.set_ylabel("forward TFLOP/s")
        ax.set_title("B={}, H={}, S={}, D={}".format(*shape))
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="prefill,decode,masks", help="comma-separated: prefill, decode, masks")
    parser.add_argument("--shapes", default=FULL_SHAPES, help="comma-separated BxHxSxD")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {list(CASES)}")
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--implementations", default="", help="flexattn_jax implementations (default: the kernels)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="prefill: time every implementation of a cell this many times, in turn; report medians")
    parser.add_argument("--timer", choices=TIMERS, default="bursts",
                        help="bursts: every implementation in bursts of calls back to back; flushed: the same, each "
                             "call after a 256 MB write (its time taken off); do_bench: torch by "
                             "triton.testing.do_bench, JAX in bursts (the runs before the thirty-second session)")
    parser.add_argument("--window-ms", "--jax-window-ms", dest="window_ms", type=float, default=timing.TORCH_REP_MS,
                        help="time each implementation (JAX alone under --timer do_bench) over at least this long, as "
                             "do_bench does (0: --runs bursts only, the timing before the twenty-sixth session)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting prefill cases after this")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes = "1x2x128x16"
        args.runs = 3
        args.window_ms = 0.0

    from tqdm.auto import tqdm

    torch_impls = None if args.no_torch else _torch()
    suites = args.suite.split(",")
    context = _context(args)
    ceilings = measure_ceilings(args.tiny, timing.load_window(args.window_ms))
    os.makedirs(args.out, exist_ok=True)
    results = _SavedResults(os.path.join(args.out, "results.json"), context, ceilings)
    total = (len(_parse_shapes(args.shapes)) * len(args.cases.split(",")) if "prefill" in suites else 0) + \
        ((2 if args.tiny else len(DECODE_LENGTHS)) if "decode" in suites else 0) + \
        ((6 if args.tiny else 3 * len(MASK_LENGTHS)) if "masks" in suites else 0)
    with tqdm(total=total, file=sys.stderr) as progress:
        if "prefill" in suites:
            prefill_suite(args, torch_impls, ceilings, results, progress)
        if "decode" in suites:
            decode_suite(args, torch_impls, ceilings, results, progress)
        if "masks" in suites:
            mask_suite(args, torch_impls, results, progress)

    results.save()
    table = markdown(results, context, ceilings)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(args.out, "tflops.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
