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

from graphopt.ir.model_program import HostPrologue
from graphopt.ir.pir_utils import (
    CONTROL_FLOW_OPS,
    add_data_op,
    add_output,
    clone_program_with_mapping,
    remove_dead_ops,
    remove_outputs,
)
from graphopt.passes.base import Pass, PassError, PassResult, Stage
from graphopt.passes.registry import register_pass


@dataclass
class HoistOptions:
    #: prefix of the main program's new inputs fed by the prologue.
    feed_prefix: str = "hoisted"


def hazard_report(mp) -> list[dict]:
    """The current replay hazards, as report rows (op, location, value)."""
    from graphopt.passes.analysis.placement import find_hazards

    blacklist = sorted(set(mp.blacklist) | CONTROL_FLOW_OPS)
    return [h.to_dict() for h in find_hazards(mp.program, mp.host_inputs, blacklist)]


@register_pass
class HoistHostBranchConditions(Pass):
    name = "hoist-host-branch-conditions"
    summary = "Move host-computed values off the captured path into a host prologue fed each step."
    stage = Stage.PROGRAM
    Options = HoistOptions
    requires = ("single-graph",)
    ensures = ("no-hazards",)

    def run(self, mp) -> PassResult:
        from graphopt.passes.analysis.placement import find_hazards

        program = mp.program
        block = program.global_block()
        blacklist = sorted(set(mp.blacklist) | CONTROL_FLOW_OPS)
        hazards = find_hazards(program, mp.host_inputs, blacklist)
        before = [h.to_dict() for h in hazards]
        mp.facts.setdefault("hazards", {})["before"] = len(before)
        mp.facts["hazards"]["details_before"] = before
        if not hazards:
            mp.facts["hazards"].update(after=0, details_after=[])
            return PassResult(False, {"hazards_before": 0, "hazards_after": 0, "hoisted_ops": 0})

        top_ops = list(block.ops)
        nested = [h for h in hazards if len(h.index_path) != 1]
        hoist = {top_ops[h.index_path[0]] for h in hazards if len(h.index_path) == 1}
        hoist_ids = {id(op) for op in hoist}
        # Values that leave the hoisted chain: these become the prologue's outputs.
        frontier = []
        for op in top_ops:
            if id(op) not in hoist_ids:
                continue
            for r in op.results():
                users = r.all_used_ops()
                if any(id(u) not in hoist_ids for u in users):
                    frontier.append(r)
        existing = len(mp.prologue.outputs) if mp.prologue is not None else 0
        if existing:
            raise PassError("a host prologue exists already; run this pass once per pipeline")

        # Prologue: the whole program, cut down to the frontier values.
        prologue, mapping = clone_program_with_mapping(program)
        remove_outputs(prologue)
        names = []
        for k, v in enumerate(frontier):
            name = f"{self.options.feed_prefix}.{k}"
            add_output(prologue, mapping.look_up(v), name)
            names.append(name)
        remove_dead_ops(prologue.global_block(), keep_inputs=False)

        # Main program: frontier values become feeds; the chain becomes dead and goes.
        for name, v in zip(names, frontier, strict=True):
            data = add_data_op(program, name, list(v.shape), v.dtype)
            v.replace_all_uses_with(data)
        for op in reversed(top_ops):
            if id(op) in hoist_ids and not any(r.all_used_ops() for r in op.results()):
                block.remove_op(op)
        remove_dead_ops(block)

        mp.prologue = HostPrologue(program=prologue, outputs=names)
        after = [h.to_dict() for h in find_hazards(program, mp.host_inputs, blacklist)]
        mp.facts["hazards"].update(after=len(after), details_after=after)
        return PassResult(
            True,
            {
                "hazards_before": len(before),
                "hazards_after": len(after),
                "hoisted_ops": len(hoist),
                "prologue_outputs": len(names),
                "not_hoistable_nested": len(nested),
            },
        )
