"""Segment plans: a program cut into captured runs and eager control flow (DESIGN §4, §5).

Cut rule (Paddle's ``CudaGraphExtractPass``, made inspectable): maximal runs of capturable ops
between blacklisted ops. ``pd_op.data``, ``builtin.parameter`` and ``builtin.shadow_output`` are
never captured; they neither join nor break a run (they have no runtime work to order). Unlike
Paddle's pass, a blacklisted ``pd_op.if`` does not swallow its branches: the ``if`` is an EAGER
segment (the host reads the condition and picks a branch) and each branch block is split the
same way, recursively. The plan is therefore a tree::

    captured #0  [scale, full_int_array, slice, cast]
    eager    #1  pd_op.if   true: [captured #2 [matmul, relu]]   false: []
    captured #3  ...

Every segment with ops of its own (captured runs; eager runs that are too short or blacklisted)
carries a standalone PIR program: one ``pd_op.data`` per live-in value (``seg3.in0``...), the
weights it reads as ``builtin.parameter`` ops, copies of its ops (nested blocks included), and
one ``builtin.shadow_output`` per live-out (``seg3.out0``...). Running the segments in order,
with each eager ``if`` choosing its branch from its condition on the host, equals running the
whole program (see ``runtime.piecewise.run_plan``).

Values are named by :class:`passes.analysis.liveness.ProgramIndex` keys (``arg.0``,
``pd_op.cast@10#0``, ``param:w1``); a runner keeps one environment ``key -> array``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paddle

from graphopt.errors import PassError
from graphopt.ir.pir_utils import (
    CONTROL_FLOW_OPS,
    NON_COMPUTE_OPS,
    add_data_op,
    add_output,
    clone_program,
    data_ops,
    output_names,
    output_values,
    static_mode,
)
from graphopt.passes.analysis.liveness import (
    BlockPath,
    OpPath,
    ProgramIndex,
    params_used,
    path_str,
    range_liveness,
)
from graphopt.passes.analysis.placement import (
    NEVER_CAPTURED_OPS,
    Placement,
    PlacementResult,
    analyze_placement,
)

CAPTURED = "captured"
EAGER = "eager"
BRANCH_LABELS = ("true", "false")


@dataclass
class Segment:
    """One node of a :class:`SegmentPlan`.

    ``kind`` is ``captured`` (a CUDA graph per capture size) or ``eager``. An eager segment is
    either a control-flow op whose branches were split (``branches`` set, no ``program``) or a run
    that must not / need not be captured (``program`` set, ``reason`` says why).
    """

    id: int
    kind: str
    #: names of the segment's top-level ops, in order
    ops: list[str]
    #: their paths in the whole program (see ProgramIndex)
    op_paths: list[OpPath]
    live_in: list[str]
    live_out: list[str]
    #: the block the segment lives in: () for the global block, (11, 0) for the true block of op 11
    block: BlockPath = ()
    reason: str = ""
    #: compute ops in the segment, nested blocks included (bookkeeping ops excluded)
    compute_ops: int = 0
    #: standalone program (None for an eager if whose branches are split)
    program: paddle.pir.Program | None = field(default=None, repr=False)
    #: names of the program's pd_op.data ops, parallel to live_in
    feed_names: list[str] = field(default_factory=list)
    #: names of the program's builtin.shadow_output ops, parallel to live_out
    output_names: list[str] = field(default_factory=list)
    #: eager if: key of the condition, keys of the results, and per branch the split segments
    #: and the keys the branch yields (parallel to `results`)
    cond: str | None = None
    results: list[str] = field(default_factory=list)
    branches: dict[str, list[Segment]] = field(default_factory=dict)
    yields: dict[str, list[str]] = field(default_factory=dict)
    #: HOST_RUNTIME values computed inside the segment: whole-program key -> key of the same
    #: value in `program`. A replay does not redo this host work (the emulator freezes them).
    host_runtime: dict[str, str] = field(default_factory=dict)

    @property
    def is_branching(self) -> bool:
        """An eager control-flow segment whose branches are split into their own segments."""
        return bool(self.branches)

    def walk(self) -> Iterator[Segment]:
        """This segment and, depth first, every segment in its branches."""
        yield self
        for label in self.branches:
            for seg in self.branches[label]:
                yield from seg.walk()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "ops": list(self.ops),
            "op_paths": [path_str(p) for p in self.op_paths],
            "block": path_str(self.block),
            "compute_ops": self.compute_ops,
            "live_in": list(self.live_in),
            "live_out": list(self.live_out),
        }
        if self.reason:
            d["reason"] = self.reason
        if self.feed_names:
            d["feed_names"] = list(self.feed_names)
        if self.output_names:
            d["output_names"] = list(self.output_names)
        if self.host_runtime:
            d["host_runtime"] = sorted(self.host_runtime)
        if self.cond is not None:
            d["cond"] = self.cond
            d["results"] = list(self.results)
        if self.branches:
            d["branches"] = {
                label: [s.to_dict() for s in segs] for label, segs in self.branches.items()
            }
            d["yields"] = {label: list(v) for label, v in self.yields.items()}
        return d


@dataclass
class SegmentPlan:
    """The ordered segment tree of one program, plus what a runner needs around it."""

    segments: list[Segment]
    #: feed names of the whole program (its pd_op.data ops)
    inputs: list[str]
    #: keys of the whole program's outputs, in order, and their shadow_output names
    outputs: list[str]
    output_names: list[str]
    blacklist: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    #: compute ops of the whole program (nested included) and those inside captured segments
    total_compute_ops: int = 0
    captured_compute_ops: int = 0
    #: runs that stayed eager because they were shorter than min_segment_ops
    short_runs: list[dict[str, Any]] = field(default_factory=list)

    # -- traversal ----------------------------------------------------------------------------
    def walk(self) -> Iterator[Segment]:
        """Every segment, depth first, in execution order of a program that takes all branches."""
        for seg in self.segments:
            yield from seg.walk()

    def by_id(self, seg_id: int) -> Segment:
        for seg in self.walk():
            if seg.id == seg_id:
                return seg
        raise KeyError(seg_id)

    @property
    def captured(self) -> list[Segment]:
        return [s for s in self.walk() if s.kind == CAPTURED]

    @property
    def eager(self) -> list[Segment]:
        return [s for s in self.walk() if s.kind == EAGER]

    @property
    def coverage(self) -> float:
        """Share of compute ops inside captured segments (any depth); 1.0 for an empty program."""
        if not self.total_compute_ops:
            return 1.0
        return self.captured_compute_ops / self.total_compute_ops

    def stats(self) -> dict[str, Any]:
        """Counters for the pass result and the report."""
        segs = list(self.walk())
        return {
            "segments": len(segs),
            "top_level_segments": len(self.segments),
            "captured": sum(1 for s in segs if s.kind == CAPTURED),
            "eager": sum(1 for s in segs if s.kind == EAGER),
            "eager_control_flow": sum(1 for s in segs if s.is_branching),
            "top_level_eager_control_flow": sum(1 for s in self.segments if s.is_branching),
            "compute_ops": self.total_compute_ops,
            "captured_ops": self.captured_compute_ops,
            "coverage": round(self.coverage, 6),
            "short_runs": len(self.short_runs),
            "captured_host_runtime_values": sum(
                len(s.host_runtime) for s in segs if s.kind == CAPTURED
            ),
        }

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: ordered segments with kind, op names, live-ins/outs."""
        return {
            "blacklist": list(self.blacklist),
            "options": dict(self.options),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "output_names": list(self.output_names),
            "stats": self.stats(),
            "short_runs": list(self.short_runs),
            "segments": [s.to_dict() for s in self.segments],
        }

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON-ready data (``json.dumps(plan.to_json())``): same as :meth:`to_dict`."""
        return self.to_dict()

    def dumps(self, indent: int | None = 1) -> str:
        """:meth:`to_json` as a string."""
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> dict[str, Any]:
        """The report's one-glance numbers (= :meth:`stats`): captured, eager, coverage..."""
        return self.stats()

    def draw(self, path: str | Path, max_segments: int = 24, tail: int = 3) -> Path:
        """Write a picture of the plan (SVG or PNG, by `path`'s suffix).

        A vertical strip, top to bottom in execution order: captured segments green with their
        op count, eager ``pd_op.if`` segments red with their two branches side by side, each
        branch with its own segments. A plan with more than `max_segments` top-level segments
        shows the first ``max_segments - tail`` and the last `tail`, and one box in between
        that counts what is not drawn (and names the repeating group when there is one).
        """
        return draw_plan(self, Path(path), max_segments=max_segments, tail=tail)

    def __str__(self) -> str:
        lines: list[str] = []

        def emit(segs: list[Segment], depth: int) -> None:
            pad = "  " * depth
            for s in segs:
                if s.is_branching:
                    lines.append(f"{pad}#{s.id} eager {s.ops[0]} (cond {s.cond})")
                    for label in s.branches:
                        lines.append(f"{pad}  {label}:")
                        emit(s.branches[label], depth + 2)
                else:
                    why = f" ({s.reason})" if s.reason else ""
                    lines.append(f"{pad}#{s.id} {s.kind} {s.compute_ops} ops: "
                                 f"{', '.join(s.ops)}{why}")

        emit(self.segments, 0)
        return "\n".join(lines)


