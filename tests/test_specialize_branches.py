"""specialize-branches: golden IR (FileCheck style), numerics per variant against the original
program, nested ifs, the feasibility rule, the negative cases, the pipelines it enables."""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

import re
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from graphopt.errors import ConfigError, PassError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import add_output, op_sequence, program_text, static_mode
from graphopt.passes import piecewise_split
from graphopt.passes.base import Stage
from graphopt.passes.manager import PassManager
from graphopt.passes.registry import get_pass
from graphopt.passes.specialize_branches import (
    _check_specialized,
    condition_label,
    control_flow_left,
)
from tests import programs as P
from tests.programs import run_program

PASS = "specialize-branches"
#: host values [max_len, max_enc, max_dec] of a prefill-only, decode-only and mixed step
KIND_MAX_LEN = {"prefill": [6, 6, 0], "decode": [6, 0, 6], "mixed": [6, 6, 6]}


def filecheck(text: str, checks: str) -> None:
    """A minimal FileCheck: ``CHECK: s`` must match in order (each after the previous one);
    ``CHECK-NOT: s`` must not appear between the previous and the next match (or anywhere, as
    the first or last line)."""
    pos = 0
    pending_not: list[str] = []
    for raw in checks.strip().splitlines():
        kind, _, pattern = raw.strip().partition(": ")
        if kind == "CHECK-NOT":
            pending_not.append(pattern)
            continue
        assert kind == "CHECK", raw
        at = text.find(pattern, pos)
        assert at >= 0, f"CHECK: {pattern!r} not found after offset {pos}"
        for bad in pending_not:
            assert bad not in text[pos:at], f"CHECK-NOT: {bad!r} found before {pattern!r}"
        pending_not, pos = [], at + len(pattern)
    for bad in pending_not:
        assert bad not in text[pos:], f"CHECK-NOT: {bad!r} found"


def _specialize(built, *, passes=(PASS,), full_cuda_graph=False, **opts) -> tuple:
    mp = P.model_program(built, blacklist=[])
    mp.full_cuda_graph = full_cuda_graph
    pm = PassManager.from_config(list(passes), {PASS: opts} if opts else {})
    records = pm.run(mp)
    return mp, {r.name: r for r in records}


def _variant(mp: ModelProgram, name: str):
    return next(v for v in mp.variants if v.name == name)


# -- the pass contract --------------------------------------------------------------------------
def test_pass_declaration():
    cls = get_pass(PASS)
    assert cls.stage is Stage.PROGRAM
    assert cls.requires == ("single-graph",) and cls.ensures == ("specialized",)
    assert not cls.changes_program()  # variants are new programs; the main one is untouched
    assert "hoist-host-branch-conditions" in cls.must_run_after
    assert {"cudagraph-blacklist-injection", "piecewise-split"} <= set(cls.must_run_before)


@pytest.mark.parametrize("opts, match", [
    ({"samples_per_kind": 0}, "samples_per_kind"),
    ({"max_variants": 0}, "max_variants"),
    ({"variant_kinds": ["decoding"]}, "unknown batch kind 'decoding'"),
    ({"variant_kinds": ["decode"], "feasibility": "all"}, "needs feasibility=sampled"),
    ({"cleanup_passes": ["dead_code_elimination"]}, "dead_code_elimination_pass"),
    ({"feasibility": "some"}, "feasibility"),
])
def test_bad_options_fail_before_running(opts, match):
    with pytest.raises(ConfigError, match=match):
        PassManager.from_config([PASS], {PASS: opts})


def test_pipeline_order_is_checked():
    with pytest.raises(ConfigError, match="must run after 'hoist-host-branch-conditions'"):
        PassManager.from_config([PASS, "hoist-host-branch-conditions"], {})
    with pytest.raises(ConfigError, match="must run before 'piecewise-split'"):
        PassManager.from_config(["piecewise-split", PASS], {})


