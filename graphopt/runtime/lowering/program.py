"""Lower a PIR program to PyTorch: a flat list of closures over one list environment.

Lowering happens once per program::

    placement  <- analyze_placement(program, host_inputs), plus shapes: shape64/shape results
                  and the small arithmetic computed only from them stay on the host
    slots      <- one environment slot per value; a template list holds what never changes
                  (weights, constant feeds, constants, device copies of constants)
    per op     <- constants (every op whose operands are all constants: full, full_int_array,
                  arange of constants, ...) are computed now and stored in the template; every
                  other op becomes one closure ``step(env)`` that reads its operand slots, calls
                  its kernel (:mod:`graphopt.runtime.lowering.registry`) and writes its result
                  slots, then clears the slots of values nothing later reads
    if         <- both blocks lowered recursively; the step picks one from its (host) condition

A run copies the template, writes the feeds into their slots and calls each closure in order;
nothing about a PIR op is looked up at run time.

Placement is the semantics. A value the placement calls host lives on the CPU; a device value
on `device`. An op runs on the device when any of its results is a device value: host
operands are moved there (a constant once, at lower time; a per-step host value on every run,
listed in :attr:`LoweredProgram.transfers`). Reading a device value on the host (an ``if``
whose condition is a device value, a shape that lives on the device) is a synchronisation: each
one is listed in :attr:`LoweredProgram.sync_points`, and none is hidden. These lists describe a
run on a real device even when `device` is the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import paddle
import torch

from graphopt.errors import LoweringError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import data_name, parameter_name, source_location, walk_ops
from graphopt.ir.program_index import OpPath, ProgramIndex, path_str
from graphopt.ir.segment_plan import Segment
from graphopt.passes.analysis.placement import Placement, PlacementResult, analyze_placement

# the op modules register their lowerings into OPS on import
from graphopt.runtime.lowering import ops_create, ops_math, ops_nn, ops_shape  # noqa: F401
from graphopt.runtime.lowering.registry import OPS, OpInfo, lowering, lowering_flags

#: ops whose results are shapes: host values read from metadata, never a device read
SHAPE_SOURCES = frozenset({"pd_op.shape", "pd_op.shape64"})
#: small arithmetic and packing through which a shape stays a host value (when every tensor
#: operand is host data and one of them is a shape)
SHAPE_OPS = frozenset({
    "builtin.combine", "builtin.split", "builtin.slice", "pd_op.slice", "pd_op.strided_slice",
    "pd_op.stack", "pd_op.concat", "pd_op.split", "pd_op.cast", "pd_op.scale", "pd_op.add",
    "pd_op.subtract", "pd_op.multiply", "pd_op.divide", "pd_op.floor_divide",
    "pd_op.remainder", "pd_op.maximum", "pd_op.minimum", "pd_op.reshape", "pd_op.squeeze",
    "pd_op.unsqueeze", "pd_op.gather", "pd_op.equal", "pd_op.not_equal", "pd_op.less_than",
    "pd_op.less_equal", "pd_op.greater_than", "pd_op.greater_equal", "pd_op.logical_and",
    "pd_op.logical_or", "pd_op.logical_not", "pd_op.assign", "pd_op.prod", "pd_op.sum",
    "pd_op.max", "pd_op.min",
})
_CPU = torch.device("cpu")


# -- placement --------------------------------------------------------------------------------


@dataclass
class ValuePlacement:
    """Where each value of a program lives for the lowering: :func:`analyze_placement`'s
    classes, plus shape values (``shape64`` results and what is computed only from them by
    :data:`SHAPE_OPS`) on the host, so a reshape needs no device-to-host read."""

    base: PlacementResult
    host: dict[str, bool]
    #: keys of values computed from a shape (host, though the base analysis says device)
    shapes: set[str]

    @property
    def index(self) -> ProgramIndex:
        return self.base.index

    def is_host(self, key: str) -> bool:
        """Whether the value `key` (a ProgramIndex key) lives on the host."""
        return self.host[key]


def value_placement(program: paddle.pir.Program, host_inputs: Sequence[str] = (),
                    index: ProgramIndex | None = None) -> ValuePlacement:
    """The lowering's placement of every value of `program` (see :class:`ValuePlacement`)."""
    base = analyze_placement(program, host_inputs, index)
    idx = base.index
    host: dict[str, bool] = {}
    shapes: set[str] = set()

    def visit(bpath: tuple[int, ...]) -> None:
        for path in idx.block_ops[bpath]:
            b = 0
            while (sub := (*path, b)) in idx.block_ops:
                for key in idx.block_args.get(sub, ()):
                    host[key] = base.by_key[key] is not Placement.DEVICE
                visit(sub)
                b += 1
            op = idx.ops[path]
            name = op.name()
            results = idx.result_keys(path)
            if name in SHAPE_SOURCES:
                for k in results:
                    host[k] = True
                    shapes.add(k)
                continue
            if name == "pd_op.if" and b == 2:
                yields = [_yield_keys(idx, (*path, br)) for br in (0, 1)]
                for r, k in enumerate(results):
                    host[k] = all(host.get(y[r], False) for y in yields)
                    if host[k] and any(y[r] in shapes for y in yields):
                        shapes.add(k)
                continue
            for k in results:
                host[k] = base.by_key[k] is not Placement.DEVICE
            if name in SHAPE_OPS and not all(host[k] for k in results):
                tensor_keys = _tensor_operand_keys(idx, path, name)
                if (tensor_keys and all(host.get(k, False) for k in tensor_keys)
                        and any(k in shapes for k in tensor_keys)):
                    for k in results:
                        host[k] = True
                        shapes.add(k)

    visit(())
    return ValuePlacement(base, host, shapes)


