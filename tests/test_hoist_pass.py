"""hoist-host-branch-conditions: golden IR, numerics, negative case."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from graphopt.ir.pir_utils import data_name, op_sequence, program_text, remove_dead_ops
from graphopt.passes.analysis.placement import hazards_of
from graphopt.passes.manager import PassManager
from tests import programs
from tests.filecheck import filecheck
from tests.programs import run_program

PATTERNS = ([6, 6, 0], [6, 0, 1], [6, 3, 1], [6, 0, 0])


def _hoist(built, **opts):
    mp = programs.model_program(built, blacklist=[])
    mp.properties.add("single-graph")
    pm = PassManager.from_config(["hoist-host-branch-conditions"],
                                 {"hoist-host-branch-conditions": opts} if opts else {})
    (record,) = pm.run(mp)
    return mp, record


def test_golden_seed_chain_moves_to_prologue():
    mp, record = _hoist(programs.build_cond_program(hoisted=False))
    assert record.modified
    assert record.stats["hazards_before"] == 4 and record.stats["hazards_after"] == 0
    main = op_sequence(mp.program)
    # CHECK-NOT: the host chain is gone from the main program ...
    assert "pd_op.slice" not in main and "pd_op.cast" not in main
    assert main.count("pd_op.if") == 2
    assert programs.data_names(mp.program) == [
        "hoisted.0", "hoisted.1", "arg.0", "meta.caches.0", "meta.max_len_tensor_cpu"]
    # ... and the prologue is exactly that chain, ending in the two fed values.
    assert op_sequence(mp.prologue.program) == [
        "pd_op.data", "pd_op.full_int_array", "pd_op.full_int_array", "pd_op.slice",
        "pd_op.cast", "pd_op.full_int_array", "pd_op.full_int_array", "pd_op.slice",
        "pd_op.cast", "builtin.shadow_output", "builtin.shadow_output"]
    assert mp.prologue.outputs == ["hoisted.0", "hoisted.1"]
    # each if reads its condition straight from a hoisted feed
    conds = [op.operand_source(0).get_defining_op() for op in mp.program.global_block().ops
             if op.name() == "pd_op.if"]
    assert [(c.name(), data_name(c)) for c in conds] == [("pd_op.data", "hoisted.0"),
                                                         ("pd_op.data", "hoisted.1")]
    # the hazards the pass removed were where the model built them
    before = programs.model_program(programs.build_cond_program(hoisted=False), blacklist=[])
    details = [h.to_dict() for h in hazards_of(before)]
    assert {d["op"] for d in details} == {"pd_op.slice", "pd_op.cast"}
    assert all("programs.py" in (d["location"] or "") for d in details)


@pytest.mark.parametrize("max_len", PATTERNS)
def test_numerics_prologue_plus_main_equals_original(max_len):
    built = programs.build_cond_program(hoisted=False, layers=2)
    rng = np.random.default_rng(1)
    batch = programs.make_batch(5, max_len, rng)
    feeds = programs.feeds_for(built, batch)
    want = run_program(built.program, built.params, feeds)

    mp, _ = _hoist(programs.build_cond_program(hoisted=False, layers=2))
    hoisted = run_program(mp.prologue.program, {}, feeds)
    feeds = {**feeds, **dict(zip(mp.prologue.outputs, hoisted, strict=True))}
    got = run_program(mp.program, mp.params, feeds)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(w, g)


def test_negative_no_host_chain_no_change():
    built = programs.build_plain_program()
    before = program_text(built.program)
    mp, record = _hoist(built)
    assert not record.modified and mp.prologue is None
    assert record.stats["hazards_before"] == 0
    assert program_text(mp.program) == before


def test_negative_already_hoisted_program_no_change():
    _, record = _hoist(programs.build_cond_program(hoisted=True))
    assert not record.modified
    assert record.stats["hazards_before"] == 0


def test_golden_text_main_program_and_prologue():
    mp, _ = _hoist(programs.build_cond_program(hoisted=False))
    filecheck(program_text(mp.program), """
        CHECK: ([[H0:%[0-9]+]]) = "pd_op.data" () {dtype:bool,name:"hoisted.0"
        CHECK-NEXT: ([[H1:%[0-9]+]]) = "pd_op.data" () {dtype:bool,name:"hoisted.1"
        CHECK-NOT: "pd_op.slice"
        CHECK-NOT: "pd_op.cast"
        CHECK: ([[A:%[0-9]+]]) = "pd_op.if" ([[H0]])
        CHECK: "pd_op.relu"
        CHECK: "pd_op.if" ([[H1]])
        CHECK: "pd_op.tanh"
        CHECK: "builtin.shadow_output"
    """)
    filecheck(program_text(mp.prologue.program), """
        CHECK: ([[M:%[0-9]+]]) = "pd_op.data" () {dtype:int32,name:"meta.max_len_tensor_cpu"
        CHECK: ([[S0:%[0-9]+]]) = "pd_op.slice" ([[M]],
        CHECK-NEXT: ([[C0:%[0-9]+]]) = "pd_op.cast" ([[S0]]) {dtype:bool
        CHECK: ([[S1:%[0-9]+]]) = "pd_op.slice" ([[M]],
        CHECK-NEXT: ([[C1:%[0-9]+]]) = "pd_op.cast" ([[S1]]) {dtype:bool
        CHECK-NOT: "pd_op.if"
        CHECK: "builtin.shadow_output" ([[C0]]) {output_name:"hoisted.0"}
        CHECK-NEXT: "builtin.shadow_output" ([[C1]]) {output_name:"hoisted.1"}
    """)


def test_dead_code_removal_keeps_in_place_writes():
    """A write whose result nobody reads (a model's cache update) is not dead code."""
    main = paddle.static.Program()
    with paddle.pir_utils.IrGuard(), paddle.static.program_guard(main):
        x = paddle.static.data("x", [4], "float32")
        cache = paddle.static.data("cache", [4], "float32")
        _ = x * 2.0  # dead: nobody reads it
        paddle.assign(x, output=cache)  # in place: nobody reads its result either
    ops = op_sequence(main)
    assert "pd_op.assign_out_" in ops and "pd_op.scale" in ops
    remove_dead_ops(main.global_block())
    after = op_sequence(main)
    assert "pd_op.assign_out_" in after and "pd_op.scale" not in after


def test_dead_code_removal_drops_a_loop_whose_list_nobody_reads():
    """A loop appending to a list (``pd_op.array_write_`` writes the array in place) is dead
    once nothing reads the list: the prologue hoisting a chunked MoE's trip count must not
    carry the loop, and the model before it, along. While the list is read, the loop stays."""
    from graphopt.ir.pir_utils import remove_outputs
    from tests import programs as P

    built = P.build_chunked_loop_program()
    kept = built.program.clone()
    remove_dead_ops(kept.global_block(), keep_inputs=False)
    assert "pd_op.while" in op_sequence(kept)  # the output reads the list: live
    dead = built.program.clone()
    remove_outputs(dead)
    remove_dead_ops(dead.global_block(), keep_inputs=False)
    assert op_sequence(dead) == []