# -- golden IR ----------------------------------------------------------------------------------
def test_golden_variants_of_the_seed_program():
    built = P.build_cond_program(hoisted=True, layers=2)
    before = program_text(built.program)
    mp, rec = _specialize(built)
    stats = rec[PASS].stats
    assert rec[PASS].modified
    assert program_text(mp.program) == before  # the main program is not changed
    # two conditions, found from the program; both false never happens for the model's batches
    assert [c.name for c in mp.specialization.conditions] == ["hoisted.0", "hoisted.1"]
    assert stats["combinations"] == 4
    assert stats["feasible"] == ["hoisted.0=1,hoisted.1=1", "hoisted.0=1,hoisted.1=0",
                                 "hoisted.0=0,hoisted.1=1"]
    assert stats["unreachable"] == ["hoisted.0=0,hoisted.1=0"] and stats["general"] == []
    assert [(v.name, v.kinds) for v in mp.variants] == [
        ("hoisted.0=1,hoisted.1=1", ["mixed"]),
        ("hoisted.0=1,hoisted.1=0", ["prefill"]),
        ("hoisted.0=0,hoisted.1=1", ["decode"]),
    ]
    for v in mp.variants:
        text = program_text(v.program)
        # CHECK-NOT anywhere: no control flow and no block terminator survives the folding
        filecheck(text, "CHECK-NOT: pd_op.if\nCHECK-NOT: \"cf.")
        assert control_flow_left(v.program) == []
        # the condition feeds are gone: nothing reads them any more
        assert P.data_names(v.program) == ["arg.0", "meta.caches.0"]
    # decode only: the prefill branch (matmul w1 + relu) is gone, the decode one is inlined
    decode = program_text(_variant(mp, "hoisted.0=0,hoisted.1=1").program)
    filecheck(decode, """
        CHECK-NOT: pd_op.relu
        CHECK: "pd_op.scale"
        CHECK: "pd_op.matmul"
        CHECK: "pd_op.tanh"
        CHECK: "pd_op.matmul"
        CHECK: "pd_op.tanh"
        CHECK-NOT: pd_op.relu
        CHECK: output_name:"logits"
    """)
    assert op_sequence(_variant(mp, "hoisted.0=0,hoisted.1=1").program) == [
        "builtin.parameter", "builtin.parameter", "pd_op.data", "pd_op.data",
        "pd_op.full", "pd_op.scale",                         # h = 2x
        "pd_op.matmul", "pd_op.tanh", "pd_op.full", "pd_op.scale",   # layer 1: decode, +1
        "pd_op.matmul", "pd_op.tanh", "pd_op.full", "pd_op.scale",   # layer 2
        "pd_op.matmul", "pd_op.tanh", "pd_op.full", "pd_op.scale",   # the cache update
        "builtin.shadow_output", "builtin.shadow_output"]
    # prefill only: no tanh on the hidden path, and DCE dropped the weight only decode read
    prefill = _variant(mp, "hoisted.0=1,hoisted.1=0").program
    assert op_sequence(prefill).count("builtin.parameter") == 1
    assert op_sequence(prefill).count("pd_op.relu") == 2
    assert op_sequence(prefill).count("pd_op.tanh") == 1  # the cache update only
    assert [v["ops"] for v in stats["variants"]] == [18, 14, 14]
    assert stats["ops_before"] == 18 + 2 * 2  # each if counts, the variants have none
    assert _check_specialized(mp) is None


def test_conditions_from_the_same_host_expression_are_one():
    """Per-layer re-reads of max_len[1] / max_len[2] are one condition each (hash-consed)."""
    built = P.build_cond_program(hoisted=False, layers=3)
    mp, rec = _specialize(built, passes=("hoist-host-branch-conditions", PASS))
    assert mp.prologue.outputs == [f"hoisted.{k}" for k in range(6)]
    conds = mp.specialization.conditions
    assert [c.feeds for c in conds] == [("hoisted.0", "hoisted.2", "hoisted.4"),
                                        ("hoisted.1", "hoisted.3", "hoisted.5")]
    assert rec[PASS].stats["combinations"] == 4 and len(mp.variants) == 3
    assert [c.location.split(" ")[0].rsplit(":", 1)[0] for c in conds] == ["tests/programs.py"] * 2
    for v in mp.variants:
        assert v.conditions.keys() == {"hoisted.0", "hoisted.1"}
        assert control_flow_left(v.program) == []


def test_nested_ifs_are_decided_in_one_walk():
    """The inner if surfaces when its parent is folded; under a false parent it is dropped and
    its condition is not one of the variant's (either value matches)."""
    built = P.build_nested_program()
    mp, rec = _specialize(built, feasibility="all")
    names = [v.name for v in mp.variants]
    assert names == ["hoisted.0=1,hoisted.1=1", "hoisted.0=1,hoisted.1=0", "hoisted.0=0"]
    assert _variant(mp, "hoisted.0=0").combinations == [
        {"hoisted.0": False, "hoisted.1": True}, {"hoisted.0": False, "hoisted.1": False}]
    assert [v["ifs_folded"] for v in rec[PASS].stats["variants"]] == [2, 2, 1]
    for v in mp.variants:
        filecheck(program_text(v.program), "CHECK-NOT: pd_op.if\nCHECK-NOT: \"cf.")
    assert op_sequence(_variant(mp, "hoisted.0=0").program).count("pd_op.matmul") == 0
    assert _check_specialized(mp) is None


