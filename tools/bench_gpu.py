"""CUDA graphs for real: graphopt's plans captured with PyTorch on a GPU, timed side by side.

    python tools/bench_gpu.py                                   # on a GPU: dsv3 at 4 and 61 layers
    python tools/bench_gpu.py 'bench.layers=[4]' bench.out=docs/bench/gpu
    python tools/bench_gpu.py runtime=torch_cpu 'bench.layers=[2]' bench.repeats=2   # CPU smoke

Paddle (its CPU build) traces and plans; the PyTorch lowering runs the plan (``runtime=
torch_cuda``). Per layer count, in ONE process, on the same batches, round-robin (medians):

  eager        the whole optimized program, lowered op by op and run on the GPU, no graph (the
               stand-in for Paddle's dygraph: attributes resolved once, PyTorch's dispatch per op)
  piecewise    pipeline=cudagraph: captured segments replayed, the ``if``s eager on the host
  full_graph   pipeline=full_graph: the batch's if-free variant, one graph
  kernel       the full-graph replay alone, inputs already in place (CUDA events): the limit

Batches: decode of 1, 8 and 64 tokens, a mixed batch (40 tokens) and a prefill (64 tokens).
A step's inputs are staged once outside the timing (a serving engine keeps them, and its KV
cache, on the device); the host prologue (the hoisted conditions, a few host ops) is staged
with them, the same for every mode.

Also per layer count: the time to capture every graph of each plan (every capture size, every
batch kind) and the GPU memory those graphs hold; every timed step and ``bench.replay_steps``
random steps against Paddle's CPU eager model as written (``runtime.check_captures`` as
configured); and ``pipeline=cudagraph_no_hoist`` replayed on the same random steps: the seed's
wrong-branch bug on real hardware, against 0 with hoisting.

Writes ``<out>/bench.json`` and ``<out>/bench.png``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
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
from hydra import compose  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from graphopt.config import GraphoptConfig, capture_check, register_configs, validate  # noqa: E402
from graphopt.driver import build_and_optimize, optimize_cached  # noqa: E402
from graphopt.errors import GraphoptError, one_line  # noqa: E402
from graphopt.ir.pir_utils import op_count  # noqa: E402
from graphopt.models.base import resolve_meta_field  # noqa: E402
from graphopt.report.report import write_atomic  # noqa: E402
from graphopt.runtime.backend import get_backend  # noqa: E402
from graphopt.runtime.executor import RunnerPool  # noqa: E402
from graphopt.runtime.step import StepExecutor, WholeProgramStep  # noqa: E402
from graphopt.runtime.variants import VariantStepExecutor  # noqa: E402
from graphopt.verification import max_abs_err  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("eager", "piecewise", "full_graph")
#: the timed batches: name -> (kind, decode sequences, prefill sequences x tokens each)
BATCHES = {
    "decode1": ("decode", 1, (0, 0)),
    "decode8": ("decode", 8, (0, 0)),
    "decode64": ("decode", 64, (0, 0)),
    "mixed": ("mixed", 8, (2, 16)),
    "prefill": ("prefill", 0, (4, 16)),
}


@dataclass
class GpuBenchOptions:
    """``bench``: what to measure."""

    layers: list[int] = field(default_factory=lambda: [4, 61])
    batches: list[str] = field(default_factory=lambda: list(BATCHES))
    #: timed rounds per batch (round-robin over modes); models of large_layers or more use
    #: repeats_large
    repeats: int = 50
    repeats_large: int = 20
    large_layers: int = 16
    #: random steps replayed against eager per plan (and with pipeline=cudagraph_no_hoist)
    replay_steps: int = 20
    #: capture every graph of each plan (every capture size and batch kind), timed
    capture_all: bool = True
    #: write PyTorch profiler tables (CPU and CUDA time per op) of a few steps of each mode on
    #: the first batch to <out>/profile-L<n>.txt
    profile: bool = False
    out: str | None = None


@dataclass
class GpuBenchConfig(GraphoptConfig):
    """graphopt's config plus ``bench``."""

    bench: GpuBenchOptions = field(default_factory=GpuBenchOptions)


register_configs()
ConfigStore.instance().store(name="bench_gpu_schema", node=GpuBenchConfig)


