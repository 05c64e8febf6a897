"""``optimize(cfg)``: one graphopt run, as a plain function (the CLI is a thin wrapper).

    model config -> build model -> source passes -> SOT trace -> program passes
      -> run the result (piecewise runner + capture emulator) and verify it against eager
      -> report.json + artifacts in the run directory
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from graphopt.errors import ConfigError, PassError

log = logging.getLogger("graphopt")
SCHEMA_VERSION = 1
_BOOL_KEYS = ("full_cuda_graph", "dump_ir", "dump_ir_only_on_change", "verify_each", "list_passes")


class VerificationError(Exception):
    """The optimized program does not compute what the eager model computes."""


def _check_top_level(cfg: DictConfig) -> None:
    for key in _BOOL_KEYS:
        value = cfg.get(key)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    steps = cfg.verify.get("steps")
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"verify.steps must be a non-negative integer, got {steps!r}")
    for key in ("passes", "options"):
        if key not in cfg.pipeline:
            raise ConfigError(f"pipeline config has no '{key}' (see conf/pipeline/none.yaml)")


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _max_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    err = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            err = max(err, float(np.max(np.abs(x - y))))
    return err


def optimize(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the configured pipeline on the configured model; return the report (also saved)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    from graphopt.passes.instruments import IRDumpInstrument
    from graphopt.passes.manager import PassManager

    if cfg.get("list_passes"):
        from graphopt.passes.listing import describe_passes

        print(describe_passes())
        return {}
    _check_top_level(cfg)
    run_dir = Path(run_dir) if run_dir is not None else _hydra_run_dir()

    instruments = []
    if cfg.dump_ir:
        instruments.append(IRDumpInstrument(run_dir, only_on_change=cfg.dump_ir_only_on_change))
    pm = PassManager.from_config(
        list(cfg.pipeline.passes),
        cfg.pipeline.options,
        verify_each=cfg.verify_each,
        instruments=instruments,
    )
    print(f"graphopt: model={cfg.model.name} pipeline={cfg.pipeline.name} "
          f"full_cuda_graph={str(cfg.full_cuda_graph).lower()} runtime={cfg.runtime.backend}")
    print(pm.describe())

    t_start = time.perf_counter()
    rng = np.random.default_rng(cfg.verify.seed)
    mp, records, hazards_before = build_and_optimize(cfg, pm, rng)
    try:
        report = _verify_and_report(cfg, pm, mp, records, hazards_before, rng, run_dir)
    finally:
        mp.model.restore_patches(0)
    report["time_s"] = round(time.perf_counter() - t_start, 3)
    _write_atomic(run_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    print(_summary(report))
    if cfg.verify.get("fail_on_mismatch", True) and not report["verified"]:
        raise VerificationError(report["verify_message"])
    return report


def build_and_optimize(cfg: DictConfig, pm, rng: np.random.Generator):
    """Build the model, run source passes, trace, run program passes.

    Returns ``(mp, records, hazards_before)``. The model's functions stay patched (marked) until
    the caller runs ``mp.model.restore_patches(0)``; on error they are restored here.
    """
    from graphopt.ir.model_program import ModelProgram
    from graphopt.ir.trace import trace_step
    from graphopt.models import build_model
    from graphopt.passes.base import Stage

    bundle = build_model(cfg.model)
    mp = ModelProgram(model=bundle, full_cuda_graph=bool(cfg.full_cuda_graph))
    trace_batch = bundle.random_batch(rng, "mixed")
    mp.facts["trace_batch"] = trace_batch
    try:
        records = pm.run(mp, Stage.SOURCE)
        # capture-control-flow leaves its last trace behind; retrace only if the code changed since.
        if mp.facts.get("traced_at_patch") != bundle.patch_checkpoint():
            trace_step(mp, trace_batch)
        mp.facts.setdefault(
            "graph_breaks", {"before": len(mp.trace.graph_breaks),
                             "after": len(mp.trace.graph_breaks)}
        )
        if mp.program is None and any(p.stage is Stage.PROGRAM for p in pm.passes):
            sites = "; ".join(
                f"{s['file'].rsplit('/models/', 1)[-1]}:{s['line']} ({s['function']})"
                for s in mp.trace.break_sites()[:3]
            )
            raise ConfigError(
                f"program-stage passes need the step as ONE graph, but SOT broke it into "
                f"{mp.trace.subgraphs} subgraphs ({len(mp.trace.graph_breaks)} breaks at {sites}). "
                "Put capture-control-flow first in the pipeline."
            )
        hazards_before = _hazards(mp)
        records += pm.run(mp, Stage.PROGRAM)
    except BaseException:
        bundle.restore_patches(0)
        raise
    return mp, records, hazards_before


def _hydra_run_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path(tempfile.mkdtemp(prefix="graphopt-"))


def _hazards(mp) -> list[dict] | None:
    if mp.program is None:
        return None
    from graphopt.passes.hoist_host_branch_conditions import hazard_report

    return hazard_report(mp)


def _step_kinds(n: int) -> list[str]:
    kinds = ["prefill", "decode", "mixed"]
    return [kinds[i % 3] for i in range(n)]


def _verify_and_report(cfg, pm, mp, records, hazards_before, rng, run_dir: Path) -> dict:
    from graphopt.runtime.capture import StepExecutor

    bundle = mp.model
    atol = float(cfg.verify.atol)
    replay_atol = float(cfg.verify.get("replay_atol", atol))
    warnings: list[str] = []
    if mp.trace.host_bound_by_reference:
        warnings.append(
            "SOT bound host tensor(s) " + ", ".join(mp.trace.host_bound_by_reference)
            + " by reference (builtin.parameter): replacing them between steps is silently not "
            "seen by Paddle itself; graphopt feeds them by value every step."
        )

    # -- numerics: one step of each kind, optimized vs eager (same cache state on both sides) --
    numerics: dict[str, float] = {}
    whole_err: dict[str, float] = {}
    runner = None
    if mp.program is not None:
        runner = StepExecutor(mp, backend="none", capture_sizes=[], num_warmups=0)
    for kind in ("prefill", "decode", "mixed"):
        batch = bundle.random_batch(rng, kind)
        eager = bundle.step(batch, commit=False)
        if runner is None:  # SOT broke the step into several graphs: check SOT's own run
            import paddle

            with paddle.no_grad():
                got = [o.numpy() for o in mp.facts["sot_step_fn"](*batch.args, batch.meta)]
        elif mp.segments is None:
            got = runner.run_whole(batch)
        else:
            got = runner.run(batch)
            whole_err[kind] = _max_err(runner.run_whole(batch), eager)
        numerics[kind] = _max_err(got, eager)
        bundle.commit_state(eager[1:])

    # -- capture + replay through the runtime backend, host values changing every step --
    emulator: dict[str, Any] = {"steps": 0, "mismatches": 0, "backend": cfg.runtime.backend}
    if mp.segments is not None and cfg.runtime.backend != "none" and cfg.verify.steps:
        ex = StepExecutor(
            mp,
            backend=cfg.runtime.backend,
            capture_sizes=list(cfg.runtime.cudagraph_capture_sizes),
            num_warmups=int(cfg.runtime.cudagraph_num_of_warmups),
        )
        errs = []
        kinds = _step_kinds(int(cfg.verify.steps))
        rng.shuffle(kinds)
        for kind in kinds:
            batch = bundle.random_batch(rng, kind)
            eager = bundle.step(batch, commit=False)
            errs.append(_max_err(ex.run(batch), eager))
            bundle.commit_state(eager[1:])
        emulator.update(
            steps=len(errs),
            mismatches=sum(e > replay_atol for e in errs),
            atol=replay_atol,
            max_abs_err=max(errs) if errs else 0.0,
            kinds={str(k): int(n) for k, n in zip(*np.unique(kinds, return_counts=True),
                                                   strict=True)},
            stats=ex.stats(),
        )
    elif mp.segments is None:
        emulator["skipped"] = "no segment plan (piecewise-split not in the pipeline)"

    hazards_after = _hazards(mp)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": cfg.model.name,
        "full_cuda_graph": bool(cfg.full_cuda_graph),
        "pipeline": {"name": cfg.pipeline.name, "passes": pm.resolved()},
        "passes": [r.to_dict() for r in records],
        "trace": mp.trace.to_dict(),
        "traces": mp.facts.get("traces", []),
        "graph_breaks": mp.facts["graph_breaks"],
        "hazards": {
            "before": None if hazards_before is None else len(hazards_before),
            "after": None if hazards_after is None else len(hazards_after),
            "details_before": hazards_before or [],
            "details_after": hazards_after or [],
        },
        "blacklist": list(mp.blacklist),
        "flags": dict(mp.flags),
        "segments": mp.segments.summary() if mp.segments is not None else None,
        "numerics": numerics,
        "numerics_whole_program": whole_err,
        "emulator": emulator,
        "warnings": warnings,
    }
    bad = [k for k, v in numerics.items() if not v <= atol]
    if emulator["mismatches"]:
        report["verified"] = False
        report["verify_message"] = (
            f"{emulator['mismatches']}/{emulator['steps']} replayed steps differ from eager "
            f"(max abs err {emulator['max_abs_err']:.3g} > {replay_atol:g}); replay hazards left: "
            f"{report['hazards']['after']}"
        )
    elif bad:
        report["verified"] = False
        report["verify_message"] = "optimized step differs from eager on " + ", ".join(
            f"{k} (max abs err {numerics[k]:.3g})" for k in bad
        )
    else:
        report["verified"] = True
        report["verify_message"] = "ok"
    report["artifacts"] = _write_artifacts(mp, pm, cfg, run_dir)
    return report


def _write_artifacts(mp, pm, cfg, run_dir: Path) -> dict[str, str]:
    from graphopt.ir.pir_utils import program_text

    out: dict[str, str] = {}
    _write_atomic(run_dir / "pipeline.yaml", OmegaConf.to_yaml(
        OmegaConf.create({"model": cfg.model.name, "full_cuda_graph": cfg.full_cuda_graph,
                          "passes": pm.resolved()})))
    out["pipeline"] = "pipeline.yaml"
    if mp.program is not None:
        _write_atomic(run_dir / "program.txt", program_text(mp.program) + "\n")
        out["program_text"] = "program.txt"
        from paddle.base import core

        core.serialize_pir_program(mp.program, str(run_dir / "program.json"), True, True, False)
        out["program_paddle"] = "program.json"
    if mp.prologue is not None:
        _write_atomic(run_dir / "prologue.txt", program_text(mp.prologue.program) + "\n")
        out["prologue_text"] = "prologue.txt"
    if mp.segments is not None:
        _write_atomic(run_dir / "segments.json", json.dumps(mp.segments.to_json(), indent=1))
        out["segments"] = "segments.json"
        mp.segments.draw(run_dir / "segments.svg")
        mp.segments.draw(run_dir / "segments.png")
        out["segments_picture"] = "segments.svg"
        out["segments_picture_png"] = "segments.png"
    if mp.flags:
        _write_atomic(run_dir / "flags.env",
                      "".join(f"export {k}={v}\n" for k, v in sorted(mp.flags.items())))
        out["flags"] = "flags.env"
    return out


def _summary(r: dict[str, Any]) -> str:
    seg = r.get("segments") or {}
    hz = r["hazards"]
    em = r["emulator"]
    num = ", ".join(f"{k} {v:.1e}" for k, v in r["numerics"].items())
    first, last = r["traces"][0], r["traces"][-1]
    lines = [
        f"graph breaks: {r['graph_breaks']['before']} -> {r['graph_breaks']['after']} "
        f"(SOT graphs {first['subgraphs']} -> {last['subgraphs']}, graph runs per step "
        f"{first['graph_runs']} -> {last['graph_runs']}; {last['ops']} ops)",
        (f"replay hazards: {hz['before']} -> {hz['after']}" if hz["before"] is not None else
         f"replay hazards: n/a (the step is {r['trace']['subgraphs']} SOT subgraphs, not one "
         "program)"),
        f"blacklist: {','.join(r['blacklist']) or '(empty)'}",
    ]
    if seg:
        lines.append(f"segments: {seg.get('captured')} captured, {seg.get('eager')} eager, "
                     f"capture coverage {seg.get('coverage', 0):.4f}")
    lines.append(f"numerics vs eager (max abs err): {num}")
    if em.get("steps"):
        lines.append(f"replay {em['backend']}: {em['steps']} steps, {em['mismatches']} mismatches"
                     f" (max abs err {em.get('max_abs_err', 0):.1e})")
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    lines.append("verified" if r["verified"] else "VERIFY FAILED: " + r["verify_message"])
    return "\n".join(lines)


def run_cli(cfg: DictConfig) -> tuple[int, str]:
    """What the Hydra entry point calls: errors become one line and an exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        optimize(cfg)
        return 0, ""
    except (ConfigError, PassError) as e:
        if full:
            raise
        code = 1 if isinstance(e, PassError) and not isinstance(e.__cause__, ConfigError) else 2
        message = f"graphopt: error: {e}"
    except VerificationError as e:
        code, message = 1, f"graphopt: verification failed: {e}"
    print(message, file=sys.stderr)
    return code, message