# -- building a plan --------------------------------------------------------------------------
def build_plan(
    program: paddle.pir.Program,
    blacklist: Sequence[str],
    host_inputs: Sequence[str] = (),
    *,
    recurse_into_branches: bool = True,
    min_segment_ops: int = 1,
    placement: PlacementResult | None = None,
) -> SegmentPlan:
    """Cut `program` into a :class:`SegmentPlan` (see the module docstring).

    `host_inputs` seed the placement analysis that tells which captured values a replay would
    freeze. Runs with fewer than `min_segment_ops` compute ops run eagerly (reported in
    ``short_runs``); so do runs made only of bookkeeping ops (nothing to capture).
    """
    index = placement.index if placement is not None else ProgramIndex(program)
    placement = placement or analyze_placement(program, host_inputs, index)
    builder = _PlanBuilder(index, placement, list(blacklist), recurse_into_branches,
                           max(1, int(min_segment_ops)))
    segments = builder.split_block(())
    total = sum(1 for op in index.ops.values() if op.name() not in NON_COMPUTE_OPS)
    captured_ops = sum(s.compute_ops for s in builder.all if s.kind == CAPTURED)
    return SegmentPlan(
        segments=segments,
        inputs=list(data_ops(program)),
        outputs=[index.key(v) for v in output_values(program)],
        output_names=output_names(program),
        blacklist=list(blacklist),
        options={"recurse_into_branches": recurse_into_branches,
                 "min_segment_ops": int(min_segment_ops)},
        total_compute_ops=total,
        captured_compute_ops=captured_ops,
        short_runs=builder.short_runs,
    )


