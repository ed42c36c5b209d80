"""The repository's record of GPU runs, ``benchmarks/results.json``: every run's rows, numbered as RESULTS.md numbers
its runs, and the newest measurement of each cell.

    python -m benchmarks.history benchmarks/results.json OUT/run/results.json [OUT/run64/results.json ...]

appends each given ``benchmarks.run`` output as the next run: its context and ceilings go to ``runs``, its rows to
``results``, each tagged with its run number (``run``). The file's own ``context`` and ``ceilings`` become the last
appended run's. ``--placeholder`` appends a run whose rows were not kept (its numbers are in RESULTS.md only), so
that the numbers after it keep matching RESULTS.md's.

``latest`` is what the performance notebook plots: for each cell (suite, mask, shape, implementation, length) the
row of the newest run that measured it without an error.
"""

from __future__ import annotations

import argparse
import json


def cell_of(row: dict) -> tuple:
    """What a row measures, whichever run it came from."""
    return (row["suite"], row.get("case"), tuple(row.get("shape", ())), row.get("implementation"), row.get("length"))


def append(history: dict, run: dict) -> int:
    """Adds ``run`` (a ``benchmarks.run`` results.json) to ``history`` as its next run; returns that run's number."""
    number = len(history["runs"])
    history["runs"].append({"context": run["context"], "ceilings": run["ceilings"]})
    history["results"] += [{**row, "run": number} for row in run["results"]]
    history["context"], history["ceilings"] = run["context"], run["ceilings"]
    return number


def latest(history: dict) -> list[dict]:
    """For each cell, the row of the newest run that measured it without an error (else its newest row), in the
    order the cells first appear. A run's note that it skipped a mask (an error row naming no implementation) is no
    cell's measurement and is left out."""
    chosen: dict[tuple, dict] = {}
    for row in history["results"]:
        if row["suite"] == "prefill" and "implementation" not in row:
            continue
        cell, held = cell_of(row), chosen.get(cell_of(row))
        if held is None or "error" in held or ("error" not in row and row.get("run", 0) >= held.get("run", 0)):
            chosen[cell] = row
    return list(chosen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("history", help="the repository's record, benchmarks/results.json")
    parser.add_argument("runs", nargs="*", help="benchmarks.run outputs (results.json), appended in this order")
    parser.add_argument("--placeholder", action="append", default=[], metavar="NOTE",
                        help="first append a run whose rows were not kept, with this note as its context")
    args = parser.parse_intermixed_args()
    with open(args.history) as f:
        history = json.load(f)
    for note in args.placeholder:
        number = len(history["runs"])
        history["runs"].append({"context": {"note": note}, "ceilings": {}})
        print(f"run {number}: {note}")
    for path in args.runs:
        with open(path) as f:
            run = json.load(f)
        number = append(history, run)
        print(f"run {number}: {run['context']['date']} on {run['context']['device']}, {len(run['results'])} rows")
    with open(args.history, "w") as f:
        json.dump(history, f, indent=1)


if __name__ == "__main__":
    main()
