"""What each kernel's SASS did, from the per-instruction counters that ``device_session.sh ncu`` brings back.

    python -m benchmarks.ncu_sass ncu_noop_sass.csv.gz [--kernel flex] [--top 12]

The input is ``ncu --import REPORT --page source --print-source sass --csv`` (gzipped or not): for each profiled
kernel a "Kernel Name" line, a header, and one row per instruction with how often it executed and the warp-stall
samples taken on it, by reason. Per kernel this prints (NOTES.md sections 29 and 31 were read this way):

* the warp instructions executed, by opcode;
* the **loop**: the instructions executed exactly as often as the most-executed count group (the body of the
  kernel's hottest loop, run by every compute warp once per step), its instructions per execution, and the stall
  reasons sampled there, beside those of the rest (setup, epilogue, and a memory warpgroup's own loop);
* for the loop's three main stall reasons, their samples by opcode and the instructions they were sampled on most.

Stall-sample totals depend on the sampling interval, which Nsight Compute picks per kernel: compare shares of
samples between kernels, and instruction counts in absolute terms.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import re
from dataclasses import dataclass

_STALL = re.compile(r"^stall_(\w+)$")  # the all-samples columns; "(Not Issued)" ones are left out


@dataclass
class Instruction:
    address: str
    source: str
    executed: int
    stalls: dict[str, int]

    @property
    def opcode(self) -> str:
        """The opcode without its modifiers or predicate: "@!P1 BRA 0x..." -> "BRA", "HGMMA.64x128x16.F32" -> "HGMMA"."""
        words = self.source.split()
        if not words:
            return ""
        word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        return word.split(".")[0]


def read(text: str) -> dict[str, list[Instruction]]:
    """Each kernel's instructions, in the order of the file (its first launch of each name)."""
    kernels: dict[str, list[Instruction]] = {}
    name = header = None
    for row in csv.reader(io.StringIO(text)):
        if not row:
            continue
        if row[0] == "Kernel Name":
            name, header = row[1], None
            if name in kernels:  # a later launch of the same kernel: keep the first
                name = None
            else:
                kernels[name] = []
            continue
        if row[0] == "Address":
            header = row
            continue
        if name is None or header is None or len(row) != len(header):
            continue
        fields = dict(zip(header, row))
        stalls = {m.group(1): int(fields[k] or 0) for k in header if (m := _STALL.match(k))}
        kernels[name].append(Instruction(fields["Address"], fields["Source"].strip(),
                                         int(fields.get("Instructions Executed") or 0), stalls))
    return kernels


def loop_count(instructions: list[Instruction]) -> int:
    """The execution count whose instructions executed most in total: the hottest loop body's count."""
    totals = collections.Counter()
    for instruction in instructions:
        if instruction.executed:
            totals[instruction.executed] += instruction.executed
    return totals.most_common(1)[0][0] if totals else 0


def shares(instructions: list[Instruction]) -> list[tuple[str, float]]:
    """Stall reasons by their share of the samples taken on these instructions, largest first."""
    totals = collections.Counter()
    for instruction in instructions:
        totals.update(instruction.stalls)
    samples = sum(totals.values())
    return [(reason, count / samples) for reason, count in totals.most_common() if count] if samples else []


def report(name: str, instructions: list[Instruction], top: int) -> str:
    lines = []
    executed = sum(i.executed for i in instructions)
    lines.append(f"## {name}\n\n{executed / 1e6:.1f}M warp instructions executed, {len(instructions)} in the code")
    mix = collections.Counter()
    for instruction in instructions:
        mix[instruction.opcode] += instruction.executed
    lines.append("by opcode: " + ", ".join(f"{op} {n / 1e6:.1f}M" for op, n in mix.most_common(top)))
    count = loop_count(instructions)
    loop = [i for i in instructions if i.executed == count]
    rest = [i for i in instructions if i.executed != count]
    if count:
        lines.append(f"loop: {len(loop)} instructions executed {count} times each "
                     f"({sum(i.executed for i in loop) / 1e6:.1f}M)")
    for label, group in (("loop", loop), ("rest", rest)):
        lines.append(f"stalls, {label}: " + ", ".join(f"{r} {100 * s:.1f}%" for r, s in shares(group)[:8]))
    for reason, _ in shares(loop)[:3]:
        by_opcode = collections.Counter()
        for instruction in loop:
            by_opcode[instruction.opcode] += instruction.stalls.get(reason, 0)
        samples = sum(by_opcode.values())
        lines.append(f"  {reason}, by opcode: "
                     + ", ".join(f"{op} {100 * n / samples:.0f}%" for op, n in by_opcode.most_common(6) if n))
        hottest = sorted(loop, key=lambda i: -i.stalls.get(reason, 0))[:5]
        lines.append(f"  {reason}, most on: "
                     + "; ".join(f"{i.source[:48]} ({i.stalls.get(reason, 0)})" for i in hottest))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a SASS CSV from ncu --page source --csv, .gz or not")
    parser.add_argument("--kernel", default="", help="only kernels whose name matches this regular expression")
    parser.add_argument("--top", type=int, default=12, help="opcodes listed")
    args = parser.parse_args()
    opener = gzip.open if args.path.endswith(".gz") else open
    with opener(args.path, "rt") as f:
        kernels = read(f.read())
    for name, instructions in kernels.items():
        if re.search(args.kernel, name):
            print(report(name, instructions, args.top), end="\n\n")


if __name__ == "__main__":
    main()