class _PlanBuilder:
    def __init__(self, index: ProgramIndex, placement: PlacementResult, blacklist: list[str],
                 recurse: bool, min_ops: int) -> None:
        self.index = index
        self.placement = placement
        self.black = set(blacklist)
        self.recurse = recurse
        self.min_ops = min_ops
        self.next_id = 0
        self.all: list[Segment] = []
        self.short_runs: list[dict[str, Any]] = []

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _compute_ops(self, paths: Sequence[OpPath]) -> int:
        return sum(1 for p in self.index.with_nested(paths)
                   if self.index.ops[p].name() not in NON_COMPUTE_OPS)

    def split_block(self, bpath: BlockPath) -> list[Segment]:
        out: list[Segment] = []
        run: list[OpPath] = []
        for path in self.index.block_ops[bpath]:
            name = self.index.ops[path].name()
            if name in NEVER_CAPTURED_OPS:
                continue  # no runtime work to order: neither joins nor breaks a run
            if name not in self.black:
                run.append(path)
                continue
            self._flush(run, bpath, out)
            run = []
            if name == "pd_op.if" and self.recurse:
                out.append(self._if_segment(path, bpath))
            else:
                why = f"blacklisted {name}"
                if name in CONTROL_FLOW_OPS:
                    why += " (branches not split: runs whole, uncaptured)"
                out.append(self._run_segment([path], bpath, EAGER, why))
        self._flush(run, bpath, out)
        return out

    def _flush(self, run: list[OpPath], bpath: BlockPath, out: list[Segment]) -> None:
        if not run:
            return
        n = self._compute_ops(run)
        if n == 0:
            out.append(self._run_segment(run, bpath, EAGER, "bookkeeping ops only: nothing to capture"))
        elif n < self.min_ops:
            seg = self._run_segment(run, bpath, EAGER,
                                    f"short run: {n} compute ops < min_segment_ops={self.min_ops}")
            self.short_runs.append({"id": seg.id, "ops": list(seg.ops), "compute_ops": n})
            out.append(seg)
        else:
            out.append(self._run_segment(run, bpath, CAPTURED, ""))

    def _run_segment(self, run: list[OpPath], bpath: BlockPath, kind: str, reason: str) -> Segment:
        live = range_liveness(self.index, run)
        seg = Segment(
            id=self._new_id(),
            kind=kind,
            ops=[self.index.ops[p].name() for p in run],
            op_paths=list(run),
            live_in=live.live_in,
            live_out=live.live_out,
            block=bpath,
            reason=reason,
            compute_ops=self._compute_ops(run),
        )
        self.all.append(seg)
        program, mapping = extract_segment_program(self.index, run, live.live_in, live.live_out,
                                                   prefix=f"seg{seg.id}")
        seg.program = program
        seg.feed_names = [f"seg{seg.id}.in{k}" for k in range(len(live.live_in))]
        seg.output_names = [f"seg{seg.id}.out{k}" for k in range(len(live.live_out))]
        # where the HOST_RUNTIME values computed here live in the segment program (the emulator
        # freezes them on replay). Only dense tensors can be recorded and fed back.
        seg_index = ProgramIndex(program)
        for p in self.index.with_nested(run):
            for key in self.index.result_keys(p):
                if self.placement.by_key.get(key) is Placement.HOST_RUNTIME:
                    new_value = mapping.look_up(self.index.values[key])
                    seg.host_runtime[key] = seg_index.key(new_value)
        return seg

    def _if_segment(self, path: OpPath, bpath: BlockPath) -> Segment:
        live = range_liveness(self.index, [path])
        seg = Segment(
            id=self._new_id(),
            kind=EAGER,
            ops=[self.index.ops[path].name()],
            op_paths=[path],
            live_in=live.live_in,
            live_out=live.live_out,
            block=bpath,
            reason="control flow: the host reads the condition and runs one branch",
            compute_ops=1,  # the if itself; its branches are counted in their own segments
            cond=self.index.operand_keys(path)[0],
            results=self.index.result_keys(path),
        )
        self.all.append(seg)
        for b, label in enumerate(BRANCH_LABELS):
            seg.branches[label] = self.split_block((*path, b))
            seg.yields[label] = _yield_keys(self.index, (*path, b))
        return seg