# -- numerics: each variant == the original program on steps of its conditions ---------------
@pytest.mark.parametrize("which", ["seed", "nested"])
def test_each_variant_equals_the_original_program(which):
    built = (P.build_cond_program(hoisted=True, layers=2) if which == "seed"
             else P.build_nested_program())
    mp, _ = _specialize(built, feasibility="all")
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(12):
        t = int(rng.integers(1, 9))
        max_len = [t, int(rng.integers(0, 2)) * t, int(rng.integers(0, 2)) * t]
        feeds = P.feeds_for(built, P.make_batch(t, max_len, rng))
        values = mp.specialization.values(feeds)
        (variant,) = [v for v in mp.variants if v.matches(values)]
        want = run_program(built.program, built.params, feeds)
        got = run_program(variant.program, built.params, feeds)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        checked += 1
    assert checked == 12


def test_a_wrong_variant_is_visibly_wrong():
    """Guards the test above: running another combination's variant changes the logits."""
    built = P.build_cond_program(hoisted=True)
    mp, _ = _specialize(built)
    feeds = P.feeds_for(built, P.make_batch(4, KIND_MAX_LEN["decode"], np.random.default_rng(0)))
    outs = {v.name: run_program(v.program, built.params, feeds)[0] for v in mp.variants}
    vals = list(outs.values())
    assert len(vals) == 3  # every pair of the three variants below, none skipped
    assert all(float(np.abs(a - b).max()) > 1e-3
               for i, a in enumerate(vals) for b in vals[i + 1:])


# -- negative cases -----------------------------------------------------------------------------
def test_negative_no_control_flow():
    mp, rec = _specialize(P.build_plain_program())
    assert not rec[PASS].modified and mp.variants == [] and mp.specialization is None
    assert rec[PASS].stats["conditions"] == 0
    assert _check_specialized(mp) is None


def test_negative_conditions_not_hoisted():
    """The seed's program before hoisting: its ifs read host values computed inside the
    program, so nothing is decided before launch and the pass does not fire."""
    built = P.build_cond_program(hoisted=False)
    before = program_text(built.program)
    mp, rec = _specialize(built)
    assert not rec[PASS].modified and mp.variants == []
    assert "no if reads a condition the host computes" in rec[PASS].stats["reason"]
    assert program_text(mp.program) == before


def _program_with_a_device_if() -> P.Built:
    """The hoisted seed program plus an if on a device value (mean(x) > 0)."""
    built = P.build_cond_program(hoisted=True)
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main, paddle.static.Program()):
            x = paddle.static.data("arg.0", [-1, P.HIDDEN], "float32")
            cache = paddle.static.data("meta.caches.0", [P.CACHE_ROWS, P.HIDDEN], "float32")
            p = paddle.static.data("hoisted.0", [1], "bool")
            paddle.static.data("hoisted.1", [1], "bool")
            y = paddle.static.nn.cond(p, lambda: x * 2.0, lambda: x)
            z = paddle.static.nn.cond(paddle.mean(y) > 0, lambda: y + 1.0, lambda: y - 1.0)
            new_cache = cache * 1.0
        add_output(main, z, "logits")
        add_output(main, new_cache, "state.0")
    return P.Built(main, built.params, built.host_inputs, built.prologue)


def test_an_if_the_host_cannot_decide_is_an_error():
    with pytest.raises(PassError, match=r"1 control-flow op\(s\) cannot be decided on the host "
                                        r"before launch \(pd_op.if at tests/test_spec"):
        _specialize(_program_with_a_device_if())


def test_checker_catches_a_missing_variant():
    mp, _ = _specialize(P.build_cond_program(hoisted=True))
    mp.variants = mp.variants[1:]
    assert "served by 0 variants" in _check_specialized(mp)


def test_feasibility_all_is_bounded():
    built = P.build_cond_program(hoisted=True)
    with pytest.raises(ConfigError, match="max_variants=2"):
        _specialize(built, feasibility="all", max_variants=2)


def test_sampled_feasibility_needs_model_batches():
    mp = P.model_program(P.build_cond_program(hoisted=True), blacklist=[])
    mp.model = SimpleNamespace(name="nobatches")
    with pytest.raises(ConfigError, match="use feasibility=all"):
        PassManager.from_config([PASS], {}).run(mp)
    mp2, _ = _specialize(P.build_cond_program(hoisted=True), feasibility="all")
    assert len(mp2.variants) == 4  # no batches needed: every combination is built


def test_condition_labels_from_source_lines():
    assert condition_label("if forward_meta.max_len_tensor_cpu[1]:") == \
        "forward_meta.max_len_tensor_cpu[1]"
    assert condition_label("need_do_prefill = forward_meta.max_len_tensor_cpu[1] > 0") == \
        "need_do_prefill"
    assert condition_label("elif x[2] > 0:") == "x[2] > 0"
    assert condition_label("return paddle.cast(m, 'bool')") == "paddle.cast(m, 'bool')"
    assert condition_label("a == b") == "a == b"


