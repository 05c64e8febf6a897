"""The one object that travels through the pipeline: the model, its program, what passes learn.

Source-stage passes act on ``mp.model`` (the dygraph Layer and its Python functions); the trace
fills ``mp.program`` and the feed/parameter tables; program-stage passes act on the program and
its metadata (host inputs, prologue, blacklist, segments). Nothing reaches around it.

Program conventions (established by :mod:`graphopt.ir.trace`):

* every per-step input of the program is a ``pd_op.data`` op; its name says where the value comes
  from each step: ``arg.<i>`` (the i-th tensor argument of the step), ``meta.<field>[.<index>]``
  (a tensor of the forward-meta object, e.g. ``meta.max_len_tensor_cpu``, ``meta.caches.3``), or
  ``hoisted.<k>`` (an output of the host prologue, see hoist-host-branch-conditions);
* weights stay ``builtin.parameter`` ops; their values are in ``mp.params`` by parameter name;
  tensors the model holds that are not parameters (buffers) are ``const.<k>`` feeds whose values
  are in ``mp.params`` too;
* the step outputs are the ``builtin.shadow_output`` ops, in order.

Analyses are cached per program *version* (:meth:`ModelProgram.cached`): the PassManager bumps
the version when a pass that may change the program reports ``modified``. A structural copy of
the program (made for rollback) keeps the version, so results keyed by op paths and value keys
stay valid for it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import paddle

from graphopt.ir.pir_utils import clone_program
from graphopt.ir.segment_plan import SegmentPlan
from graphopt.ir.sources import format_location

if TYPE_CHECKING:
    from graphopt.models.base import ModelBundle, StepBatch

T = TypeVar("T")


@dataclass
class GraphBreak:
    """One SOT graph break: why, and where in the model's source."""

    reason: str  # SOT's reason class, e.g. "DataDependencyControlFlowBreak"
    message: str
    file: str
    line: int
    function: str

    @property
    def location(self) -> str:
        """``path:line (function)``, or ``-`` when SOT named no user frame."""
        return format_location(self.file, self.line, self.function) if self.file else "-"

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "function": self.function,
            "location": self.location,
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
    #: seconds SOT took to translate the step and run it (build it, with placeholder runs)
    time_s: float = 0.0
    #: graph runs answered with zeros instead of running the graph (an optimistic
    #: ``trace_step``): the program was built, not executed
    placeholder_runs: int = 0
    #: the optimistic attempt did not give the step as one graph (or failed), so the step was
    #: traced again the normal way (this record); its wall time includes the attempt
    retraced: bool = False
    #: seconds of the whole trace: SOT plus reading its results and adopting its program
    wall_s: float = 0.0
    #: source patches applied to the model when this trace ran
    marked: int = 0
    #: meta tensors that SOT bound as builtin.parameter (captured by reference): fed by value now.
    host_bound_by_reference: list[str] = field(default_factory=list)
    #: tensor inputs of the traced graph that are neither step arguments, forward-meta fields nor
    #: the model's parameters or buffers (``const.0 [4, 8] float32``): frozen at trace time
    frozen_inputs: list[str] = field(default_factory=list)
    #: meta fields the model does not list in ``host_inputs`` that are host tensors all the
    #: same (FastDeploy's ``*_cpu`` naming, or a CPU tensor on a CUDA build): treated as host
    #: inputs, so their reads on the captured path count as replay hazards
    inferred_host_inputs: list[str] = field(default_factory=list)

    def break_sites(self) -> list[dict[str, Any]]:
        """Distinct places the graph broke (innermost user frame), with how often SOT said so."""
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
            "wall_s": round(self.wall_s, 4),
            "marked": self.marked,
            "placeholder_runs": self.placeholder_runs,
            "retraced": self.retraced,
            "host_bound_by_reference": list(self.host_bound_by_reference),
            "inferred_host_inputs": list(self.inferred_host_inputs),
            "frozen_inputs": list(self.frozen_inputs),
        }


@dataclass
class MarkedFunction:
    """A model function capture-control-flow marked (and maybe rewrote) in memory."""

    qualname: str
    location: str
    #: what the in-memory rewrite changed (empty: marked as written)
    rewrites: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"function": self.qualname, "location": self.location,
                "rewrites": list(self.rewrites)}


@dataclass
class HostPrologue:
    """Host work hoisted out of the captured program; runs eagerly every step.

    ``program`` reads feeds named like the main program's (e.g. ``meta.max_len_tensor_cpu``) and
    its fetches, in order, become the main program's ``hoisted.<k>`` feeds (``outputs[k]``).
    """

    program: paddle.pir.Program
    outputs: list[str]  # names of the main program's pd_op.data ops fed by this prologue


