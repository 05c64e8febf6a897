"""The runner feeds a program's constants instead of computing them every run.

``hoist_constants`` rewrites the runner's private copy of a program: each ``pd_op.full`` /
``pd_op.full_int_array`` becomes a ``pd_op.data`` input the runner fills once. A constant that
something could write into or hand out stays an op.
"""

from __future__ import annotations

import numpy as np
import paddle

from graphopt.ir.pir_utils import hoist_constants, static_mode
from graphopt.runtime.executor import CONSTANT_FEED_PREFIX, ProgramRunner
from tests.filecheck import filecheck


def _program() -> paddle.pir.Program:
    """x + 2.5 reshaped by a constant shape; scale(3.0 const) + x; an output that IS a
    constant; a constant an explicit in-place op writes into."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main):
            x = paddle.static.data("x", [-1, 4], "float32")
            y = paddle.reshape(x + paddle.full([1], 2.5, "float32"), [2, -1])
            s = paddle.scale(paddle.full([4], 3.0, "float32"), 2.0) + x
            k = paddle.full([2], 7.0, "float32")
            w = paddle.full([4], 1.0, "float32")
            w2 = paddle._pir_ops.scale_(w, 2.0, 0.0, True)
            for value, name in ((y, "y"), (s, "s"), (k, "k"), (w2 + x, "w")):
                paddle._pir_ops.set_persistable_value(value, name)
    return main


def _executor_run(program: paddle.pir.Program, x: np.ndarray) -> list[np.ndarray]:
    outs = [op.operand_source(0) for op in program.global_block().ops
            if op.name() == "builtin.shadow_output"]
    with static_mode(), paddle.static.scope_guard(paddle.static.Scope()):
        return paddle.static.Executor(paddle.CPUPlace()).run(program, feed={"x": x},
                                                              fetch_list=outs)


def test_constants_become_inputs_but_not_outputs_or_inplace_targets():
    program = _program()
    specs = hoist_constants(program, "c.")
    text = str(program)
    filecheck(text, """
        CHECK: (%[[C25:\\d+]]) = "pd_op.data" () {dtype:float32,name:"c.0",place:Place(undefined:0),shape:[1]
        CHECK-NEXT: (%[[SHAPE:\\d+]]) = "pd_op.data" () {dtype:int64,name:"c.1",place:Place(cpu),shape:[2]
        CHECK: (%[[X:\\d+]]) = "pd_op.data" () {dtype:float32,name:"x"
        CHECK-NEXT: (%[[SUM:\\d+]]) = "pd_op.add" (%[[X]], %[[C25]])
        CHECK-NEXT: "pd_op.reshape" (%[[SUM]], %[[SHAPE]])
        CHECK: "pd_op.full" () {{.*}}value:7}
        CHECK: "pd_op.full" () {{.*}}value:1}
        CHECK-NEXT: "pd_op.full" ()
        CHECK-NEXT: "pd_op.scale_"
    """)
    assert [(s.feed_name, s.op_name) for s in specs] == [
        ("c.0", "pd_op.full"), ("c.1", "pd_op.full_int_array"), ("c.2", "pd_op.full"),
        ("c.3", "pd_op.full")]
    assert specs[1].attrs["value"] == [2, -1]


def test_no_constants_no_change():
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main):
            x = paddle.static.data("x", [-1, 4], "float32")
            paddle._pir_ops.set_persistable_value(paddle.nn.functional.relu(x), "y")
    before = str(main)
    assert hoist_constants(main, "c.") == []
    assert str(main) == before


def test_runner_without_fed_constants_keeps_the_ops():
    program = _program()
    runner = ProgramRunner(program, {}, feed_constants=False)
    assert runner._fed_constants == []
    x = np.ones((2, 4), "float32")
    for g, w in zip(runner.run({"x": x}), _executor_run(program, x), strict=True):
        np.testing.assert_array_equal(g.numpy(), w)


def test_runner_with_fed_constants_equals_the_executor_run_after_run():
    program = _program()
    runner = ProgramRunner(program, {})
    # the runner's copy changed (3, not 4: CSE first merged the two scale factors 2.0, and the
    # merged one is also read by the in-place op, so it stays) ...
    assert len(runner._fed_constants) == 3
    assert "pd_op.full_int_array" in str(program)  # ... never the program it was given
    assert CONSTANT_FEED_PREFIX not in str(program)
    fed_before = [t.numpy().copy() for t in runner._fed_constants]
    rng = np.random.default_rng(0)
    for rows in (2, 2, 6):  # a second run with the same shapes, then another shape
        x = rng.standard_normal((rows, 4)).astype("float32")
        got = runner.run({"x": paddle.to_tensor(x)})
        want = _executor_run(program, x)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.numpy(), w)
    # nothing wrote into a fed constant (Paddle's in-place pass leaves program inputs alone)
    for t, before in zip(runner._fed_constants, fed_before, strict=True):
        np.testing.assert_array_equal(t.numpy(), before)


def test_views_of_a_fed_constant_are_not_written_in_place():
    """unsqueeze / reshape of a constant are views; the ops after them are ones Paddle's
    in-place pass rewrites (relu -> relu_, exp -> exp_) when their input is dead."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main):
            x = paddle.static.data("x", [-1, 4], "float32")
            v = paddle.unsqueeze(paddle.full([4], 3.0, "float32"), 0)
            v2 = paddle.reshape(paddle.full([2, 2], 5.0, "float32"), [1, 4])
            paddle._pir_ops.set_persistable_value(paddle.nn.functional.relu(v) * 2.0 + x, "y")
            paddle._pir_ops.set_persistable_value(paddle.exp(v2) + x, "z")
    runner = ProgramRunner(main, {})
    assert len(runner._fed_constants) == 5
    fed_before = [t.numpy().copy() for t in runner._fed_constants]
    x = np.ones((2, 4), "float32")
    want = _executor_run(main, x)
    for _ in range(3):
        for g, w in zip(runner.run({"x": x}), want, strict=True):
            np.testing.assert_array_equal(g.numpy(), w)
    for t, before in zip(runner._fed_constants, fed_before, strict=True):
        np.testing.assert_array_equal(t.numpy(), before)
