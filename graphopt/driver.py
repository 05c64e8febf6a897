"""``optimize(cfg)``: one graphopt run, as a plain function (the CLI is a thin wrapper).

    validate the config (nothing built yet) -> build the model -> source passes -> SOT trace
      -> program passes -> verify against eager (numerics, replay) -> report.json + artifacts

Each phase runs under ``graphopt.report.progress.phase`` (a progress line on a terminal, a log
line always). With ``verify.bisect=true`` a failed verification reruns the pipeline with a numeric
check after every program pass (:func:`bisect`) and names the first pass that broke the step.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from graphopt.config import validate
from graphopt.errors import ConfigError, VerificationError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.trace import trace_step
from graphopt.models import build_model
from graphopt.passes.analysis.placement import hazards_of
from graphopt.passes.base import PassRecord, Stage
from graphopt.passes.instruments import IRDumpInstrument
from graphopt.passes.listing import describe_passes
from graphopt.passes.manager import PassManager
from graphopt.report.progress import ProgressInstrument, phase
from graphopt.report.report import (
    build_report,
    summary,
    write_artifacts,
    write_atomic,
    write_report,
)
from graphopt.verification import BisectResult, NumericsInstrument, check_numerics, check_replay


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
    rng = np.random.default_rng(cfg.verify.seed)
    mp, records, hazards_before = build_and_optimize(cfg, pm, rng)
    try:
        with phase("verify", "(numerics vs eager)"):
            numerics = check_numerics(mp, rng)
        with phase("replay", f"({cfg.verify.steps} steps)"):
            replay = check_replay(
                mp, rng,
                backend=str(getattr(cfg.runtime.backend, "value", cfg.runtime.backend)),
                steps=int(cfg.verify.steps),
                capture_sizes=list(cfg.runtime.cudagraph_capture_sizes),
                num_warmups=int(cfg.runtime.cudagraph_num_of_warmups),
                atol=float(cfg.verify.replay_atol),
                check_captures=bool(cfg.runtime.check_captures),
                check_atol=float(cfg.runtime.check_captures_atol),
            )
        hazards_after = [h.to_dict() for h in hazards_of(mp)] if mp.program is not None else None
        report = build_report(cfg, pipeline, mp, records, hazards_before, hazards_after,
                              numerics, replay, float(cfg.verify.atol))
        with phase("artifacts"):
            report.artifacts = write_artifacts(mp, cfg, pipeline, run_dir)
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
    write_report(report, run_dir)
    raising = bool(cfg.verify.fail_on_mismatch and not report.verified)
    print(summary(report, verdict=not raising))
    if bisect_line:
        print(bisect_line)
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
    cfg: DictConfig, pm: PassManager, rng: np.random.Generator
) -> tuple[ModelProgram, list[PassRecord], list[dict] | None]:
    """Build the model, run source passes, trace, run program passes.

    Returns ``(mp, records, hazards_before)``. The model's functions stay patched (marked) until
    the caller runs ``mp.model.restore_patches(0)``; on error they are restored here.
    """
    with phase("build", f"(model={cfg.model.name})"):
        bundle = build_model(cfg.model)
    mp = ModelProgram(model=bundle, full_cuda_graph=bool(cfg.full_cuda_graph))
    mp.trace_batch = bundle.random_batch(rng, "mixed")
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
    return mp, records, hazards_before


def hydra_run_dir() -> Path:
    """Hydra's output directory of this job, or a fresh temp dir outside Hydra."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(tempfile.mkdtemp(prefix="graphopt-"))
