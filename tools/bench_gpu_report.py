"""Merge GPU bench runs into one ``bench.json`` and render it: ``bench.png`` and ``bench.md``.

The 61-layer bench does not fit one call of the lent GPU machine (10 min) together with its
three cold optimizes, so it runs as two calls on one warm machine: the first optimizes into the
compile cache, the second measures. This tool keeps each layer count from the run that measured
it, takes the cold optimize times from the first call, and records where every part came from::

    python tools/bench_gpu_report.py docs/bench/gpu/raw/L4.json docs/bench/gpu/raw/L61.json \\
        --cold docs/bench/gpu/raw/L61-optimize-cold.json \\
        --attach graph_pools=docs/bench/gpu/raw/graph-pools.json --out docs/bench/gpu

``bench.md`` holds the tables docs/gpu.md and the README show.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BATCHES = ("decode1", "decode8", "decode64", "mixed", "prefill")


def merge(runs: list[Path], cold: list[Path]) -> dict[str, Any]:
    """One result: device and versions of the first run, each ``L<n>`` from the run that
    measured it, cold optimize times from `cold` runs, and ``sources``."""
    out: dict[str, Any] = {}
    sources = []
    for path in runs:
        run = json.loads(path.read_text())
        for key in ("device", "torch", "paddle", "backend", "capture_sizes", "check_captures"):
            out.setdefault(key, run.get(key))
        for key, value in run.items():
            if key.startswith("L"):
                out[key] = value
                sources.append({"part": key, "file": path.name, "date": run["date"],
                                "command": run["command"]})
    for path in cold:
        run = json.loads(path.read_text())
        for key, value in run.items():
            if key.startswith("L") and key in out:
                out[key]["optimize_s_cached"] = out[key]["optimize_s"]
                out[key]["optimize_s"] = value["optimize_s"]
                sources.append({"part": f"{key}.optimize_s", "file": path.name,
                                "date": run["date"], "command": run["command"]})
    out["sources"] = sources
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def markdown(result: dict[str, Any]) -> str:
    """The tables: per layer count, times and ratios per batch; capture and memory; checks."""
    parts = []
    for label in (k for k in result if k.startswith("L") and isinstance(result[k], dict)):
        r = result[label]
        parts.append(f"**{r['layers']} layers** ({r['ops']} ops, {r['segments']['captured']} "
                     f"captured segments, {len(r['variants'])} full-graph variants)\n")
        parts.append("| batch | tokens | eager ms | piecewise ms | full graph ms | replay ms "
                     "(events) | kernel sum ms (kernels) | eager / full | eager / piecewise | "
                     "piecewise / full | replay / kernel sum |")
        parts.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for b in BATCHES:
            if b not in r:
                continue
            x = r[b]
            e, p, f = x["eager_ms"], x["piecewise_ms"], x["full_graph_ms"]
            k, s = x.get("kernel_ms"), x.get("kernel_sum_ms")
            fell = " (fell back)" if x["counters"].get("unbound_replays") or x["counters"].get(
                "uncaptured_runs") else ""
            parts.append(
                f"| {b} | {x['tokens']} | {e:.2f} | {p:.2f}{fell} | {f:.2f} | "
                f"{k:.2f} | {s:.2f} ({x.get('kernels')}) | {e / f:.1f}x | {e / p:.1f}x | "
                f"{_ratio(p, f)} | {_ratio(k, s)} |")
        parts.append("")
    parts.append("| | optimize (cold) cudagraph / full_graph / no_hoist | piecewise graphs, "
                 "capture | full graphs, capture | graph memory piecewise / full |")
    parts.append("|---|---|---|---|---|")
    for label in (k for k in result if k.startswith("L") and isinstance(result[k], dict)):
        r = result[label]
        o, c = r["optimize_s"], r.get("capture", {})
        pw, fg = c.get("piecewise", {}), c.get("full_graph", {})
        parts.append(
            f"| {r['layers']} layers | {o['cudagraph']:.1f} / {o['full_graph']:.1f} / "
            f"{o['cudagraph_no_hoist']:.1f} s | {pw.get('graphs')}, {pw.get('wall_s')} s "
            f"({pw.get('capture_only_s')} s) | {fg.get('graphs')}, {fg.get('wall_s')} s "
            f"({fg.get('capture_only_s')} s) | {pw.get('graph_mem_mb'):,.0f} / "
            f"{fg.get('graph_mem_mb'):,.0f} MiB |")
    parts.append("")
    parts.append("| | hoisted piecewise wrong | hoisted full graph wrong | max abs err | graphs "
                 "dropped | no hoist, unchecked | no hoist, checked (dropped) |")
    parts.append("|---|---|---|---|---|---|---|")
    for label in (k for k in result if k.startswith("L") and isinstance(result[k], dict)):
        r = result[label]
        h, n = r["hoisted_replay"], r["no_hoist_replay"]
        nc = r.get("no_hoist_checked_replay", {})
        parts.append(
            f"| {r['layers']} layers | {h['piecewise']['wrong']}/{r['steps']} | "
            f"{h['full_graph']['wrong']}/{r['steps']} | {r['max_abs_err']['replay']:.2g} | "
            f"{r['dropped_graphs']} | **{n['wrong']}/{r['steps']} wrong** (max "
            f"{n['max_abs_err']:.3g}) | {nc.get('wrong')}/{r['steps']} "
            f"({nc.get('dropped_graphs')}) |")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench.json files of tools/bench_gpu.py")
    ap.add_argument("--cold", nargs="*", type=Path, default=[],
                    help="runs whose optimize_s were cold (compile cache misses)")
    ap.add_argument("--attach", nargs="*", default=[], metavar="KEY=FILE",
                    help="put a JSON file (another measurement, a note) under KEY")
    ap.add_argument("--out", type=Path, required=True, help="folder for bench.json/png/md")
    args = ap.parse_args(argv)
    attach = dict(a.partition("=")[::2] for a in args.attach)
    if any(not k or not v for k, v in attach.items()):
        print("bench_gpu_report: error: --attach takes KEY=FILE", file=sys.stderr)
        return 2
    missing = [str(p) for p in [*args.runs, *args.cold, *map(Path, attach.values())]
               if not p.is_file()]
    if missing:
        print(f"bench_gpu_report: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    result = merge(args.runs, args.cold)
    for key, path in attach.items():
        result[key] = json.loads(Path(path).read_text())
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_gpu import plot  # imports Paddle: only when rendering

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "bench.png")
    (args.out / "bench.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