def _yield_keys(index: ProgramIndex, bpath: BlockPath) -> list[str]:
    paths = index.block_ops.get(bpath, [])
    if paths and index.ops[paths[-1]].name() == "cf.yield":
        return index.operand_keys(paths[-1])
    return []


# -- segment programs -------------------------------------------------------------------------
def extract_segment_program(
    index: ProgramIndex,
    run: Sequence[OpPath],
    live_in: Sequence[str],
    live_out: Sequence[str],
    prefix: str,
) -> tuple[paddle.pir.Program, paddle.pir.IrMapping]:
    """A standalone program computing the ops at `run` (all in one block, nested blocks
    included): live-ins become ``pd_op.data`` ops ``<prefix>.in<k>``, live-outs
    ``builtin.shadow_output`` ops ``<prefix>.out<k>``; weights stay ``builtin.parameter`` ops.

    The ops are copied (``Operation.clone`` with an IrMapping, regions included) into a fresh
    program, so the cost is the size of the segment, not of the whole program; that matters for
    a 61-layer model with hundreds of segments. Copying a run out of an ``if`` branch gives the
    same program as cloning the whole program, folding that ``if`` to the branch and deleting
    every other op (the recipe of DESIGN §9; ``extract_by_pruning`` does exactly that and the
    tests check both agree).
    """
    mapping = paddle.pir.IrMapping()
    program = paddle.static.Program()
    with static_mode(), paddle.static.program_guard(program, paddle.static.Program()):
        block = program.global_block()
        for k, key in enumerate(live_in):
            value = index.values[key]
            if not value.is_dense_tensor_type():
                raise PassError(
                    f"{prefix}: live-in {key} is not a dense tensor ({value.type()}); a "
                    "segment boundary cannot cut through it (is a builtin.combine split from "
                    "its consumer by a blacklisted op?)"
                )
            new = paddle.static.data(f"{prefix}.in{k}", list(value.shape), value.dtype)
            mapping.add(value, new)
        options = paddle.pir.CloneOptions(True, True, True)
        for pkey in params_used(index, run):
            param_op = index.ops[index.defs[pkey].path]
            paddle.pir.set_insertion_point_to_block_end(block)
            param_op.clone(mapping, options)
        for path in run:
            paddle.pir.set_insertion_point_to_block_end(block)
            index.ops[path].clone(mapping, options)
        paddle.pir.reset_insertion_point_to_end()
    for k, key in enumerate(live_out):
        add_output(program, mapping.look_up(index.values[key]), f"{prefix}.out{k}")
    _check_self_contained(program, prefix)
    return program, mapping


