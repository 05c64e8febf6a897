"""Tracing without running: a marked step's graph is built, not executed, and the result is the
same program; a step that still breaks is traced again with real runs, since Python then runs
on the graph's values. Also the per-trace shortcuts into dy2static/SOT internals."""

from __future__ import annotations

import contextlib
import re
import traceback
import types
from dataclasses import dataclass

import numpy as np
import paddle
import pytest
from paddle.jit import marker
from paddle.jit.dy2static import program_translator

from graphopt.ir import trace
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.trace import _block_op_count, trace_step
from graphopt.models.base import ModelBundle, StepBatch


@dataclass
class Meta:
    scale: paddle.Tensor


class Branchy(paddle.nn.Layer):
    """Two identical blocks, each with a Tensor `if` whose branch decides the result."""

    def __init__(self):
        super().__init__()
        self.blocks = paddle.nn.LayerList([Block(), Block()])

    def forward(self, x, meta):
        for b in self.blocks:
            x = b(x) * meta.scale
        return (x,)


class Block(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.l = paddle.nn.Linear(4, 4)

    def forward(self, x):
        y = self.l(x)
        if y.sum() > 0:  # a data-dependent branch: breaks the graph unless marked
            return y * 2.0
        return y - 100.0


def _step(layer):
    paddle.seed(0)
    meta = Meta(scale=paddle.to_tensor([1.5]))
    batch = StepBatch("prefill", (paddle.rand([2, 4]),), meta, [2], [0])
    return ModelProgram(model=ModelBundle("branchy", layer, meta, (), (), None, None, None,
                                          None)), batch


def _trace(layer, optimistic):
    mp, batch = _step(layer)
    with paddle.no_grad():
        outs = trace_step(mp, batch, optimistic=optimistic)
        want = layer(*batch.args, batch.meta)[0].numpy()
    return mp, outs, want


def _text(program) -> str:
    """The program's text without the layer-call names, numbered anew by each trace."""
    return re.sub(r',?struct_name:"[^"]*"', "", str(program))


def _marked():
    layer = Branchy()
    f = _ORIGINAL_FORWARD  # a copy is marked: the marker flags the function object itself
    Block.forward = marker.capture_control_flow(
        types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__))
    return layer


_ORIGINAL_FORWARD = Block.forward
_EXTRACT_STACK = traceback.extract_stack


def teardown_function():
    Block.forward = _ORIGINAL_FORWARD


def test_a_marked_step_is_built_not_run_and_is_the_same_program():
    layer = _marked()
    real, real_outs, want = _trace(layer, optimistic=False)
    built, built_outs, _ = _trace(layer, optimistic=True)
    assert "single-graph" in built.properties
    assert (real.trace.placeholder_runs, built.trace.placeholder_runs) == (0, 1)
    assert not built.trace.retraced and len(built.traces) == 1
    assert _text(built.program) == _text(real.program)
    assert real.trace.ops == built.trace.ops
    np.testing.assert_allclose(real_outs[0].numpy(), want, rtol=1e-6)
    # what came back was never computed: zeros of the output's shape
    assert built_outs[0].shape == real_outs[0].shape
    assert not built_outs[0].numpy().any()


def test_a_step_that_still_breaks_is_traced_again_with_real_runs():
    layer = Branchy()
    mp, outs, want = _trace(layer, optimistic=True)
    assert mp.trace.graph_breaks and "single-graph" not in mp.properties
    # one record, the real trace's; its time includes the attempt that was thrown away
    assert len(mp.traces) == 1 and mp.trace.retraced
    assert mp.trace.placeholder_runs == 0 and mp.trace.wall_s >= mp.trace.time_s
    # Python ran on real values after each break: the branches the data chose, as eager
    np.testing.assert_allclose(outs[0].numpy(), want, rtol=1e-6)
    real, _, _ = _trace(layer, optimistic=False)
    assert len(real.trace.graph_breaks) == len(mp.trace.graph_breaks)
    assert real.trace.subgraphs == mp.trace.subgraphs


class TopLevelBranch(paddle.nn.Layer):
    """A Tensor `if` in the traced function itself: SOT splits the step there, no inlined call
    breaks, so the optimistic attempt notices only when a second graph runs."""

    def __init__(self):
        super().__init__()
        self.a = paddle.nn.Linear(4, 4)
        self.b = paddle.nn.Linear(4, 4)

    def forward(self, x, meta):
        y = self.a(x)
        if y.sum() > 0:
            y = y * 2.0
        return (self.b(y) * meta.scale,)


@pytest.mark.parametrize("layer, stopped_by", [(Branchy, "_SnapshotNeeded"),
                                               (TopLevelBranch, "_NotOneGraph")])