def _tensor_operand_keys(idx: ProgramIndex, path: OpPath, name: str) -> list[str]:
    """Operand keys an op computes with (not its host-data operands: shapes, axes)."""
    fn = OPS.get(name)
    host_ops, meta_ops = (lowering_flags(fn)[:2] if fn is not None
                          else (frozenset(), frozenset()))
    return [k for i, k in enumerate(idx.operand_keys(path))
            if i not in host_ops and i not in meta_ops]


def _yield_keys(idx: ProgramIndex, bpath: tuple[int, ...]) -> list[str]:
    paths = idx.block_ops.get(bpath, [])
    if paths and idx.ops[paths[-1]].name() == "cf.yield":
        return idx.operand_keys(paths[-1])
    return []


def host_inputs_of(mp: ModelProgram) -> list[str]:
    """The feeds of `mp`'s programs that carry host values: the model's host inputs and the
    host prologue's outputs (``hoisted.<k>``, computed on the host every step)."""
    names = list(mp.host_inputs)
    if mp.prologue is not None:
        names += [n for n in mp.prologue.outputs if n not in names]
    return names


def segment_host_inputs(seg: Segment, placement: ValuePlacement) -> list[str]:
    """The feeds of segment `seg`'s standalone program that carry host values, given the
    placement of the whole program the segment was cut from (its live-ins are keys there)."""
    return [name for name, key in zip(seg.feed_names, seg.live_in, strict=True)
            if placement.host.get(key, False)]


# -- missing ops ------------------------------------------------------------------------------


def missing_lowerings(program: paddle.pir.Program) -> list[tuple[str, str | None]]:
    """``(op name, user source location or None)`` of every op of `program` (nested blocks
    included) that has no entry in :data:`OPS`, in program order; an op built twice at the same
    line (the same layer code run for each layer) is listed once."""
    seen: set[tuple[str, str | None]] = set()
    out: list[tuple[str, str | None]] = []
    for op in walk_ops(program.global_block()):
        name = op.name()
        if name in OPS:
            continue
        item = (name, source_location(op))
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def lowering_error(program: paddle.pir.Program, backend: str) -> LoweringError | None:
    """The one-line error for the first op of `program` with no lowering (None: all have)."""
    missing = missing_lowerings(program)
    if not missing:
        return None
    name = missing[0][0]
    # the first instance SOT traced may have no located frame; another instance may
    where = next((w for n, w in missing if n == name and w), None)
    kinds = sorted({n for n, _ in missing})
    more = f" ({len(kinds)} op kinds have none: {', '.join(kinds)})" if len(kinds) > 1 else ""
    return LoweringError(
        f"no PyTorch lowering for {name} at {where or 'an unknown location'}: backend "
        f"{backend} cannot run this program{more}; add one with @lowering({name!r}) "
        "(graphopt.runtime.lowering)")


