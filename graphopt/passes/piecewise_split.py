"""piecewise-split: cut the program into captured runs and eager control flow (DESIGN §4).

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
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.ir.model_program import ModelProgram
from graphopt.ir.segment_plan import build_plan
from graphopt.passes.base import Pass, PassError, PassResult, Stage
from graphopt.passes.registry import register_pass


@dataclass
class PiecewiseSplitOptions:
    """Options of piecewise-split."""

    #: split the branches of a blacklisted pd_op.if into their own captured runs (False: the
    #: whole if, branches included, runs eagerly -- what Paddle's own pass does)
    recurse_into_branches: bool = True
    #: runs with fewer compute ops than this stay eager (a graph launch is not free); reported
    min_segment_ops: int = 1


@register_pass
class PiecewiseSplit(Pass):
    """Cut the program into captured segments around blacklisted ops (see module docstring)."""

    name = "piecewise-split"
    summary = "Cut the program into CUDA-graph segments around blacklisted ops, recursing into if-branches."
    stage = Stage.PROGRAM
    Options = PiecewiseSplitOptions
    requires = ("traced",)
    ensures = ("segmented",)
    must_run_after = ("cudagraph-blacklist-injection",)

    def run(self, mp: ModelProgram) -> PassResult:
        if mp.program is None:
            raise PassError("piecewise-split: no program to split (run the trace first)")
        if self.options.min_segment_ops < 1:
            raise PassError(
                f"piecewise-split: min_segment_ops must be >= 1, got {self.options.min_segment_ops}"
            )
        plan = build_plan(
            mp.program,
            mp.blacklist,
            mp.host_inputs,
            recurse_into_branches=self.options.recurse_into_branches,
            min_segment_ops=self.options.min_segment_ops,
        )
        mp.segments = plan
        mp.properties.add("segmented")
        stats = plan.stats()
        mp.facts["segments"] = {
            "stats": stats,
            "short_runs": plan.short_runs,
            "captured_host_runtime": {
                s.id: sorted(s.host_runtime) for s in plan.captured if s.host_runtime
            },
        }
        # modified: the ModelProgram gained a plan; the program itself is unchanged
        return PassResult(modified=True, stats=stats)
