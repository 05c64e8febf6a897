"""Benchmark one optimized decoder step, every execution mode side by side in ONE run.

    python tools/bench.py                                   # default dsv3
    python tools/bench.py model.num_hidden_layers=61 bench.repeats=10
    python tools/bench.py model=tiny bench.out=docs/bench/tiny

Modes, timed round-robin on the same batches so machine noise hits them alike:
  eager       the dygraph Layer (what SOT falls back to at every graph break)
  sot         the SOT-compiled step of the optimized model (one graph)
  whole       the optimized program, one static-executor run
  piecewise   segments in order, no capture (backend none)
  replay      segments through the capture backend (CPU: the replay emulator)
  variant, variant_replay   with specialize-branches (e.g. pipeline=full_graph): the step's
              if-free variant, uncaptured / through the capture backend
Also counted, not timed: host dispatches per step (eager: ops launched one by one; whole: 1;
piecewise/replay: segment runs incl. eager ifs) -- the number a CUDA graph exists to cut.

Writes <out>/bench.json and <out>/bench.png (default out: docs/bench/dsv3). Ratios are relative to eager, same run.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", category=UserWarning)

from omegaconf import OmegaConf  # noqa: E402

BENCH_DEFAULTS = {"repeats": 20, "kinds": ["decode", "mixed", "prefill"], "out": "docs/bench/dsv3"}


def _compose(argv: list[str]):
    from hydra import compose, initialize_config_module

    bench_args = [a for a in argv if a.startswith("bench.")]
    other = [a for a in argv if not a.startswith("bench.")]
    from graphopt.config import register_configs

    register_configs()
    with initialize_config_module(config_module="graphopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=other)
    given = OmegaConf.from_dotlist(bench_args).get("bench", {})
    unknown = sorted(set(given) - set(BENCH_DEFAULTS))
    if unknown:
        raise SystemExit(f"bench: unknown option(s) {unknown}; known: {sorted(BENCH_DEFAULTS)}")
    bench = OmegaConf.merge(OmegaConf.create(BENCH_DEFAULTS), given)
    return cfg, bench


def run(argv: list[str]) -> dict:
    import numpy as np
    import paddle

    from graphopt.config import validate
    from graphopt.driver import build_and_optimize
    from graphopt.ir.pir_utils import op_count
    from graphopt.runtime.step import StepExecutor, WholeProgramStep
    from graphopt.runtime.variants import VariantStepExecutor

    cfg, bench = _compose(argv)
    pm = validate(cfg)
    rng = np.random.default_rng(cfg.verify.seed)
    t0 = time.perf_counter()
    mp, _, _ = build_and_optimize(cfg, pm, rng)
    optimize_s = time.perf_counter() - t0
    bundle = mp.model
    try:
        whole = WholeProgramStep(mp)
        piecewise = StepExecutor(mp, backend="none", capture_sizes=[], num_warmups=0)
        replay = StepExecutor(mp, backend=cfg.runtime.backend.value,
                              capture_sizes=list(cfg.runtime.cudagraph_capture_sizes),
                              num_warmups=int(cfg.runtime.cudagraph_num_of_warmups))
        sot_fn = mp.sot_step

        def eager(b):
            return bundle.step(b, commit=False)

        def sot(b):
            with paddle.no_grad():
                return [o.numpy() for o in sot_fn(*b.args, b.meta)]

        modes = {"eager": eager, "sot": sot, "whole": whole.run,
                 "piecewise": piecewise.run, "replay": replay.run}
        if mp.variants:
            modes["variant"] = VariantStepExecutor(mp, backend="none").run
            modes["variant_replay"] = VariantStepExecutor(
                mp, backend=cfg.runtime.backend.value,
                capture_sizes=list(cfg.runtime.cudagraph_capture_sizes),
                num_warmups=int(cfg.runtime.cudagraph_num_of_warmups)).run
        results: dict[str, dict] = {}
        for kind in bench.kinds:
            batch = bundle.random_batch(rng, kind)
            for fn in modes.values():  # warm-up (and capture, for replay)
                fn(batch)
            times: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(int(bench.repeats)):
                for m, fn in modes.items():
                    t = time.perf_counter()
                    fn(batch)
                    times[m].append(time.perf_counter() - t)
            med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
            results[kind] = {
                "tokens": batch.num_tokens,
                "median_ms": {m: round(v, 3) for m, v in med.items()},
                "ratio_vs_eager": {m: round(med[m] / med["eager"], 3) for m in modes},
            }
        plan = mp.segments
        dispatches = {
            "eager": op_count(mp.program),
            "whole": 1,
            "piecewise_or_replay": sum(1 for s in plan.walk() if s.kind == "captured")
            + (1 if mp.prologue is not None else 0),
        }
        if mp.variants:  # one variant per step: its captured segments plus the prologue
            dispatches["variant"] = max(len(v.segments.captured) if v.segments else 1
                                        for v in mp.variants) + (mp.prologue is not None)
    finally:
        bundle.restore_patches(0)

    out = {
        "model": cfg.model.name,
        "num_hidden_layers": int(cfg.model.get("num_hidden_layers", 0) or 0),
        "pipeline": cfg.pipeline.name,
        "backend": cfg.runtime.backend.value,
        "repeats": int(bench.repeats),
        "optimize_s": round(optimize_s, 3),
        "trace_s": round(mp.trace.time_s, 3),
        "traces": [t.to_dict() for t in mp.traces],  # first = the unmodified model's
        "ops": mp.trace.ops,
        "segments": plan.stats(),
        "host_dispatches_per_step_upper_bound": dispatches,
        "steps": results,
        "machine": {"cpus": os.cpu_count(), "paddle": paddle.__version__},
        "note": "CPU only: replay is the emulator (re-runs each segment), so it measures "
                "orchestration overhead, not CUDA-graph speed-up.",
    }
    out_dir = Path(bench.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(out, indent=2) + "\n")
    _plot(out, out_dir / "bench.png")
    print(json.dumps({k: v for k, v in out.items() if k != "segments"}, indent=2))
    return out


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(out["steps"])
    modes = list(out["steps"][kinds[0]]["median_ms"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        vals = [out["steps"][k]["median_ms"][m] for k in kinds]
        bars = ax.bar([x + i * width for x in range(len(kinds))], vals, width, label=m)
        for b, k in zip(bars, kinds, strict=True):
            r = out["steps"][k]["ratio_vs_eager"][m]
            ax.annotate(f"{r:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(kinds))])
    ax.set_xticklabels([f"{k}\n({out['steps'][k]['tokens']} tokens)" for k in kinds])
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"{out['model']} L={out['num_hidden_layers']}: one step, all modes, one run "
                 f"(x = ratio vs eager)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    run(sys.argv[1:])