# -- steps --------------------------------------------------------------------------------------

#: one lowered op: reads and writes slots of the run's environment
Step = Callable[[list], None]
_FACTORIES: dict[tuple[int, int, int], Callable[..., Step]] = {}


def _step_factory(n_in: int, n_out: int, n_free: int) -> Callable[..., Step]:
    """A maker of closures ``step(env)`` for ops of this arity, written out once per arity so
    a step indexes its slots directly (no loops, no argument lists built per run)."""
    key = (n_in, n_out, n_free)
    made = _FACTORIES.get(key)
    if made is not None:
        return made
    ins = [f"i{k}" for k in range(n_in)]
    outs = [f"o{k}" for k in range(n_out)]
    frees = [f"f{k}" for k in range(n_free)]
    call = f"kernel({', '.join(f'env[{i}]' for i in ins)})"
    if n_out == 0:
        lines = [call]
    elif n_out == 1:
        lines = [f"env[o0] = {call}"]
    else:
        lines = [f"{', '.join(f'env[{o}]' for o in outs)} = {call}"]
    lines += [f"env[{f}] = None" for f in frees]
    src = (f"def make(kernel, {', '.join(ins + outs + frees)}):\n"
           "    def step(env):\n" + "".join(f"        {line}\n" for line in lines)
           + "    return step\n")
    namespace: dict[str, Any] = {}
    exec(src, namespace)  # the source is generated from integers above, no user text
    made = namespace["make"]
    _FACTORIES[key] = made
    return made


def _make_step(kernel: Callable[..., Any], ins: list[int], outs: list[int], frees: list[int]
               ) -> Step:
    return _step_factory(len(ins), len(outs), len(frees))(kernel, *ins, *outs, *frees)


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _converting(kernel: Callable[..., Any], moves: list[tuple[int, torch.device]]
                ) -> Callable[..., Any]:
    """`kernel` with operands moved first (a per-step host value read by a device op)."""

    def run(*args: Any) -> Any:
        moved = list(args)
        for i, device in moves:
            moved[i] = _move(moved[i], device)
        return kernel(*moved)

    return run


def _with_frees(step: Step, frees: list[int]) -> Step:
    def run(env: list) -> None:
        step(env)
        for f in frees:
            env[f] = None

    return run


def _run_block(steps: Sequence[Step], env: list) -> None:
    step = None
    try:
        for step in steps:
            step(env)
    except Exception as e:
        where = getattr(step, "graphopt_op", None)
        if where is not None and hasattr(e, "add_note"):
            e.add_note(f"in the lowered op {where}")
        raise


# -- the lowerer --------------------------------------------------------------------------------