class BenchError(GraphoptError):
    """A benchmark that cannot give honest numbers: one line, exit 2 (bad keys) or 1."""


def check_bench(cfg: DictConfig) -> None:
    """The ``bench`` keys and the backend, checked before anything is built."""
    bench = cfg.bench
    if not bench.layers or any(int(n) < 1 for n in bench.layers):
        raise BenchError(f"bench.layers={list(bench.layers)}: give layer counts >= 1")
    unknown = [b for b in bench.batches if b not in BATCHES]
    if unknown:  # [] is allowed: no timed batches (optimize, capture and replay checks only)
        raise BenchError(f"bench.batches={list(bench.batches)}: choose from "
                         f"{', '.join(BATCHES)}")
    for key in ("repeats", "repeats_large"):
        if int(bench[key]) < 1:
            raise BenchError(f"bench.{key}={bench[key]}: a median needs at least 1 round")
    if not str(cfg.runtime.backend).startswith("torch_"):
        raise BenchError(f"runtime.backend={cfg.runtime.backend}: this bench runs the PyTorch "
                         "lowering; use runtime=torch_cuda (GPU) or runtime=torch_cpu")
    if int(cfg.model.max_num_seqs) < 64 or int(cfg.model.max_seq_len) < 64:
        raise BenchError("model.max_num_seqs and model.max_seq_len must be >= 64 for the "
                         "64-token batches")


# -- batches --------------------------------------------------------------------------------------
def batch_spec(name: str) -> tuple[str, list[int], list[int]]:
    """(kind, seq_lens, cached_lens) of a named timed batch."""
    kind, n_decode, (n_prefill, prefill_len) = BATCHES[name]
    seq_lens = [1] * n_decode + [prefill_len] * n_prefill
    cached = [16 + (7 * i) % 40 for i in range(n_decode)] + [0] * n_prefill
    return kind, seq_lens, cached


