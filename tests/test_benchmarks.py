"""The benchmark suite's CPU smoke run: every suite runs at tiny sizes and writes its JSON, table and plot."""

import json
import time

import jax
import numpy as np
import pytest

import flexattn_jax as fa
from benchmarks import mosaic_sweep, run
from benchmarks.cases import CASES, document_ids
from flexattn_jax.backends import _captures


def test_tiny_run_writes_results(tmp_path):
    # jax.nn.dot_product_attention's own XLA path mixes bf16 and f32 internally, which strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        run.main(["--tiny", "--no-torch", "--out", str(tmp_path), "--cases", "causal,document,alibi,per_head"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"date", "jax", "device", "flop_model", "command"} <= set(data["context"])
    prefill = [r for r in data["results"] if r["suite"] == "prefill"]
    assert {r["case"] for r in prefill} == {"causal", "document", "alibi", "per_head"}
    assert not [r for r in data["results"] if "error" in r]
    for r in prefill:
        assert r["forward_ms"] > 0 and r["fwd_bwd_ms"] > 0 and 0 < r["density"] <= 1
        if "relative_error" in r:
            assert r["relative_error"] < 1e-2  # bf16 implementations agree
    assert {r["suite"] for r in data["results"]} == {"prefill", "decode", "create_block_mask"}
    assert "| causal |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "tflops.png").stat().st_size > 1000