class _Lowerer:
    """Lowers one program: owns the slots, the template, the constants and the findings."""

    def __init__(self, program: paddle.pir.Program, params: Mapping[str, torch.Tensor],
                 device: torch.device, host_inputs: Sequence[str]) -> None:
        self.program = program
        self.params = params
        self.device = device
        #: whether device values live apart from host ones (moves and copies are real)
        self.split = device.type != "cpu"
        self.placement = value_placement(program, host_inputs)
        self.index = self.placement.index
        self.slots: dict[str, int] = {}
        self.template: list[Any] = [None]  # slot 0 stays None: what a baked operand reads
        self.consts: dict[str, Any] = {}
        self._device_copies: dict[str, int] = {}
        self.feeds: list[tuple[str, int, bool]] = []
        self.outputs: list[int] = []
        self.output_keys: list[str] = [
            self.index.operand_keys(p)[0] for p in self.index.block_ops[()]
            if self.index.ops[p].name() == "builtin.shadow_output"]
        #: weights and feeds: held by the caller, so clearing their slots frees nothing
        self.input_keys: set[str] = {
            k for p in self.index.block_ops[()]
            if self.index.ops[p].name() in ("pd_op.data", "builtin.parameter")
            for k in self.index.result_keys(p)}
        self.sync_points: list[str] = []
        self.transfers: list[str] = []
        self.folded = 0
        self.steps = 0
        self.device_ops = 0
        self.host_ops = 0

    # -- slots ----------------------------------------------------------------------------
    def slot(self, key: str) -> int:
        s = self.slots.get(key)
        if s is None:
            s = self.slots[key] = len(self.template)
            self.template.append(None)
        return s

    def device_copy(self, key: str) -> int:
        """The slot of a device copy of constant `key`, made now, once."""
        if not self.split:
            return self.slot(key)
        s = self._device_copies.get(key)
        if s is None:
            s = self._device_copies[key] = len(self.template)
            self.template.append(_move(self.consts[key], self.device))
        return s

    # -- findings -------------------------------------------------------------------------
    def describe(self, path: OpPath) -> str:
        op = self.index.ops[path]
        where = source_location(op)
        return f"{op.name()} [{path_str(path)}]" + (f" at {where}" if where else "")

    def note_sync(self, path: OpPath, why: str) -> None:
        self.sync_points.append(f"{self.describe(path)}: {why}")

    def note_transfer(self, path: OpPath, why: str) -> None:
        self.transfers.append(f"{self.describe(path)}: {why}")

    def _check_inplace(self, path: OpPath, operands: list[str]) -> None:
        """An in-place op is lowered as a function of its operands: right only when no op
        after it reads what it overwrote."""
        for k in operands:
            later = [p for p in self.index.uses.get(k, []) if p > path]
            if later:
                raise LoweringError(
                    f"{self.describe(path)} writes into {k} in place, and "
                    f"{self.describe(later[0])} reads it afterwards: the lowering computes "
                    "in-place ops as new values, so it cannot run this program")

    def _kernel(self, path: OpPath, fn: Callable[..., Any], info: OpInfo) -> Callable[..., Any]:
        """``fn(info)``; a lowering that fails says which op it was lowering."""
        try:
            return fn(info)
        except Exception as e:
            raise LoweringError(f"lowering {self.describe(path)} failed: "
                                f"{type(e).__name__}: {e}") from e

    # -- blocks ---------------------------------------------------------------------------
    def lower_block(self, bpath: tuple[int, ...]) -> tuple[list[Step], list[str], set[str]]:
        """The steps of the block at `bpath`, the keys its ``cf.yield`` yields, and the keys it
        defines."""
        paths = self.index.block_ops[bpath]
        defined: set[str] = set()
        last_use: dict[str, int] = {}
        yields: list[str] = []
        for j, path in enumerate(paths):
            for p in (path, *self.index.nested(path)):
                for k in self.index.operand_keys(p):
                    last_use[k] = j
            defined.update(self.index.result_keys(path))
            if self.index.ops[path].name() == "cf.yield":
                yields = self.index.operand_keys(path)
        keep = set(yields) | set(self.output_keys)
        frees: dict[int, list[str]] = {}
        for k, j in last_use.items():
            if k in defined and k not in keep:
                frees.setdefault(j, []).append(k)

        steps: list[Step] = []
        for j, path in enumerate(paths):
            op = self.index.ops[path]
            fn = OPS.get(op.name())
            if fn is None:  # lower_program checked the whole program first; kept for lower_block
                raise LoweringError(f"no PyTorch lowering for {self.describe(path)}")
            # constants and weights are held by the template: clearing their slots frees nothing
            free_slots = sorted({self.slots[k] for k in frees.get(j, ())
                                 if k not in self.consts and k in self.slots
                                 and k not in self.input_keys})
            if lowering_flags(fn)[4]:
                step = fn(self, path, op)
                if step is not None and free_slots:
                    step = _with_frees(step, free_slots)
            else:
                step = self._lower_op(path, op, fn, free_slots)
            if step is not None:
                step.graphopt_op = f"{op.name()} [{path_str(path)}]"  # type: ignore[attr-defined]
                steps.append(step)
                self.steps += 1
        return steps, yields, defined

    def _lower_op(self, path: OpPath, op: paddle.pir.Operation, fn: Callable[..., Any],
                  free_slots: list[int]) -> Step | None:
        host_ops, meta_ops, foldable, syncs, _ = lowering_flags(fn)
        operands = self.index.operand_keys(path)
        if op.name().endswith("_"):
            self._check_inplace(path, operands)
        results = self.index.result_keys(path)
        is_host = self.placement.is_host
        on_device = any(not is_host(k) for k in results)
        device = self.device if on_device else _CPU
        consts = {i: self.consts[k] for i, k in enumerate(operands) if k in self.consts}
        info = OpInfo(op, device, consts, location=lambda: source_location(op),
                      on_device=on_device)

        if foldable and len(consts) == len(operands):
            # every operand is known now: compute the op once, keep its results as constants
            kernel = self._kernel(path, fn, info)
            args = [None if i in info.baked else
                    (self.consts[k] if i in host_ops or i in meta_ops else
                     _move(self.consts[k], device)) for i, k in enumerate(operands)]
            try:
                out = kernel(*args)
            except Exception as e:
                raise LoweringError(f"computing the constant {self.describe(path)} failed: "
                                    f"{type(e).__name__}: {e}") from e
            values = list(out) if len(results) > 1 else [out]
            for k, v in zip(results, values, strict=True):
                self.consts[k] = v
                self.template[self.slot(k)] = v
            self.folded += 1
            return None

        kernel = self._kernel(path, fn, info)
        ins: list[int] = []
        moves: list[tuple[int, torch.device]] = []
        for i, k in enumerate(operands):
            if i in info.baked:
                ins.append(0)
                continue
            if i in meta_ops:
                ins.append(self.slot(k))
                continue
            if i in host_ops:
                if not is_host(k):
                    self.note_sync(path, f"operand {i} ({k}) is a device value read on the host")
                ins.append(self.slot(k))
                continue
            if on_device and is_host(k):
                if k in self.consts:
                    ins.append(self.device_copy(k))
                else:
                    self.note_transfer(path, f"operand {i} ({k}) is a per-step host value "
                                             "copied to the device")
                    ins.append(self.slot(k))
                    if self.split:
                        moves.append((i, self.device))
            elif not on_device and not is_host(k):
                self.note_sync(path, f"operand {i} ({k}) is a device value read by a host op")
                ins.append(self.slot(k))
                if self.split:
                    moves.append((i, _CPU))
            else:
                ins.append(self.slot(k))
        if syncs and on_device:
            self.note_sync(path, syncs)
        if moves:
            kernel = _converting(kernel, moves)
        if on_device:
            self.device_ops += 1
        else:
            self.host_ops += 1
        return _make_step(kernel, ins, [self.slot(k) for k in results], free_slots)


