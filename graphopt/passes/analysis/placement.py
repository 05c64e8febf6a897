"""Placement analysis: which values live on the device, which are host constants, and which are
host values computed from a runtime host input -- and the replay hazards that follow.

Why it matters: a CUDA graph replays device kernels with new input data, but host work done
while capturing is *not* redone. A host value computed from a per-step host input
(``cast(slice(max_len_tensor_cpu, 1:2))``) by an op inside a captured region is frozen at its
capture-time value; on replay a ``pd_op.if`` reading it takes the capture-time branch. Host
*constants* (``full_int_array`` with place cpu) are harmless to freeze.

Rules (one walk in program order, nested blocks included; loop-carried values are not fed
back, so a ``while`` body sees its entry placements only):

* seeds: ``pd_op.data`` (or ``builtin.parameter``) named in ``host_inputs`` -> HOST_RUNTIME;
  constant ops (``pd_op.full``, ``full_int_array``, ``assign_value``) on a host place (cpu or
  unspecified) -> HOST_CONST; every other data / parameter -> DEVICE;
* an op whose operands are all host and include a HOST_RUNTIME value -> its results are
  HOST_RUNTIME (host work computed from a runtime input: slice, cast, compare...);
* all operands HOST_CONST -> HOST_CONST; anything else (a device operand, no operands) -> DEVICE;
* an ``if`` result is DEVICE if a branch yields a device value there; otherwise it is host data,
  HOST_RUNTIME when a branch yields a HOST_RUNTIME value or the condition is not a host constant
  (which value comes out changes per step), else HOST_CONST. Values inside branches follow the
  same rules.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paddle

from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import (
    CONTROL_FLOW_OPS,
    INTERFACE_OPS,
    PACKING_OPS,
    data_name,
    parameter_name,
    source_location,
)
from graphopt.ir.program_index import OpPath, ProgramIndex, path_str

#: ops that create a constant from attributes alone.
CONSTANT_OPS = frozenset(
    {"pd_op.full", "pd_op.full_int_array", "pd_op.assign_value", "pd_op.assign_value_"}
)
#: ops that copy host data to the device: their results are device values whatever the input.
TO_DEVICE_OPS = frozenset({"pd_op.memcpy_h2d"})


class Placement(str, enum.Enum):
    """Where a value lives, as far as CUDA-graph replay is concerned."""

    #: a device tensor: captured kernels read it from static buffers each replay.
    DEVICE = "device"
    #: a host value fixed by the program itself: freezing it at capture is harmless.
    HOST_CONST = "host_const"
    #: a host value derived from a per-step host input: freezing it at capture is a bug.
    HOST_RUNTIME = "host_runtime"


def combine(placements: Iterable[Placement]) -> Placement:
    """Placement of a result computed from operands with these placements."""
    ps = list(placements)
    if not ps or Placement.DEVICE in ps:
        return Placement.DEVICE
    if Placement.HOST_RUNTIME in ps:
        return Placement.HOST_RUNTIME
    return Placement.HOST_CONST


def _is_host_place(op: paddle.pir.Operation) -> bool:
    try:
        place = op.attrs().get("place")
    except Exception:
        return True
    text = str(place).lower() if place is not None else ""
    # "Place(cpu)", "Place(undefined:0)" or no place at all count as host; gpu/xpu/... do not.
    return not any(dev in text for dev in ("gpu", "xpu", "custom", "ipu", "npu"))


@dataclass
class PlacementResult:
    """The placement of every value of a program (by :class:`ProgramIndex` key)."""

    index: ProgramIndex
    by_key: dict[str, Placement]
    host_inputs: tuple[str, ...] = ()
    #: for each HOST_RUNTIME value, the host inputs it derives from (for messages).
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def of(self, value: paddle.pir.Value | str) -> Placement:
        """Placement of a value (or of a value key)."""
        key = value if isinstance(value, str) else self.index.key(value)
        return self.by_key[key]

    def keys(self, placement: Placement) -> list[str]:
        """Keys of every value with this placement, in program order."""
        return [k for k, p in self.by_key.items() if p is placement]

    def counts(self) -> dict[str, int]:
        out = {p.value: 0 for p in Placement}
        for p in self.by_key.values():
            out[p.value] += 1
        return out

    @property
    def program(self) -> paddle.pir.Program:
        """The program this result indexes."""
        return self.index.program

    def rebind(self, program: paddle.pir.Program) -> PlacementResult:
        """The same result for a structural copy of its program (keys and paths are equal)."""
        return PlacementResult(ProgramIndex(program), self.by_key, self.host_inputs, self.sources)

    def op_placement(self, path: OpPath) -> list[Placement]:
        """Placements of the results of the op at `path`."""
        return [self.by_key[k] for k in self.index.result_keys(path)]


def analyze_placement(
    program: paddle.pir.Program,
    host_inputs: Sequence[str],
    index: ProgramIndex | None = None,
) -> PlacementResult:
    """Classify every value of `program` (nested blocks included); see the module docstring.

    `host_inputs` are feed names (``meta.max_len_tensor_cpu``); a bare field name
    (``max_len_tensor_cpu``) also matches ``meta.<field>``, and a ``builtin.parameter`` with
    that name counts too (SOT binds host tensors reached through the meta as parameters).
    """
    index = index or ProgramIndex(program)
    wanted = set(host_inputs) | {f"meta.{h}" for h in host_inputs}
    by_key: dict[str, Placement] = {}
    sources: dict[str, tuple[str, ...]] = {}

    def visit(bpath: tuple[int, ...]) -> None:
        for path in index.block_ops[bpath]:
            op = index.ops[path]
            name = op.name()
            results = index.result_keys(path)
            for b in range(op.num_regions()):
                # block arguments (while loops) carry the loop operands' placement
                for key in index.block_args.get((*path, b), ()):
                    by_key[key] = combine(by_key.get(k, Placement.DEVICE) for k in index.operand_keys(path))
                visit((*path, b))
            if name in ("pd_op.data", "builtin.parameter"):
                input_name = data_name(op) if name == "pd_op.data" else parameter_name(op)
                p = Placement.HOST_RUNTIME if input_name in wanted else Placement.DEVICE
                if p is Placement.HOST_RUNTIME:
                    sources[results[0]] = (input_name,)
                by_key[results[0]] = p
                continue
            operands = index.operand_keys(path)
            if name in CONSTANT_OPS and not operands:
                p = Placement.HOST_CONST if _is_host_place(op) else Placement.DEVICE
                for k in results:
                    by_key[k] = p
                continue
            if name in TO_DEVICE_OPS:
                for k in results:
                    by_key[k] = Placement.DEVICE
                continue
            if name == "pd_op.if" and op.num_regions() == 2:
                yields = [_yield_keys(index, (*path, b)) for b in (0, 1)]
                cond = by_key.get(operands[0], Placement.DEVICE)
                for r, k in enumerate(results):
                    ys = [by_key.get(y[r], Placement.DEVICE) for y in yields if r < len(y)]
                    if not ys or Placement.DEVICE in ys:
                        by_key[k] = Placement.DEVICE
                    elif Placement.HOST_RUNTIME in ys or cond is not Placement.HOST_CONST:
                        # host data either way; which value depends on a per-step condition
                        by_key[k] = Placement.HOST_RUNTIME
                    else:
                        by_key[k] = Placement.HOST_CONST
                    _note_sources(sources, k, [operands[0]] + [y[r] for y in yields if r < len(y)],
                                  by_key)
                continue
            p = combine(by_key.get(k, Placement.DEVICE) for k in operands)
            for k in results:
                by_key[k] = p
                _note_sources(sources, k, operands, by_key)

    visit(())
    return PlacementResult(index, by_key, tuple(host_inputs), sources)


def _yield_keys(index: ProgramIndex, bpath: tuple[int, ...]) -> list[str]:
    paths = index.block_ops.get(bpath, [])
    if paths and index.ops[paths[-1]].name() == "cf.yield":
        return index.operand_keys(paths[-1])
    return []


def _note_sources(
    sources: dict[str, tuple[str, ...]], key: str, inputs: list[str], by_key: dict[str, Placement]
) -> None:
    if by_key.get(key) is not Placement.HOST_RUNTIME:
        return
    found: list[str] = []
    for i in inputs:
        for s in sources.get(i, ()):
            if s not in found:
                found.append(s)
    sources[key] = tuple(found)


@dataclass
class Hazard:
    """An op that would be captured and computes a host value from a runtime host input: a
    replay would reuse its capture-time result."""

    op_name: str
    index_path: tuple[int, ...]
    #: ``file:line (function)`` of the model code that built the op, when Paddle recorded it.
    location: str | None
    value_desc: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op_name,
            "index_path": list(self.index_path),
            "location": self.location,
            "value": self.value_desc,
        }

    def __str__(self) -> str:
        where = f" at {self.location}" if self.location else ""
        return f"{self.op_name} [{path_str(self.index_path)}]{where}: {self.value_desc}"


def is_capturable(op_name: str, blacklist: Iterable[str]) -> bool:
    """Would a CUDA-graph split capture an op of this name? (blacklist + interface ops)"""
    return op_name not in INTERFACE_OPS and op_name not in set(blacklist)


def find_hazards(
    program: paddle.pir.Program,
    host_inputs: Sequence[str],
    blacklist: Sequence[str],
    placement: PlacementResult | None = None,
) -> list[Hazard]:
    """Every op that would be captured and produces a HOST_RUNTIME result, in program order.

    Ops nested in blacklisted control-flow ops count too: their branch bodies are captured
    piecewise (``piecewise-split`` recurses into them). Bookkeeping ops (``builtin.combine``...)
    launch nothing and are skipped; the op consuming their result is reported instead.
    """
    placement = placement or analyze_placement(program, host_inputs)
    index = placement.index
    black = set(blacklist)
    hazards: list[Hazard] = []
    for path, op in index.ops.items():
        name = op.name()
        if not is_capturable(name, black) or name in PACKING_OPS:
            continue
        for key in index.result_keys(path):
            if placement.by_key.get(key) is Placement.HOST_RUNTIME:
                src = ", ".join(placement.sources.get(key, ())) or "a host input"
                hazards.append(
                    Hazard(name, path, source_location(op), f"{key} (host value derived from {src})")
                )
                break
    return hazards


def placement_of(mp: ModelProgram) -> PlacementResult:
    """The placement of `mp`'s program, computed once per program version."""
    return mp.cached("placement", lambda: analyze_placement(mp.program, mp.host_inputs))


def hazards_of(mp: ModelProgram) -> list[Hazard]:
    """The replay hazards of `mp`'s program under its blacklist (control flow always counts as
    blacklisted: a CUDA graph cannot capture it)."""
    blacklist = sorted(set(mp.blacklist) | CONTROL_FLOW_OPS)
    return find_hazards(mp.program, mp.host_inputs, blacklist, placement_of(mp))