def test_the_optimistic_attempt_stops_at_the_first_sign_of_a_break(layer, stopped_by,
                                                                    monkeypatch):
    attempts = []
    original = trace._trace_once

    def recording(mp, batch, *, optimistic):
        try:
            return original(mp, batch, optimistic=optimistic)
        except Exception as e:
            chain = []  # SOT wraps what it did not raise itself
            while e is not None:
                chain.append(type(e).__name__)
                e = e.__cause__ or e.__context__
            attempts.append((optimistic, chain))
            raise
        finally:
            attempts.append((optimistic, "ran"))

    monkeypatch.setattr(trace, "_trace_once", recording)
    mp, outs, want = _trace(layer(), optimistic=True)
    # the attempt raised where the break showed; the normal trace then ran to the end
    assert attempts[0][0] is True and stopped_by in attempts[0][1]
    assert attempts[-1] == (False, "ran")
    assert mp.trace.retraced and mp.trace.graph_breaks
    np.testing.assert_allclose(outs[0].numpy(), want, rtol=1e-6)


class LazyCache(paddle.nn.Layer):
    """Builds a table on its first call and keeps it: the graph's output is stored on the layer."""

    def __init__(self):
        super().__init__()
        self.l = paddle.nn.Linear(4, 4)
        self.table = None

    def forward(self, x, meta):
        if self.table is None:
            self.table = self.l.weight * 3.0
        return (paddle.matmul(x, self.table) * meta.scale,)


class WritesMeta(paddle.nn.Layer):
    """Writes its result into a tensor of the forward meta, in place (a cache write)."""

    def __init__(self):
        super().__init__()
        self.l = paddle.nn.Linear(4, 4)

    def forward(self, x, meta):
        y = self.l(x)
        paddle.assign(y.sum(axis=0, keepdim=True)[0, :1], output=meta.scale)
        return (y,)


def test_a_graph_whose_output_is_stored_on_the_model_is_run_for_real():
    """Zeros must never be stored where the model keeps them: a lazily built table would stay
    zeros, and eager and the optimized step would agree on the wrong answer."""
    layer = LazyCache()
    mp, batch = _step(layer)
    with paddle.no_grad():
        trace_step(mp, batch)
    assert mp.trace.retraced and mp.trace.placeholder_runs == 0
    np.testing.assert_allclose(layer.table.numpy(), layer.l.weight.numpy() * 3.0)


def test_an_in_place_write_in_the_graph_is_built_not_done():
    """An in-place write into a tensor the step was given is part of the program (run_program
    writes through the input's memory); a graph that is built, not run, leaves the input as it
    was rather than writing zeros into it."""
    layer = WritesMeta()
    mp, batch = _step(layer)
    before = batch.meta.scale.numpy().copy()
    with paddle.no_grad():
        trace_step(mp, batch)
    assert not mp.trace.retraced and mp.trace.placeholder_runs == 1
    np.testing.assert_array_equal(batch.meta.scale.numpy(), before)
    assert "assign_out_" in str(mp.program)


def test_a_marked_method_is_converted_once_per_trace_not_once_per_call(monkeypatch):
    converted = []
    original = program_translator.FunctionCache._convert

    def counting(self, func):
        converted.append(getattr(func, "__func__", func))
        return original(self, func)

    monkeypatch.setattr(program_translator.FunctionCache, "_convert", counting)
    mp, _, _ = _trace(_marked(), optimistic=True)
    assert "single-graph" in mp.properties
    # two blocks call the marked forward: dy2static alone converts it once per call
    assert sum(f is Block.forward for f in converted) == 1
    # the shortcut is gone after the trace
    assert "convert_with_cache" not in vars(program_translator._FUNCTION_CACHE)


def _callstacks(program):
    out = []

    def walk(block):
        for op in block.ops:
            out.append((op.name(), tuple(op.attrs().get("op_callstack") or ())))
            for b in op.blocks():
                walk(b)

    walk(program.global_block())
    return out


def test_remembered_stack_frames_give_paddle_the_same_op_callstacks(monkeypatch):
    layer = _marked()
    traced = []
    for remembered in (True, False):  # one call site: the test's own frames are the same
        if not remembered:
            monkeypatch.setattr(trace, "_remembered_stack_frames", contextlib.nullcontext)
        traced.append(_trace(layer, optimistic=True)[0])
    stacks = _callstacks(traced[0].program)
    assert stacks == _callstacks(traced[1].program)
    # the user's own frames are there (graphopt reads them for locations)
    assert any("test_trace_placeholders.py" in line for _, s in stacks for line in s)
    # outside a trace the standard library's own function is back
    assert traceback.extract_stack is _EXTRACT_STACK


def test_the_op_count_sot_asks_for_is_the_block_length():
    paddle.enable_static()
    try:
        main = paddle.static.Program()
        with paddle.static.program_guard(main):
            x = paddle.static.data("x", [2, 2])
            for _ in range(5):
                x = x + 1
            assert _block_op_count() == len(main.global_block().ops) > 5
    finally:
        paddle.disable_static()