# -- structural ops -------------------------------------------------------------------------------


def _param(params: Mapping[str, Any], name: str) -> torch.Tensor:
    value = params[name]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"params[{name!r}] is a {type(value).__name__}, not a torch tensor "
                        "(convert weights once with to_torch(value, device))")
    return value


@lowering("pd_op.data", structural=True, foldable=False)
def _data(lw: _Lowerer, path: OpPath, op: paddle.pir.Operation) -> None:
    name = data_name(op)
    (key,) = lw.index.result_keys(path)
    slot = lw.slot(key)
    has_default = name in lw.params  # `const.<k>`: a model buffer whose value lives with weights
    if has_default:
        lw.template[slot] = _param(lw.params, name)
    lw.feeds.append((name, slot, has_default))


@lowering("builtin.parameter", structural=True, foldable=False)
def _parameter(lw: _Lowerer, path: OpPath, op: paddle.pir.Operation) -> None:
    name = parameter_name(op)
    if name not in lw.params:
        raise KeyError(f"program needs parameter {name!r}, which has no value")
    (key,) = lw.index.result_keys(path)
    lw.template[lw.slot(key)] = _param(lw.params, name)  # shared with the caller: never copied


@lowering("builtin.shadow_output", structural=True, foldable=False)
def _shadow_output(lw: _Lowerer, path: OpPath, op: paddle.pir.Operation) -> None:
    (key,) = lw.index.operand_keys(path)
    lw.outputs.append(lw.slot(key))


