"""piecewise-split: cut the program into captured runs and eager control flow.

Same cut rule as Paddle's C++ ``CudaGraphExtractPass`` (maximal runs of capturable ops between
blacklisted ops; ``pd_op.data`` / ``builtin.shadow_output`` never captured), but inspectable,
testable and runnable on CPU, and it recurses into the branches of a blacklisted ``pd_op.if``:
the ``if`` is an eager segment, each branch is split into its own captured runs.

Before (blacklist ``["pd_op.if"]``)::

    scale, full_int_array, slice, cast
    pd_op.if { matmul, relu, yield } else { yield }
    full, scale

After: ``mp.segments`` =
``[captured #0 (4 ops), eager #1 pd_op.if {true: [captured #2 (2 ops)], false: []},
captured #3 (2 ops)]``, each captured segment a standalone program. The program itself is not
changed.

After specialize-branches, every variant gets a plan of its own too (``variant.segments``). A
variant has no control flow, so unless something in it is blacklisted its plan is one captured
segment: one full graph per capture size. The main program is still planned, with its control
flow cut out even under ``full_cuda_graph=true``. It serves the combinations no variant serves
(the hybrid), and it is the piecewise baseline the report compares with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import paddle
from paddle.base import core

from graphopt.errors import PassError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import (
    CONTROL_FLOW_OPS,
    INTERFACE_OPS,
    NON_COMPUTE_OPS,
    add_output,
    data_ops,
    output_names,
    output_values,
    source_location,
    static_mode,
    walk_ops,
)
from graphopt.ir.program_index import BlockPath, OpPath, ProgramIndex, path_str
from graphopt.ir.segment_plan import BRANCH_LABELS, CAPTURED, EAGER, Segment, SegmentPlan
from graphopt.passes.analysis.liveness import params_used, range_liveness
from graphopt.passes.analysis.placement import (
    Placement,
    PlacementResult,
    analyze_placement,
    placement_of,
)
from graphopt.passes.base import PRESERVES_PROGRAM, Pass, PassResult, Stage
from graphopt.passes.registry import register_pass
from graphopt.passes.verify import register_property_check


@dataclass
class PiecewiseSplitOptions:
    """Options of piecewise-split."""

    #: split the branches of a blacklisted pd_op.if into their own captured runs (False: the
    #: whole if, branches included, runs eagerly -- what Paddle's own pass does)
    recurse_into_branches: bool = True
    #: runs with fewer compute ops than this stay eager (a graph launch is not free); reported
    min_segment_ops: int = 1

    def __post_init__(self) -> None:
        if self.min_segment_ops < 1:
            raise ValueError(f"min_segment_ops must be >= 1, got {self.min_segment_ops}")


@register_pass
class PiecewiseSplit(Pass):
    """Cut the program into captured segments around blacklisted ops (see module docstring)."""

    name = "piecewise-split"
    summary = "Cut the program into CUDA-graph segments around blacklisted ops, recursing into if-branches."
    stage = Stage.PROGRAM
    Options = PiecewiseSplitOptions
    requires = ("single-graph",)
    ensures = ("segmented",)
    preserves = (PRESERVES_PROGRAM,)
    must_run_after = ("cudagraph-blacklist-injection",)

    def run(self, mp: ModelProgram) -> PassResult:
        stats = plan_model_program(mp, self.options.recurse_into_branches,
                                   self.options.min_segment_ops)
        # modified: the ModelProgram gained plans; the programs themselves are unchanged
        return PassResult(modified=True, stats=stats)


@register_property_check("segmented")
def _check_segmented(mp: ModelProgram) -> str | None:
    """The plan exists, belongs to this program and covers every compute op of it; so does each
    variant's."""
    plan = mp.segments
    if plan is None:
        return "the ModelProgram has no segment plan"
    why = _coverage_problem(plan, placement_of(mp).index)  # the analysis' cached index
    if why:
        return why
    if plan.inputs != list(data_ops(mp.program)):
        return "the plan's inputs are not the program's feeds"
    for v in mp.variants:
        if v.segments is None:
            return f"variant {v.name} has no segment plan"
        why = _coverage_problem(v.segments, ProgramIndex(v.program))
        if why:
            return f"variant {v.name}: {why}"
    return None


def _coverage_problem(plan: SegmentPlan, index: ProgramIndex) -> str | None:
    """Whether the plan's segments hold every compute op of the indexed program exactly once
    (an eager ``if`` holds itself; its branches' segments hold what is inside it)."""
    want = {p for p, op in index.ops.items() if op.name() not in NON_COMPUTE_OPS}
    got: list[OpPath] = []
    for seg in plan.walk():
        unknown = [p for p in seg.op_paths if p not in index.ops]
        if unknown:
            return (f"segment {seg.id} names op {path_str(unknown[0])}, which the program does "
                    "not have")
        paths = seg.op_paths if seg.is_branching else index.with_nested(seg.op_paths)
        got.extend(p for p in paths if p in want)
    held = set(got)
    if len(got) != len(held):
        return f"{len(got) - len(held)} compute op(s) are in more than one segment"
    if want - held:
        first = min(want - held)
        return (f"{len(want - held)} compute op(s) are in no segment (first: "
                f"{index.ops[first].name()} at {path_str(first)})")
    if plan.total_compute_ops != len(want):
        return f"the plan counts {plan.total_compute_ops} compute ops, the program has {len(want)}"
    return None


