"""Summarise a Hydra sweep of tools/optimize.py into one table.

    python tools/optimize.py -m model.num_hidden_layers=2,4,8 pipeline=cudagraph,cudagraph_no_hoist
    python tools/sweep_report.py multirun/2026-11-28/06-15-56      # markdown table on stdout
    python tools/sweep_report.py <sweep dir> --json sweep.json     # also as JSON

One row per job: its overrides, then what its report.json says (or its one-line error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("overrides", "graph breaks", "SOT graphs", "hazards", "segments (cap/eager)",
           "coverage", "replay mismatches", "result")


def job_row(job: Path) -> dict[str, str]:
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = []
    if overrides_file.is_file():
        overrides = [ln[2:].strip() for ln in overrides_file.read_text().splitlines()
                     if ln.startswith("- ") and not ln[2:].startswith("hydra.")]
    row = dict.fromkeys(COLUMNS, "")
    row["overrides"] = " ".join(overrides) or job.name
    error = job / "error.txt"
    report = job / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        seg = r.get("segments") or {}
        hz = r["hazards"]
        first, last = r["traces"][0], r["traces"][-1]
        em = r["replay"]
        row.update({
            "graph breaks": f"{r['graph_breaks']['before']} -> {r['graph_breaks']['after']}",
            "SOT graphs": f"{first['subgraphs']} -> {last['subgraphs']}",
            "hazards": "n/a" if hz["before"] is None else f"{hz['before']} -> {hz['after']}",
            "segments (cap/eager)": f"{seg['captured']}/{seg['eager']}" if seg else "-",
            "coverage": f"{seg['coverage']:.4f}" if seg else "-",
            "replay mismatches": f"{em['mismatches']}/{em['steps']}" if em.get("steps") else "-",
            "result": "verified" if r["verified"] else "FAILED: " + r["verify_message"],
        })
    if error.is_file():
        row["result"] = error.read_text().strip().removeprefix("graphopt: ")
    elif not report.is_file():
        row["result"] = "no report (job did not finish)"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"sweep_report: no such directory: {args.sweep_dir}", file=sys.stderr)
        return 2
    jobs = sorted((p for p in args.sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name))
    if not jobs:
        print(f"sweep_report: {args.sweep_dir} has no job directories (0/, 1/, ...): "
              "give the directory of one `-m` run", file=sys.stderr)
        return 2
    rows = [job_row(j) for j in jobs]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row[c] for c in COLUMNS) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
