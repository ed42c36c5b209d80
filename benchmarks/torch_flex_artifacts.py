"""What PyTorch FlexAttention's forward compiles to on this GPU: its Triton kernels' IR, PTX and launch, to compare
with ours (``benchmarks.triton_report``) where it is faster.

    TRITON_CACHE_DIR=/tmp/triton python3 -m benchmarks.torch_flex_artifacts --cases noop alibi -D 64 --out $OUT/k

Compiles ``torch.compile(flex_attention)`` for each case at B=2, H=16, S=8192 in bf16 and runs it once. Triton
writes every kernel it builds (``.ttir``, ``.ttgir``, ``.ptx``, ``.cubin`` and a ``.json`` with the launch:
warps, stages, shared memory) under ``TRITON_CACHE_DIR``; this prints, per kernel, its name and launch, and copies
the attention kernels' (Inductor's ``triton_tem_*`` templates) IR, PTX and launch to ``--out``, one flat folder.
The files are read offline (``ptxas -v``, ``nvdisasm``; NOTES.md §27), never copied into the project.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil

import torch

from benchmarks.cases import CASES
from benchmarks.torch_impls import flex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["noop", "alibi"])
    parser.add_argument("-D", type=int, default=64)
    parser.add_argument("-S", type=int, default=8192)
    parser.add_argument("--out", default=None, help="where the attention kernels' files are copied")
    args = parser.parse_args()
    cache = os.environ.get("TRITON_CACHE_DIR")
    if cache is None:
        raise SystemExit("set TRITON_CACHE_DIR: the kernels' files are written there")
    B, H, S, D = 2, 16, args.S, args.D
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for name in args.cases:
        forward = flex(CASES[name], B, H, S, S)
        torch.cuda.synchronize()
        forward(q, k, v)
        torch.cuda.synchronize()
        print(f"compiled {name} D={D}", flush=True)
    for metadata in sorted(pathlib.Path(cache).rglob("*.json")):
        if metadata.name.startswith("__grp__"):
            continue
        launch = json.loads(metadata.read_text())
        if "num_warps" not in launch:
            continue
        print(f"{metadata.parent.name[:12]} {launch.get('name')}: warps {launch['num_warps']}, stages "
              f"{launch.get('num_stages')}, shared {launch.get('shared')}")
        if args.out and str(launch.get("name", "")).startswith("triton_tem"):
            out = pathlib.Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for kept in metadata.parent.glob(f"{launch['name']}.*"):
                if kept.suffix in (".ttgir", ".ptx", ".json"):
                    shutil.copy(kept, out / f"{metadata.parent.name[:8]}_{kept.name}")


if __name__ == "__main__":
    main()
