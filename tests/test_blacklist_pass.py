"""cudagraph-blacklist-injection: golden lists, the flag, full_cuda_graph=true, negative case."""

from __future__ import annotations

import paddle
import pytest

from graphopt.errors import ConfigError
from graphopt.ir.pir_utils import program_text
from graphopt.passes.cudagraph_blacklist_injection import FLAG, merge_flag
from graphopt.passes.manager import PassManager
from tests import programs


def _run(built, full_cuda_graph=False, **opts):
    mp = programs.model_program(built, blacklist=[])
    mp.properties.add("single-graph")
    mp.full_cuda_graph = full_cuda_graph
    pm = PassManager.from_config(["cudagraph-blacklist-injection"],
                                 {"cudagraph-blacklist-injection": opts} if opts else {})
    (record,) = pm.run(mp)
    return mp, record


def test_golden_control_flow_only():
    built = programs.build_cond_program(hoisted=True)
    before = program_text(built.program)
    mp, record = _run(built, include_host_bound=False)
    assert program_text(mp.program) == before  # the pass only computes the list and the flag
    assert mp.blacklist == ["pd_op.if"] and record.modified
    assert record.stats["control_flow"] == {"pd_op.if": 2}
    assert paddle.get_flags(FLAG)[FLAG] == "pd_op.if"
    assert mp.flags == {FLAG: "pd_op.if"}


def test_host_bound_op_names_are_blacklisted_only_when_every_instance_is_host():
    # Un-hoisted seed program: every slice/cast computes on max_len_tensor_cpu.
    mp, record = _run(programs.build_cond_program(hoisted=False))
    assert record.stats["host_bound"] == ["pd_op.cast", "pd_op.slice"]
    assert mp.blacklist == ["pd_op.cast", "pd_op.if", "pd_op.slice"]
    # Hoisted: nothing host-bound is left in the main program.
    mp, record = _run(programs.build_cond_program(hoisted=True))
    assert record.stats["host_bound"] == [] and mp.blacklist == ["pd_op.if"]


def test_flag_is_merged_sorted_and_idempotent():
    paddle.set_flags({FLAG: "pd_op.zzz,pd_op.all_reduce"})
    _run(programs.build_cond_program(hoisted=True), splitting_ops=["pd_op.foo"])
    value = paddle.get_flags(FLAG)[FLAG]
    assert value == "pd_op.all_reduce,pd_op.foo,pd_op.if,pd_op.zzz"
    _run(programs.build_cond_program(hoisted=True), splitting_ops=["pd_op.foo"])
    assert paddle.get_flags(FLAG)[FLAG] == value
    assert merge_flag(" a, ,b,a", ["c", "a"]) == "a,b,c"


def test_a_later_model_does_not_inherit_an_earlier_models_entries():
    """Two models optimized in one process (a sweep's jobs): the user's entries stay, the
    first model's own entries do not leak into the second model's flag."""
    paddle.set_flags({FLAG: "pd_op.user_op"})
    _run(programs.build_cond_program(hoisted=True), splitting_ops=["pd_op.first_only"])
    assert paddle.get_flags(FLAG)[FLAG] == "pd_op.first_only,pd_op.if,pd_op.user_op"
    mp, _ = _run(programs.build_cond_program(hoisted=True), splitting_ops=["pd_op.second"])
    assert paddle.get_flags(FLAG)[FLAG] == "pd_op.if,pd_op.second,pd_op.user_op"
    assert mp.flags == {FLAG: "pd_op.if,pd_op.second,pd_op.user_op"}


def test_full_cuda_graph_with_control_flow_is_one_clear_error():
    built = programs.build_cond_program(hoisted=True)
    before = program_text(built.program)
    with pytest.raises(ConfigError) as e:
        _run(built, full_cuda_graph=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "pd_op.if x2" in msg and "full_cuda_graph=false" in msg
    assert "cudagraph-blacklist-injection" in msg
    assert program_text(built.program) == before
    assert paddle.get_flags(FLAG)[FLAG] == ""  # nothing set on failure


def test_negative_no_control_flow():
    mp, record = _run(programs.build_plain_program())
    assert mp.blacklist == [] and not record.modified
    assert record.stats["control_flow"] == {}
    # full graph is fine when there is nothing to blacklist
    mp, record = _run(programs.build_plain_program(), full_cuda_graph=True)
    assert mp.blacklist == []
