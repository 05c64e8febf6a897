"""Helpers over Paddle's PIR API that must build what Paddle's own calls build."""

from __future__ import annotations

import paddle

from graphopt.ir.pir_utils import add_data_ops, static_mode


def _program() -> paddle.pir.Program:
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main):
            x = paddle.static.data("x", [-1, 4], "float32")
            paddle._pir_ops.set_persistable_value(paddle.nn.functional.relu(x), "y")
    return main


def test_add_data_ops_builds_what_paddle_static_data_builds():
    ours, theirs = _program(), _program()
    specs = [("a", [2, 3], paddle.float32), ("b", [-1], "int64"), ("c", [1], paddle.bool)]
    values = add_data_ops(ours, specs)
    with static_mode(), paddle.static.program_guard(theirs):
        for name, shape, dtype in specs:
            paddle.static.data(name, shape, dtype)
    assert str(ours) == str(theirs)
    assert [v.get_defining_op().attrs()["name"] for v in values] == ["a", "b", "c"]


def test_add_data_ops_on_an_empty_program():
    with static_mode():
        empty = paddle.static.Program()
    (value,) = add_data_ops(empty, [("a", [1], paddle.float32)])
    assert [op.name() for op in empty.global_block().ops] == ["pd_op.data"]
    assert value.shape == [1]
