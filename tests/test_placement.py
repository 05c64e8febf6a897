"""Placement analysis and replay hazards on hand-built, seed-shaped programs."""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

import paddle
import pytest

from graphopt.ir.pir_utils import add_output, static_mode
from graphopt.passes.analysis.liveness import ProgramIndex, range_liveness
from graphopt.passes.analysis.placement import (
    Placement,
    analyze_placement,
    combine,
    find_hazards,
    is_capturable,
)
from tests import programs as P

D, HC, HR = Placement.DEVICE, Placement.HOST_CONST, Placement.HOST_RUNTIME


@pytest.fixture(scope="module")
def seed():
    return P.build_cond_program(hoisted=False)


@pytest.fixture(scope="module")
def hoisted():
    return P.build_cond_program(hoisted=True)


def _by_name(result, name: str) -> list[Placement]:
    """Placements of every result of the ops called `name`, in program order."""
    idx = result.index
    return [result.by_key[k] for p, op in idx.ops.items() if op.name() == name
            for k in idx.result_keys(p)]


def test_combine_rule():
    assert combine([HR, HC]) is HR
    assert combine([HC, HC]) is HC
    assert combine([HR, D]) is D
    assert combine([]) is D


def test_seed_chain_classes(seed):
    res = analyze_placement(seed.program, seed.host_inputs)
    assert res.of("meta.max_len_tensor_cpu") is HR
    assert res.of("arg.0") is D and res.of("meta.caches.0") is D
    assert res.of("param:w1") is D
    # slice(max_len, 1:2) -> cast(bool): host work from a runtime host input
    assert res.of("pd_op.slice@9#0") is HR
    assert res.of("pd_op.cast@10#0") is HR
    assert _by_name(res, "pd_op.full_int_array") == [HC] * 4
    assert _by_name(res, "pd_op.full") == [HC] * 3
    assert set(_by_name(res, "pd_op.matmul")) == {D}
    # the if's result combines the host condition with device branch values -> device
    assert _by_name(res, "pd_op.if") == [D, D]
    assert res.counts() == {"device": 15, "host_const": 7, "host_runtime": 5}
    assert res.sources["pd_op.cast@10#0"] == ("meta.max_len_tensor_cpu",)


def test_bare_field_name_and_value_lookup(seed):
    res = analyze_placement(seed.program, ["max_len_tensor_cpu"])
    idx = res.index
    assert res.of(idx.values["pd_op.cast@15#0"]) is HR


def test_hoisted_program_has_no_host_runtime_values(hoisted):
    res = analyze_placement(hoisted.program, hoisted.host_inputs)
    assert res.keys(HR) == []


def _host_work_in_branch() -> paddle.pir.Program:
    """A captured-piecewise branch that computes host work from max_len (a nested hazard), and
    an if whose branches yield host values only (its result is host-runtime)."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main, paddle.static.Program()):
            x = paddle.static.data("arg.0", [-1, 8], "float32")
            max_len = paddle.static.data(P.HOST_INPUT, [3], "int32")
            flag = paddle.static.data("hoisted.0", [1], "bool")
            y = paddle.static.nn.cond(flag, lambda: x * paddle.cast(max_len[0:1], "float32"),
                                      lambda: x)
            m = paddle.static.nn.cond(flag, lambda: max_len + 1, lambda: max_len)
        add_output(main, y, "logits")
        add_output(main, m, "m")
    return main


def test_nested_host_values_and_hazards():
    prog = _host_work_in_branch()
    res = analyze_placement(prog, [P.HOST_INPUT])
    idx = res.index
    first_if, second_if = [p for p, op in idx.ops.items() if op.name() == "pd_op.if"]
    # y: device (x is device); m: both branches yield host-runtime values -> host-runtime
    assert res.op_placement(first_if) == [D]
    assert res.op_placement(second_if) == [HR]
    hazards = find_hazards(prog, [P.HOST_INPUT], ["pd_op.if"])
    names = [h.op_name for h in hazards]
    # slice + cast inside the first if's true branch, the scale (+1) in the second's true branch
    assert names == ["pd_op.slice", "pd_op.cast", "pd_op.scale"]
    assert all(len(h.index_path) == 3 for h in hazards)
    assert hazards[0].index_path[:2] == (first_if[0], 0)


def test_hazards_before_and_after_hoisting(seed, hoisted):
    before = find_hazards(seed.program, seed.host_inputs, ["pd_op.if"])
    assert [(h.op_name, h.index_path) for h in before] == [
        ("pd_op.slice", (9,)), ("pd_op.cast", (10,)), ("pd_op.slice", (14,)), ("pd_op.cast", (15,))
    ]
    for h in before:
        assert h.location is not None and h.location.startswith("tests/programs.py:")
        assert "_host_cond" in h.location
        assert "meta.max_len_tensor_cpu" in h.value_desc
        assert h.to_dict()["index_path"] == list(h.index_path)
    assert "pd_op.slice [9]" in str(before[0])
    assert find_hazards(hoisted.program, hoisted.host_inputs, ["pd_op.if"]) == []


def test_blacklisted_host_ops_are_not_hazards(seed):
    # an op that is never captured cannot freeze anything
    assert find_hazards(seed.program, seed.host_inputs,
                        ["pd_op.if", "pd_op.slice", "pd_op.cast"]) == []
    assert not is_capturable("pd_op.data", [])
    assert not is_capturable("pd_op.if", ["pd_op.if"])
    assert is_capturable("pd_op.matmul", ["pd_op.if"])


def test_program_without_host_inputs_has_no_hazards():
    plain = P.build_plain_program()
    assert find_hazards(plain.program, [], []) == []
    assert analyze_placement(plain.program, []).keys(HR) == []


def test_index_keys_and_liveness(seed):
    idx = ProgramIndex(seed.program)
    assert idx.key(idx.ops[(10,)].result(0)) == "pd_op.cast@10#0"
    assert idx.path(idx.ops[(11, 0, 1)]) == (11, 0, 1)
    assert [idx.ops[p].name() for p in idx.nested((11,))] == [
        "pd_op.matmul", "pd_op.relu", "cf.yield", "cf.yield"]
    # the first if, as a range: reads its cond and the scaled input (inside its branches)
    live = range_liveness(idx, [(11,)])
    assert live.live_in == ["pd_op.cast@10#0", "pd_op.scale@6#0"]
    assert live.live_out == ["pd_op.if@11#0"]
    # the relu inside the branch is yielded: live-out of the branch run
    live = range_liveness(idx, [(11, 0, 0), (11, 0, 1)])
    assert live.live_in == ["pd_op.scale@6#0"]
    assert live.live_out == ["pd_op.relu@11/0/1#0"]
