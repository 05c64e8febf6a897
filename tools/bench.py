"""Benchmark an optimized decoder step: every execution mode side by side, at several sizes.

    python tools/bench.py                                  # dsv3 at 4 and 61 layers
    python tools/bench.py 'bench.layers=[4]' bench.repeats=10
    python tools/bench.py model=tiny 'bench.layers=[2]' bench.optimize=false
    python tools/bench.py bench.out=docs/bench             # publish (default: the run dir)
    python tools/bench.py --help                           # every key (Hydra)

Per size (``model.num_hidden_layers``), in ONE process, timed round-robin on the same batches so
machine noise hits every mode alike (medians):

  eager       the dygraph Layer
  sot         SOT's own compiled step of the optimized model (its runner, one graph)
  whole       graphopt's runner: the optimized program in one run_program call (+ prologue)
  piecewise   segments in order, uncaptured (backend none)
  replay      segments through the capture backend (CPU: the replay emulator)
  variant, variant_replay   with specialize-branches (e.g. pipeline=full_graph): the step's
              if-free variant, uncaptured / through the capture backend

With ``bench.optimize``, each size is also optimized by ``tools/optimize.py`` in a subprocess,
cold and then again from the compile cache: wall time and peak RSS of each (``os.wait4``).

Writes ``<out>/bench.json`` and ``<out>/bench.png``. Headline keys: ``runner_over_sot``,
``piecewise_over_whole``, ``step_ratio_to_eager`` (per mode, per size ``L<n>``),
``optimize_wall_s``, ``optimize_cached_over_cold_L<n>``, ``peak_rss_mb_L<n>``, ``trace_s``,
``timings_L<n>``. A ratio over batch kinds is their geometric mean; per-kind medians are under
``steps``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", category=UserWarning)

import hydra  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from graphopt.config import (  # noqa: E402
    GraphoptConfig,
    register_configs,
    validate,
)
from graphopt.driver import build_and_optimize  # noqa: E402
from graphopt.ir.pir_utils import op_count  # noqa: E402
from graphopt.report.report import write_atomic  # noqa: E402
from graphopt.runtime.executor import RunnerPool, release_interpreters  # noqa: E402
from graphopt.runtime.step import StepExecutor, WholeProgramStep  # noqa: E402
from graphopt.runtime.variants import VariantStepExecutor  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = ("eager", "sot", "whole", "piecewise", "replay")


@dataclass
class BenchOptions:
    """``bench``: what to measure."""

    layers: list[int] = field(default_factory=lambda: [4, 61])
    kinds: list[str] = field(default_factory=lambda: ["decode", "mixed", "prefill"])
    repeats: int = 20
    repeats_large: int = 5
    large_layers: int = 16
    optimize: bool = True
    out: str | None = None


@dataclass
class BenchConfig(GraphoptConfig):
    """graphopt's config plus ``bench``."""

    bench: BenchOptions = field(default_factory=BenchOptions)


register_configs()
ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


class BenchError(Exception):
    """A benchmark that cannot give honest numbers: one line, exit 2 (bad keys) or 1."""


def check_bench(bench: Any) -> None:
    """The ``bench`` keys, checked before anything runs (one line naming the key)."""
    if not bench.layers or any(int(n) < 1 for n in bench.layers):
        raise BenchError(f"bench.layers={list(bench.layers)}: give one or more layer counts >= 1")
    kinds = list(bench.kinds)
    if not kinds or any(k not in ("decode", "mixed", "prefill") for k in kinds):
        raise BenchError(f"bench.kinds={kinds}: choose from decode, mixed, prefill")
    for key in ("repeats", "repeats_large"):
        if int(bench[key]) < 1:
            raise BenchError(f"bench.{key}={bench[key]}: a median needs at least 1 round")


def _geomean(values: list[float]) -> float:
    return round(math.exp(sum(math.log(v) for v in values) / len(values)), 3)


def _user_overrides() -> list[str]:
    """The command line's graphopt overrides (bench.* and hydra.* are the bench's own)."""
    return [o for o in HydraConfig.get().overrides.task
            if not o.lstrip("+~").startswith(("bench.", "hydra.", "model.num_hidden_layers"))]