@lowering("cf.yield", structural=True, foldable=False)
def _yield(lw: _Lowerer, path: OpPath, op: paddle.pir.Operation) -> None:
    return None  # lower_block reads the yielded keys; the enclosing op moves them


@lowering("pd_op.if", host_operands=(0,), structural=True, foldable=False)
def _if(lw: _Lowerer, path: OpPath, op: paddle.pir.Operation) -> Step:
    (cond_key,) = lw.index.operand_keys(path)
    if not lw.placement.is_host(cond_key):
        lw.note_sync(path, f"the condition ({cond_key}) is a device value read on the host")
    cond = lw.slot(cond_key)
    results = lw.index.result_keys(path)
    branches = []
    for b in (0, 1):
        steps, yields, defined = lw.lower_block((*path, b))
        pairs = []
        for r, y in zip(results, yields, strict=True):
            move = False
            src = lw.slot(y)
            if not lw.placement.is_host(r) and lw.placement.is_host(y):
                if y in lw.consts:
                    src = lw.device_copy(y)
                else:
                    lw.note_transfer(path, f"branch {b} yields a per-step host value ({y}) as "
                                           f"device result {r}")
                    move = lw.split
            pairs.append((lw.slot(r), src, move))
        # what the branch computed and yielded is read once, here: its slots can go
        clear = tuple(sorted({lw.slots[y] for y in yields
                              if y in defined and y not in lw.consts and y in lw.slots}
                             - {lw.slot(r) for r in results}))
        branches.append((tuple(steps), tuple(pairs), clear))
    (t_steps, t_pairs, t_clear), (f_steps, f_pairs, f_clear) = branches
    device = lw.device

    def step(env: list) -> None:
        if env[cond]:
            steps, pairs, clear = t_steps, t_pairs, t_clear
        else:
            steps, pairs, clear = f_steps, f_pairs, f_clear
        _run_block(steps, env)
        for r, s, move in pairs:
            env[r] = env[s].to(device) if move else env[s]
        for s in clear:
            env[s] = None

    return step


# -- the lowered program ------------------------------------------------------------------------


