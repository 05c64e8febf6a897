"""``optimize(cfg)``: one graphopt run, as a plain function (the CLI is a thin wrapper).

    validate the config (nothing built yet) -> build the model -> source passes -> SOT trace
      -> program passes -> verify against eager (numerics, replay) -> report.json + artifacts

Each phase runs under ``graphopt.report.progress.phase`` (a progress line on a terminal, a log
line always). With ``verify.bisect=true`` a failed verification reruns the pipeline with a numeric
check after every program pass (:func:`bisect`) and names the first pass that broke the step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from graphopt.cache import (
    ENTRY_FILE,
    CacheError,
    CompileCache,
    cache_key,
    code_digests,
    key_material,
    link_entry,
    record_replay,
    recorded_replay,
    write_entry,
)
from graphopt.config import capture_check, validate
from graphopt.errors import ConfigError, VerificationError, one_line
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.trace import trace_step
from graphopt.models import build_model, builder_path
from graphopt.models.base import ModelBundle
from graphopt.passes.analysis.placement import hazards_of
from graphopt.passes.base import PassRecord, Stage
from graphopt.passes.instruments import IRDumpInstrument
from graphopt.passes.listing import describe_passes
from graphopt.passes.manager import PassManager
from graphopt.report.progress import ProgressInstrument, memory_mb, phase, reset_peak_rss
from graphopt.report.report import (
    build_report,
    summary,
    write_artifacts,
    write_atomic,
    write_report,
)
from graphopt.runtime.executor import RunnerPool, release_interpreters
from graphopt.verification import (
    BisectResult,
    NumericsInstrument,
    Replay,
    check_numerics,
    check_replay,
)


def optimize(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the configured pipeline on the configured model; return the report (also saved)."""
    pm = validate(cfg)
    if cfg.list_passes:
        print(describe_passes())
        return {}
    run_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    if cfg.dump_ir:
        pm.instruments.append(IRDumpInstrument(run_dir, only_on_change=cfg.dump_ir_only_on_change))
    pm.instruments.append(ProgressInstrument())
    pipeline = {"name": str(cfg.pipeline.name), "passes": pm.resolved()}
    print(f"graphopt: model={cfg.model.name} pipeline={_pipeline_label(cfg, pm)} "
          f"full_cuda_graph={str(cfg.full_cuda_graph).lower()} "
          f"runtime={getattr(cfg.runtime.backend, 'value', cfg.runtime.backend)}")
    print(pm.describe())

    t_start = time.perf_counter()
    reset_peak_rss()  # the peak this run reports is its own (a sweep runs jobs in one process)
    timings: dict[str, float] = {}
    rng = np.random.default_rng(cfg.verify.seed)
    if cfg.cache.enabled:
        mp, records, hazards_before, cache_info = optimize_cached(cfg, pm, rng, timings)
    else:
        mp, records, hazards_before = build_and_optimize(cfg, pm, rng, timings)
        cache_info = {"status": "off"}
    try:
        # one pool: the replay reuses every program the numerics check compiled
        pool = RunnerPool(mp.params)
        with phase("verify", "(numerics vs eager)"), _timed(timings, "verify"):
            numerics = check_numerics(mp, rng, pool,
                                      int(cfg.verify.get("whole_program_max_ops", 4000)),
                                      backend=str(cfg.runtime.backend))
            hazards_after = ([h.to_dict() for h in hazards_of(mp)] if mp.program is not None
                             else None)
        settings = _replay_settings(cfg)
        entry_dir = Path(cache_info["entry"]) if cache_info.get("entry") else None
        recorded = (recorded_replay(entry_dir, settings)
                    if entry_dir is not None and cache_info["status"] == "hit"
                    and not cfg.cache.replay_on_hit else None)
        if recorded is not None:
            replay = Replay.from_dict(recorded[0])
            replay.recorded = recorded[1]
        else:
            with phase("replay", f"({cfg.verify.steps} steps)"), _timed(timings, "replay"):
                replay = check_replay(
                    mp, rng, backend=settings["backend"], steps=settings["steps"],
                    capture_sizes=settings["capture_sizes"],
                    num_warmups=settings["num_warmups"], atol=settings["atol"],
                    check=capture_check(cfg.runtime), pool=pool)
            if entry_dir is not None:  # for later hits with the same settings
                record_replay(entry_dir, settings, replay.to_dict(),
                              f"the run of {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ({run_dir})")
        pool.clear()
        release_interpreters()  # the checks are done: give their compiled programs back
        report = build_report(cfg, pipeline, mp, records, hazards_before, hazards_after,
                              numerics, replay, float(cfg.verify.atol))
        report.cache = cache_info
        with phase("artifacts"), _timed(timings, "artifacts"):
            compiled = None
            if mp.program is not None:  # what graphopt.load(run_dir) reads
                entry = cache_info.get("entry")
                if entry and Path(entry, ENTRY_FILE).is_file():  # the cache's, as is
                    link_entry(Path(entry), run_dir / "compiled")
                else:  # keyed like a cache entry: load() checks the key is its material's
                    material = cache_info.get("material") or _key_material(cfg, pm, mp.model)
                    _write_entry_atomic(run_dir / "compiled", cache_info.get("key") or
                                        cache_key(material), material, mp, report.passes,
                                        hazards_before)
                compiled = run_dir / "compiled" / "program.pir"
            report.artifacts = write_artifacts(mp, cfg, pipeline, run_dir, serialized=compiled)
            if compiled is not None:
                report.artifacts["compiled"] = "compiled"
    finally:
        mp.model.restore_patches(0)
    bisect_line = ""
    if cfg.verify.bisect and not report.verified and mp.program is not None:
        with phase("bisect", "(numerics after each program pass)"):
            found = bisect(cfg, run_dir)
        report.bisect = found.to_dict()
        hazards = report.hazards["after"]
        bisect_line = found.message(
            f"the step differs only when replayed: {hazards} replay hazard(s) left, host values "
            "frozen at capture" if replay.mismatches else "")
    report.time_s = round(time.perf_counter() - t_start, 3)
    report.timings = {k: round(v, 3) for k, v in timings.items()}
    report.memory_mb = memory_mb()
    write_report(report, run_dir)
    raising = bool(cfg.verify.fail_on_mismatch and not report.verified)
    print(summary(report, verdict=not raising))
    if bisect_line:
        print(bisect_line)
    peak = report.memory_mb.get("peak_rss")
    print(timing_line(report.timings, report.time_s)
          + (f"; peak RSS {peak:.0f} MB" if peak else ""))
    if cache_info.get("status") == "hit":
        print(f"cache: hit ({cache_info['key']}, made {cache_info['created']}): trace and "
              "passes skipped; the trace and pass numbers above are that run's")
    if raising:
        raise VerificationError(report.verify_message)
    return report.to_dict()