def time_optimize(layers: int, out: Path, cache_dir: Path, label: str) -> dict[str, Any]:
    """Run tools/optimize.py for `layers` in a subprocess; wall seconds, peak RSS, its report."""
    run_dir = out / "optimize" / f"L{layers}-{label}"
    cmd = [sys.executable, str(REPO / "tools" / "optimize.py"), *_user_overrides(),
           f"model.num_hidden_layers={layers}", "cache.enabled=true", f"cache.dir={cache_dir}",
           f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    with open(out / f"optimize-L{layers}-{label}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:  # a failed run's wall time and memory would be meaningless
        raise BenchError(f"tools/optimize.py ({label}, {layers} layers) exited "
                         f"{proc.returncode}; see {out / f'optimize-L{layers}-{label}.log'}")
    report_file = run_dir / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return {"exit_code": proc.returncode, "wall_s": round(wall, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
            "cache": report.get("cache", {}).get("status"), "time_s": report.get("time_s"),
            "timings": report.get("timings", {}),
            "trace_s": {"unmodified": report["traces"][0]["time_s"],
                        "optimized": report["traces"][-1]["time_s"]} if report else None,
            "verified": report.get("verified")}


def time_steps(cfg: DictConfig, bench: Any) -> dict[str, Any]:
    """Optimize in this process, then time every mode round-robin on the same batches."""
    layers = int(cfg.model.num_hidden_layers)
    repeats = int(bench.repeats if layers < bench.large_layers else bench.repeats_large)
    pm = validate(cfg)
    rng = np.random.default_rng(cfg.verify.seed)
    t0 = time.perf_counter()
    mp, _, _ = build_and_optimize(cfg, pm, rng)
    optimize_s = time.perf_counter() - t0
    bundle = mp.model
    if mp.program is None or mp.segments is None:
        bundle.restore_patches(0)
        raise BenchError(f"pipeline={cfg.pipeline.name} leaves no single program with a "
                         "segment plan, and the bench compares the whole program with its "
                         "segments: use a pipeline that ends with piecewise-split")
    try:
        pool = RunnerPool(mp.params)
        whole = WholeProgramStep(mp, pool)
        piecewise = StepExecutor(mp, backend="none", capture_sizes=[1], num_warmups=0, pool=pool)
        replay = StepExecutor(mp, backend=str(cfg.runtime.backend),
                              capture_sizes=list(cfg.runtime.cudagraph_capture_sizes),
                              num_warmups=int(cfg.runtime.cudagraph_num_of_warmups), pool=pool)
        sot_fn = mp.sot_step

        def eager(b):  # the model as its authors wrote it, not graphopt's rewrite of it
            with paddle.no_grad(), bundle.as_written():
                return bundle.layer(*b.args, b.meta)

        def sot(b):
            with paddle.no_grad():
                return sot_fn(*b.args, b.meta)

        fns = {"eager": eager, "sot": sot, "whole": whole.run, "piecewise": piecewise.run,
               "replay": replay.run}
        if mp.variants:
            fns["variant"] = VariantStepExecutor(mp, backend="none", pool=pool).run
            fns["variant_replay"] = VariantStepExecutor(
                mp, backend=str(cfg.runtime.backend),
                capture_sizes=list(cfg.runtime.cudagraph_capture_sizes),
                num_warmups=int(cfg.runtime.cudagraph_num_of_warmups), pool=pool).run
        modes = list(fns)
        steps: dict[str, Any] = {}
        for kind in bench.kinds:
            batch = bundle.random_batch(rng, kind)
            for fn in fns.values():  # warm-up: compile, capture
                fn(batch)
            times: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(repeats):
                for m in modes:
                    t = time.perf_counter()
                    fns[m](batch)
                    times[m].append(time.perf_counter() - t)
            med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
            steps[kind] = {"tokens": batch.num_tokens,
                           "median_ms": {m: round(v, 3) for m, v in med.items()},
                           "ratio_vs_eager": {m: round(med[m] / med["eager"], 3) for m in modes}}
        plan = mp.segments
        dispatches = {
            "eager": op_count(mp.program), "whole": 1 + (mp.prologue is not None),
            "piecewise_or_replay": sum(1 for s in plan.walk() if s.kind == "captured")
            + (mp.prologue is not None)}
        if mp.variants:  # one variant per step: its captured segments plus the prologue
            dispatches["variant"] = max(len(v.segments.captured) if v.segments else 1
                                        for v in mp.variants) + (mp.prologue is not None)
        out = {
            "layers": layers, "repeats": repeats, "in_process_optimize_s": round(optimize_s, 2),
            "ops": mp.trace.ops, "segments": plan.stats(), "steps": steps,
            "host_dispatches_per_step_upper_bound": dispatches,
        }
    finally:
        bundle.restore_patches(0)
    return out


def summarize(sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline keys from the per-size results."""
    out: dict[str, Any] = {"runner_over_sot": {}, "piecewise_over_whole": {},
                           "step_ratio_to_eager": {m: {} for m in MODES if m != "eager"},
                           "optimize_wall_s": {}, "optimize_cached_wall_s": {},
                           "trace_s": {}, "peak_rss_mb": {}}
    # the specialised variant's step, replayed (None: no size was benched with variants)
    out["step_ratio_to_eager"]["specialized"] = {}
    for label, r in sizes.items():
        steps = r["steps"]["steps"]
        kinds = list(steps)

        def ratio(a: str, b: str, kinds=kinds, steps=steps) -> float:
            return _geomean([steps[k]["median_ms"][a] / steps[k]["median_ms"][b] for k in kinds])

        out["runner_over_sot"][label] = ratio("whole", "sot")
        out["piecewise_over_whole"][label] = ratio("piecewise", "whole")
        for m in MODES[1:]:
            out["step_ratio_to_eager"][m][label] = ratio(m, "eager")
        if "variant_replay" in steps[kinds[0]]["median_ms"]:
            out["step_ratio_to_eager"]["specialized"][label] = ratio("variant_replay", "eager")
        cold, warm = r.get("optimize_cold"), r.get("optimize_cached")
        if cold:
            out["optimize_wall_s"][label] = cold["wall_s"]
            out["peak_rss_mb"][label] = cold["peak_rss_mb"]
            out[f"peak_rss_mb_{label}"] = cold["peak_rss_mb"]
            out["trace_s"][label] = cold["trace_s"]
            out[f"timings_{label}"] = cold["timings"]
        if cold and warm:
            out["optimize_cached_wall_s"][label] = warm["wall_s"]
            out[f"optimize_cached_over_cold_{label}"] = round(warm["wall_s"] / cold["wall_s"], 3)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Step-time ratios per mode and size, and optimize wall time (cold / cache hit)."""
    labels = list(result["sizes"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    modes = [m for m in [*MODES, "specialized"] if m != "eager"
             and all(lb in (result["step_ratio_to_eager"].get(m) or {}) for lb in labels)]
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        vals = [result["step_ratio_to_eager"][m][lb] for lb in labels]
        bars = ax1.bar([x + i * width for x in range(len(labels))], vals, width, label=m)
        for b, v in zip(bars, vals, strict=True):
            ax1.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                         ha="center", va="bottom", fontsize=7)
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
    ax1.set_xticklabels(labels)
    ax1.set_ylabel("step time / eager (geomean over batch kinds)")
    ax1.set_title("one step, every mode, one run", fontsize=10)
    ax1.legend(fontsize=8)
    cold = [result["optimize_wall_s"].get(lb, 0) for lb in labels]
    warm = [result["optimize_cached_wall_s"].get(lb, 0) for lb in labels]
    xs = range(len(labels))
    ax2.bar([x - 0.2 for x in xs], cold, 0.4, label="cold")
    ax2.bar([x + 0.2 for x in xs], warm, 0.4, label="cache hit")
    for x, lb in zip(xs, labels, strict=True):
        rss = result["peak_rss_mb"].get(lb)
        if rss:
            ax2.annotate(f"peak {rss / 1024:.1f} GiB", (x - 0.2, cold[x]), ha="center",
                         va="bottom", fontsize=7)
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels)
    ax2.set_ylabel("tools/optimize.py wall time (s)")
    ax2.set_title("optimize, verification included", fontsize=10)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: {result['date']}, {result['machine']['cpus']} CPUs",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path="pkg://graphopt.conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    """Benchmark each size of ``bench.layers``; write bench.json and bench.png."""
    bench = cfg.bench
    try:
        check_bench(bench)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    # scratch (optimize runs, their logs, the compile cache) always stays in the run directory;
    # only bench.json and bench.png go to bench.out when it is given
    work = Path(HydraConfig.get().runtime.output_dir)
    out = Path(bench.out) if bench.out else work
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    sizes: dict[str, dict[str, Any]] = {}
    for layers in bench.layers:
        label = f"L{layers}"
        r: dict[str, Any] = {}
        if bench.optimize:
            try:
                r["optimize_cold"] = time_optimize(layers, work, cache_dir, "cold")
                r["optimize_cached"] = time_optimize(layers, work, cache_dir, "cached")
            except BenchError as e:
                print(f"bench: error: {e}", file=sys.stderr)
                sys.exit(1)
            print(f"bench {label}: optimize cold {r['optimize_cold']['wall_s']} s, cached "
                  f"{r['optimize_cached']['wall_s']} s, peak RSS "
                  f"{r['optimize_cold']['peak_rss_mb']} MB", flush=True)
        size_cfg = OmegaConf.to_container(cfg, resolve=True)
        size_cfg.pop("bench")
        size_cfg = OmegaConf.merge(OmegaConf.structured(GraphoptConfig),
                                   OmegaConf.create(size_cfg))
        OmegaConf.update(size_cfg, "model.num_hidden_layers", int(layers), force_add=True)
        try:
            r["steps"] = time_steps(size_cfg, bench)
        except BenchError as e:
            print(f"bench: error: {e}", file=sys.stderr)
            sys.exit(2)
        release_interpreters()  # this size's programs are done with
        gc.collect()
        print(f"bench {label}: " + json.dumps({k: v["ratio_vs_eager"]
                                                for k, v in r["steps"]["steps"].items()}),
              flush=True)
        sizes[label] = r
    result = {
        "model": str(cfg.model.name),
        "pipeline": str(cfg.pipeline.name),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version(),
                    "paddle": paddle.__version__,
                    "load_average_at_end": os.getloadavg()},
        **summarize(sizes),
        "sizes": sizes,
        "note": "CPU only: replay is the emulator (re-runs each segment), so it measures "
                "orchestration overhead, not CUDA-graph speed-up. Ratios are geometric means "
                "over batch kinds of medians taken round-robin in one process.",
    }
    write_atomic(out / "bench.json", json.dumps(result, indent=2) + "\n")
    plot(result, out / "bench.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("sizes",)}, indent=2))
    print(f"bench: wrote {out / 'bench.json'} and {out / 'bench.png'}")


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)  # what the modes and keys mean; Hydra's help then lists the config
    main()