def sized_spec(kind: str, tokens: int) -> tuple[list[int], list[int]] | None:
    """seq_lens, cached_lens of a `kind` batch of exactly `tokens` tokens (None: impossible)."""
    if kind == "decode":
        return [1] * tokens, [8 + i % 48 for i in range(tokens)]
    prefill = tokens - (1 if kind == "mixed" else 0)
    if prefill < 1:
        return None
    chunks = [16] * (prefill // 16) + ([prefill % 16] if prefill % 16 else [])
    if kind == "mixed":
        return [1, *chunks], [8, *[0] * len(chunks)]
    return chunks, [0] * len(chunks)


def random_spec(rng: np.random.Generator, kind: str, max_tokens: int = 64
                ) -> tuple[list[int], list[int]]:
    """A random `kind` batch of at most 8 sequences and `max_tokens` tokens."""
    n = int(rng.integers(2 if kind == "mixed" else 1, 9))
    n_decode = 0 if kind == "prefill" else n if kind == "decode" else int(rng.integers(1, n))
    seq_lens = [1] * n_decode + [int(rng.integers(1, 9)) for _ in range(n - n_decode)]
    cached = [int(rng.integers(1, 48)) for _ in range(n_decode)] + [0] * (n - n_decode)
    assert sum(seq_lens) <= max_tokens
    return seq_lens, cached


def make_batch(bundle: Any, kind: str, seq_lens: list[int], cached: list[int],
               vocab: int, seed: int) -> Any:
    ids = np.random.default_rng(seed).integers(0, vocab, size=sum(seq_lens))
    return bundle.make_batch(kind, seq_lens, cached, input_ids=ids)


def fill_state(bundle: Any, seed: int) -> None:
    """The same random KV caches in every bundle: decode attends over real numbers."""
    rng = np.random.default_rng(seed)
    for path in bundle.state_fields:
        t = resolve_meta_field(bundle.meta, path)
        paddle.assign(paddle.to_tensor(
            rng.standard_normal(t.shape).astype(str(t.dtype).removeprefix("paddle."))), output=t)


# -- timing ---------------------------------------------------------------------------------------
class Clock:
    """Wall time of a call that ends with every GPU kernel done (torch_cuda), or plain."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.torch = torch
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn: Any) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def time_split(self, fn: Any) -> tuple[float, float]:
        """(seconds until the GPU is done, seconds until `fn` returned)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        self.sync()
        return time.perf_counter() - t0, t1 - t0

    def gpu_ms(self, fn: Any, repeats: int) -> float | None:
        """Median GPU time of `fn` by CUDA events (None without CUDA)."""
        if not self.cuda:
            return None
        torch = self.torch
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def memory_mb(self) -> float | None:
        return self.torch.cuda.memory_reserved() / 2**20 if self.cuda else None


def kernel_profile(fn: Any) -> dict[str, Any] | None:
    """One call of `fn` under the profiler: the sum of its GPU kernels' durations (ms), how
    many kernels ran, and the span from the first kernel's start to the last one's end (ms);
    span - sum is the time the GPU sat between kernels. None if unavailable."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
                   and str(e.device_type).endswith("CUDA")]
        if not kernels:
            return None
        span = (max(e.time_range.end for e in kernels)
                - min(e.time_range.start for e in kernels))
        return {"sum_ms": round(sum(e.device_time for e in kernels) / 1e3, 4),
                "kernels": len(kernels), "span_ms": round(span / 1e3, 4)}
    except Exception:
        return None


# -- one layer count ------------------------------------------------------------------------------
def _compose(overrides: list[str]) -> DictConfig:
    cfg = compose(config_name="bench_gpu", overrides=overrides)
    validate(cfg)
    return cfg


def optimize_pipeline(overrides: list[str], pipeline: str) -> tuple[Any, float]:
    """The optimized ModelProgram of one pipeline (no verification: this bench checks what
    it runs against eager itself); the model's patches are undone, so eager is as written."""
    extra = ["full_cuda_graph=true"] if pipeline == "full_graph" else []
    cfg = _compose([*overrides, f"pipeline={pipeline}", *extra])
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.verify.seed)
    if cfg.cache.enabled:  # a second call on the same machine skips the 61-layer traces
        mp, _, _, info = optimize_cached(cfg, validate(cfg), rng, {})
        print(f"bench_gpu: cache {info['status']} ({pipeline})", flush=True)
    else:
        mp, _, _ = build_and_optimize(cfg, validate(cfg), rng)
    mp.model.restore_patches(0)
    return mp, time.perf_counter() - t0


