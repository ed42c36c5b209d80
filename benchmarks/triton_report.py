"""What the pallas_triton kernels compile to for Hopper, without a GPU: registers, spills, and which matmul
instructions each dot became.

    pip install triton==3.6.0            # the GPU machine's version; not a dependency of the project
    python -m benchmarks.triton_report [--mask causal] [--score-mod softcap|alibi|relative_table] [-D 128]
        [--options '{"bwd_num_warps": 8}']

Lowers the forward and the gradient of ``pallas_triton`` for CUDA on the CPU (as the lowering tests do), keeps the
Triton IR of each kernel, runs Triton's TTIR passes on it (as XLA's pipeline does), compiles it with the installed
``triton`` for sm_90a and runs the ptxas bundled with it.
Per kernel it prints ptxas's register and spill line, the shared memory Triton allocates (Hopper has 227 KiB per
block), and counts of ``wgmma`` (Hopper's asynchronous matmul) and
``mma.sync`` (the Ampere one, which Triton falls back to when a dot's operands do not suit wgmma) in the PTX.

The numbers are indicative: on the GPU, XLA compiles the same IR with the Triton it bundles, which is close to
but not the same as the release installed here. Speed is only measured on the GPU (``benchmarks.mosaic_sweep
--implementation pallas_triton``).
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import re
import subprocess
import tempfile


def _capture_triton_ir(directory: pathlib.Path):
    """Makes Pallas' Triton lowering write each kernel's IR text to ``directory`` (a patch of a private function:
    this tool follows the pinned JAX)."""
    from jax._src.pallas.triton import lowering

    lower = lowering.lower_jaxpr_to_triton_module
    names: list[str] = []

    def recording(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        name = jaxpr.debug_info.func_name if jaxpr.debug_info else "kernel"
        names.append(name)
        (directory / f"{len(names) - 1}_{name}.ttir").write_text(result.module.operation.get_asm())
        return result

    lowering.lower_jaxpr_to_triton_module = recording
    return names


def _as_xla_compiles(ir_path: pathlib.Path, options) -> pathlib.Path:
    """The kernel's IR after Triton's TTIR passes (canonicalize, combine, CSE), which XLA's pipeline runs first and
    ``triton.compile`` of a .ttir file skips: without them, for one, ``acc * c + dot(p, v)`` keeps a separate
    accumulator (the combine pass makes it the dot's own)."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ir.parse_mlir_module(str(ir_path), context)
    module.context = context
    module = CUDABackend.make_ttir(module, {}, backend.parse_options(options), 90)
    out = ir_path.parent / "passes" / ir_path.name
    out.parent.mkdir(exist_ok=True)
    out.write_text(str(module))
    return out


def _loops(sass: str) -> list[str]:
    """Each loop of a kernel's SASS (a label and the backward branch to it): instructions, local-memory loads and
    stores (spills), tensor-core and exp2 instructions per iteration, and the copy groups its waits leave in flight."""
    lines = sass.splitlines()
    labels = {line.rstrip(":").strip(): n for n, line in enumerate(lines) if re.fullmatch(r"\.L_x_\d+:", line.strip())}
    loops = []
    for n, line in enumerate(lines):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target is None or labels.get(target.group(1), n) >= n:
            continue
        body = [x for x in lines[labels[target.group(1)] : n + 1] if re.match(r"\s+/\*[0-9a-f]+\*/", x)]
        if len(body) < 4:  # the branch-to-self that ends a kernel
            continue
        count = lambda pattern: sum(bool(re.search(pattern, x)) for x in body)  # noqa: E731
        # DEPBAR.LE SB0, n waits until at most n groups of asynchronous copies are in flight: 0 at the top of a loop
        # means its loads are not overlapped with its own compute (only other programs on the SM hide them).
        waits = sorted({int(w, 16) for w in re.findall(r"DEPBAR\.LE SB0, (0x[0-9a-f]+)", "\n".join(body))})
        loops.append(f"{len(body)} instructions, {count(r' (STL|LDL)')} local, {count(r' HGMMA')} HGMMA, "
                     f"{count(r' MUFU.EX2')} MUFU.EX2, copies in flight at its waits {waits}")
    return loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask", choices=("noop", "causal"), default="causal")
    parser.add_argument("--score-mod", choices=("identity", "softcap", "alibi", "relative_table"), default="identity",
                        help="tanh soft-capping at 30, ALiBi (slopes computed from h), or a learned relative-position "
                             "bias table (captured and differentiated: the dQ kernel adds its gradient up)")
    parser.add_argument("-D", type=int, default=128, help="head dim")
    parser.add_argument("--options", default="{}", help="kernel_options, as a Python dict literal")
    parser.add_argument("--out", default=None, help="where the IR and PTX go (default: a temporary directory)")
    parser.add_argument("--ftz", type=int, choices=(0, 1), default=1,
                        help="libdevice's flush-to-zero variant of its float32 functions (exp2f): Triton's own "
                             "default 1; XLA's modules carry nvvm-reflect-ftz 0 unless --xla_gpu_ftz is set")
    args = parser.parse_args()
    options = ast.literal_eval(args.options) or None
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="triton_report_"))
    out.mkdir(parents=True, exist_ok=True)

    import jax
    import jax.numpy as jnp
    import triton
    from jax._src.mesh import AbstractDevice, AbstractMesh
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    import flexattn_jax as fa
    from flexattn_jax.backends import pallas_triton
    from flexattn_jax.backends.pallas_triton import backward, config

    _capture_triton_ir(out)
    B, H, S, D = 1, 2, 1024, args.D
    q, k, v = (jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 3))
    mask_mod = fa.causal_mask if args.mask == "causal" else fa.noop_mask
    block_mask = fa.create_block_mask(mask_mod, None, None, S, S)
    table = jnp.zeros((H, 2 * S - 1), jnp.float32)
    make_score_mod = {"identity": lambda table: fa.identity, "softcap": lambda table: fa.tanh_softcap(30.0),
                      "alibi": lambda table: fa.generate_alibi_bias(H), "relative_table": fa.relative_position_bias}[
        args.score_mod]

    def loss(q, k, v, table):
        out, _ = pallas_triton.attention(
            q, k, v, score_mod=make_score_mod(table), mask_mod=mask_mod, kv_num_blocks=block_mask.kv_num_blocks,
            kv_indices=block_mask.kv_indices, full_kv_num_blocks=block_mask.full_kv_num_blocks,
            full_kv_indices=block_mask.full_kv_indices, block_size=block_mask.BLOCK_SIZE, scale=D**-0.5,
            kernel_options=options,
        )
        return jnp.sum(out.astype(jnp.float32))

    hopper = AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=hopper)):
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, v, table).lower(lowering_platforms=("cuda",))

    sizes = dict(q_len=S, kv_len=S, mask_block_size=block_mask.BLOCK_SIZE, mask_num_blocks=block_mask.kv_indices.shape[-2:])
    fwd = config.forward_config(options, head_dim=D, dtype=q.dtype, **sizes)
    bwd = backward.backward_config(options, head_dim=D, dtype=q.dtype, **sizes)
    if args.score_mod == "relative_table":  # the launch pallas_triton gives a score_mod with captured arrays
        bwd = backward.cap_stages_for_captures(bwd, options)
    launch = {"forward": (fwd.num_warps, fwd.num_stages), "dkdv": (bwd.num_warps, bwd.num_stages),
              "dq": (bwd.dq_num_warps, bwd.dq_num_stages)}
    print(f"triton {triton.__version__}, sm_90a, D={D}, {args.mask}, {args.score_mod}; "
          f"forward {fwd}; backward {bwd}")
    ptxas = get_ptxas(90).path
    for ir in sorted(out.glob("*.ttir")):
        kind = next((name for name in launch if ir.stem.endswith(name)), None)
        if kind is None:
            continue
        warps, stages = launch[kind]
        launch_options = {"num_warps": warps, "num_stages": stages, "enable_reflect_ftz": bool(args.ftz)}
        kernel = triton.compile(str(_as_xla_compiles(ir, launch_options)), target=GPUTarget("cuda", 90, 32),
                                options=launch_options)
        ptx = ir.with_suffix(".ptx")
        ptx.write_text(kernel.asm["ptx"])
        cubin = ir.with_suffix(".cubin")
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)], capture_output=True,
                                text=True).stderr
        nvdisasm = pathlib.Path(ptxas).with_name("nvdisasm")  # bundled with Triton's NVIDIA backend
        sass = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True).stdout \
            if nvdisasm.exists() else ""
        ir.with_suffix(".sass").write_text(sass)
        lines = [line.split(":", 1)[-1].strip() for line in report.splitlines() if "registers" in line or "spill" in line]
        text = kernel.asm["ptx"]
        print(f"## {ir.stem} ({warps} warps, {stages} stages): {'; '.join(lines)}; "
              f"shared memory {kernel.metadata.shared} bytes; "
              f"wgmma {text.count('wgmma.mma_async')}, mma.sync {text.count('mma.sync')}")
        for number, loop in enumerate(_loops(sass)):
            print(f"   loop {number}: {loop} per iteration")


if __name__ == "__main__":
    main()