# -- building a plan --------------------------------------------------------------------------
def plan_model_program(mp: ModelProgram, recurse_into_branches: bool = True,
                       min_segment_ops: int = 1) -> dict[str, Any]:
    """Give `mp`'s program and each of its variants a segment plan; returns the plan stats.

    What the pass does, also called on a program loaded from the compile cache so that a
    cache hit runs exactly the plans a cold run would.
    """
    opts = {"recurse_into_branches": recurse_into_branches, "min_segment_ops": min_segment_ops}
    blacklist = list(mp.blacklist)
    if mp.variants:
        # With variants the main program is planned too: it serves the combinations no
        # variant serves (the hybrid) and is the piecewise baseline the report compares
        # with. Its control flow must never be captured, even when full_cuda_graph=true
        # left pd_op.if off the blacklist (variants have none).
        blacklist = sorted(set(blacklist) | {
            op.name() for op in walk_ops(mp.program.global_block())
            if op.name() in CONTROL_FLOW_OPS})
    mp.segments = build_plan(mp.program, blacklist, mp.host_inputs,
                             placement=placement_of(mp), **opts)
    stats = mp.segments.stats()
    for v in mp.variants:
        # a variant has no control flow: with nothing else blacklisted it is one captured
        # segment, i.e. one full graph per capture size
        v.segments = build_plan(v.program, mp.blacklist, mp.host_inputs, **opts)
    if mp.variants:
        stats["variants"] = {v.name: v.segments.stats() for v in mp.variants}
    return stats


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

    def _location(self, paths: Sequence[OpPath]) -> str | None:
        """Where the user's code built the first op of `paths` that Paddle located."""
        for p in self.index.with_nested(paths):
            where = source_location(self.index.ops[p])
            if where:
                return where
        return None

    def _compute_ops(self, paths: Sequence[OpPath]) -> int:
        return sum(1 for p in self.index.with_nested(paths)
                   if self.index.ops[p].name() not in NON_COMPUTE_OPS)

    def _kept_together(self, bpath: BlockPath) -> dict[int, tuple[int, str]]:
        """Spans of the block's ops that a cut would break: from an op defining a value that
        is not a dense tensor (a tensor array a loop appends to, a ``builtin.combine`` list) to
        its last reader in this block (a reader inside a loop or branch counts as that op),
        when a blacklisted op lies inside, so a boundary would fall in between. Overlapping
        spans are merged. Returns start -> (end, why)."""
        ops = self.index.block_ops[bpath]
        pos = {p: i for i, p in enumerate(ops)}
        depth = len(bpath) + 1
        spans: list[list[Any]] = []
        for i, p in enumerate(ops):
            for key in self.index.result_keys(p):
                if self.index.values[key].is_dense_tensor_type():
                    continue
                last = max([i, *(pos[u[:depth]] for u in self.index.uses.get(key, [])
                                 if u[:depth] in pos)])
                if last > i:
                    spans.append([i, last, f"{self.index.ops[p].name()} "
                                  f"({self.index.values[key].type()})"])
        spans.sort()
        merged: list[list[Any]] = []
        for span in spans:
            if merged and span[0] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], span[1])
            else:
                merged.append(span)
        return {start: (end, why) for start, end, why in merged
                if any(self.index.ops[ops[k]].name() in self.black
                       for k in range(start, end + 1))}

    def split_block(self, bpath: BlockPath) -> list[Segment]:
        out: list[Segment] = []
        run: list[OpPath] = []
        together = self._kept_together(bpath)
        skip_to = -1
        for i, path in enumerate(self.index.block_ops[bpath]):
            if i <= skip_to:
                continue
            if i in together:  # one uncaptured segment: no boundary inside the span
                end, why = together[i]
                self._flush(run, bpath, out)
                run = []
                span = [p for p in self.index.block_ops[bpath][i:end + 1]
                        if self.index.ops[p].name() not in INTERFACE_OPS]
                out.append(self._run_segment(
                    span, bpath, EAGER, f"kept together: {why} is used across a blacklisted "
                    "op (a loop or branch), so no boundary may cut it; runs uncaptured"))
                skip_to = end
                continue
            name = self.index.ops[path].name()
            if name in INTERFACE_OPS:
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
            location=self._location(run),
        )
        self.all.append(seg)
        program, mapping = extract_segment_program(self.index, run, live.live_in, live.live_out,
                                                   prefix=f"seg{seg.id}")
        seg.program = program
        seg.feed_names = [f"seg{seg.id}.in{k}" for k in range(len(live.live_in))]
        seg.output_names = [f"seg{seg.id}.out{k}" for k in range(len(live.live_out))]
        # where the HOST_RUNTIME values computed here live in the segment program (the emulator
        # freezes them on replay). Only dense tensors can be recorded and fed back.
        seg_index = None  # indexed only when needed: most segments compute no host value
        for p in self.index.with_nested(run):
            for key in self.index.result_keys(p):
                if self.placement.by_key.get(key) is Placement.HOST_RUNTIME:
                    seg_index = seg_index or ProgramIndex(program)
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
            location=self._location([path]),
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
    every other op (``tests/reference_pruning.py`` does exactly that, and the tests check both
    agree).
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
            # Paddle's op builder directly: paddle.static.data's checks and insertion-point
            # search cost ~0.2 ms per live-in, and 1.6k live-ins make a 61-layer plan
            new = paddle._pir_ops.data(f"{prefix}.in{k}", list(value.shape), value.dtype,
                                       core.Place())
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
