"""The pass framework: registry, config validation, transactional runs, instruments, verify-each."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

os.environ.setdefault("GLOG_minloglevel", "2")

import json
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from graphopt.errors import ConfigError, PassError
from graphopt.ir.pir_utils import op_sequence, program_text
from graphopt.passes import registry
from graphopt.passes.base import Pass, PassResult, Stage
from graphopt.passes.instruments import IRDumpInstrument, PassInstrument, format_records
from graphopt.passes.listing import describe_passes
from graphopt.passes.listing import main as listing_main
from graphopt.passes.manager import PassManager, PassRecord
from graphopt.passes.options import build_options
from graphopt.passes.verify import (
    PROPERTY_CHECKS,
    PassVerificationError,
    check_program,
    release_program,
    verify_program,
)
from tests import framework_helpers as fh


@pytest.fixture(autouse=True, scope="module")
def _test_passes():
    with fh.registered_test_passes():
        yield


def pm_of(*names: str, options: dict | None = None, **kwargs) -> PassManager:
    return PassManager.from_config(list(names), options or {}, **kwargs)


# -- registry ------------------------------------------------------------------------------------


def test_registered_passes_are_found_by_name():
    assert registry.get_pass("test-add-op") is fh.AddOp
    assert registry.get_pass("paddle-native").stage is Stage.PROGRAM
    assert "test-noop" in registry.all_passes()


def test_registration_enforces_kebab_case_and_one_line_summary():
    class Snake(Pass):
        name = "snake_case"
        summary = "x"

    class Upper(Pass):
        name = "Upper-Case"
        summary = "x"

    class TwoLines(Pass):
        name = "two-lines"
        summary = "one\ntwo"

    for cls in (Snake, Upper):
        with pytest.raises(ValueError, match="not kebab-case"):
            registry.register_pass(cls)
    with pytest.raises(ValueError, match="one non-empty line"):
        registry.register_pass(TwoLines)
    with pytest.raises(TypeError):
        registry.register_pass(object)


def test_a_name_cannot_be_taken_twice():
    class Impostor(Pass):
        name = "test-noop"
        summary = "Another pass with a taken name."

    with pytest.raises(ValueError, match="registered twice"):
        registry.register_pass(Impostor)
    assert registry.get_pass("test-noop") is fh.NoOp


def test_unknown_pass_lists_candidates():
    with pytest.raises(ConfigError) as info:
        registry.get_pass("test-add-opp")
    msg = str(info.value)
    assert "unknown pass 'test-add-opp'" in msg
    assert "Did you mean 'test-add-op'?" in msg
    assert "paddle-native" in msg and "test-noop" in msg


def test_entry_point_passes_are_registered(monkeypatch):
    class Plugin(Pass):
        name = "test-plugin"
        summary = "Comes from an entry point."

    ep = SimpleNamespace(name="plugin", value="pkg:Plugin", load=lambda: Plugin)
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [ep] if group == "graphopt.passes" else []
    )
    try:
        assert registry.get_pass("test-plugin") is Plugin
    finally:
        registry._REGISTRY.pop("test-plugin", None)


def test_a_broken_plugin_does_not_hide_the_others(monkeypatch, capsys):
    class Good(Pass):
        name = "test-good-plugin"
        summary = "Loads fine."

    def broken():
        raise ImportError("No module named 'missing_dep'")

    eps = [SimpleNamespace(name="test-broken-plugin", value="bad:Pass", load=broken),
           SimpleNamespace(name="good", value="good:Good", load=lambda: Good)]
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: eps if group == "graphopt.passes" else [])
    try:
        assert registry.get_pass("test-good-plugin") is Good
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "test-broken-plugin" in err and "missing_dep" in err
        with pytest.raises(ConfigError, match="failed to load: No module named 'missing_dep'"):
            registry.get_pass("test-broken-plugin")
    finally:
        registry._REGISTRY.pop("test-good-plugin", None)


def test_two_classes_from_different_modules_cannot_share_a_pass_name():
    def make(module):
        cls = type("Fuse", (Pass,), {"name": "test-fuse", "summary": "Fuses.",
                                     "__module__": module})
        return cls

    registry.register_pass(make("plugin_a"))
    try:
        with pytest.raises(ValueError, match="registered twice"):
            registry.register_pass(make("plugin_b"))
        registry.register_pass(make("plugin_a"))  # the same class re-imported: fine
    finally:
        registry._REGISTRY.pop("test-fuse", None)


def test_listing_shows_every_pass_with_options():
    text = describe_passes()
    assert "paddle-native  [program]" in text
    assert "passes: list[str] = ['dead_code_elimination_pass']" in text
    assert "test-options  [program]" in text
    assert "mode: auto | explicit = 'auto'" in text
    assert "how to choose" in text  # help from field metadata
    assert "raise after patching" in text  # help from a `#:` comment
    assert "requires: test-prop" in text and "ensures: test-prop" in text
    assert "runs after: test-first, not-in-any-pipeline" in text
    assert "options: none" in text


def test_listing_main(capsys):
    assert listing_main(["test-noop"]) == 0
    out = capsys.readouterr().out
    assert "test-noop  [program]" in out and "paddle-native" not in out
    assert listing_main(["no-such-pass"]) == 2
    assert "unknown pass 'no-such-pass'" in capsys.readouterr().err


# -- config validation ---------------------------------------------------------------------------


def test_from_config_accepts_omegaconf_and_describes_every_option():
    cfg = OmegaConf.create(
        {
            "passes": ["test-source-noop", "test-options"],
            "options": {"test-options": {"count": 7, "items": ["a", "b"]}},
        }
    )
    pm = PassManager.from_config(cfg.passes, cfg.options)
    opts = pm.passes[1].options
    assert opts.count == 7 and opts.items == ["a", "b"] and isinstance(opts.items, list)
    text = pm.describe()
    assert text.splitlines()[0] == "pipeline: 2 passes (verify_each=on)"
    assert "1. test-source-noop  [source]  -" in text
    assert (
        "2. test-options      [program]  mode='auto', count=7, ratio=0.5, flag=False, "
        "label='x', items=['a', 'b'], table={}, limit=None" in text
    )
    resolved = pm.resolved()
    assert resolved[1] == {
        "name": "test-options",
        "stage": "program",
        "options": {
            "mode": "auto",
            "count": 7,
            "ratio": 0.5,
            "flag": False,
            "label": "x",
            "items": ["a", "b"],
            "table": {},
            "limit": None,
        },
    }
    json.dumps(resolved)
    OmegaConf.to_yaml(OmegaConf.create(resolved))


def test_unknown_option_key_lists_valid_options():
    with pytest.raises(ConfigError) as info:
        pm_of("test-options", options={"test-options": {"cuont": 1}})
    msg = str(info.value)
    assert "pipeline.options.test-options: unknown option 'cuont'. Did you mean 'count'?" in msg
    assert "Valid options: mode, count, ratio, flag, label, items, table, limit" in msg
    with pytest.raises(ConfigError, match="takes no options, got 'x'"):
        pm_of("test-no-options", options={"test-no-options": {"x": 1}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "atuo"}, "pipeline.options.test-options.mode: Invalid value 'atuo', expected "
                           "one of [auto, explicit]"),
        ({"count": "x3"}, "pipeline.options.test-options.count: Value 'x3' of type 'str' could "
                          "not be converted to Integer"),
        ({"count": True}, "pipeline.options.test-options.count: Value 'True' of type 'bool' "
                          "could not be converted to Integer"),
        ({"flag": "maybe"}, "pipeline.options.test-options.flag: Value 'maybe' is not a valid "
                            "bool"),
        ({"ratio": "x"}, "pipeline.options.test-options.ratio: Value 'x' of type 'str' could not "
                         "be converted to Float"),
        ({"items": "a"}, "pipeline.options.test-options.items: Invalid value assigned"),
        ({"table": {"a": "b"}}, "pipeline.options.test-options.table.a: Value 'b' of type 'str' "
                                "could not be converted to Integer"),
        ({"limit": "no"}, "pipeline.options.test-options.limit: Value 'no' of type 'str' could "
                          "not be converted to Integer"),
        ({"count": -1}, "pipeline.options.test-options: count must be >= 0, got -1"),
    ],
)
def test_option_values_are_type_checked(values, message):
    with pytest.raises(ConfigError) as info:
        pm_of("test-options", options={"test-options": values})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_option_values_are_converted():
    opts = build_options(
        fh.EveryType, {"ratio": 2, "items": ("a",), "limit": None, "table": {"k": 1}}
    )
    assert opts.ratio == 2.0 and isinstance(opts.ratio, float)
    assert opts.items == ["a"] and opts.limit is None and opts.table == {"k": 1}
    assert build_options(fh.EveryType, {"limit": 4}).limit == 4
    assert build_options(fh.EveryType, {"mode": "explicit"}).mode is fh.Choice.explicit


def test_bad_choice_of_a_real_pass():
    with pytest.raises(ConfigError) as info:
        pm_of("capture-control-flow", options={"capture-control-flow": {"mode": "atuo"}})
    assert str(info.value) == (
        "pipeline.options.capture-control-flow.mode: Invalid value 'atuo', expected one of "
        "[auto, explicit]"
    )


def test_options_whose_types_omegaconf_cannot_check_are_refused():
    @dataclass
    class LiteralOptions:
        mode: Literal["a", "b"] = "a"

    class LiteralPass(Pass):
        name = "test-literal"
        summary = "Options typed with Literal."
        Options = LiteralOptions

    with pytest.raises(ConfigError, match="its Options cannot be typed by OmegaConf"):
        build_options(LiteralPass, {})


def test_options_for_a_pass_not_in_the_pipeline_are_left_out_and_said_so():
    # a pipeline's options survive `pipeline.passes=[...]` on the command line
    pm = pm_of("test-noop", "test-add-op", options={"test-options": {"count": 1}})
    assert pm.ignored_options == ["test-options"]
    assert "(options of test-options not used: not in the pipeline)" in pm.describe()
    with pytest.raises(ConfigError, match=r"unknown pass 'test-nop'\. Did you mean 'test-noop'"):
        pm_of("test-noop", options={"test-nop": {}})


def test_unknown_pass_in_pipeline():
    with pytest.raises(ConfigError, match=r"unknown pass 'test-noopp'\. Did you mean 'test-noop'"):
        pm_of("test-noopp")


def test_a_pass_listed_twice_is_an_error():
    with pytest.raises(ConfigError, match=r"'test-noop' is listed twice .*positions 1 and 3"):
        pm_of("test-noop", "test-add-op", "test-noop")


def test_pipeline_must_be_a_list():
    with pytest.raises(ConfigError, match="must be a list of pass names"):
        PassManager.from_config("test-noop", {})


def test_ordering_constraints():
    pm_of("test-first", "test-second")  # ok; the constraint on an absent pass is ignored
    with pytest.raises(ConfigError) as info:
        pm_of("test-second", "test-noop", "test-first")
    msg = str(info.value)
    assert "pass 'test-second' must run after 'test-first'" in msg
    assert "A valid order: test-noop, test-first, test-second" in msg
    with pytest.raises(ConfigError, match="pass 'test-early' must run before 'test-first'"):
        pm_of("test-first", "test-early")
    pm_of("test-early", "test-first", "test-second")


@settings(max_examples=30, deadline=None)
@given(st.permutations(["test-first", "test-second", "test-early", "test-noop"]))
def test_ordering_is_accepted_iff_every_constraint_holds(order):
    ok = order.index("test-first") < order.index("test-second") and order.index(
        "test-early"
    ) < order.index("test-first")
    if ok:
        assert pm_of(*order).names == list(order)
    else:
        with pytest.raises(ConfigError, match="A valid order: "):
            pm_of(*order)


def test_source_passes_must_come_before_program_passes():
    pm_of("test-source-noop", "test-source-patch", "test-noop")
    with pytest.raises(ConfigError) as info:
        pm_of("test-source-noop", "test-noop", "test-source-patch")
    msg = str(info.value)
    assert (
        "source-stage pass 'test-source-patch' (position 3) comes after program-stage pass "
        "'test-noop' (position 2)" in msg
    )


# -- running -------------------------------------------------------------------------------------


def test_run_records_and_stage_selection(monkeypatch):
    mp = fh.make_mp()
    pm = pm_of("test-source-noop", "test-add-op", "test-noop")
    assert pm.run(mp, Stage.SOURCE) == [
        PassRecord("test-source-noop", False, pytest.approx(0, abs=1), {})
    ]
    # test-add-op now takes at least `sleep`: its record must show it, and only its record
    sleep, add_op = 0.05, fh.AddOp.run

    def slow_add_op(self, mp):
        time.sleep(sleep)
        return add_op(self, mp)

    monkeypatch.setattr(fh.AddOp, "run", slow_add_op)
    t0 = time.perf_counter()
    records = pm.run(mp, "program")
    wall = time.perf_counter() - t0
    assert [(r.name, r.modified, r.stats) for r in records] == [
        ("test-add-op", True, {"added": 1}),
        ("test-noop", False, {"looked_at": 1}),
    ]
    # each pass's own run time, in seconds: the sleep is in the pass that slept, every pass
    # took some time, and together they took no longer than the run around them
    assert records[0].time_s >= sleep
    assert records[1].time_s > 0
    assert records[0].time_s + records[1].time_s <= wall
    assert records[0].to_dict()["time_s"] == round(records[0].time_s, 6)
    assert records[0].to_dict()["name"] == "test-add-op"
    assert set(records[0].to_dict()) == {"name", "modified", "time_s", "stats"}
    assert "pd_op.tanh" in op_sequence(mp.program)
    assert [r.name for r in pm.records] == ["test-source-noop", "test-add-op", "test-noop"]
    assert "test-add-op" in format_records(pm.records)


def test_failing_program_pass_rolls_back_everything():
    mp = fh.make_mp(fh.build_program(dead=True), blacklist=["pd_op.if"])
    mp.flags["log"] = "start"
    original = mp.program
    before = program_text(mp.program)
    with pytest.raises(PassError) as info:
        pm_of("test-boom").run(mp)
    assert str(info.value) == (
        "pass 'test-boom' failed: RuntimeError: kaboom (passes run before it: none)"
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert mp.program is original and program_text(mp.program) == before
    assert mp.flags == {"log": "start"} and mp.host_inputs == []
    assert mp.blacklist == ["pd_op.if"] and mp.properties == set()


def test_failure_names_the_passes_that_ran_before_and_keeps_their_effect():
    mp = fh.make_mp(fh.build_program(dead=True))
    pm = pm_of("test-source-noop", "test-add-op", "test-noop", "test-boom")
    pm.run(mp, Stage.SOURCE)
    with pytest.raises(PassError) as info:
        pm.run(mp, Stage.PROGRAM)
    assert str(info.value) == (
        "pass 'test-boom' failed: RuntimeError: kaboom "
        "(passes run before it: test-source-noop, test-add-op, test-noop)"
    )
    expected = fh.build_program(dead=True)
    fh.add_tanh(expected)  # the successful passes' work stays
    assert program_text(mp.program) == program_text(expected)


def test_failing_source_pass_undoes_its_patches():
    mp = fh.make_mp(program=None)
    mp.flags["kept"] = "1"
    with pytest.raises(PassError) as info:
        pm_of("test-source-patch", options={"test-source-patch": {"fail": True}}).run(mp)
    assert "pass 'test-source-patch' failed: ValueError: patch went wrong" in str(info.value)
    assert fh.Target().greet() == "hello"
    assert mp.model._patches == []
    assert mp.flags == {"kept": "1"} and mp.properties == set()


def test_successful_source_pass_keeps_its_patches():
    mp = fh.make_mp(program=None)
    try:
        [record] = pm_of("test-source-patch").run(mp)
        assert record.modified and fh.Target().greet() == "patched"
        assert mp.flags["patched"] and "patched" in mp.properties
    finally:
        mp.model.restore_patches(0)
    assert fh.Target().greet() == "hello"


def test_program_pass_without_a_program():
    with pytest.raises(PassError, match="program-stage pass but there is no program yet"):
        pm_of("test-noop").run(fh.make_mp(program=None))


def test_requires_and_ensures():
    mp = fh.make_mp()
    with pytest.raises(PassError) as info:
        pm_of("test-needs-prop").run(mp)
    msg = str(info.value)
    assert "pass 'test-needs-prop' requires property 'test-prop', which does not hold" in msg
    assert "it is ensured by: test-ensure-prop" in msg
    pm_of("test-ensure-prop", "test-needs-prop").run(mp)
    assert "test-prop" in mp.properties


def test_property_checker_violation_fails_and_rolls_back():
    assert "test-prop" in PROPERTY_CHECKS
    mp = fh.make_mp()
    with pytest.raises(PassError) as info:
        pm_of("test-ensure-prop", options={"test-ensure-prop": {"honest": False}}).run(mp)
    msg = str(info.value)
    assert msg.startswith("pass 'test-ensure-prop' failed: PassVerificationError:")
    assert "property 'test-prop' does not hold: flags['test_prop_holds'] is not set" in msg
    assert "test_prop_holds" not in mp.flags and "test-prop" not in mp.properties
    # Without verify-each the promise is taken on trust.
    pm_of(
        "test-ensure-prop", options={"test-ensure-prop": {"honest": False}}, verify_each=False
    ).run(mp)
    assert "test-prop" in mp.properties


def test_verify_each_catches_use_before_def_and_rolls_back():
    mp = fh.make_mp()
    before = program_text(mp.program)
    with pytest.raises(PassError) as info:
        pm_of("test-add-op", "test-misorder").run(mp)
    msg = str(info.value)
    assert msg.startswith(
        "pass 'test-misorder' failed: PassVerificationError: verification failed:"
    )
    assert "'pd_op.scale': operand 0 is used before its definition" in msg
    assert "'pd_op.relu'" in msg
    assert msg.endswith("(passes run before it: test-add-op)")
    assert program_text(mp.program) != before  # test-add-op's change is kept...
    assert op_sequence(mp.program).index("pd_op.relu") < op_sequence(mp.program).index(
        "pd_op.scale"
    )
    assert check_program(mp.program) == []  # ...and the program is sound


def test_verify_each_catches_a_program_without_outputs():
    mp = fh.make_mp()
    before = program_text(mp.program)
    with pytest.raises(PassError, match=r"the program has no builtin\.shadow_output"):
        pm_of("test-drop-outputs").run(mp)
    assert program_text(mp.program) == before
    pm_of("test-drop-outputs", verify_each=False).run(mp)  # off: nothing checks
    assert "builtin.shadow_output" not in op_sequence(mp.program)


# -- structural verifier -------------------------------------------------------------------------


def test_verifier_accepts_sound_programs_with_nested_blocks():
    assert check_program(fh.build_program(dead=True, duplicate=True)) == []
    program = fh.build_control_flow_program()
    assert {"pd_op.while", "pd_op.if"} <= set(op_sequence(program))
    assert check_program(program) == []
    verify_program(program)


def test_verifier_reports_null_operands_and_duplicate_feeds():
    import paddle

    program = fh.build_program()
    fh.ops_named(program, "pd_op.relu")[0].operand(0).set_source(paddle.pir.fake_value())
    assert check_program(program) == ["op 1 'pd_op.relu': operand 0 is null"]
    with pytest.raises(PassVerificationError, match="operand 0 is null"):
        verify_program(program)
    assert check_program(fh.build_duplicate_feed_program()) == [
        "pd_op.data name 'x' is used by 2 ops (feed names must be unique)"
    ]


def test_verifier_reports_use_before_def_inside_a_nested_block():
    program = fh.build_control_flow_program()
    if_op = fh.ops_named(program, "pd_op.if")[0]
    true_block = if_op.as_if_op().true_block()
    full = true_block.ops[0]  # pd_op.full, read by the pd_op.scale after it
    full.move_before(true_block.ops[2])  # now after the scale that reads it
    [problem] = check_program(program)
    assert (
        "'pd_op.if' block 0: op 0 'pd_op.scale': operand 1 is used before its definition" in problem
    )
    release_program(program)  # freeing a use-before-def program would abort the process


# -- IR dumps ------------------------------------------------------------------------------------


def test_ir_dump_file_names_and_content(tmp_path):
    mp = fh.make_mp()
    dump = IRDumpInstrument(tmp_path)
    pm_of("test-add-op", "test-noop", "test-remove-tanh", instruments=[dump]).run(mp)
    ir = tmp_path / "ir"
    assert sorted(p.name for p in ir.iterdir()) == [
        "000_input.txt",
        "001_test-add-op.txt",
        "002_test-noop.txt",
        "003_test-remove-tanh.txt",
    ]
    assert [p.name for p in dump.written] == sorted(p.name for p in ir.iterdir())
    unchanged = (ir / "002_test-noop.txt").read_text()
    assert "// modified: false" in unchanged and "(unchanged: the pass changed nothing" in unchanged
    assert "pd_op.relu" not in unchanged
    first = (ir / "001_test-add-op.txt").read_text()
    assert first.startswith("// after pass 1 'test-add-op' (stage program)\n")
    assert '// stats: {"added": 1}' in first
    assert "pd_op.tanh" in first and "pd_op.relu" in first
    assert "pd_op.tanh" not in (ir / "000_input.txt").read_text()
    third = (ir / "003_test-remove-tanh.txt").read_text()
    assert '"removed": 1' in third and "pd_op.tanh" not in third and "pd_op.scale" in third


def test_ir_dump_every_pass_and_failures(tmp_path):
    mp = fh.make_mp()
    with pytest.raises(PassError):
        pm_of(
            "test-add-op",
            "test-noop",
            "test-misorder",
            instruments=[IRDumpInstrument(tmp_path, only_on_change=False)],
        ).run(mp)
    names = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert names == [
        "000_input.txt",
        "001_test-add-op.txt",
        "002_test-noop.txt",
        "003_test-misorder.failed.txt",
    ]
    failed = (tmp_path / "ir" / "003_test-misorder.failed.txt").read_text()
    assert "FAILED pass 3 'test-misorder'" in failed and "used before its definition" in failed


def test_ir_dump_of_a_source_pass_lists_patches(tmp_path):
    mp = fh.make_mp()
    try:
        pm_of("test-source-patch", "test-noop", instruments=[IRDumpInstrument(tmp_path)]).run(mp)
    finally:
        mp.model.restore_patches(0)
    names = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert names == ["000_input.txt", "001_test-source-patch.txt", "002_test-noop.txt"]
    text = (tmp_path / "ir" / "001_test-source-patch.txt").read_text()
    assert (
        "tests.framework_helpers.Target.greet: tests.framework_helpers.Target.greet -> "
        "tests.framework_helpers.SourcePatch.run.<locals>.<lambda>\n" in text
    )


def test_instrument_hooks_order():
    calls = []

    class Spy(PassInstrument):
        def before_pass(self, pass_, mp, index):
            calls.append(("before", pass_.name, index))

        def after_pass(self, pass_, mp, index, result):
            calls.append(("after", pass_.name, index, result.modified))

        def on_error(self, pass_, mp, index, error):
            calls.append(("error", pass_.name, index, type(error).__name__))

    with pytest.raises(PassError):
        pm_of("test-add-op", "test-boom", instruments=[Spy()]).run(fh.make_mp())
    assert calls == [
        ("before", "test-add-op", 1),
        ("after", "test-add-op", 1, True),
        ("before", "test-boom", 2),
        ("error", "test-boom", 2, "RuntimeError"),
    ]


def test_a_pass_must_return_a_pass_result():
    class Sloppy(Pass):
        name = "test-sloppy"
        summary = "Returns nothing."

        def run(self, mp):
            return None

    with pytest.raises(
        PassError, match="TypeError: run\\(\\) returned NoneType, expected a PassResult"
    ):
        PassManager([Sloppy()]).run(fh.make_mp())
    assert PassResult(True).stats == {}


# -- ModelProgram.clone (what program-stage rollback relies on) ----------------------------------


def test_clone_is_independent_where_passes_write_and_shares_live_objects():
    from graphopt.ir.model_program import HostPrologue

    batch = SimpleNamespace(meta=object())  # stands for the trace batch and its ONE meta object
    mp = fh.make_mp(
        params={"w": 1},
        prologue=HostPrologue(program=fh.build_program(), outputs=["hoisted.0"]),
    )
    mp.trace_batch = batch
    mp.blacklist = ["pd_op.if"]
    mp.trace.graph_breaks = []
    before = program_text(mp.program)
    prologue_before = program_text(mp.prologue.program)

    work = mp.clone()
    fh.add_tanh(work.program)
    fh.add_tanh(work.prologue.program)
    work.prologue.outputs.append("hoisted.1")
    work.params["new"] = 2
    work.blacklist.append("pd_op.cast")
    work.trace.subgraphs = 7
    work.properties.add("x")

    assert program_text(mp.program) == before
    assert program_text(mp.prologue.program) == prologue_before
    assert mp.prologue.outputs == ["hoisted.0"] and mp.params == {"w": 1}
    assert mp.blacklist == ["pd_op.if"] and mp.trace.subgraphs == 0
    assert mp.properties == set()
    assert work.trace_batch is batch and work.model is mp.model


def test_program_pass_commits_every_field_it_set():
    class SetsMetadata(Pass):
        name = "test-sets-metadata"
        summary = "Writes metadata fields."

        def run(self, mp):
            mp.segments = "plan"
            mp.flags["FLAGS_x"] = "1"
            mp.host_inputs.append("meta.len")
            return PassResult(True)

    mp = fh.make_mp()
    PassManager([SetsMetadata()]).run(mp)
    assert mp.segments == "plan" and mp.flags == {"FLAGS_x": "1"}
    assert mp.host_inputs == ["meta.len"]


def test_a_broken_input_program_is_reported_before_the_first_pass():
    program = fh.build_duplicate_feed_program()
    with pytest.raises(PassVerificationError) as info:
        pm_of("test-noop").run(fh.make_mp(program))
    assert str(info.value).startswith(
        "verification failed: the input program is broken before pass 'test-noop'; "
        "pd_op.data name 'x' is used by 2 ops"
    )


def test_patch_listing_says_how_the_function_changed():
    import functools

    from graphopt.passes.instruments import patches_text

    class Owner:
        def a(self):
            return 1

        def b(self):
            return 2

    mp = fh.make_mp(program=None)
    assert patches_text(mp) == "(no patches applied)\n"
    mp.model.patch(Owner, "a", Owner.a)  # e.g. paddle.jit.marker.* returns the same function
    mp.model.patch(Owner, "b", functools.wraps(Owner.b)(lambda self: 3))
    lines = patches_text(mp).splitlines()
    mp.model.restore_patches(0)
    assert lines[0].endswith(".a (same object, marked in place)")
    assert lines[1].endswith(".b (a wrapper of the original)")


def test_a_failed_pass_that_broke_the_prologue_is_rolled_back_without_crashing():
    from graphopt.ir.model_program import HostPrologue

    class BreakPrologue(Pass):
        name = "test-break-prologue"
        summary = "Leave a use-before-def prologue behind, then fail."

        def run(self, mp):
            prologue = mp.prologue.program
            relu = fh.ops_named(prologue, "pd_op.relu")[0]
            relu.move_before(fh.ops_named(prologue, "builtin.shadow_output")[0])
            raise RuntimeError("half done")

    mp = fh.make_mp(prologue=HostPrologue(program=fh.build_program(), outputs=["hoisted.0"]))
    before = program_text(mp.prologue.program)
    with pytest.raises(PassError, match="RuntimeError: half done"):
        PassManager([BreakPrologue()]).run(mp)
    assert program_text(mp.prologue.program) == before
    import gc

    gc.collect()  # the broken copy is freed here; without release_program Paddle would abort


def test_required_options_and_help_sources():
    from dataclasses import dataclass, field

    from graphopt.passes.options import option_help

    @dataclass
    class Opts:
        needed: str
        #: how hard to try
        level: int = 1
        names: list[str] = field(default_factory=list, metadata={"help": "which ones"})

    class WithOpts(Pass):
        name = "test-with-opts"
        summary = "x"
        Options = Opts

    assert option_help(Opts, "level") == "how hard to try"
    assert option_help(Opts, "names") == "which ones"
    with pytest.raises(ConfigError, match=r"pipeline\.options\.test-with-opts\.needed: .*missing mandatory"):
        build_options(WithOpts, {})
    assert build_options(WithOpts, {"needed": "y", "level": 2}) == Opts("y", 2, [])
