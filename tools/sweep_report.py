"""Summarise a Hydra sweep of tools/optimize.py into one table, and a plot per swept key.

    python tools/optimize.py -m model.num_hidden_layers=2,4,8 pipeline=cudagraph,cudagraph_no_hoist
    python tools/optimize.py -m hydra/launcher=local2 model.num_hidden_layers=2,4   # 2 at a time
    python tools/sweep_report.py multirun/2026-11-28/06-15-56      # markdown table on stdout
    python tools/sweep_report.py <sweep dir> --json sweep.json     # also as JSON
    python tools/sweep_report.py <sweep dir> --no-plots            # table only

One row per job: its overrides, then what its report.json says (or its one-line error),
including the run's wall time and peak resident memory. For every key the sweep varies, a PNG
(``<sweep dir>/sweep_<key>.png``) plots time and peak RSS against that key's values.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = ("overrides", "graph breaks", "SOT graphs", "hazards", "segments (cap/eager)",
           "coverage", "full-graph variants", "replay mismatches", "time (s)", "peak RSS (MB)",
           "cache", "result")


def job_overrides(job: Path) -> list[str]:
    """The job's command-line overrides (Hydra's own keys left out)."""
    overrides_file = job / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return []
    return [ln[2:].strip() for ln in overrides_file.read_text().splitlines()
            if ln.startswith("- ") and not ln[2:].startswith("hydra.")]


def job_row(job: Path) -> dict[str, str]:
    """One table row for the job directory `job` (its report, or why there is none)."""
    overrides = job_overrides(job)
    row = dict.fromkeys(COLUMNS, "")
    row["overrides"] = " ".join(overrides) or job.name
    error = job / "error.txt"
    report = job / "report.json"
    try:
        r = json.loads(report.read_text()) if report.is_file() else None
        if r is not None:
            _fill(row, r)
    except (ValueError, KeyError, TypeError) as e:  # truncated, or written by another version
        row["result"] = f"unreadable report.json ({type(e).__name__}: {e})"
    if error.is_file():
        row["result"] = error.read_text().strip().removeprefix("graphopt: ")
    elif not report.is_file():
        row["result"] = "no report (job did not finish)"
    return row


def _fill(row: dict[str, str], r: dict) -> None:
    """The columns of one job from its report."""
    seg = r.get("segments") or {}
    hz = r["hazards"]
    first, last = r["traces"][0], r["traces"][-1]
    em = r["replay"]
    before = r["graph_breaks"]["before"]
    row.update({
        "graph breaks": (f"{before} -> " if before is not None else "")
        + str(r["graph_breaks"]["after"]),
        "SOT graphs": (f"{first['subgraphs']} -> " if before is not None else "")
        + str(last["subgraphs"]),
        "hazards": "n/a" if hz["before"] is None else f"{hz['before']} -> {hz['after']}",
        "segments (cap/eager)": f"{seg['captured']}/{seg['eager']}" if seg else "-",
        "coverage": f"{seg['coverage']:.4f}" if seg else "-",
        "full-graph variants": _variants(r),
        "replay mismatches": f"{em['mismatches']}/{em['steps']}" if em.get("steps") else "-",
        "time (s)": f"{r['time_s']:.1f}" if r.get("time_s") is not None else "-",
        "peak RSS (MB)": (f"{r['memory_mb']['peak_rss']:.0f}"
                          if r.get("memory_mb", {}).get("peak_rss") else "-"),
        "cache": (r.get("cache") or {}).get("status", "-"),
        "result": "verified" if r["verified"] else "FAILED: " + r["verify_message"],
    })


def _variants(r: dict) -> str:
    """``3 (decode 743, mixed 867, prefill 755 ops)``: the if-free variants, or ``-``."""
    variants = r.get("variants") or []
    if not variants:
        return "-"
    parts = ", ".join(f"{'+'.join(v['kinds']) or v['name']} {v['ops']}" for v in
                      sorted(variants, key=lambda v: v["kinds"]))
    return f"{len(variants)} ({parts} ops)"


def swept_keys(jobs: list[Path]) -> dict[str, list[tuple[str, Path]]]:
    """key -> [(value, job)] for every override key whose value differs between jobs."""
    values: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for job in jobs:
        for o in job_overrides(job):
            key, _, value = o.lstrip("+~").partition("=")
            values[key].append((value, job))
    return {k: v for k, v in values.items() if len({val for val, _ in v}) > 1}


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def plot_key(key: str, points: list[tuple[str, Path]], path: Path) -> bool:
    """Time and peak RSS against the values of `key` (one dot per job); False if no data."""
    import matplotlib  # only when drawing: the table alone stays quick to print

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for value, job in points:
        report = job / "report.json"
        if not report.is_file():
            continue
        r = json.loads(report.read_text())
        rows.append((value, r.get("time_s"), (r.get("memory_mb") or {}).get("peak_rss")))
    if not rows:
        return False
    numeric = all(_number(v) is not None for v, _, _ in rows)
    order = sorted({v for v, _, _ in rows}, key=lambda v: _number(v) if numeric else v)
    xs_of = {v: (_number(v) if numeric else i) for i, v in enumerate(order)}
    fig, ax1 = plt.subplots(figsize=(6, 3.6))
    ax2 = ax1.twinx()
    ax1.scatter([xs_of[v] for v, t, _ in rows if t is not None],
                [t for _, t, _ in rows if t is not None], color="tab:blue", label="time")
    ax2.scatter([xs_of[v] for v, _, m in rows if m is not None],
                [m for _, _, m in rows if m is not None], color="tab:red", marker="s",
                label="peak RSS")
    if not numeric:
        ax1.set_xticks(range(len(order)))
        ax1.set_xticklabels(order, rotation=20, fontsize=8)
    ax1.set_xlabel(key)
    ax1.set_ylabel("optimize wall time (s)", color="tab:blue")
    ax2.set_ylabel("peak RSS (MB)", color="tab:red")
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax1.set_title(f"sweep over {key}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Print the sweep's table, draw a plot per swept key; 2 on a bad directory."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG per swept key")
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
    if not args.no_plots:
        for key, points in swept_keys(jobs).items():
            path = args.sweep_dir / f"sweep_{key.replace('/', '_')}.png"
            if plot_key(key, points, path):
                print(f"plot: {path}")
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        try:
            tmp.write_text(json.dumps(rows, indent=2) + "\n")
            tmp.replace(args.json)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            print(f"sweep_report: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
