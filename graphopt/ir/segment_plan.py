"""Segment plans: a program cut into captured runs and eager control flow.

A plan is a tree, in execution order::

    captured #0  [scale, full_int_array, slice, cast]
    eager    #1  pd_op.if   true: [captured #2 [matmul, relu]]   false: []
    captured #3  ...

Every segment with ops of its own (captured runs; eager runs that are too short or blacklisted)
carries a standalone PIR program: one ``pd_op.data`` per live-in value (``seg3.in0``...), the
weights it reads as ``builtin.parameter`` ops, copies of its ops (nested blocks included), and
one ``builtin.shadow_output`` per live-out (``seg3.out0``...). Running the segments in order,
with each eager ``if`` choosing its branch from its condition on the host, equals running the
whole program. The ``piecewise-split`` pass builds plans; the runtime executes them.

Values are named by :class:`graphopt.ir.program_index.ProgramIndex` keys (``arg.0``,
``pd_op.cast@10#0``, ``param:w1``); a runner keeps one environment ``key -> array``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import paddle

from graphopt.ir.program_index import BlockPath, OpPath, path_str

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
    #: ``file:line (function)`` of the user code that built the segment's first located op
    location: str | None = None

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
        if self.location:
            d["location"] = self.location
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


def reads(seg: Segment) -> set[str]:
    """Every value key running `seg` reads: its live-ins and, for an eager ``if``, its
    condition, what its branches read and what they yield."""
    keys = set(seg.live_in)
    if seg.is_branching:
        keys.add(str(seg.cond))
        for label, segs in seg.branches.items():
            for s in segs:
                keys |= reads(s)
            keys.update(seg.yields[label])
    return keys


def release_schedule(segments: list[Segment], keep: set[str] | frozenset[str] = frozenset()
                     ) -> dict[int, list[str]]:
    """Segment id -> the value keys that nothing after that segment reads (`keep` excepted).

    A runner drops those from its environment once the segment has run, so each boundary
    tensor lives as long as it would inside the unsplit program and not until the step ends:
    holding every one for the whole step made the heap grow by the step's working set (8% of
    a 61-layer decode step on CPU). Inside a branch only the values the branch itself defines
    are dropped (the enclosing block decides about the rest) and what it yields is kept.
    """
    out: dict[int, list[str]] = {}
    _schedule(segments, set(keep), None, out)
    return {seg_id: sorted(keys) for seg_id, keys in out.items()}


def _schedule(segments: list[Segment], keep: set[str], defined: set[str] | None,
              out: dict[int, list[str]]) -> None:
    last: dict[str, int] = {}
    for i, seg in enumerate(segments):
        for key in reads(seg):
            last[key] = i
    for key, i in last.items():
        if key not in keep and (defined is None or key in defined):
            out.setdefault(segments[i].id, []).append(key)
    for seg in segments:
        for label, segs in seg.branches.items():
            here = {k for s in segs for k in (*s.live_out, *s.results)}
            _schedule(segs, set(seg.yields[label]), here, out)


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

    def release_schedule(self) -> dict[int, list[str]]:
        """:func:`release_schedule` of the whole tree; the program's outputs are kept."""
        return release_schedule(self.segments, set(self.outputs))

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

    def dumps(self, indent: int | None = 1) -> str:
        """:meth:`to_json` as a string."""
        return json.dumps(self.to_dict(), indent=indent)

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