@dataclass(frozen=True)
class BranchCondition:
    """A branch condition the host decides before launch (set by specialize-branches).

    One or more ``hoisted.<k>`` feeds that compute the same host expression (e.g. each layer's
    ``max_len_tensor_cpu[1]`` check): the prologue computes them every step, so a step's value
    is known before anything is launched.
    """

    #: the first of `feeds`; variants are keyed by it
    name: str
    feeds: tuple[str, ...]
    #: the source text of the condition (``forward_meta.max_len_tensor_cpu[1]``), "" if unknown
    label: str = ""
    #: ``file:line (function)`` where the model computes it, "" if unknown
    location: str = ""

    def value(self, feeds: Mapping[str, Any]) -> bool:
        """The condition's truth in a step's feeds; ValueError if its feeds disagree or one is
        not a single element (never guess a branch)."""
        values = set()
        for name in self.feeds:
            arr = np.asarray(feeds[name])
            if arr.dtype == object or arr.size != 1:
                raise ValueError(f"branch condition {name} must be one element, got shape "
                                 f"{list(arr.shape)}")
            values.add(bool(arr.reshape(-1)[0]))
        if len(values) != 1:
            raise ValueError(f"branch condition {self.name}: its feeds {', '.join(self.feeds)} "
                             "compute the same host expression but disagree")
        return values.pop()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "feeds": list(self.feeds), "label": self.label,
                "location": self.location}


def combination_name(values: Mapping[str, bool]) -> str:
    """``hoisted.0=1,hoisted.1=0``: a combination of condition values, by condition name."""
    return ",".join(f"{name}={int(v)}" for name, v in values.items()) or "(none)"