def _check_self_contained(program: paddle.pir.Program, prefix: str) -> None:
    """Every operand must be defined in `program` itself (a missed live-in would otherwise make
    the copy read a value of the original program)."""
    idx = ProgramIndex(program)
    extern = [k for k in idx.uses if k.startswith("extern@") and idx.uses[k]]
    if extern:
        raise PassError(f"{prefix}: segment program reads {len(extern)} value(s) it does not "
                        "define: live-in analysis missed them")


def fold_if(if_op: paddle.pir.Operation, branch: int) -> None:
    """Replace `if_op` by the ops of one branch (0 = true, 1 = false), in place (DESIGN §9)."""
    block = list(if_op.blocks())[branch]
    inner = list(block.ops)
    yield_op = inner[-1]
    for op in inner[:-1]:
        op.move_before(if_op)
    for res, src in zip(if_op.results(), yield_op.operands_source(), strict=True):
        res.replace_all_uses_with(src)
    if_op.get_parent_block().remove_op(if_op)


def extract_by_pruning(
    program: paddle.pir.Program,
    run: Sequence[OpPath],
    live_in: Sequence[str],
    live_out: Sequence[str],
    prefix: str,
) -> paddle.pir.Program:
    """The DESIGN §9 recipe, kept as the reference for :func:`extract_segment_program`: clone
    the whole program, fold the ``if``s enclosing the run to the run's branch, replace each
    live-in by a data op, add outputs for the live-outs, remove every other op (reverse order).
    O(program) per segment."""
    clone = clone_program(program)
    cidx = ProgramIndex(clone)
    run_ops = [cidx.ops[p] for p in run]
    ins = [cidx.values[k] for k in live_in]
    outs = [cidx.values[k] for k in live_out]
    bpath = tuple(run[0][:-1]) if run else ()
    enclosing = [(cidx.ops[bpath[: i + 1]], bpath[i + 1]) for i in range(0, len(bpath), 2)]
    for if_op, branch in enclosing:  # outermost first: it moves the inner ifs up a level
        fold_if(if_op, branch)
    keep = {op.id() for op in run_ops}
    for k, value in enumerate(ins):
        new = add_data_op(clone, f"{prefix}.in{k}", list(value.shape), value.dtype)
        value.replace_all_uses_with(new)
        keep.add(new.get_defining_op().id())
    block = clone.global_block()
    for k, value in enumerate(outs):
        add_output(clone, value, f"{prefix}.out{k}")
        keep.add(block.ops[-1].id())
    for op in reversed(list(block.ops)):
        if op.id() in keep:
            continue
        if op.name() == "builtin.parameter" and not op.result(0).use_empty():
            continue  # a weight the run reads
        block.remove_op(op)
    return clone