def bisect(cfg: DictConfig, run_dir: str | Path) -> BisectResult:
    """Rerun the pipeline with a numeric check (vs eager) after every program pass.

    The first pass after which the step differs from eager by more than ``verify.atol`` is the
    culprit; its IR before and after go to ``<run_dir>/bisect/``.
    """
    out = Path(run_dir) / "bisect"

    def write(name: str, text: str) -> str:
        write_atomic(out / name, text if text.endswith("\n") else text + "\n")
        return f"bisect/{name}"

    pm = validate(cfg)
    check = NumericsInstrument(float(cfg.verify.atol), int(cfg.verify.seed), write)
    pm.instruments.append(check)
    mp, _, _ = build_and_optimize(cfg, pm, np.random.default_rng(cfg.verify.seed))
    mp.model.restore_patches(0)
    return check.result


def _pipeline_label(cfg: DictConfig, pm: PassManager) -> str:
    """The pipeline's config name, or its passes when the command line replaced them."""
    names = ",".join(pm.names) or "(none)"
    return f"{cfg.pipeline.name}[{names}]"


def build_and_optimize(
    cfg: DictConfig, pm: PassManager, rng: np.random.Generator,
    timings: dict[str, float] | None = None,
    bundle: ModelBundle | None = None,
) -> tuple[ModelProgram, list[PassRecord], list[dict] | None]:
    """Build the model, run source passes, trace, run program passes.

    Returns ``(mp, records, hazards_before)``. The model's functions stay patched (marked) until
    the caller runs ``mp.model.restore_patches(0)``; on error they are restored here. With
    `timings`, the phases' wall seconds are added to it (``build``, ``trace_unmodified``,
    ``trace_optimized``, ``passes``). A `bundle` already built from ``cfg.model`` is used as is.
    """
    timings = timings if timings is not None else {}
    _set_device(cfg)
    if bundle is None:
        with phase("build", f"(model={cfg.model.name})"), _timed(timings, "build"):
            bundle = build_model(cfg.model)
    mp = ModelProgram(model=bundle, full_cuda_graph=bool(cfg.full_cuda_graph))
    mp.trace_batch = bundle.random_batch(rng, "mixed")
    t0 = time.perf_counter()
    try:
        with phase("passes", "(source)"):
            records = pm.run(mp, Stage.SOURCE)
        # a source pass leaves its last trace behind; trace again only if the code changed since
        if not mp.traces or mp.trace.marked != mp.patch_checkpoint():
            with phase("trace", "(SOT -> PIR)"):
                trace_step(mp, mp.trace_batch)
        if mp.program is None and any(p.stage is Stage.PROGRAM for p in pm.passes):
            sites = "; ".join(b["location"] for b in mp.trace.break_sites()[:3])
            raise ConfigError(
                f"program-stage passes need the step as ONE graph, but SOT broke it into "
                f"{mp.trace.subgraphs} graphs ({len(mp.trace.graph_breaks)} breaks at {sites}). "
                + ("capture-control-flow ran and could not remove them (see its stats)."
                   if "capture-control-flow" in pm.names else
                   "Add capture-control-flow at the start of pipeline.passes.")
            )
        hazards_before = ([h.to_dict() for h in hazards_of(mp)]
                          if mp.program is not None else None)
        with phase("passes", "(program)"):
            records += pm.run(mp, Stage.PROGRAM)
    except BaseException:
        bundle.restore_patches(0)
        raise
    # the traces ran inside the source passes; what is left of the stage is the passes' own work.
    # A trace of the model with no function marked is of the unmodified model.
    unmodified = sum(t.wall_s for t in mp.traces if not t.marked)
    modified = sum(t.wall_s for t in mp.traces if t.marked)
    timings["trace_unmodified"] = timings.get("trace_unmodified", 0.0) + unmodified
    timings["trace_optimized"] = timings.get("trace_optimized", 0.0) + modified
    timings["passes"] = (timings.get("passes", 0.0) + time.perf_counter() - t0
                         - unmodified - modified)
    return mp, records, hazards_before


