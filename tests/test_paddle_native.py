"""paddle-native: Paddle's C++ PIR passes by name, on real programs, numerics unchanged."""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
import pytest

from graphopt.errors import ConfigError
from graphopt.ir.pir_utils import clone_program, op_sequence, program_text
from graphopt.passes.manager import PassManager
from graphopt.passes.paddle_native import PaddleNative, PaddleNativeOptions, is_registered
from graphopt.passes.verify import check_program
from tests import framework_helpers as fh
from tests.filecheck import filecheck
from tests.programs import run_program

X = np.array([[-1.0, 0.5, 2.0], [3.0, -0.25, 0.0]], dtype="float32")


def native(*names: str, verify_each: bool = True) -> PassManager:
    return PassManager.from_config(
        ["paddle-native"], {"paddle-native": {"passes": list(names)}}, verify_each=verify_each
    )


def outputs(program) -> list[np.ndarray]:
    return run_program(program, {}, {"x": X})


def test_dce_removes_the_dead_op_and_keeps_outputs_and_numerics():
    mp = fh.make_mp(fh.build_program(dead=True))
    expected = outputs(clone_program(mp.program))
    assert "pd_op.exp" in op_sequence(mp.program)

    [record] = native("dead_code_elimination_pass").run(mp)

    assert record.name == "paddle-native" and record.modified
    assert record.stats["ops_before"] - record.stats["ops_after"] == 1
    assert record.stats["passes"] == ["dead_code_elimination_pass"]
    # CHECK-NOT: the dead op; CHECK: everything the output reads, the feed, the output.
    assert op_sequence(mp.program) == [
        "pd_op.data",
        "pd_op.relu",
        "pd_op.full",
        "pd_op.scale",
        "builtin.shadow_output",
    ]
    assert check_program(mp.program) == []
    np.testing.assert_array_equal(outputs(mp.program)[0], expected[0])
    np.testing.assert_array_equal(expected[0], np.maximum(X, 0) * 2)


def test_dce_on_a_program_without_dead_ops_changes_nothing():
    mp = fh.make_mp(fh.build_program())
    before = program_text(mp.program)
    [record] = native("dead_code_elimination_pass").run(mp)
    assert not record.modified and record.stats["ops_before"] == record.stats["ops_after"]
    assert program_text(mp.program) == before


def test_cse_merges_duplicates_numerics_unchanged():
    mp = fh.make_mp(fh.build_program(duplicate=True))
    expected = outputs(clone_program(mp.program))
    assert op_sequence(mp.program).count("pd_op.scale") == 2

    [record] = native("common_subexpression_elimination_pass", "dead_code_elimination_pass").run(mp)

    assert record.modified and record.stats["ops_after"] < record.stats["ops_before"]
    assert op_sequence(mp.program).count("pd_op.scale") == 1
    np.testing.assert_allclose(outputs(mp.program)[0], expected[0], rtol=0, atol=0)


def test_default_option_is_dce():
    assert PaddleNativeOptions().passes == ["dead_code_elimination_pass"]
    pm = PassManager.from_config(["paddle-native"], {})
    assert "passes=['dead_code_elimination_pass']" in pm.describe()
    assert pm.resolved()[0]["options"] == {"passes": ["dead_code_elimination_pass"]}


def test_unknown_paddle_pass_name_is_a_config_error_with_suggestions():
    assert is_registered("dead_code_elimination_pass")
    assert not is_registered("dead_code_elimination")
    with pytest.raises(ConfigError) as info:
        native("dead_code_elimination")
    msg = str(info.value)
    assert msg.startswith(
        "pipeline.options.paddle-native: unknown Paddle PIR pass 'dead_code_elimination'.")
    assert "Did you mean 'dead_code_elimination_pass'" in msg
    assert "Known: " in msg and "common_subexpression_elimination_pass" in msg
    # Constructing the options directly validates too.
    with pytest.raises(ConfigError, match="unknown Paddle PIR pass 'nope_pass'"):
        PaddleNative(PaddleNativeOptions(passes=["nope_pass"]))


def test_passes_option_must_be_a_list_of_strings():
    with pytest.raises(ConfigError, match=r"pipeline\.options\.paddle-native\.passes: Invalid value"):
        PassManager.from_config(
            ["paddle-native"], {"paddle-native": {"passes": "dead_code_elimination_pass"}}
        )


def test_golden_text_dce():
    program = fh.build_program(dead=True)
    native("dead_code_elimination_pass").run(fh.make_mp(program))
    filecheck(program_text(program), """
        CHECK: ([[X:%[0-9]+]]) = "pd_op.data" () {{.*}}name:"x"
        CHECK-NOT: "pd_op.exp"
        CHECK: ([[R:%[0-9]+]]) = "pd_op.relu" ([[X]])
        CHECK: "pd_op.scale" ([[R]],
        CHECK: "builtin.shadow_output"
    """)