class LoweredProgram:
    """A PIR program lowered to PyTorch (see the module docstring); :meth:`run` it with feeds.

    Outputs may share memory with feeds, weights or constants (a reshape of a feed is a view):
    treat every tensor going in or out as read-only. Not re-entrant: run one step at a time.
    """

    def __init__(self, program: paddle.pir.Program, lw: _Lowerer, steps: list[Step]) -> None:
        self.program = program
        #: names of the program's pd_op.data ops, in program order (ProgramRunner's order)
        self.feed_names: list[str] = [name for name, _, _ in lw.feeds]
        #: feeds the program reads as host (CPU) tensors; every other feed is a device value
        self.host_feeds: list[str] = [name for name, _, _ in lw.feeds
                                      if lw.placement.is_host(name)]
        #: whether each output is a host (CPU) value
        self.output_on_host: list[bool] = [lw.placement.is_host(k) for k in lw.output_keys]
        #: ops that read a device value on the host: each is a synchronisation (and cannot be
        #: captured into a CUDA graph); "op [path] at file:line (function): why"
        self.sync_points: list[str] = list(lw.sync_points)
        #: per-step host values copied to the device on every run (not capturable either)
        self.transfers: list[str] = list(lw.transfers)
        self.device = lw.device
        self._steps = tuple(steps)
        self._template = lw.template
        self._required = tuple((n, s) for n, s, default in lw.feeds if not default)
        self._optional = tuple((n, s) for n, s, default in lw.feeds if default)
        self._outputs = tuple(lw.outputs)
        self._stats = {
            "ops": sum(1 for _ in walk_ops(program.global_block())),
            "steps": lw.steps,
            "device_ops": lw.device_ops,
            "host_ops": lw.host_ops,
            "folded_constants": lw.folded,
            "device_constant_copies": len(lw._device_copies),
            "slots": len(lw.template),
            "sync_points": len(lw.sync_points),
            "transfers": len(lw.transfers),
        }

    def run(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """One run: a tensor per program output, in ``output_values(program)`` order.

        `feeds` holds a tensor per name in :attr:`feed_names` (``const.<k>`` names may be left
        out: their values come from the params); tensors are used as they are, not copied.
        """
        env = self._template.copy()
        try:
            for name, slot in self._required:
                env[slot] = feeds[name]
        except KeyError:
            missing = [n for n, _ in self._required if n not in feeds]
            raise KeyError(f"missing feeds: {', '.join(missing)}") from None
        for name, slot in self._optional:
            value = feeds.get(name)
            if value is not None:
                env[slot] = value
        _run_block(self._steps, env)
        return [env[s] for s in self._outputs]

    __call__ = run

    def stats(self) -> dict[str, int]:
        """Counts: ops of the program, closures run per step (an ``if`` and its taken branch's
        ops count as they are lowered), device and host ops, constants folded at lower time,
        device copies of constants, environment slots, sync points, per-step transfers."""
        return dict(self._stats)


def lower_program(program: paddle.pir.Program, params: Mapping[str, torch.Tensor], *,
                  device: torch.device | str = "cpu", host_inputs: Sequence[str] = (),
                  backend: str = "torch_*") -> LoweredProgram:
    """Lower `program` to PyTorch, once; the result runs it with :meth:`LoweredProgram.run`.

    `params`: ``builtin.parameter`` name -> tensor (already on the right device; shared, not
    copied), and the values of ``const.<k>`` feeds. `device`: where device values live.
    `host_inputs`: feed names whose values are host data (for a ModelProgram:
    :func:`host_inputs_of`; for a segment of a plan: :func:`segment_host_inputs`). `backend`:
    named in the error when an op has no lowering. Raises :class:`LoweringError`, one line
    naming the first op without a lowering and where the model builds it.
    """
    error = lowering_error(program, backend)
    if error is not None:
        raise error
    lw = _Lowerer(program, params, torch.device(device), host_inputs)
    steps, _, _ = lw.lower_block(())
    return LoweredProgram(program, lw, steps)


def lower_op(op: paddle.pir.Operation, *, device: torch.device | str = "cpu",
             consts: Mapping[int, Any] | None = None) -> Callable[..., list[Any]]:
    """The kernel of one op alone, as a function of all its operand values returning the list
    of its results (for checks against Paddle, op by op). `consts`: operand position -> the
    lower-time value of operands to treat as constants (baked into the kernel, as in a
    program); the others are read at run time."""
    fn = OPS.get(op.name())
    if fn is None:
        raise LoweringError(f"no PyTorch lowering for {op.name()}")
    if lowering_flags(fn)[4]:
        raise ValueError(f"{op.name()} is lowered by lower_program itself (control flow, "
                         "feeds, outputs)")
    dev = torch.device(device)
    info = OpInfo(op, dev, dict(consts or {}), location=lambda: source_location(op),
                  on_device=dev.type != "cpu")
    kernel = fn(info)
    baked = frozenset(info.baked)
    multi = op.num_results() > 1

    def run(*operands: Any) -> list[Any]:
        out = kernel(*[None if i in baked else v for i, v in enumerate(operands)])
        return list(out) if multi else [out]

    return run
