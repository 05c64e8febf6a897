"""Run a PIR program outside SOT, through Paddle's ``run_program`` op (the path SOT itself uses).

A :class:`ProgramRunner` is a program plus its weights, bound once: the program is split into a
forward program (``paddle.jit``'s ``RunnableProgram``), its attributes are built once, and each
run is one ``run_program`` call with tensors in and tensors out. No numpy round trip, no
stringified program per run (``Executor.run`` keys its cache by ``str(program)``).
The program's constants (``pd_op.full``, ``pd_op.full_int_array``) are made once and fed by
reference (:func:`~graphopt.ir.pir_utils.hoist_constants`; ``feed_constants=False`` keeps them
as ops): computed in the program, each allocates and fills a tensor on every run, and a segment
plan holds several times the constants of the whole program.

Per-step inputs are passed every run as the tensors the step holds at that moment, never bound
at trace time: a program holding a tensor by reference would miss a replaced tensor.

Two things about ``run_program`` that the runner takes care of:

* the compiled interpreter is cached process-wide under the runner's ``program_id``. Paddle's own
  layer derives that id from ``id()`` of Python objects, which a later object can reuse once the
  first is freed; a reused id would run the *old* program. Each runner takes a fresh id from a
  counter instead.
* the cache keeps every interpreter until :func:`release_interpreters` empties it, so a phase that
  is done with its runners (verification, say) calls that to give the memory back.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import paddle
from paddle import _C_ops
from paddle.base import core
from paddle.jit.dy2static.pir_partial_program import RunnableProgram, apply_general_passes
from paddle.jit.dy2static.utils import CUDAGraphState

from graphopt.errors import PassError
from graphopt.ir.pir_utils import (
    INTERFACE_OPS,
    NON_COMPUTE_OPS,
    ConstantSpec,
    data_ops,
    hoist_constants,
    op_count,
    output_values,
    release_native_memory,
    static_mode,
)
from graphopt.ir.program_index import OpPath, ProgramIndex
from graphopt.passes.analysis.liveness import range_liveness
from graphopt.passes.piecewise_split import extract_segment_program

#: a tensor, or anything paddle.to_tensor takes (numpy arrays in tests and tools)
TensorLike = Any

# Ids of the interpreters this process compiles; far from the hash-of-ids values Paddle's own
# layers use, so the two never meet in the shared interpreter cache.
_PROGRAM_IDS = itertools.count(random.randrange(1 << 60, 1 << 61))
#: names of the inputs a runner feeds its program's constants through (see hoist_constants)
CONSTANT_FEED_PREFIX = "graphopt.constant."
_PLACE_KINDS = ("cpu", "gpu", "xpu", "custom", "ipu", "cuda_pinned", "xpu_pinned")
_NO_CUDA_GRAPH = {"cuda_graph_state": CUDAGraphState.DISABLE, "cuda_graph_dispatch_key": 0}


def as_tensor(value: TensorLike) -> paddle.Tensor:
    """`value` as a CPU tensor: tensors as they are, anything else converted (one copy)."""
    if isinstance(value, paddle.Tensor):
        return value
    return paddle.to_tensor(np.asarray(value), place=paddle.CPUPlace())


def tensor_params(params: Mapping[str, TensorLike]) -> dict[str, paddle.Tensor]:
    """Weights as tensors that need no gradient (shared with the originals, no copy for
    tensors), converted once so every runner of a program set shares them."""
    out = {}
    for name, value in params.items():
        t = as_tensor(value)
        out[name] = t if t.stop_gradient else t.detach()
    return out


def make_constant(spec: ConstantSpec) -> paddle.Tensor:
    """The tensor the constant op `spec` describes, made by the op's own kernel (same dtype,
    same place; an undefined place is the expected one, as in the program)."""
    a = spec.attrs
    place = a["place"]
    if not any(getattr(place, f"is_{kind}_place")() for kind in _PLACE_KINDS):
        place = paddle.framework._current_expected_place()
    if spec.op_name == "pd_op.full":
        return _C_ops.full(a["shape"], a["value"], a["dtype"], place)
    if spec.op_name == "pd_op.full_int_array":
        return _C_ops.full_int_array(a["value"], a["dtype"], place)
    raise ValueError(f"not a constant op: {spec.op_name}")


def release_interpreters() -> None:
    """Drop every interpreter ``run_program`` has cached in this process (they rebuild on the
    next run of a live runner); call it when a phase is done with its runners."""
    release_native_memory()


class ProgramRunner:
    """A program + its weights, ready to run many times with different inputs.

    ``run(feeds)`` takes tensors (or arrays) by feed name and returns one tensor per fetched
    value. ``run_list(inputs)`` is the hot path: inputs in :attr:`feed_names` order.
    """

    def __init__(
        self,
        program: paddle.pir.Program,
        params: Mapping[str, TensorLike],
        fetch: Sequence[paddle.pir.Value] | None = None,
        *,
        feed_constants: bool = True,
    ) -> None:
        self.program = program
        fetch = list(fetch) if fetch is not None else output_values(program)
        self.feed_names = list(data_ops(program))
        needed = [op.attrs()["parameter_name"] for op in program.global_block().ops
                  if op.name() == "builtin.parameter"]
        missing = sorted(set(needed) - set(params))
        if missing:
            raise KeyError(f"program needs parameters with no value: {', '.join(missing[:8])}")
        self.params = [as_tensor(params[n]) for n in needed]
        self.params = [t if t.stop_gradient else t.detach() for t in self.params]
        # `const.*` feeds: tensors the model holds that are not parameters (see ir.trace).
        self.constants = {n: as_tensor(params[n]) for n in self.feed_names if n in params}
        # a value fetched twice is one output of run_program: map positions back
        unique: list[paddle.pir.Value] = []
        self._fetch_index = []
        for v in fetch:
            pos = next((i for i, u in enumerate(unique) if u.is_same(v)), None)
            if pos is None:
                pos = len(unique)
                unique.append(v)
            self._fetch_index.append(pos)
        self._identity = self._fetch_index == list(range(len(unique)))
        inputs = [op.result(0) for op in data_ops(program).values()]
        param_values = [op.result(0) for op in program.global_block().ops
                        if op.name() == "builtin.parameter"]
        with static_mode():
            runnable = RunnableProgram(program, (inputs, param_values, unique),
                                       [True] * len(unique))
            forward = runnable.forward_program
            runnable.program_name_attr  # noqa: B018 (names taken before the pass, as Paddle does)
            # what SOT's runner does to the programs it runs (numerics unchanged)
            apply_general_passes(forward, enable_cse=True, enable_delete_assert_op=False)
            # made once here, fed by reference every run (fx: the input names, in x order)
            specs = (hoist_constants(forward, CONSTANT_FEED_PREFIX) if feed_constants
                     else [])
            runnable.program_name_attr["fx"].extend(s.feed_name for s in specs)
            self._attrs = core.construct_program_attribute_map({
                "forward_program": forward,
                "backward_program": runnable.backward_program,
                "is_test": True,
                "program_id": next(_PROGRAM_IDS),
                "in_sot_mode": True,
            } | runnable.program_attr)
        self._fed_constants = [make_constant(s) for s in specs]
        self._scope: core.Scope | None = None

    def run(self, feeds: Mapping[str, TensorLike]) -> list[paddle.Tensor]:
        """Run once; `feeds` must hold every pd_op.data name of the program but ``const.*``."""
        inputs = []
        missing = []
        for n in self.feed_names:
            v = feeds.get(n)
            if v is None:
                v = self.constants.get(n)
                if v is None:
                    missing.append(n)
                    continue
            inputs.append(as_tensor(v))
        if missing:
            raise KeyError(f"missing feeds: {', '.join(missing)}")
        return self.run_list(inputs)

    def run_list(self, inputs: list[paddle.Tensor]) -> list[paddle.Tensor]:
        """Run once with tensors in :attr:`feed_names` order."""
        if self._scope is None or not self._scope._can_reused:  # held by an earlier run
            self._scope = core.Scope()
        # no autograd bookkeeping: weights are detached and outputs are marked stop_gradient
        if self._fed_constants:
            inputs = inputs + self._fed_constants
        outs = _C_ops.run_program(inputs or None, self.params or None, [self._scope],
                                  self._attrs, _NO_CUDA_GRAPH)
        if self._identity:
            return list(outs)
        return [outs[i] for i in self._fetch_index]


#: the most compute ops one interpreter of a :class:`RunnerPool` holds; a longer program runs
#: as consecutive interpreters (see RunnerPool)
MAX_INTERPRETER_OPS = 2048


class RunnerPool:
    """One runner per program, shared by every step executor given the pool, so a program's
    interpreter is built once however many checks run it (numerics, replay, benchmarks).
    Weights are converted to tensors once for all of them.

    A program of more than `max_interpreter_ops` compute ops (a 61-layer full graph: 12-13k)
    runs as consecutive interpreters of at most that many ops each (:class:`_ChunkedRunner`),
    with the same results, bit for bit. Building one Paddle interpreter costs time and memory
    quadratic in its op count (its dependency analysis keeps every op's transitive
    predecessors and successors, for the program and again for two copies of it to place
    events): a 13k-op variant took 33 s and 3.2 GB at its peak on CPU, its seven 2k-op
    pieces 5 s and 0.26 GB. ``None``: every program is one interpreter.
    """

    def __init__(self, params: Mapping[str, TensorLike], *, feed_constants: bool = True,
                 max_interpreter_ops: int | None = MAX_INTERPRETER_OPS) -> None:
        self.params = tensor_params(params)
        self.feed_constants = feed_constants
        self.max_interpreter_ops = max_interpreter_ops
        self._runners: dict[int, tuple[paddle.pir.Program, Any]] = {}
        self._memo: dict[Any, Any] = {}

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per pool and `key`: what every backend over this pool
        shares (a torch backend's copy of the weights on its device, say)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def get(self, program: paddle.pir.Program) -> ProgramRunner | _ChunkedRunner:
        """The runner of `program` (made on first use; keyed by the program object)."""
        hit = self._runners.get(id(program))
        if hit is not None and hit[0] is program:
            return hit[1]
        runner = None
        if (self.max_interpreter_ops is not None
                and op_count(program) > self.max_interpreter_ops):
            runner = _ChunkedRunner.build(program, self.params, self.max_interpreter_ops,
                                          feed_constants=self.feed_constants)
        if runner is None:
            runner = ProgramRunner(program, self.params, feed_constants=self.feed_constants)
        self._runners[id(program)] = (program, runner)
        return runner

    def __len__(self) -> int:
        return len(self._runners)

    def clear(self) -> None:
        """Forget every runner (their interpreters go with :func:`release_interpreters`)."""
        self._runners.clear()


class _ChunkedRunner:
    """A long program run as consecutive pieces, each a :class:`ProgramRunner` of its own
    (RunnerPool's, for programs over ``max_interpreter_ops``).

    The global block's ops are cut, in program order, into runs of about `max_ops` compute ops
    (an op with nested blocks goes whole into one run). Each run becomes a standalone program
    exactly as a piecewise segment does (:func:`extract_segment_program`: its live-ins are
    data ops, its live-outs outputs, weights its own parameter ops). A step runs the pieces
    in order, each fed the program's feeds and the values earlier pieces computed, so every
    op runs the same kernel on the same inputs as in the whole program.
    """

    def __init__(self, program: paddle.pir.Program, feed_names: list[str],
                 constants: dict[str, paddle.Tensor], params: Mapping[str, paddle.Tensor],
                 pieces: list[tuple[ProgramRunner, list[str], list[str]]],
                 outputs: list[str]) -> None:
        self.program = program
        self.feed_names = feed_names
        self.constants = constants
        self.params = params
        #: (runner, value keys in its feed order, value keys of its outputs)
        self.pieces = pieces
        self.outputs = outputs
        # values no later piece (nor the result) reads: dropped once their last reader ran
        last: dict[str, int] = {}
        for i, (_, ins, _) in enumerate(pieces):
            for key in ins:
                last[key] = i
        keep = set(outputs)
        self._drop: list[list[str]] = [[] for _ in pieces]
        for key, i in last.items():
            if key not in keep:
                self._drop[i].append(key)

    @classmethod
    def build(cls, program: paddle.pir.Program, params: Mapping[str, paddle.Tensor],
              max_ops: int, *, feed_constants: bool = True) -> _ChunkedRunner | None:
        """The pieces of `program`; None when it does not cut into two or more (one op holds
        most of it, or a non-tensor value would cross a cut): run it whole then."""
        index = ProgramIndex(program)
        runs: list[list[OpPath]] = []
        run: list[OpPath] = []
        n = 0
        for path in index.block_ops[()]:
            op = index.ops[path]
            if op.name() in INTERFACE_OPS:
                continue  # feeds, weights, outputs: every piece makes its own
            run.append(path)
            n += sum(1 for p in index.with_nested([path])
                     if index.ops[p].name() not in NON_COMPUTE_OPS)
            # never cut right after an op whose result is not a dense tensor (a
            # builtin.combine's vector goes to the op right after it)
            if n >= max_ops and all(v.is_dense_tensor_type() for v in op.results()):
                runs.append(run)
                run, n = [], 0
        if run:
            runs.append(run)
        if len(runs) < 2:
            return None
        pieces = []
        for i, ops in enumerate(runs):
            live = range_liveness(index, ops)
            try:
                piece, _ = extract_segment_program(index, ops, live.live_in, live.live_out,
                                                   prefix=f"piece{i}")
            except PassError:  # a value that is not a dense tensor crosses the cut
                return None
            runner = ProgramRunner(piece, params, feed_constants=feed_constants)
            by_name = {f"piece{i}.in{k}": key for k, key in enumerate(live.live_in)}
            pieces.append((runner, [by_name[name] for name in runner.feed_names],
                           list(live.live_out)))
        feed_names = list(data_ops(program))
        constants = {n: as_tensor(params[n]) for n in feed_names if n in params}
        outputs = [index.key(v) for v in output_values(program)]
        return cls(program, feed_names, constants, params, pieces, outputs)

    def run(self, feeds: Mapping[str, TensorLike]) -> list[paddle.Tensor]:
        """Run once; `feeds` as :meth:`ProgramRunner.run` takes them."""
        missing = [n for n in self.feed_names
                   if feeds.get(n) is None and n not in self.constants]
        if missing:
            raise KeyError(f"missing feeds: {', '.join(missing)}")
        return self.run_list([feeds[n] if feeds.get(n) is not None else self.constants[n]
                              for n in self.feed_names])

    def run_list(self, inputs: list[TensorLike]) -> list[paddle.Tensor]:
        """Run once with inputs in :attr:`feed_names` order."""
        env: dict[str, Any] = dict(zip(self.feed_names, inputs, strict=True))
        for (runner, ins, outs), drop in zip(self.pieces, self._drop, strict=True):
            results = runner.run_list([as_tensor(env[k]) for k in ins])
            env.update(zip(outs, results, strict=True))
            for key in drop:
                env.pop(key, None)
        return [as_tensor(env[k]) if k in env else self.params[k.removeprefix("param:")]
                for k in self.outputs]
