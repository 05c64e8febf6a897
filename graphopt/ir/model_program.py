"""The one object that travels through the pipeline (DESIGN §2).

Source-stage passes act on ``mp.model`` (the dygraph Layer and its Python functions); the trace
step fills ``mp.program`` and the feed/parameter tables; program-stage passes act on the program
and its metadata (host inputs, prologue, blacklist, segments). Nothing reaches around it.

Program conventions (established by ``runtime.trace``):

* every per-step input of the program is a ``pd_op.data`` op; its name says where the value comes
  from each step: ``arg.<i>`` (the i-th tensor argument of the step), ``meta.<field>[.<index>]``
  (a tensor of the forward-meta object, e.g. ``meta.max_len_tensor_cpu``, ``meta.caches.3``), or
  ``hoisted.<k>`` (an output of the host prologue, see hoist-host-branch-conditions);
* weights stay ``builtin.parameter`` ops; their values are in ``mp.params`` by parameter name;
  tensors the model holds that are not parameters (buffers) are ``const.<k>`` feeds whose values
  are in ``mp.params`` too (``runtime.executor.ProgramRunner`` feeds them);
* the step outputs are the ``builtin.shadow_output`` ops, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import paddle

    from graphopt.models.base import ModelBundle


@dataclass
class GraphBreak:
    """One SOT graph break: why, and where in the model's source."""

    reason: str  # SOT's reason class, e.g. "DataDependencyControlFlowBreak"
    message: str
    file: str
    line: int
    function: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "function": self.function,
        }


@dataclass
class TraceInfo:
    """What tracing one step through SOT produced."""

    #: distinct graphs SOT compiled for the step
    subgraphs: int = 0
    #: compiled graphs the traced step ran (a loop over layers runs one graph many times: each
    #: run after the first is a return to Python, i.e. a graph break paid at run time)
    graph_runs: int = 0
    graph_breaks: list[GraphBreak] = field(default_factory=list)
    compile_count: int = 0
    ops: int = 0
    time_s: float = 0.0
    #: meta tensors that SOT bound as builtin.parameter (captured by reference): fed by value now.
    host_bound_by_reference: list[str] = field(default_factory=list)

    def break_sites(self) -> list[dict[str, Any]]:
        """Distinct places the graph broke (innermost model frame), with how often SOT said so."""
        sites: dict[tuple, dict[str, Any]] = {}
        for b in self.graph_breaks:
            key = (b.file, b.line, b.function)
            if key not in sites:
                sites[key] = {**b.to_dict(), "count": 0}
            sites[key]["count"] += 1
            if b.reason == "DataDependencyControlFlowBreak":
                sites[key]["reason"] = b.reason
        return list(sites.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "subgraphs": self.subgraphs,
            "graph_runs": self.graph_runs,
            "graph_breaks": len(self.graph_breaks),
            "break_sites": self.break_sites(),
            "compile_count": self.compile_count,
            "ops": self.ops,
            "time_s": round(self.time_s, 4),
            "host_bound_by_reference": list(self.host_bound_by_reference),
        }


@dataclass
class HostPrologue:
    """Host work hoisted out of the captured program; runs eagerly every step.

    ``program`` reads feeds named like the main program's (e.g. ``meta.max_len_tensor_cpu``) and
    its fetches, in order, become the main program's ``hoisted.<k>`` feeds (``outputs[k]``).
    """

    program: paddle.pir.Program
    outputs: list[str]  # names of the main program's pd_op.data ops fed by this prologue


@dataclass
class ModelProgram:
    """The model, its traced program, and everything the passes learn about it."""

    model: ModelBundle
    program: paddle.pir.Program | None = None
    #: builtin.parameter name -> value (weights). Host inputs are never here: they are feeds.
    params: dict[str, np.ndarray] = field(default_factory=dict)
    #: names of pd_op.data feeds that carry runtime host values (seed of the placement analysis).
    host_inputs: list[str] = field(default_factory=list)
    prologue: HostPrologue | None = None
    #: op names that must not be captured (what FLAGS_cuda_graph_blacklist gets).
    blacklist: list[str] = field(default_factory=list)
    #: flags to set before the first compile, e.g. {"FLAGS_cuda_graph_blacklist": "pd_op.if"}.
    flags: dict[str, str] = field(default_factory=dict)
    #: set by piecewise-split: runtime.segments.SegmentPlan
    segments: Any = None
    trace: TraceInfo = field(default_factory=TraceInfo)
    #: free-form results of analyses and passes that the report shows (hazards, ...).
    facts: dict[str, Any] = field(default_factory=dict)
    #: properties that currently hold (e.g. "traced", "single-graph", "no-hazards").
    properties: set[str] = field(default_factory=set)
    full_cuda_graph: bool = False

    def clone(self) -> ModelProgram:
        """A copy whose program can be mutated without touching this one (for rollback).

        Deep: the program and the prologue's program (new ops and values), the trace info and
        every container (params dict, lists, flags, the containers inside facts, properties).
        Shared: the model (source patches have their own rollback), the weight arrays (passes
        replace, never mutate them), non-container objects inside facts (see `copy_facts`) and
        ``segments`` (passes assign a new plan, never edit one in place).
        """
        import copy

        from graphopt.ir.pir_utils import clone_program

        new = copy.copy(self)
        new.program = clone_program(self.program) if self.program is not None else None
        if self.prologue is not None:
            new.prologue = HostPrologue(
                program=clone_program(self.prologue.program), outputs=list(self.prologue.outputs)
            )
        new.params = dict(self.params)
        new.host_inputs = list(self.host_inputs)
        new.blacklist = list(self.blacklist)
        new.flags = dict(self.flags)
        new.trace = copy.deepcopy(self.trace)
        new.facts = copy_facts(self.facts)
        new.properties = set(self.properties)
        return new


def copy_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """Copy of the facts: containers (dict/list/tuple/set) are copied at every depth, other
    objects are shared.

    Not ``copy.deepcopy``: facts also hold live objects that must keep their identity (the trace
    batch references the model's ONE forward-meta object, which SOT guards on; PIR values and
    programs cannot be deep-copied at all).
    """

    def copy_(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: copy_(x) for k, x in v.items()}
        if isinstance(v, list):
            return [copy_(x) for x in v]
        if isinstance(v, tuple) and type(v) is tuple:
            return tuple(copy_(x) for x in v)
        if isinstance(v, set):
            return set(v)
        return v

    return copy_(facts)