# -- picture ----------------------------------------------------------------------------------
_GREEN, _GREEN_EDGE = "#a6dba0", "#1b7837"
_RED, _RED_EDGE = "#f4a6a6", "#b2182b"
_GREY, _GREY_EDGE = "#dddddd", "#555555"
_BOX_H, _GAP, _HEADER_H, _LANE_LABEL_H, _PAD = 1.0, 0.3, 0.9, 0.6, 0.25


def _short_op(name: str) -> str:
    return name.split(".", 1)[-1]


def _ops_summary(ops: Sequence[str], limit: int = 3) -> str:
    names = [_short_op(o) for o in ops]
    if len(names) <= limit:
        return ", ".join(names)
    return f"{names[0]}, {names[1]} … {names[-1]}"


def _signature(seg: Segment) -> tuple:
    return (seg.kind, tuple(seg.ops), tuple(
        (label, tuple(_signature(s) for s in segs)) for label, segs in seg.branches.items()))


def _describe_elided(segs: list[Segment]) -> str:
    captured = sum(1 for s in segs if s.kind == CAPTURED)
    ifs = sum(1 for s in segs if s.is_branching)
    other = len(segs) - captured - ifs
    ops = sum(x.compute_ops for s in segs for x in s.walk() if x.kind == CAPTURED)
    text = (f"… {len(segs)} top-level segments not drawn: {captured} captured "
            f"({ops} captured ops, branches included), {ifs} eager pd_op.if")
    if other:
        text += f", {other} other eager"
    sigs = [_signature(s) for s in segs]
    for p in range(1, len(sigs) // 2 + 1):
        if all(sigs[i] == sigs[i + p] for i in range(len(sigs) - p)):
            kinds = ", ".join("pd_op.if" if s.is_branching else f"{s.kind} {s.compute_ops} ops"
                              for s in segs[:p])
            full, extra = divmod(len(sigs), p)
            more = f" + its first {extra}" if extra else ""
            text += f"\nthey repeat one {p}-segment group {full}×{more}: [{kinds}]"
            break
    return text


class _Drawer:
    def __init__(self, ax: Any | None) -> None:
        self.ax = ax

    def _box(self, x: float, y: float, w: float, h: float, face: str, edge: str,
             text: str, size: float, dashed: bool = False, va: str = "center") -> None:
        if self.ax is None:
            return
        from matplotlib.patches import FancyBboxPatch

        self.ax.add_patch(FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=face,
            edgecolor=edge, linewidth=1.0, linestyle="--" if dashed else "-"))
        ty = y + h / 2 if va == "center" else y + 0.45
        self.ax.text(x + w / 2, ty, text, ha="center", va="center", fontsize=size,
                     clip_on=False)

    def segments(self, segs: Sequence[Segment], x: float, y: float, w: float,
                 depth: int = 0) -> float:
        """Draw `segs` stacked from `y` downwards in a lane of width `w`; return the height."""
        size = max(4.5, 9.0 - 1.5 * depth)
        y0 = y
        for seg in segs:
            if seg.is_branching:
                y += self._if(seg, x, y, w, depth) + _GAP
            elif seg.kind == CAPTURED:
                label = f"captured #{seg.id} · {seg.compute_ops} ops"
                if w > 4:
                    label += f"\n{_ops_summary(seg.ops)}"
                self._box(x, y, w, _BOX_H, _GREEN, _GREEN_EDGE, label, size)
                y += _BOX_H + _GAP
            else:
                label = f"eager #{seg.id} · {_ops_summary(seg.ops, 2)}"
                if w > 4 and seg.reason:
                    label += f"\n{seg.reason}"
                self._box(x, y, w, _BOX_H, _GREY, _GREY_EDGE, label, size)
                y += _BOX_H + _GAP
        return max(0.0, y - y0 - _GAP)

    def _if(self, seg: Segment, x: float, y: float, w: float, depth: int) -> float:
        lane_w = (w - 3 * _PAD) / 2
        inner = []
        for label in BRANCH_LABELS:
            segs = seg.branches.get(label, [])
            inner.append(_Drawer(None).segments(segs, 0, 0, lane_w, depth + 1) if segs
                         else _BOX_H * 0.7)
        h = _HEADER_H + _LANE_LABEL_H + max(inner) + _PAD
        size = max(4.5, 9.0 - 1.5 * depth)
        self._box(x, y, w, h, _RED, _RED_EDGE, f"{seg.ops[0]} #{seg.id}   (cond: {seg.cond})",
                  size, va="top")
        for i, label in enumerate(BRANCH_LABELS):
            lx = x + _PAD + i * (lane_w + _PAD)
            ly = y + _HEADER_H
            if self.ax is not None:
                self.ax.text(lx + lane_w / 2, ly + _LANE_LABEL_H / 2, label, ha="center",
                             va="center", fontsize=size - 1, style="italic")
            segs = seg.branches.get(label, [])
            if segs:
                self.segments(segs, lx, ly + _LANE_LABEL_H, lane_w, depth + 1)
            else:
                self._box(lx, ly + _LANE_LABEL_H, lane_w, _BOX_H * 0.7, "#ffffff", _GREY_EDGE,
                          "no ops (yield only)", size - 1, dashed=True)
        return h