def _set_device(cfg: DictConfig) -> None:
    """``runtime.device``: where the model is built and its programs run."""
    paddle.set_device(str(getattr(cfg.runtime.device, "value", cfg.runtime.device)))


def _replay_settings(cfg: DictConfig) -> dict[str, Any]:
    """Everything the replay check's result depends on besides the cache key: the arguments
    of :func:`check_replay`, and the device."""
    return {
        "backend": str(getattr(cfg.runtime.backend, "value", cfg.runtime.backend)),
        "steps": int(cfg.verify.steps),
        "capture_sizes": list(cfg.runtime.cudagraph_capture_sizes),
        "num_warmups": int(cfg.runtime.cudagraph_num_of_warmups),
        "atol": float(cfg.verify.replay_atol),
        "check_captures": bool(cfg.runtime.check_captures),
        "check_atol": float(cfg.runtime.check_captures_atol),
        "check_replays": cfg.runtime.check_captures_replays,
        "check_on_mismatch": str(getattr(cfg.runtime.check_captures_on_mismatch, "value",
                                         cfg.runtime.check_captures_on_mismatch)),
        "device": str(getattr(cfg.runtime.device, "value", cfg.runtime.device)),
    }


def _key_material(cfg: DictConfig, pm: PassManager, bundle: ModelBundle) -> dict[str, Any]:
    """What the optimized step of this run depends on (see graphopt.cache.key_material)."""
    return key_material(
        OmegaConf.to_container(cfg.model, resolve=True),  # type: ignore[arg-type]
        bundle.provenance,
        pm.resolved(),
        # the trace batch comes from verify.seed's generator
        {"full_cuda_graph": bool(cfg.full_cuda_graph), "verify.seed": int(cfg.verify.seed)},
        # code outside graphopt the step comes from: plug-in passes, the model's own classes
        code_digests([*(type(p) for p in pm.passes), _builder(cfg.model),
                      *(type(layer) for layer in [bundle.layer, *bundle.layer.sublayers()])]),
    )


