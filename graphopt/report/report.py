"""``report.json``: its declared schema, how it is filled, and the run's other artifacts.

Every key of ``report.json`` is a field of :class:`Report`. The driver fills it from typed
sources only: the ModelProgram's fields, the pass records, the analyses (hazards) and the
verification results.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from paddle.base import core

from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import CONTROL_FLOW_OPS, op_count, program_text, walk_ops
from graphopt.passes.base import PassRecord
from graphopt.report.picture import draw_plan
from graphopt.report.rundir import pending_temp
from graphopt.verification import Numerics, Replay

#: bumped when a key changes meaning or goes away
SCHEMA_VERSION = 2


@dataclass
class Report:
    """The keys of report.json (one optimize run)."""

    model: str
    #: where the model's config and weights came from (path + sha256, or "random, seed")
    model_provenance: dict[str, Any]
    full_cuda_graph: bool
    #: {"name", "passes": [{name, stage, options}]} as actually run
    pipeline: dict[str, Any]
    #: one record per pass: name, modified, time_s, stats
    passes: list[dict[str, Any]]
    #: the last trace; ``traces[0]`` is the unmodified model's
    trace: dict[str, Any]
    traces: list[dict[str, Any]]
    #: SOT break records before (unmodified model; None when it was not traced) and after
    graph_breaks: dict[str, int | None]
    #: functions capture-control-flow marked, with file:line and in-memory rewrites
    marked: list[dict[str, Any]]
    #: replay hazards before the program passes and after them (None: no single program)
    hazards: dict[str, Any]
    #: control-flow ops left in the optimized program, by name
    control_flow: dict[str, int]
    blacklist: list[str]
    flags: dict[str, str]
    #: the segment plan's counters (None: no plan)
    segments: dict[str, Any] | None
    numerics: dict[str, float]
    numerics_whole_program: dict[str, float]
    numerics_ran: str
    #: why numerics_whole_program is empty (None when it was measured or there is no plan)
    numerics_whole_program_skipped: str | None
    replay: dict[str, Any]
    warnings: list[str]
    verified: bool
    verify_message: str
    #: with variants: the variant (or "general") each numerics batch kind was dispatched to
    numerics_dispatched: dict[str, str] = field(default_factory=dict)
    #: what "eager" is in every comparison: the model as written, with graphopt's source
    #: patches undone for each reference step (never graphopt's own rewrite of it)
    numerics_reference: str = ""
    #: specialize-branches' variants (None: not specialised): name, label, conditions, kinds,
    #: ops, segments, captured_graphs, dispatch counts per size, dropped graphs
    variants: list[dict[str, Any]] | None = None
    #: the host conditions, which combinations can occur, which were left out and why
    specialization: dict[str, Any] | None = None
    #: graphs to capture (captured segments x capture sizes; variants vs the piecewise plan)
    #: and static input-buffer bytes per capture size (None: no plan)
    capture_plan: dict[str, Any] | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    time_s: float = 0.0
    #: verify.bisect=true on a mismatch: the checks after each program pass and the culprit
    bisect: dict[str, Any] | None = None
    #: wall seconds per phase: build, trace_unmodified, trace_optimized, passes, verify,
    #: replay, artifacts (the rest of ``time_s`` is bookkeeping between them)
    timings: dict[str, float] = field(default_factory=dict)
    #: this process's resident memory at the end and its peak over the run (MB)
    memory_mb: dict[str, float] = field(default_factory=dict)
    #: the compile cache: {"status": off|hit|miss|rebuilt, "key", "dir", ...}
    cache: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {"schema_version": self.schema_version,
             **{k: v for k, v in asdict(self).items() if k != "schema_version"}}
        d["cache"] = {k: v for k, v in self.cache.items() if k != "material"}
        return d


def build_report(cfg: Any, pipeline: dict[str, Any], mp: ModelProgram,
                 records: list[PassRecord], hazards_before: list[dict] | None,
                 hazards_after: list[dict] | None, numerics: Numerics, replay: Replay,
                 atol: float) -> Report:
    """Assemble the report and decide ``verified`` (replay mismatches, then numerics)."""
    warnings = []
    if mp.trace.host_bound_by_reference:
        warnings.append(
            "SOT bound host tensor(s) " + ", ".join(mp.trace.host_bound_by_reference)
            + " by reference (builtin.parameter): replacing them between steps is silently not "
            "seen by Paddle itself; graphopt feeds them by value every step."
        )
    if mp.trace.inferred_host_inputs:
        fields = ", ".join(f"meta.{f}" for f in mp.trace.inferred_host_inputs)
        warnings.append(
            f"{fields}: host tensor(s) the model does not list in its bundle's host_inputs "
            "(named *_cpu, or on the CPU in a CUDA build); treated as host inputs, so host work "
            "on them counts as a replay hazard. List them in host_inputs to say so yourself.")
    if mp.trace.frozen_inputs:
        warnings.append(
            f"{len(mp.trace.frozen_inputs)} tensor input(s) of the traced step are neither step "
            "arguments, forward-meta fields nor the model's parameters or buffers ("
            + ", ".join(mp.trace.frozen_inputs[:3]) + (", ..." if len(mp.trace.frozen_inputs) > 3
                                                        else "")
            + "): they are frozen at their trace-time values. If one changes per step, reach it "
            "through forward_meta."
        )
    control: dict[str, int] = {}
    if mp.program is not None:
        for op in walk_ops(mp.program.global_block()):
            if op.name() in CONTROL_FLOW_OPS:
                control[op.name()] = control.get(op.name(), 0) + 1
    first, last = mp.traces[0], mp.traces[-1]
    report = Report(
        model=str(cfg.model.name),
        model_provenance=dict(mp.model.provenance),
        full_cuda_graph=bool(cfg.full_cuda_graph),
        pipeline=pipeline,
        passes=[r.to_dict() for r in records],
        trace=last.to_dict(),
        traces=[t.to_dict() for t in mp.traces],
        # no trace of the unmodified model (explicit targets): no "before", rather than a wrong one
        graph_breaks={"before": None if first.marked else len(first.graph_breaks),
                      "after": len(last.graph_breaks)},
        marked=[m.to_dict() for m in mp.marked],
        hazards={
            "before": None if hazards_before is None else len(hazards_before),
            "after": None if hazards_after is None else len(hazards_after),
            "details_before": hazards_before or [],
            "details_after": hazards_after or [],
        },
        control_flow=control,
        blacklist=list(mp.blacklist),
        flags=dict(mp.flags),
        segments=mp.segments.stats() if mp.segments is not None else None,
        numerics=numerics.optimized,
        numerics_whole_program=numerics.whole_program,
        numerics_ran=numerics.ran,
        numerics_whole_program_skipped=numerics.whole_program_skipped,
        replay=replay.to_dict(),
        warnings=warnings,
        verified=True,
        verify_message="ok",
        numerics_reference=numerics.reference,
    )
    sizes = [int(x) for x in cfg.runtime.cudagraph_capture_sizes]
    report.capture_plan = capture_plan(mp, sizes, replay)
    if mp.specialization is not None:
        report.specialization = mp.specialization.to_dict()
        report.numerics_dispatched = dict(numerics.dispatched)
        report.variants = variant_entries(mp, replay)
    bad = [k for k, v in numerics.optimized.items() if not v <= atol]
    replayed = (f"{replay.mismatches}/{replay.steps} replayed steps differ from eager "
                f"(max abs err {replay.max_abs_err:.3g} > {replay.atol:g})")
    if bad:  # uncaptured already: the cause is not replay, say that first
        rewritten = [m.qualname for m in mp.marked if m.rewrites]
        report.verified = False
        report.verify_message = (
            "optimized step differs from eager (the model as written) uncaptured, on "
            + ", ".join(f"{k} (max abs err {numerics.optimized[k]:.3g})" for k in bad)
            + (f"; also {replayed}" if replay.mismatches else "")
            + (f"; traced after graphopt rewrote {', '.join(rewritten)} in memory "
               "(verify.bisect=true names the pass)" if rewritten else ""))
    elif replay.mismatches:
        report.verified = False
        report.verify_message = (
            f"{replayed}; replay hazards left: {report.hazards['after']}")
    return report


def variant_entries(mp: ModelProgram, replay: Replay) -> list[dict[str, Any]]:
    """One entry per variant: what it is, how big, how it was captured and dispatched during
    the replay check (the general program too, in the hybrid)."""
    targets = replay.stats.get("targets", {})
    dispatch = replay.stats.get("dispatch", [])
    out = []
    for v in mp.variants:
        t = targets.get(v.name, {})
        out.append({
            **v.to_dict(),
            "ops": op_count(v.program),
            "segments": None if v.segments is None else {
                "captured": len(v.segments.captured), "eager": len(v.segments.eager)},
            "captured_graphs": t.get("captured_graphs", 0),
            "graph_sizes": t.get("graph_sizes", []),
            "dropped_graphs": t.get("dropped_graphs", []),
            "dispatch": {str(d["size"]): d["steps"] for d in dispatch if d["target"] == v.name},
        })
    return out


def capture_plan(mp: ModelProgram, sizes: list[int], replay: Replay) -> dict[str, Any] | None:
    """Graphs a deployment captures (one per captured segment and capture size) for what
    runs: the variants (plus the general program in the hybrid), else the piecewise plan; the
    piecewise count is always given, to compare with. Static input-buffer bytes are measured
    on the graphs the replay check captured (per size, and per target and size): traced
    programs carry the trace batch's shapes, so they cannot be estimated from the program."""
    if mp.segments is None:
        return None
    plans = [v.segments for v in mp.variants if v.segments is not None]
    if not mp.variants or mp.needs_general_program():
        plans.append(mp.segments)
    per_size = sum(len(p.captured) for p in plans)
    return {
        "capture_sizes": list(sizes),
        "graphs_to_capture": per_size * len(sizes),
        "graphs_to_capture_piecewise": len(mp.segments.captured) * len(sizes),
        "variants": len(mp.variants),
        "static_input_bytes": {
            str(k): v for k, v in replay.stats.get("static_input_bytes", {}).items()},
        "static_input_bytes_per_graph": {
            name: {str(k): v for k, v in t.get("static_input_bytes", {}).items()}
            for name, t in replay.stats.get("targets", {}).items()},
        "sizes_not_captured": [s for s in sizes
                               if str(s) not in {str(k) for k in
                                                 replay.stats.get("static_input_bytes", {})}],
    }


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write via a temp file + rename (mode 0644), so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with pending_temp(tmp):  # an interrupt removes it (graphopt.report.rundir)
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def write_artifacts(mp: ModelProgram, cfg: Any, pipeline: dict[str, Any],
                    run_dir: Path, serialized: Path | None = None) -> dict[str, str]:
    """Program text, Paddle's serialized program, prologue, plan + picture, variant programs,
    flags, pipeline.

    `serialized`: a file already holding Paddle's serialization of ``mp.program`` (the
    compiled entry's); it is linked as ``program.json`` instead of serialising again (a
    second or more at 61 layers).
    """
    out: dict[str, str] = {}
    write_atomic(run_dir / "pipeline.yaml", OmegaConf.to_yaml(OmegaConf.create(
        {"model": str(cfg.model.name), "full_cuda_graph": bool(cfg.full_cuda_graph),
         **pipeline})))
    out["pipeline"] = "pipeline.yaml"
    if mp.program is not None:
        write_atomic(run_dir / "program.txt", program_text(mp.program) + "\n")
        out["program_text"] = "program.txt"
        with pending_temp(run_dir / ".program.json.tmp") as tmp:
            if serialized is not None:
                _link_or_copy(serialized, tmp)
            else:
                core.serialize_pir_program(mp.program, str(tmp), True, True, False)
                os.chmod(tmp, 0o644)
            os.replace(tmp, run_dir / "program.json")
        out["program_paddle"] = "program.json"
    if mp.prologue is not None:
        write_atomic(run_dir / "prologue.txt", program_text(mp.prologue.program) + "\n")
        out["prologue_text"] = "prologue.txt"
    if mp.segments is not None:
        write_atomic(run_dir / "segments.json", mp.segments.dumps())
        out["segments"] = "segments.json"
        for suffix in ("svg", "png"):
            with pending_temp(run_dir / f".segments.tmp.{suffix}") as tmp:
                draw_plan(mp.segments, tmp, prologue=mp.prologue,
                          num_layers=_num_layers(mp))
                os.chmod(tmp, 0o644)
                os.replace(tmp, run_dir / f"segments.{suffix}")
        out["segments_picture"] = "segments.svg"
        out["segments_picture_png"] = "segments.png"
    for i, v in enumerate(mp.variants):
        write_atomic(run_dir / "variants" / f"{i}.txt",
                     f"// variant {v.name}" + (f": {v.label}" if v.label else "") + "\n"
                     + program_text(v.program) + "\n")
        out["variant_programs"] = "variants/"
    if mp.flags:
        write_atomic(run_dir / "flags.env",
                     "".join(f"export {k}={v}\n" for k, v in sorted(mp.flags.items())))
        out["flags"] = "flags.env"
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)


