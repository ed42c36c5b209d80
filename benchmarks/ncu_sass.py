"""What each kernel's SASS did, from the per-instruction counters that ``device_session.sh ncu`` brings back.

    python -m benchmarks.ncu_sass ncu_noop_sass.csv.gz [--kernel flex] [--top 12]
    python -m benchmarks.ncu_sass ncu_s2048_noop_sass.csv.gz --against ncu_s8k_noop_sass.csv.gz

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

``--against`` compares one kernel's code (the same SASS, instruction by instruction) profiled at two shapes
(NOTES.md section 38): the other profile's samples are scaled by the ratio of the hottest loops' counts, the work
done, and the instructions listed are those whose samples differ most, with their execution counts, so that the
time one shape spends beyond the other's, per unit of work, is placed on instructions (the loop, a per-item
prologue, the memory warp's waits). Both profiles must use the same sampling interval (their samples per
microsecond of the kernel's duration agree).
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


def compare(instructions: list[Instruction], other: list[Instruction], top: int) -> str:
    """The instructions whose stall samples differ most between two profiles of the same code, the second scaled
    to the first's work (its hottest loop's count)."""
    # Branch targets are absolute addresses, which differ from one load of the code to the next: compare opcodes.
    if [i.opcode for i in instructions] != [i.opcode for i in other]:
        raise SystemExit("--against: the two kernels' SASS differ; they are not the same code")
    scale = loop_count(instructions) / loop_count(other)
    rows = []
    for mine, theirs in zip(instructions, other):
        samples, expected = sum(mine.stalls.values()), scale * sum(theirs.stalls.values())
        rows.append((samples - expected, samples, expected, mine))
    total, expected_total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines = [f"samples {total}, the other's scaled by {scale:.4f}: {expected_total:.0f} "
             f"({100 * (total / expected_total - 1):+.1f}%)",
             "excess  samples  scaled  executed  reasons (here)  instruction"]
    for excess, samples, expected, instruction in sorted(rows, key=lambda r: -abs(r[0]))[:top]:
        reasons = ",".join(f"{k} {v}" for k, v in collections.Counter(instruction.stalls).most_common(2) if v)
        lines.append(f"{excess:+7.0f} {samples:8d} {expected:7.0f} {instruction.executed:9d}  {reasons:28s} "
                     f"{instruction.source[:60]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a SASS CSV from ncu --page source --csv, .gz or not")
    parser.add_argument("--kernel", default="", help="only kernels whose name matches this regular expression")
    parser.add_argument("--top", type=int, default=12, help="opcodes (or, with --against, instructions) listed")
    parser.add_argument("--against", default=None, help="a second SASS CSV of the same kernel at another shape")
    args = parser.parse_args()
    kernels = _read_file(args.path)
    others = _read_file(args.against) if args.against else {}
    for name, instructions in kernels.items():
        if not re.search(args.kernel, name):
            continue
        if args.against:
            if name in others:
                print(f"## {name}\n\n{compare(instructions, others[name], args.top)}", end="\n\n")
        else:
            print(report(name, instructions, args.top), end="\n\n")


def _read_file(path: str) -> dict[str, list[Instruction]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return read(f.read())


if __name__ == "__main__":
    main()