def _write_entry_atomic(target: Path, key: str, material: dict[str, Any], mp: ModelProgram,
                        records: list[Any], hazards_before: list[dict] | None) -> None:
    """The run directory's ``compiled/`` entry, written beside it and renamed into place, so
    a full disk leaves no half-written entry for ``load()`` to trip over."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".compiled-", dir=target.parent))
    try:
        write_entry(tmp, key, material, mp, records, hazards_before)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp made it 0700
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _builder(model: Any) -> Any:
    """The model's builder function (for its module's digest); None if it cannot be found."""
    module, _, attr = builder_path(model).rpartition(".")
    return getattr(sys.modules.get(module), attr, None)


def optimize_cached(
    cfg: DictConfig, pm: PassManager, rng: np.random.Generator, timings: dict[str, float]
) -> tuple[ModelProgram, list[PassRecord], list[dict] | None, dict[str, Any]]:
    """:func:`build_and_optimize` through the compile cache (``cache.enabled``).

    A hit loads the optimized program, prologue, flags and pass records and rebuilds the plan:
    no trace, no passes. A miss optimizes and stores the result. An entry that cannot be used
    (corrupt, stale) is reported in one warning line, rebuilt and replaced. Returns what
    :func:`build_and_optimize` does, plus ``{"status": hit|miss|rebuilt, "key", ...}``.
    """
    _set_device(cfg)
    with phase("build", f"(model={cfg.model.name})"), _timed(timings, "build"):
        bundle = build_model(cfg.model)
    material = _key_material(cfg, pm, bundle)
    key = cache_key(material)
    cache = CompileCache(cfg.cache.dir)
    unsafe = cache.unsafe()
    if unsafe:
        print(f"graphopt: warning: cache.dir={cache.dir}: {unsafe}; anyone who can write there "
              "can plant entries (README, 'Sharing a cache')", file=sys.stderr)
    info: dict[str, Any] = {"status": "miss", "key": key, "dir": str(cache.dir)}
    try:
        with _timed(timings, "cache_load"):
            entry = cache.load(key, bundle)
    except CacheError as e:
        print(f"graphopt: warning: cache entry {key} cannot be used ({one_line(e)}); "
              "rebuilding it", file=sys.stderr)
        entry, info["status"] = None, "rebuilt"
    if entry is not None:
        mp = entry.mp
        mp.trace_batch = bundle.random_batch(rng, "mixed")  # same draws as a cold run
        if mp.flags:
            paddle.set_flags(dict(mp.flags))
        records = [PassRecord(r["name"], r["modified"], r["time_s"], r["stats"])
                   for r in entry.records]
        info.update(status="hit", created=entry.created, entry=str(cache.path(key)))
        return mp, records, entry.hazards_before, info
    mp, records, hazards_before = build_and_optimize(cfg, pm, rng, timings, bundle=bundle)
    if mp.program is not None:
        try:
            with _timed(timings, "cache_store"):
                stored = cache.store(key, material, mp, [r.to_dict() for r in records],
                                     hazards_before, replace=info["status"] == "rebuilt")
        except OSError as e:  # a full disk: the run is still good, only not cached
            print(f"graphopt: warning: cache entry {key} not stored in {cache.dir} "
                  f"({e.strerror or e}); the run goes on uncached", file=sys.stderr)
            info["stored"], info["store_error"] = False, str(e.strerror or e)
        else:
            info["stored"] = stored
            info["entry"] = str(cache.path(key))  # ours, or an identical one a peer wrote
    info["material"] = material
    return mp, records, hazards_before, info


#: the phases of one run, in the order ``report.json`` and the CLI list them
PHASES = ("build", "cache_load", "trace_unmodified", "trace_optimized", "passes", "cache_store",
          "verify", "replay", "artifacts")


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[phase]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t0


def timing_line(timings: dict[str, float], total: float) -> str:
    """``timings: build 1.2 s, trace_unmodified 3.1 s, ... (other 0.4 s), total 10.8 s``."""
    keys = [k for k in PHASES if k in timings] + [k for k in timings if k not in PHASES]
    parts = [f"{k} {timings[k]:.1f} s" for k in keys]
    other = total - sum(timings.values())
    if other >= 0.05:
        parts.append(f"other {other:.1f} s")
    return f"timings: {', '.join(parts)}; total {total:.1f} s"


def hydra_run_dir() -> Path:
    """Hydra's output directory of this job, or a fresh temp dir outside Hydra."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(tempfile.mkdtemp(prefix="graphopt-"))