def _num_layers(mp: ModelProgram) -> int | None:
    """The model's decoder layer count, if its config says (for the picture's layer rows)."""
    config = mp.model.config
    n = getattr(config, "num_hidden_layers", None)
    if n is None and isinstance(config, dict):
        n = config.get("num_hidden_layers")
    return int(n) if isinstance(n, int) and n > 0 else None


def write_report(report: Report, run_dir: Path) -> None:
    """report.json, atomically."""
    write_atomic(run_dir / "report.json", json.dumps(report.to_dict(), indent=2, default=str) + "\n")


def summary(r: Report, verdict: bool = True) -> str:
    """A few lines for the terminal: breaks, hazards, blacklist, segments, numerics, replay.

    Without `verdict` the last line (verified / VERIFY FAILED) is left out: the caller raises
    the failure, and the command line prints it once, on stderr.
    """
    first, last = r.traces[0], r.traces[-1]
    hz = r.hazards
    if r.graph_breaks["before"] is None:
        breaks = (f"graph breaks: {r.graph_breaks['after']} (SOT graphs {last['subgraphs']}, "
                  f"{last['ops']} ops; the unmodified model was not traced)")
    else:
        breaks = (f"graph breaks: {r.graph_breaks['before']} -> {r.graph_breaks['after']} "
                  f"(SOT graphs {first['subgraphs']} -> {last['subgraphs']}, graph runs per step "
                  f"{first['graph_runs']} -> {last['graph_runs']}; {last['ops']} ops)")
    lines = [
        breaks,
        (f"replay hazards: {hz['before']} -> {hz['after']}" if hz["before"] is not None else
         f"replay hazards: n/a (the step is {r.trace['subgraphs']} SOT graphs, not one program)"),
        f"blacklist: {','.join(r.blacklist) or '(empty)'}",
    ]
    seg = r.segments
    if r.variants is not None:
        spec = r.specialization or {}
        lines.append(f"variants: {len(r.variants)} if-free ("
                     + "; ".join(f"{v['name']} [{','.join(v['kinds']) or '-'}] {v['ops']} ops"
                                 for v in r.variants)
                     + f"); unreachable: {', '.join(spec.get('unreachable', [])) or 'none'}"
                     + (f"; general program for: {', '.join(spec['general'])}"
                        if spec.get("general") else ""))
        plan = r.capture_plan or {}
        if plan:
            lines.append(f"graphs to capture: {plan['graphs_to_capture']} (piecewise: "
                         f"{plan['graphs_to_capture_piecewise']})")
    elif seg:
        lines.append(f"segments: {seg['captured']} captured, {seg['eager']} eager, "
                     f"capture coverage {seg['coverage']:.4f}")
    num = ", ".join(f"{k} {v:.1e}" for k, v in r.numerics.items())
    lines.append(f"numerics vs eager (max abs err, {r.numerics_ran}): {num}")
    if r.numerics_reference:
        lines.append(f"eager reference: {r.numerics_reference}")
    if r.numerics_whole_program_skipped:
        lines.append(f"unsplit program not compared: {r.numerics_whole_program_skipped}")
    rp = r.replay
    if rp.get("steps"):
        lines.append(f"replay {rp['backend']}: {rp['steps']} steps, {rp['mismatches']} mismatches"
                     f" (max abs err {rp.get('max_abs_err', 0):.1e})"
                     + (f": recorded by {rp['recorded']} with these settings, not replayed on "
                        "this cache hit (cache.replay_on_hit=true replays)"
                        if rp.get("recorded") else ""))
    elif rp.get("skipped"):
        lines.append(f"replay: skipped ({rp['skipped']})")
    for d in rp.get("stats", {}).get("dropped_graphs", []):
        where = f"{d['target']} " if "target" in d else ""
        on = f" on replay {d['replay']}" if "replay" in d else ""
        lines.append(f"checked capture dropped: {where}segment {d['segment']} at size "
                     f"{d['size']}{on} (max abs err {d['max_abs_err']:.3g}); it runs uncaptured")
    lines.extend(f"warning: {w}" for w in r.warnings)
    if verdict or r.verified:
        lines.append("verified" if r.verified else "VERIFY FAILED: " + r.verify_message)
    return "\n".join(lines)