def test_rounds_time_every_implementation_in_turn_and_report_the_median(tmp_path, monkeypatch):
    calls = []

    def fake_time_bursts(fn, input_sets, wait, **kwargs):
        calls.append(fn)
        return float(len(calls))  # each timing reads higher than the last: the median must be the middle round's

    monkeypatch.setattr(run.timing, "time_bursts", fake_time_bursts)
    with jax.numpy_dtype_promotion("standard"):
        run.main(["--tiny", "--no-torch", "--suite", "prefill", "--cases", "causal", "--modes", "fwd",
                  "--rounds", "3", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    labels = [r["implementation"] for r in rows]
    first = len(calls) - 3 * len(labels)  # the calls before are the ceilings' (measure_ceilings)
    assert len(labels) >= 2 and first >= 0
    n = len(labels)
    for i, r in enumerate(rows):
        # The rounds interleave the implementations, round j starting at implementation j: round j times
        # implementation i in the cell's (j * n + (i - j) % n)-th call.
        assert r["forward_ms_rounds"] == [float(first + j * n + (i - j) % n + 1) for j in range(3)]
        assert r["forward_ms"] == float(np.median(r["forward_ms_rounds"]))
    assert "the median of 3 rounds" in (tmp_path / "results.md").read_text()


def test_time_jax_loads_the_device_for_its_window():
    # PyTorch's timer loads the GPU for 100 + 500 ms; time_jax's window does the same with more bursts, not fewer.
    from benchmarks import timing

    calls = []

    def one_ms(x):
        calls.append(time.perf_counter())
        time.sleep(1e-3)
        return x

    x = jax.numpy.ones(4)
    assert timing.time_jax(one_ms, [(x,)], warmup=1, runs=2, burst=2) >= 1.0
    assert len(calls) == 1 + 2 * 2  # without a window: the counts alone
    calls.clear()
    ms = timing.time_jax(one_ms, [(x,)], warmup=1, runs=2, burst=2, warmup_ms=20, min_ms=60)
    assert 1.0 <= ms < 20.0  # a burst's time per call, not the window's (60 ms and more)
    assert calls[-1] - calls[0] >= 0.075 and len(calls) >= 20
    # benchmarks.run's and mosaic_sweep's --jax-window-ms: PyTorch's warm-up in proportion, or no window at all
    assert timing.load_window(500.0) == {"warmup_ms": 100.0, "min_ms": 500.0}
    assert timing.load_window(0.0) == {}


def test_time_bursts_waits_once_a_burst():
    # timer_gaps times SDPA by time_jax's bursts with torch's synchronisation as ``wait``: once a warm-up call,
    # then once a burst, on the burst's outputs.
    from benchmarks import timing

    waited = []
    counter = iter(range(1000))
    ms = timing.time_bursts(lambda: next(counter), [()], waited.append, warmup=2, runs=3, burst=4)
    assert waited == [0, 1, [2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]]
    assert 0.0 <= ms < 1.0


def test_time_flushed_takes_the_flush_off_and_runs_it_before_every_call(monkeypatch):
    from benchmarks import timing

    clock = [0.0]  # seconds: the flush takes 2 ms, the call 3 ms, on a clock of the test's own
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    order = []

    def flush(seconds=2e-3):
        order.append("flush")
        clock[0] += seconds

    def call():
        order.append("call")
        clock[0] += 3e-3
        return 0

    ms = timing.time_flushed(call, [()], lambda _: None, flush, warmup=1, runs=5, burst=2)
    assert abs(ms - 3.0) < 1e-6  # the call's 3 ms, not the 5 ms of flush and call
    with_flush = order[: 2 * (1 + 5 * 2)]  # the flushed bursts come first: flush, call, flush, call, ...
    assert with_flush == ["flush", "call"] * (1 + 5 * 2)
    assert order[len(with_flush):] == ["flush"] * (1 + 5 * 2)  # then the flush alone
    # A call that the flush's noise hides is an error, not a negative time: here the flush reads 1 ms beside the
    # call (the flushed bursts' 1 + 3 * 2 calls) and 2 ms alone.
    flushes = []

    def uneven_flush():
        flushes.append(None)
        flush(1e-3 if len(flushes) <= 7 else 2e-3)

    with pytest.raises(ValueError, match="lost in the flush"):
        timing.time_flushed(lambda: 0, [()], lambda _: None, uneven_flush, warmup=1, runs=3, burst=2)


def test_timer_times_jax_and_torch_alike_unless_asked_for_do_bench(monkeypatch):
    # NOTES.md section 56: do_bench's flushes raise torch's rate against calls back to back; --timer bursts and
    # flushed time both frameworks one way, do_bench keeps the old mix.
    import argparse

    used = []
    monkeypatch.setattr(run.timing, "time_bursts", lambda fn, sets, wait, **kw: used.append(("bursts", wait)) or 1.0)
    monkeypatch.setattr(run.timing, "time_flushed", lambda fn, sets, wait, flush, **kw: used.append("flushed") or 2.0)
    monkeypatch.setattr(run.timing, "time_torch", lambda fn: used.append("do_bench") or 3.0)
    monkeypatch.setattr(run.timing, "torch_flush", lambda: None)
    monkeypatch.setattr(run.timing, "jax_flush", lambda: None)  # no 256 MB scratch on the test's device
    for timer, kind, expected in [("bursts", "jax", ("bursts", jax.block_until_ready)),
                                  ("bursts", "torch", ("bursts", run.timing.torch_wait)),
                                  ("flushed", "jax", "flushed"), ("flushed", "torch", "flushed"),
                                  ("do_bench", "jax", ("bursts", jax.block_until_ready)),
                                  ("do_bench", "torch", "do_bench")]:
        args = argparse.Namespace(timer=timer, runs=3, window_ms=0.0)
        run._timer(args, kind)(lambda: None, [()])
        assert used.pop() == expected, (timer, kind)
        assert ("do_bench" in run._timing_text(args, {})) == (timer == "do_bench")


def test_case_densities_match_the_published_anchors():
    # PERF_TARGETS.md: causal 0.5001, sliding_window 0.1172, prefix_lm 0.5313, document 0.0831 at S=8192.
    S = 8192
    assert abs(CASES["causal"].density(1, 1, S, S) - 0.5001) < 1e-4
    assert abs(CASES["sliding_window"].density(1, 1, S, S) - 0.1172) < 1e-4
    assert abs(CASES["prefix_lm"].density(1, 1, S, S) - 0.5313) < 1e-4
    assert abs(CASES["document"].density(1, 1, S, S) - 0.0831) < 1e-4
    assert len(set(document_ids(S).tolist())) == 7


def test_sweep_config_int_indices_traces_the_index_arithmetic_as_written():
    """mosaic_sweep's "int_indices" times the kernels without ModProgram.with_index_bound, and puts it back."""
    program, _ = _captures.trace_score_mod(fa.generate_alibi_bias(4), 16, 16)
    with mosaic_sweep._traced_as("int_indices"):
        assert not program.with_index_bound(64).exact_indices
    with mosaic_sweep._traced_as("triton"):
        assert program.with_index_bound(64).exact_indices
    assert program.with_index_bound(64).exact_indices
    assert mosaic_sweep.options_of("int_indices") == {}


def test_sweep_config_libdevice_exp2_routes_exp2_through_jnp_and_puts_it_back():
    """mosaic_sweep's "libdevice_exp2" times the Triton kernels with jnp.exp2 (libdevice) in place of the
    flush-to-zero instruction, only while that configuration is traced."""
    from flexattn_jax.backends.pallas_triton import _tile

    fast = _tile.exp2
    with mosaic_sweep._traced_as("libdevice_exp2"):
        assert _tile.exp2 is not fast
        x = jax.numpy.linspace(-3.0, 3.0, 8)
        assert jax.numpy.array_equal(_tile.exp2(x, fast=True), jax.numpy.exp2(x))
    assert _tile.exp2 is fast
    assert mosaic_sweep.options_of("libdevice_exp2") == {}


def test_sweep_configs_of_the_repair_patch_the_forward_and_put_it_back():
    """mosaic_sweep's section 61 configurations: the repair's gate always open, no repair at all, every anchor a
    constant; each only while traced, on the anchored walk's options."""
    from flexattn_jax.backends.pallas_mosaic import forward

    needs = jax.numpy.zeros((1, 2, 3), jax.numpy.int32)
    originals = forward.repair_gate, forward.repair_failed_items, forward.row_maximum
    with mosaic_sweep._traced_as("repair_ungated"):
        assert forward.repair_gate(needs).tolist() == [1]
    with mosaic_sweep._traced_as("no_repair"):
        assert forward.repair_failed_items(None, [], "out", "lse", 8) == ("out", "lse")
    with mosaic_sweep._traced_as("anchor_constant"):
        assert forward.row_maximum(jax.numpy.ones((4, 16)), tree=True).tolist() == [7.0] * 4
    assert (forward.repair_gate, forward.repair_failed_items, forward.row_maximum) == originals
    assert forward.repair_gate(needs).tolist() == [0]
    for config in ("repair_ungated", "no_repair", "anchor_constant"):
        assert mosaic_sweep.options_of(config) == {"mosaic_fwd_anchored_shift": 1}


def test_clock_readings_summarised_per_window(capsys):
    from benchmarks import clocks

    sampler = clocks.Sampler.__new__(clocks.Sampler)  # the readings without nvidia-smi
    sampler.samples = [(1.0, ["1980", "650", "60", "0x0"]), (2.0, ["1755", "700", "71", "0x4"]),
                       (5.0, ["345", "90", "30", "0x1"])]
    assert sampler.between(0.5, 2.5) == "1868 MHz, 675 W, 71 C, reasons 0x0 0x4 (2 samples)"
    assert sampler.between(2.5, 4.0) == "no samples"
    clocks.measure("f", lambda: None, lambda: None, 2e9, sampler, seconds=0.01, gap_ms=0.0, alone=3)
    rows = capsys.readouterr().out.splitlines()
    assert [row.split(" | ")[1] for row in rows] == ["alone", "back to back"]


def test_clock_ramp_reports_each_stretch_of_the_load(capsys):
    from benchmarks import clocks

    sampler = clocks.Sampler.__new__(clocks.Sampler)
    sampler.samples = []
    calls = []

    def call():
        calls.append(time.perf_counter())
        time.sleep(2e-3)

    clocks.ramp("f", call, lambda: None, 2e9, sampler, idle_s=0.0, ramp_ms=120.0)
    rows = [row.split(" | ") for row in capsys.readouterr().out.splitlines()]
    stretches = [row[1] for row in rows]  # in order; a stretch no burst ended in is left out
    assert stretches[-1] == "100-200 ms" and "50-100 ms" in stretches
    assert stretches == [f"{low}-{high} ms" for low, high in zip(clocks.RAMP_EDGES_MS, clocks.RAMP_EDGES_MS[1:])
                         if f"{low}-{high} ms" in stretches]
    assert all(row[4] == "no samples |" for row in rows)
    # a call takes about 2 ms: 2e9 FLOP in 2 ms is 1 TFLOP/s, printed rounded (0 or 1 as the sleep overshoots)
    assert all(row[3] in ("0", "1") for row in rows)
    assert sum(int(row[2]) for row in rows) * 5 == len(calls) - 1  # one call before the idle


def test_history_appends_runs_and_shows_each_cell_newest():
    from benchmarks import history

    def row(case, implementation, tflops=None, error=None):
        r = {"suite": "prefill", "case": case, "shape": [2, 16, 8192, 128]}
        if implementation:
            r["implementation"] = implementation
        return {**r, "forward_tflops": tflops} if error is None else {**r, "error": error}

    record = {"context": {}, "ceilings": {}, "runs": [], "results": []}
    first = {"context": {"date": "1"}, "ceilings": {"matmul_tflops": 1.0},
             "results": [row("noop", "a", 500), row("causal", "a", 400), row("noop", "b", 450)]}
    second = {"context": {"date": "2"}, "ceilings": {"matmul_tflops": 2.0},
              "results": [row("noop", "a", 520), row("causal", "a", error="RuntimeError: out of memory"),
                          row("softcap", None, error="skipped: time budget")]}
    assert history.append(record, first) == 0 and history.append(record, second) == 1
    assert record["context"] == {"date": "2"} and len(record["runs"]) == 2 and len(record["results"]) == 6
    newest = {(r["case"], r["implementation"]): (r["run"], r.get("forward_tflops")) for r in history.latest(record)}
    # noop of a from the second run; causal of a kept from the first, whose number had no error; the skip is no cell
    assert newest == {("noop", "a"): (1, 520), ("causal", "a"): (0, 400), ("noop", "b"): (0, 450)}


def test_sass_counters_summarised_per_kernel():
    from benchmarks import ncu_sass

    header = '"Address","Source","Instructions Executed","stall_wait","stall_barrier","stall_wait (Not Issued)"'
    text = "\n".join([
        '"Kernel Name","attention_kernel"', header,
        '"0x0","      MOV R1, c[0x0][0x28]","4","1","0","9"',  # setup, run once per warp
        '"0x10","      MUFU.EX2 R2, R2","64","30","0","9"',  # the loop body: 64 executions each
        '"0x20","@!P1  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24","64","10","0","9"',
        '"0x30","      WARPGROUP.DEPBAR.LE gsb0, 0x0","64","0","60","9"',
        '"Kernel Name","attention_kernel"', header, '"0x0","      NOP","1","0","0","0"',  # a second launch: ignored
    ])
    kernels = ncu_sass.read(text)
    assert list(kernels) == ["attention_kernel"] and len(kernels["attention_kernel"]) == 4
    loop = [i for i in kernels["attention_kernel"] if i.executed == ncu_sass.loop_count(kernels["attention_kernel"])]
    assert [i.opcode for i in loop] == ["MUFU", "HGMMA", "WARPGROUP"]
    assert ncu_sass.shares(loop) == [("barrier", 0.6), ("wait", 0.4)]
    report = ncu_sass.report("attention_kernel", kernels["attention_kernel"], top=3)
    assert "loop: 3 instructions executed 64 times each" in report
    assert "wait, by opcode: MUFU 75%, HGMMA 25%" in report


@pytest.mark.parametrize("name", ["fma_f32", "tanh_f32", "tanh_f16x2", "ex2_bf16x2"])
def test_mufu_rate_chains_lower_for_cuda(name):
    # Each instruction's chain lowers to one Triton kernel holding the inline PTX once per written-out step (the
    # loop is not unrolled further); the GPU run is `python -m benchmarks.mufu_rate`.
    from benchmarks import mufu_rate

    op = mufu_rate.OPS[name]
    fn = mufu_rate.chain(op, num_programs=2, iterations=3)
    x = jax.ShapeDtypeStruct((2 * mufu_rate.BLOCK,), op.dtype)
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        text = fn.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "mufu_rate_chain" in text
    assert op.asm.split()[0] in text  # the instruction, in the kernel's serialized Triton IR


def test_mufu_rate_prints_a_row_per_instruction(monkeypatch, capsys):
    # The table without a GPU: each chain a plain XLA function of the same shapes, nvidia-smi's clock absent.
    from benchmarks import mufu_rate

    monkeypatch.setattr(mufu_rate, "num_sms", lambda: 2)
    monkeypatch.setattr(mufu_rate, "_sm_clock_mhz", lambda: "?")
    monkeypatch.setattr(mufu_rate, "chain", lambda op, num_programs, iterations: jax.jit(lambda x: -x))
    mufu_rate.main(["--iterations", "1", "--ops", "fma_f32", "tanh_f16x2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| fma_f32", "| tanh_f16x2"]
    assert rows[0].split(" | ")[4] == "128.0 (fma_f32 = 128)"  # no clock read: the fallback's own rate
    results, instructions = (float(cell) for cell in rows[1].split(" | ")[2:4])
    # two results an f16x2 instruction, up to the table's two decimals
    assert results == pytest.approx(2 * instructions, abs=0.02)


def test_mufu_rate_counts_results_a_clock_at_the_clock_read(monkeypatch, capsys):
    # With nvidia-smi's clock read, each row's results a clock are its results a nanosecond over the clock in GHz.
    from benchmarks import mufu_rate

    monkeypatch.setattr(mufu_rate, "num_sms", lambda: 2)
    monkeypatch.setattr(mufu_rate, "_sm_clock_mhz", lambda: "1500")
    monkeypatch.setattr(mufu_rate, "chain", lambda op, num_programs, iterations: jax.jit(lambda x: -x))
    monkeypatch.setattr(mufu_rate.timing, "time_jax", lambda *args, **kwargs: 0.001)  # a fixed time: fixed rates
    mufu_rate.main(["--iterations", "1", "--ops", "ex2_f32"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| ex2_f32"))
    cells = row.split(" | ")
    # 16 programs of 4096 elements, 4 steps each, in a microsecond on 2 SMs: 131.07 a nanosecond an SM
    assert float(cells[2]) == pytest.approx(131.07)
    assert float(cells[4]) == pytest.approx(131.07 / 1.5, abs=0.05)


def test_kernel_fingerprints_repeat_and_tell_kernels_apart(monkeypatch):
    from benchmarks import kernel_fingerprints
    from jax.experimental.mosaic.gpu import core

    causal = ("causal", 64, fa.causal_mask, None, None, "forward")
    overlapped = ("overlapped", 64, fa.causal_mask, None, {"mosaic_fwd_overlap": 1}, "forward")
    monkeypatch.setattr(kernel_fingerprints, "_cases", lambda: iter([causal, overlapped, causal]))
    serialize = core._run_serde_pass
    lines = list(kernel_fingerprints.fingerprints())
    assert core._run_serde_pass is serialize  # the recording hook is taken off again
    assert [line.split(" ", 1)[1] for line in lines] == ["causal", "overlapped", "causal"]
    first, other, again = (line.split()[0] for line in lines)
    assert first == again != other