@dataclass
class Variant:
    """One if-free program: the main program with every host-decided ``if`` folded to the
    branch its conditions take (set by specialize-branches)."""

    #: the conditions it was folded for, e.g. ``hoisted.0=1,hoisted.1=0``
    name: str
    #: condition name -> the value it assumes. Only conditions some fold read: a condition whose
    #: every ``if`` sits in a dropped branch is not one of them (either value matches).
    conditions: dict[str, bool]
    program: paddle.pir.Program = field(repr=False)
    #: the conditions in words, from the model's source (e.g. ``x[1] and not x[2]``)
    label: str = ""
    #: batch kinds the combinations it serves were seen with (sampled feasibility)
    kinds: list[str] = field(default_factory=list)
    #: the full combinations of condition values it serves
    combinations: list[dict[str, bool]] = field(default_factory=list)
    #: set by piecewise-split: how the variant is captured (one captured segment when nothing in
    #: it is blacklisted: a full graph)
    segments: SegmentPlan | None = None

    def matches(self, values: Mapping[str, bool]) -> bool:
        """Whether a step with these condition values runs this variant."""
        return all(values.get(name) == v for name, v in self.conditions.items())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (no program) for reports."""
        return {
            "name": self.name,
            "label": self.label,
            "conditions": {k: bool(v) for k, v in self.conditions.items()},
            "kinds": list(self.kinds),
            "combinations": [combination_name(c) for c in self.combinations],
            "segments": None if self.segments is None else self.segments.stats(),
        }


@dataclass
class Specialization:
    """What specialize-branches decided: the host conditions, which combinations of their
    values can occur, and which of those have a variant."""

    conditions: list[BranchCondition]
    #: combinations that can occur (each served by one variant, or by the general program)
    feasible: list[dict[str, bool]]
    #: combinations enumerated but never produced (not built; a step with one is refused)
    unreachable: list[dict[str, bool]]
    #: feasible combinations left to the general program (run piecewise, ifs eager)
    general: list[dict[str, bool]]
    #: how feasibility was decided, in words
    rule: str = ""

    def values(self, feeds: Mapping[str, Any]) -> dict[str, bool]:
        """Every condition's value in a step's feeds (prologue outputs included)."""
        return {c.name: c.value(feeds) for c in self.conditions}

    def to_dict(self) -> dict[str, Any]:
        return {
            "conditions": [c.to_dict() for c in self.conditions],
            "feasible": [combination_name(c) for c in self.feasible],
            "unreachable": [combination_name(c) for c in self.unreachable],
            "general": [combination_name(c) for c in self.general],
            "rule": self.rule,
        }


@dataclass
class ModelProgram:
    """The model, its traced program, and everything the passes learn about it."""

    model: ModelBundle
    program: paddle.pir.Program | None = None
    #: builtin.parameter name -> value (weights; tensors sharing the model's memory, or arrays).
    #: Host inputs are never here: they are feeds.
    params: dict[str, paddle.Tensor | np.ndarray] = field(default_factory=dict)
    #: names of pd_op.data feeds that carry runtime host values (seed of the placement analysis).
    host_inputs: list[str] = field(default_factory=list)
    prologue: HostPrologue | None = None
    #: op names that must not be captured (what FLAGS_cuda_graph_blacklist gets).
    blacklist: list[str] = field(default_factory=list)
    #: flags to set before the first compile, e.g. {"FLAGS_cuda_graph_blacklist": "pd_op.if"}.
    flags: dict[str, str] = field(default_factory=dict)
    #: set by piecewise-split
    segments: SegmentPlan | None = None
    #: set by specialize-branches: one if-free program per feasible combination of host-decided
    #: branch conditions, and what it decided
    variants: list[Variant] = field(default_factory=list)
    specialization: Specialization | None = None
    #: the latest trace, and every trace of the run in order (the first: the unmodified model)
    trace: TraceInfo = field(default_factory=TraceInfo)
    traces: list[TraceInfo] = field(default_factory=list)
    #: the batch the step is traced with (its meta is the model's one forward-meta object)
    trace_batch: StepBatch | None = None
    #: the SOT-compiled step of the latest trace (runs the model when it is several graphs)
    sot_step: Callable[..., Any] | None = None
    #: functions capture-control-flow marked
    marked: list[MarkedFunction] = field(default_factory=list)
    #: properties that currently hold (e.g. "traced", "single-graph", "no-hazards").
    properties: set[str] = field(default_factory=set)
    full_cuda_graph: bool = False
    #: bumped whenever the program may have changed; keys the analysis cache
    version: int = 0
    _analyses: dict[str, tuple[int, Any]] = field(default_factory=dict, repr=False)

    # -- analyses ---------------------------------------------------------------------------
    def cached(self, name: str, compute: Callable[[], T]) -> T:
        """The analysis `name` of the current program version, computed once per version.

        A result computed on a structural copy of this program (same version) is reused;
        results that point into a program (``.program``) are rebound with ``.rebind(program)``.
        """
        hit = self._analyses.get(name)
        if hit is not None and hit[0] == self.version:
            value = hit[1]
            if getattr(value, "program", self.program) is not self.program:
                value = value.rebind(self.program)
                self._analyses[name] = (self.version, value)
            return value
        value = compute()
        self._analyses[name] = (self.version, value)
        return value

    def invalidate(self) -> None:
        """The program changed: every cached analysis is stale."""
        self.version += 1
        self._analyses.clear()

    def patch_checkpoint(self) -> int:
        """How many source patches the model carries (for retrace decisions and rollback)."""
        return self.model.patch_checkpoint()

    def needs_general_program(self) -> bool:
        """Whether steps may run ``program`` itself: no variants, or feasible combinations that
        no variant serves (see specialize-branches)."""
        return not self.variants or bool(self.specialization and self.specialization.general)

    def programs(self) -> list[paddle.pir.Program]:
        """Every PIR program this ModelProgram owns: main, prologue, variants."""
        out = [self.program] if self.program is not None else []
        if self.prologue is not None:
            out.append(self.prologue.program)
        out.extend(v.program for v in self.variants)
        return out

    # -- copies -----------------------------------------------------------------------------
    def clone(self, program: bool = True) -> ModelProgram:
        """A copy whose metadata (and, with `program`, PIR programs) can be changed without
        touching this one (for rollback).

        Copied: the program and the prologue's program (new ops and values) when `program`,
        every container (params dict, lists, flags, properties, analyses) and the trace infos.
        Shared: the model (source patches have their own rollback), the weight arrays (passes
        replace, never mutate them), the trace batch, ``segments`` and ``specialization``
        (passes assign new ones, never edit one in place). Variants are new objects (a pass may
        give one a plan), their programs copied with `program`.
        """
        new = copy.copy(self)
        if program:
            new.program = clone_program(self.program) if self.program is not None else None
            if self.prologue is not None:
                new.prologue = HostPrologue(
                    program=clone_program(self.prologue.program),
                    outputs=list(self.prologue.outputs),
                )
        new.variants = [copy.copy(v) for v in self.variants]
        if program:
            for v in new.variants:
                v.program = clone_program(v.program)
        new.params = dict(self.params)
        new.host_inputs = list(self.host_inputs)
        new.blacklist = list(self.blacklist)
        new.flags = dict(self.flags)
        new.trace = copy.deepcopy(self.trace)
        new.traces = copy.deepcopy(self.traces)
        new.marked = copy.deepcopy(self.marked)
        new.properties = set(self.properties)
        new._analyses = dict(self._analyses)
        return new