def draw_plan(plan: SegmentPlan, path: Path, max_segments: int = 24, tail: int = 3) -> Path:
    """Draw `plan` to `path` (see :meth:`SegmentPlan.draw`)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    top = list(plan.segments)
    elided: list[Segment] = []
    if len(top) > max_segments:
        tail = max(0, min(tail, max_segments - 1))
        head_n = max_segments - tail
        elided = top[head_n: len(top) - tail]
        head, rest = top[:head_n], top[len(top) - tail:] if tail else []
    else:
        head, rest = top, []
    width = 10.0
    measure = _Drawer(None)
    h_head = measure.segments(head, 0, 0, width)
    h_rest = measure.segments(rest, 0, 0, width) if rest else 0.0
    elide_h = 1.6 if elided else 0.0
    total = h_head + (elide_h + 2 * _GAP if elided else 0.0) + h_rest + 1.5
    fig = Figure(figsize=(8.0, max(3.0, 0.42 * total)))
    ax = fig.add_axes((0.02, 0.01, 0.96, 0.98))
    drawer = _Drawer(ax)
    st = plan.stats()
    ax.text(width / 2, 0.2, f"{st['segments']} segments: {st['captured']} captured, "
            f"{st['eager']} eager ({st['eager_control_flow']} control flow) — coverage "
            f"{100 * plan.coverage:.2f}% of {st['compute_ops']} compute ops",
            ha="center", va="center", fontsize=9, weight="bold")
    y = 1.0
    y += drawer.segments(head, 0, y, width) + _GAP
    if elided:
        drawer._box(0, y, width, elide_h, "#ffffff", _GREY_EDGE, _describe_elided(elided), 8,
                    dashed=True)
        y += elide_h + _GAP
    if rest:
        y += drawer.segments(rest, 0, y, width)
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(max(y, total) + 0.2, -0.2)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib import rc_context

    # keep SVG text as text (searchable, diffable) instead of glyph outlines
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(path, format=path.suffix.lstrip(".").lower() or "svg", dpi=110)
    return path
