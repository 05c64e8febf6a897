"""hoist-host-branch-conditions: move host work off the captured path into a host prologue.

A CUDA graph replays device kernels; it does not rerun host work done during capture. A branch
condition computed on the host from a runtime host input (``if forward_meta.max_len_tensor_cpu[1]:``
becomes ``slice -> cast -> pd_op.if``) lands in the captured run before the ``if``; on replay
the ``if`` reads the value frozen at capture time and **the wrong branch runs** (the seed's bug).

This pass does for any program what the seed change did by hand (``needs_prefill =
max_len_tensor_cpu[1] > 0`` computed before the graph): each replay hazard found by the placement
analysis has its producer chain moved into ``mp.prologue`` — a small host program that runs
eagerly every step — and its results are fed back in as ``hoisted.<k>`` inputs.

Before::

    %m = pd_op.data {name: "meta.max_len_tensor_cpu"}
    %s = pd_op.slice(%m, 1, 2)       # host work: hazard
    %c = pd_op.cast(%s) {bool}        # host work: hazard
    %o = pd_op.if(%c) {...}

After (main program / prologue)::

    %c = pd_op.data {name: "hoisted.0"}      |  %m = pd_op.data {name: "meta.max_len_tensor_cpu"}
    %o = pd_op.if(%c) {...}                  |  %c = pd_op.cast(pd_op.slice(%m, 1, 2)) -> out 0
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.errors import PassError
from graphopt.ir.model_program import HostPrologue, ModelProgram
from graphopt.ir.pir_utils import (
    add_data_ops,
    add_output,
    clone_program_with_mapping,
    remove_dead_ops,
    remove_outputs,
)
from graphopt.passes.analysis.placement import hazards_of
from graphopt.passes.base import Pass, PassResult, Stage
from graphopt.passes.registry import register_pass
from graphopt.passes.verify import register_property_check


@dataclass
class HoistOptions:
    """Options of hoist-host-branch-conditions."""

    #: prefix of the main program's new inputs fed by the prologue.
    feed_prefix: str = "hoisted"

    def __post_init__(self) -> None:
        if not self.feed_prefix or "." in self.feed_prefix:
            raise ValueError(f"feed_prefix must be a non-empty name without dots, got "
                             f"{self.feed_prefix!r}")


@register_pass
class HoistHostBranchConditions(Pass):
    """Move every replay hazard's host producer chain into a host prologue run each step;
    fails (and is rolled back) when a hazard sits inside a branch, where it cannot be moved."""

    name = "hoist-host-branch-conditions"
    summary = "Move host-computed values off the captured path into a host prologue fed each step."
    stage = Stage.PROGRAM
    Options = HoistOptions
    requires = ("single-graph",)
    ensures = ("no-hazards",)

    def run(self, mp: ModelProgram) -> PassResult:
        hazards = hazards_of(mp)
        if not hazards:
            return PassResult(False, {"hazards_before": 0, "hazards_after": 0, "hoisted_ops": 0})
        if mp.prologue is not None:
            raise PassError("a host prologue exists already; run this pass once per pipeline")
        program = mp.program
        block = program.global_block()
        top_ops = list(block.ops)
        nested = [h for h in hazards if len(h.index_path) != 1]
        hoist_ids = {top_ops[h.index_path[0]].id() for h in hazards if len(h.index_path) == 1}
        # Values that leave the hoisted chain: these become the prologue's outputs.
        frontier = [
            r for op in top_ops if op.id() in hoist_ids for r in op.results()
            if any(u.id() not in hoist_ids for u in r.all_used_ops())
        ]

        # Prologue: the whole program, cut down to the frontier values.
        prologue, mapping = clone_program_with_mapping(program)
        remove_outputs(prologue)
        names = [f"{self.options.feed_prefix}.{k}" for k in range(len(frontier))]
        for name, v in zip(names, frontier, strict=True):
            add_output(prologue, mapping.look_up(v), name)
        remove_dead_ops(prologue.global_block(), keep_inputs=False)

        # Main program: frontier values become feeds; the chain becomes dead and goes.
        feeds = add_data_ops(program, [(n, list(v.shape), v.dtype)
                                       for n, v in zip(names, frontier, strict=True)])
        for v, feed in zip(frontier, feeds, strict=True):
            v.replace_all_uses_with(feed)
        for op in reversed(top_ops):
            if op.id() in hoist_ids and not any(r.all_used_ops() for r in op.results()):
                block.remove_op(op)
        remove_dead_ops(block)
        mp.prologue = HostPrologue(program=prologue, outputs=names)
        mp.invalidate()
        after = hazards_of(mp)
        return PassResult(
            True,
            {
                "hazards_before": len(hazards),
                "hazards_after": len(after),
                "hoisted_ops": len(hoist_ids),
                "prologue_outputs": len(names),
                "not_hoistable_nested": len(nested),
            },
        )


@register_property_check("no-hazards")
def _check_no_hazards(mp: ModelProgram) -> str | None:
    hazards = hazards_of(mp)
    if not hazards:
        return None
    return f"{len(hazards)} replay hazard(s) left, first: {hazards[0]}"