def replay_check(executor: Any, bundle: Any, steps: int, seed: int, atol: float,
                 vocab: int) -> dict[str, Any]:
    """`steps` random steps through `executor`, each against the model as written; the state
    each step writes is committed, so later steps read what earlier ones wrote."""
    rng = np.random.default_rng(seed)
    kinds = ["prefill", "decode", "mixed"] * (steps // 3 + 1)
    errs = []
    for i, kind in enumerate(kinds[:steps]):
        seq_lens, cached = random_spec(rng, kind)
        batch = make_batch(bundle, kind, seq_lens, cached, vocab, seed * 1000 + i)
        want = bundle.reference_step(batch)
        errs.append(max_abs_err(executor.run(batch), want))
        bundle.commit_state(want[1:])
    return {"steps": len(errs), "wrong": sum(e > atol for e in errs),
            "max_abs_err": max(errs) if errs else 0.0}


def capture_everything(executor: Any, bundle: Any, sizes: list[int], clock: Clock,
                       vocab: int) -> dict[str, Any]:
    """Run one step of every kind at every capture size: each graph of the plan is captured.
    Returns the wall seconds, the backend's own capture seconds and the GPU memory taken."""
    mem0 = clock.memory_mb()
    backends = _backends(executor)
    t = 0.0
    for size in sizes:
        for kind in ("decode", "prefill", "mixed"):
            spec = sized_spec(kind, size)
            if spec is None:
                continue
            batch = make_batch(bundle, kind, *spec, vocab, size)
            t += clock.time(lambda b=batch: executor.run(b))
    mem1 = clock.memory_mb()
    st = executor.stats()
    return {"wall_s": round(t, 3),
            "capture_only_s": round(sum(getattr(b, "capture_s", 0.0) for b in backends), 3),
            "graphs": st["graphs_captured"],
            "graph_mem_mb": None if mem0 is None else round(mem1 - mem0, 1)}


def profile_modes(fns: dict[str, Any], path: Path, cuda: bool) -> None:
    """PyTorch profiler tables of 3 calls of each mode (where a step's time goes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    parts = []
    for m, fn in fns.items():
        with profile(activities=acts) as prof:
            for _ in range(3):
                fn()
            if cuda:
                torch.cuda.synchronize()
        parts.append(f"== {m} (3 calls)\n" + prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=18))
    path.write_text("\n".join(parts))


def _counters(*executors: Any) -> dict[str, int]:
    """Replays, uncaptured runs, checked replays, unbound replays, eager segment runs: summed
    over `executors` (to tell what a timed loop really ran)."""
    out = {"replays": 0, "uncaptured_runs": 0, "checked_replays": 0, "eager_segment_runs": 0,
           "unbound_replays": 0}
    for ex in executors:
        st = ex.stats()
        for k in ("replays", "uncaptured_runs", "checked_replays", "eager_segment_runs"):
            out[k] += int(st.get(k, 0))
        out["unbound_replays"] += sum(getattr(b, "unbound_replays", 0) for b in _backends(ex))
    return out


def _backends(executor: Any) -> list[Any]:
    if isinstance(executor, VariantStepExecutor):
        targets = [*executor.targets.values(), *([executor.general] if executor.general else [])]
        return [t.manager.backend for t in targets if t.manager is not None]
    return [executor.capture.backend] if executor.capture is not None else []


def full_graph_replay(executor: VariantStepExecutor, prepared: Any) -> Any:
    """A function replaying the graphs the prepared step's variant runs at its size, inputs
    already in place (None when that variant is not captured at that size)."""
    target, size = prepared.target, prepared.size
    if target.manager is None or size is None:
        return None
    graphs = [target.manager.graphs.get((seg.id, size)) for seg in target.plan.captured]
    if not graphs or any(g is None for g in graphs):
        return None
    api = target.manager.backend.api

    def replay() -> None:
        for g in graphs:
            api.replay(g.graph)
    return replay


def bench_layers(overrides: list[str], layers: int, bench: Any, cfg: DictConfig,
                 out_dir: Path) -> dict[str, Any]:
    over = [*overrides, f"model.num_hidden_layers={layers}"]
    backend = str(cfg.runtime.backend)
    cuda = get_backend(backend).captures
    clock = Clock(cuda)
    sizes = [int(s) for s in cfg.runtime.cudagraph_capture_sizes]
    warmups = int(cfg.runtime.cudagraph_num_of_warmups)
    check = capture_check(cfg.runtime)
    atol = float(cfg.verify.replay_atol)
    vocab = None
    out: dict[str, Any] = {"layers": layers, "optimize_s": {}}

    plans = {}
    for pipeline in ("cudagraph", "full_graph", "cudagraph_no_hoist"):
        mp, took = optimize_pipeline(over, pipeline)
        plans[pipeline] = mp
        out["optimize_s"][pipeline] = round(took, 2)
        fill_state(mp.model, 7)
        vocab = int(mp.model.config.vocab_size)
        print(f"bench_gpu: L{layers} {pipeline}: optimized in {took:.1f} s", flush=True)
    piece, full, nohoist = plans["cudagraph"], plans["full_graph"], plans["cudagraph_no_hoist"]
    out["ops"] = op_count(piece.program)
    out["segments"] = piece.segments.stats()
    out["variants"] = {v.name: op_count(v.program) for v in full.variants}

    pool_p, pool_f = RunnerPool(piece.params), RunnerPool(full.params)
    eager = WholeProgramStep(piece, pool_p, backend)
    pw = StepExecutor(piece, backend, sizes, warmups, pool_p, check_captures=check)
    fg = VariantStepExecutor(full, backend, sizes, warmups, pool_f, check_captures=check)

    if bench.capture_all and cuda:
        out["capture"] = {
            "piecewise": capture_everything(pw, piece.model, sizes, clock, vocab),
            "full_graph": capture_everything(fg, full.model, sizes, clock, vocab)}
        print(f"bench_gpu: L{layers} captured: {out['capture']}", flush=True)

    repeats = int(bench.repeats if layers < bench.large_layers else bench.repeats_large)
    errors: dict[str, float] = {m: 0.0 for m in MODES}
    for i, name in enumerate(bench.batches):
        kind, seq_lens, cached = batch_spec(name)
        bp = make_batch(piece.model, kind, seq_lens, cached, vocab, 100 + i)
        bf = make_batch(full.model, kind, seq_lens, cached, vocab, 100 + i)
        want = piece.model.reference_step(bp)
        feeds = eager.inputs(bp)
        pp, pf = pw.prepare(bp), fg.prepare(bf)
        fns = {"eager": lambda f=feeds: eager.execute(f),
               "piecewise": lambda p=pp: pw.execute(p),
               "full_graph": lambda p=pf: fg.execute(p)}
        for m, fn in fns.items():  # warm-up (captures what capture_all did not), then check
            for _ in range(max(2, warmups + 2)):
                fn()
            clock.sync()
            errors[m] = max(errors[m], max_abs_err(fn(), want))
        times: dict[str, list[float]] = {m: [] for m in MODES}
        host: dict[str, list[float]] = {m: [] for m in MODES}
        before = _counters(pw, fg)
        for _ in range(repeats):
            for m, fn in fns.items():
                wall, returned = clock.time_split(fn)
                times[m].append(wall)
                host[m].append(returned)
        row = {f"{m}_ms": round(statistics.median(v) * 1e3, 4) for m, v in times.items()}
        if bench.profile and i == 0:
            profile_modes(fns, out_dir / f"profile-L{layers}.txt", cuda)
        # where the time goes: until the call returns (host work, launches) vs until the GPU
        # is done; and what the executors did meanwhile (replays, uncaptured runs, checks)
        row["host_ms"] = {m: round(statistics.median(v) * 1e3, 4) for m, v in host.items()}
        after = _counters(pw, fg)
        row["counters"] = {k: after[k] - before[k] for k in after}
        replay = full_graph_replay(fg, pf) if cuda else None
        row["kernel_ms"] = (round(clock.gpu_ms(replay, repeats), 4) if replay is not None
                            else None)
        prof = kernel_profile(replay) if replay is not None else None
        row["kernel_sum_ms"] = prof["sum_ms"] if prof else None
        row["kernels"] = prof["kernels"] if prof else None
        row["kernel_span_ms"] = prof["span_ms"] if prof else None
        row["tokens"] = sum(seq_lens)
        row["full_graph_variant"] = pf.target.name
        out[name] = row
        print(f"bench_gpu: L{layers} {name}: {row}", flush=True)

    out["max_abs_err"] = {m: float(f"{e:.3g}") for m, e in errors.items()}
    steps = int(bench.replay_steps)
    seed = int(cfg.verify.seed)
    out["steps"] = steps
    hoisted = {
        "piecewise": replay_check(pw, piece.model, steps, seed, atol, vocab),
        "full_graph": replay_check(fg, full.model, steps, seed, atol, vocab)}
    out["hoisted_replay"] = hoisted
    out["hoisted_wrong"] = sum(r["wrong"] for r in hoisted.values())
    nh = StepExecutor(nohoist, backend, sizes, warmups, RunnerPool(nohoist.params))
    out["no_hoist_replay"] = replay_check(nh, nohoist.model, steps, seed, atol, vocab)
    out["no_hoist_wrong"] = out["no_hoist_replay"]["wrong"]
    if check is not None:  # the same steps, checked: the stale graphs are caught and dropped
        fill_state(nohoist.model, 7)
        nhc = StepExecutor(nohoist, backend, sizes, warmups, RunnerPool(nohoist.params),
                           check_captures=check)
        out["no_hoist_checked_replay"] = replay_check(nhc, nohoist.model, steps, seed, atol,
                                                      vocab)
        out["no_hoist_checked_replay"]["dropped_graphs"] = len(
            nhc.stats()["dropped_graphs"])
    dropped = pw.stats().get("dropped_graphs", []) + fg.stats().get("dropped_graphs", [])
    out["dropped_graphs"] = len(dropped)
    out["dropped"] = dropped[:10]
    out["max_abs_err"]["replay"] = float(f"{max(r['max_abs_err'] for r in hoisted.values()):.3g}")
    out["unbound_replays"] = sum(getattr(b, "unbound_replays", 0)
                                 for b in _backends(pw) + _backends(fg))
    if "capture" in out:
        out["capture_s"] = {k: v["wall_s"] for k, v in out["capture"].items()}
        out["graph_mem_mb"] = {k: v["graph_mem_mb"] for k, v in out["capture"].items()}
    return out


# -- report ---------------------------------------------------------------------------------------
def device_name(cfg: DictConfig) -> str:
    import torch

    if str(cfg.runtime.backend) == "torch_cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def plot(result: dict[str, Any], path: Path) -> None:
    sizes = [k for k in result if k.startswith("L")]
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.2), squeeze=False)
    modes = ["eager", "piecewise", "full_graph", "kernel"]
    colors = {"eager": "#b0b0b0", "piecewise": "#4c72b0", "full_graph": "#55a868",
              "kernel": "#222222"}
    for ax, label in zip(axes[0], sizes, strict=True):
        r = result[label]
        names = [b for b in BATCHES if b in r]
        width = 0.8 / len(modes)
        for j, m in enumerate(modes):
            vals = [r[b].get(f"{m}_ms") for b in names]
            xs = [i + (j - 1.5) * width for i in range(len(names))]
            bars = ax.bar([x for x, v in zip(xs, vals, strict=True) if v],
                          [v for v in vals if v], width, label=m, color=colors[m])
            if m != "piecewise":
                continue
            # a piecewise step whose replays fell back to uncaptured runs is not a graph number
            kept = [b for b, v in zip(names, vals, strict=True) if v]
            for bar, b in zip(bars, kept, strict=True):
                if r[b].get("counters", {}).get("unbound_replays"):
                    bar.set_hatch("//")
                    bar.set_edgecolor("white")
                    ax.annotate("fell back\nuncaptured", (bar.get_x() + width / 2,
                                bar.get_height()), ha="center", va="bottom", fontsize=6)
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 4)
        ax.set_xticks(range(len(names)), [f"{b}\n({r[b]['tokens']} tok)" for b in names])
        ax.set_ylabel("ms per step (median, log)")
        title = f"{label}: " + (f"{r['ops']} ops, {r['segments']['captured']} captured "
                                f"segments; " if "ops" in r else "")
        title += (f"no-hoist wrong {r['no_hoist_wrong']}/{r['steps']}"
                  if r.get("steps") else "replay checks not measured")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=4)
    fig.suptitle(f"graphopt plans on {result['device']} (torch {result['torch']}, paddle "
                 f"{result['paddle']} CPU plans)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: DictConfig) -> dict[str, Any]:
    import torch

    check_bench(cfg)
    overrides = [o for o in HydraConfig.get().overrides.task
                 if not o.lstrip("+~").startswith(("bench.", "hydra.", "model.num_hidden_layers",
                                                   "pipeline=", "full_cuda_graph"))]
    result: dict[str, Any] = {
        "device": device_name(cfg), "torch": torch.__version__, "paddle": paddle.__version__,
        "backend": str(cfg.runtime.backend), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python tools/bench_gpu.py " + " ".join(HydraConfig.get().overrides.task),
        "capture_sizes": list(cfg.runtime.cudagraph_capture_sizes),
        "check_captures": OmegaConf.to_container(cfg.runtime, resolve=True),
    }
    out = Path(cfg.bench.out) if cfg.bench.out else Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for layers in cfg.bench.layers:
        result[f"L{layers}"] = bench_layers(overrides, int(layers), cfg.bench, cfg, out)
        # after each size: a run stopped by a time limit keeps the sizes it finished
        write_atomic(out / "bench.json", json.dumps(result, indent=1, default=_plain) + "\n")
        plot(result, out / "bench.png")
        print(f"bench_gpu: wrote {out / 'bench.json'} and bench.png (L{layers})", flush=True)
    return result


def _plain(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


@hydra.main(config_path="../graphopt/conf", config_name="bench_gpu", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except GraphoptError as e:
        print(f"bench_gpu: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2 if isinstance(e, BenchError) else 1)


if __name__ == "__main__":
    main()