# -- the pipelines it enables -------------------------------------------------------------------
FULL = ["hoist-host-branch-conditions", PASS, "cudagraph-blacklist-injection", "piecewise-split"]


def test_full_cuda_graph_works_with_variants(monkeypatch):
    monkeypatch.setattr(paddle, "set_flags", lambda flags: None)
    built = P.build_cond_program(hoisted=False, layers=2)
    mp, rec = _specialize(built, passes=FULL, full_cuda_graph=True)
    assert rec["cudagraph-blacklist-injection"].stats["control_flow"] == {}
    assert "pd_op.if" not in mp.blacklist
    for v in mp.variants:  # each variant: one captured segment = one full graph per size
        assert [s.kind for s in v.segments.segments] == ["captured"]
        assert v.segments.coverage == 1.0
    # the general program is planned too (the piecewise baseline), its ifs eager
    assert mp.segments.stats()["eager_control_flow"] == 4
    assert rec["piecewise-split"].stats["variants"].keys() == {v.name for v in mp.variants}


def test_full_cuda_graph_without_specialization_names_the_way_out(monkeypatch):
    monkeypatch.setattr(paddle, "set_flags", lambda flags: None)
    built = P.build_cond_program(hoisted=False)
    passes = [p for p in FULL if p != PASS]
    with pytest.raises(ConfigError, match=re.escape("pipeline=full_graph")):
        _specialize(built, passes=passes, full_cuda_graph=True)


def test_hybrid_keeps_the_general_program_for_the_other_kinds(monkeypatch):
    monkeypatch.setattr(paddle, "set_flags", lambda flags: None)
    built = P.build_cond_program(hoisted=False)
    mp, rec = _specialize(built, passes=FULL, variant_kinds=["decode"])
    assert [v.name for v in mp.variants] == ["hoisted.0=0,hoisted.1=1"]
    assert rec[PASS].stats["general"] == ["hoisted.0=1,hoisted.1=1", "hoisted.0=1,hoisted.1=0"]
    assert mp.needs_general_program()
    assert mp.blacklist == ["pd_op.if"]  # the general program still branches
    assert _check_specialized(mp) is None
    # and a full graph for everything is then impossible: one clear error
    with pytest.raises(ConfigError, match=re.escape("the general program, which serves hoisted.0=1")):
        _specialize(built, passes=FULL, variant_kinds=["decode"], full_cuda_graph=True)


def test_a_failing_pass_after_it_rolls_back_the_variants(monkeypatch):
    monkeypatch.setattr(paddle, "set_flags", lambda flags: None)
    built = P.build_cond_program(hoisted=True)
    mp, _ = _specialize(built)
    variants = list(mp.variants)
    assert len(variants) == 3  # something to roll back
    pm = PassManager.from_config(["piecewise-split"], {"piecewise-split": {}})
    monkeypatch.setattr("graphopt.passes.piecewise_split.build_plan",
                        _fail_on_second_call())
    with pytest.raises(PassError, match="boom"):
        pm.run(mp)
    assert mp.variants == variants and all(v.segments is None for v in mp.variants)


def _fail_on_second_call():
    """build_plan that fails on its third call (the second variant), after the general
    program and the first variant got their plans."""
    real = piecewise_split.build_plan
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    return fake


def test_hybrid_variant_that_ignores_a_condition_takes_its_combinations(monkeypatch):
    """Nested program, hybrid on decode: the decode variant never reads the inner condition
    (its parent is folded away), so it serves outer-false with either inner value; a combination
    of that shape is not left to the general program."""
    monkeypatch.setattr(paddle, "set_flags", lambda flags: None)
    mp = P.model_program(P.build_nested_program(), blacklist=[])
    flags = {"prefill": (1, 0), "decode": (0, 1), "mixed": (0, 0)}  # a model whose "mixed"

    def random_batch(rng, kind):  # steps have neither flag set
        t = int(rng.integers(1, 9))
        return P.make_batch(t, [t, flags[kind][0] * t, flags[kind][1] * t], rng)

    mp.model.random_batch = random_batch
    PassManager.from_config([PASS], {PASS: {"variant_kinds": ["decode"]}}).run(mp)
    (variant,) = mp.variants
    assert variant.name == "hoisted.0=0" and variant.kinds == ["decode", "mixed"]
    assert variant.combinations == [{"hoisted.0": False, "hoisted.1": True},
                                    {"hoisted.0": False, "hoisted.1": False}]
    assert mp.specialization.general == [{"hoisted.0": True, "hoisted.1": False}]
    assert _check_specialized(mp) is None
