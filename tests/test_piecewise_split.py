"""piecewise-split: golden segment trees, live-ins/outs, standalone segment programs, numerics
(all segments in order == whole program), the negative case, options, JSON and picture."""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

import json

import numpy as np
import pytest

from graphopt.ir.pir_utils import data_ops, op_sequence, output_names, program_text
from graphopt.ir.segment_plan import CAPTURED, EAGER, reads
from graphopt.passes.base import Stage
from graphopt.passes.piecewise_split import _check_segmented, build_plan
from graphopt.passes.registry import get_pass
from graphopt.report.picture import draw_plan
from graphopt.runtime.executor import RunnerPool, as_tensor
from graphopt.runtime.step import _Env, execute_segments
from graphopt.runtime.step import run_plan as _run_plan
from tests import programs as P
from tests.filecheck import filecheck
from tests.programs import run_program
from tests.reference_pruning import extract_by_pruning

IF = ["pd_op.if"]
#: host values [max_len, max_enc, max_dec]: prefill-only, decode-only, mixed, (none present)
PATTERNS = [[6, 6, 0], [6, 0, 6], [6, 6, 6], [6, 0, 0]]


@pytest.fixture(scope="module")
def seed():
    return P.build_cond_program(hoisted=False)


@pytest.fixture(scope="module")
def hoisted():
    return P.build_cond_program(hoisted=True)


@pytest.fixture(scope="module")
def nested():
    return P.build_nested_program()


def _tree(segs) -> list:
    """(kind, ops) per segment; an eager if as (if, {branch: subtree})."""
    out = []
    for s in segs:
        if s.is_branching:
            out.append(("if", {k: _tree(v) for k, v in s.branches.items()}))
        else:
            out.append((s.kind, [o.split(".", 1)[1] for o in s.ops]))
    return out


# -- the pass contract --------------------------------------------------------------------------
def test_pass_declaration():
    cls = get_pass("piecewise-split")
    assert cls.stage is Stage.PROGRAM
    assert cls.requires == ("single-graph",) and cls.ensures == ("segmented",)
    assert cls.preserves == ("program",) and not cls.changes_program()
    assert "cudagraph-blacklist-injection" in cls.must_run_after
    opts = cls.Options()
    assert opts.recurse_into_branches is True and opts.min_segment_ops == 1
    with pytest.raises(TypeError):
        cls.Options(no_such_option=1)


def test_pass_writes_plan_and_stats(seed):
    mp = P.model_program(seed)
    before = op_sequence(mp.program, nested=True)
    res = get_pass("piecewise-split")().run(mp)
    assert res.modified
    assert mp.segments is not None
    assert op_sequence(mp.program, nested=True) == before  # the program itself is untouched
    assert res.stats["captured"] == 5 and res.stats["eager"] == 2
    assert res.stats["coverage"] == pytest.approx(20 / 22, abs=1e-6)
    assert res.stats["captured_host_runtime_values"] == 4  # slice+cast twice: frozen on replay
    assert {s.id: sorted(s.host_runtime) for s in mp.segments.captured if s.host_runtime} == {
        0: ["pd_op.cast@10#0", "pd_op.slice@9#0"], 3: ["pd_op.cast@15#0", "pd_op.slice@14#0"]}


def test_segmented_checker_catches_a_plan_that_drops_or_repeats_ops(seed):
    mp = P.model_program(seed)
    get_pass("piecewise-split")().run(mp)
    assert _check_segmented(mp) is None
    segs = mp.segments.segments
    dropped = next(s for s in segs if s.kind == CAPTURED)
    segs.remove(dropped)
    assert "in no segment" in _check_segmented(mp)
    segs.insert(0, dropped)
    segs.append(dropped)
    assert "in more than one segment" in _check_segmented(mp)


def test_pass_rejects_bad_options():
    cls = get_pass("piecewise-split")
    with pytest.raises(ValueError, match="min_segment_ops"):
        cls.Options(min_segment_ops=0)


# -- golden segment trees -----------------------------------------------------------------------
def test_golden_seed_program(seed):
    plan = build_plan(seed.program, IF, seed.host_inputs)
    assert _tree(plan.segments) == [
        (CAPTURED, ["full", "scale", "full_int_array", "full_int_array", "slice", "cast"]),
        ("if", {"true": [(CAPTURED, ["matmul", "relu"])], "false": []}),
        (CAPTURED, ["full_int_array", "full_int_array", "slice", "cast"]),
        ("if", {"true": [(CAPTURED, ["matmul", "tanh"])], "false": []}),
        (CAPTURED, ["full", "scale", "matmul", "tanh", "full", "scale"]),
    ]
    assert [s.id for s in plan.walk()] == list(range(7))  # preorder ids
    s0, if1, s3, _if4, s6 = plan.segments
    # live-ins / live-outs, by stable value key
    assert s0.live_in == ["arg.0", "meta.max_len_tensor_cpu"]
    assert s0.live_out == ["pd_op.scale@6#0", "pd_op.cast@10#0"]
    assert if1.cond == "pd_op.cast@10#0" and if1.results == ["pd_op.if@11#0"]
    assert if1.live_in == ["pd_op.cast@10#0", "pd_op.scale@6#0"]
    assert if1.yields == {"true": ["pd_op.relu@11/0/1#0"], "false": ["pd_op.scale@6#0"]}
    branch = if1.branches["true"][0]
    assert branch.block == (11, 0) and branch.op_paths == [(11, 0, 0), (11, 0, 1)]
    assert branch.live_in == ["pd_op.scale@6#0"] and branch.live_out == ["pd_op.relu@11/0/1#0"]
    assert s3.live_in == ["meta.max_len_tensor_cpu"] and s3.live_out == ["pd_op.cast@15#0"]
    assert s6.live_in == ["pd_op.if@16#0", "meta.caches.0"]
    assert s6.live_out == ["pd_op.scale@18#0", "pd_op.scale@22#0"]
    assert plan.outputs == ["pd_op.scale@18#0", "pd_op.scale@22#0"]
    assert plan.output_names == ["logits", "state.0"]
    assert s0.host_runtime == {"pd_op.slice@9#0": "pd_op.slice@6#0",
                               "pd_op.cast@10#0": "pd_op.cast@7#0"}


def test_golden_hoisted_program(hoisted):
    plan = build_plan(hoisted.program, IF, hoisted.host_inputs)
    # the conditions are inputs now: nothing to capture between the two ifs
    assert _tree(plan.segments) == [
        (CAPTURED, ["full", "scale"]),
        ("if", {"true": [(CAPTURED, ["matmul", "relu"])], "false": []}),
        ("if", {"true": [(CAPTURED, ["matmul", "tanh"])], "false": []}),
        (CAPTURED, ["full", "scale", "matmul", "tanh", "full", "scale"]),
    ]
    assert [s.cond for s in plan.segments if s.is_branching] == ["hoisted.0", "hoisted.1"]
    assert all(not s.host_runtime for s in plan.walk())
    assert plan.stats()["captured_host_runtime_values"] == 0


def test_golden_nested_ifs(nested):
    plan = build_plan(nested.program, IF, nested.host_inputs)
    assert _tree(plan.segments) == [
        (CAPTURED, ["full", "scale"]),
        ("if", {"true": [(CAPTURED, ["matmul", "relu"]),
                         ("if", {"true": [(CAPTURED, ["matmul", "tanh"])], "false": []}),
                         (CAPTURED, ["full", "scale"])],
                "false": []}),
        (CAPTURED, ["full", "scale", "full", "scale"]),
    ]
    inner = plan.segments[1].branches["true"][1].branches["true"][0]
    assert inner.block == (8, 0, 2, 0)


def test_segment_programs_are_standalone(seed):
    plan = build_plan(seed.program, IF, seed.host_inputs)
    branch = plan.segments[1].branches["true"][0]
    assert op_sequence(branch.program) == [
        "pd_op.data", "builtin.parameter", "pd_op.matmul", "pd_op.relu", "builtin.shadow_output"]
    assert list(data_ops(branch.program)) == branch.feed_names == ["seg2.in0"]
    assert output_names(branch.program) == branch.output_names == ["seg2.out0"]
    s0 = plan.segments[0]
    assert list(data_ops(s0.program)) == ["seg0.in0", "seg0.in1"]
    # the run's ops only (no weights read), with the live-outs as outputs
    assert op_sequence(s0.program)[2:] == [
        "pd_op.full", "pd_op.scale", "pd_op.full_int_array", "pd_op.full_int_array",
        "pd_op.slice", "pd_op.cast", "builtin.shadow_output", "builtin.shadow_output"]


@pytest.mark.parametrize("which", ["seed", "nested"])
def test_copy_extraction_equals_clone_fold_prune(which, seed, nested):
    """The fast extraction (copy the run's ops) builds the same programs as the clone-fold-prune recipe
    (clone the whole program, fold the enclosing ifs, drop everything else) and both run alike."""
    built = {"seed": seed, "nested": nested}[which]
    plan = build_plan(built.program, IF, built.host_inputs)
    rng = np.random.default_rng(3)
    for seg in plan.walk():
        if seg.program is None:
            continue
        pruned = extract_by_pruning(built.program, seg.op_paths, seg.live_in, seg.live_out,
                                    f"seg{seg.id}")
        assert sorted(op_sequence(pruned, nested=True)) == sorted(
            op_sequence(seg.program, nested=True))
        feeds = {}
        for name, op in data_ops(seg.program).items():
            v = op.result(0)
            shape = [3 if d < 0 else d for d in v.shape]
            dtype = str(v.dtype).replace("paddle.", "")
            feeds[name] = (rng.integers(0, 2, shape).astype(dtype) if dtype in ("bool", "int32")
                           else rng.standard_normal(shape).astype(dtype))
        a = run_program(seg.program, built.params, feeds)
        b = run_program(pruned, built.params, feeds)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def run_plan(plan, params, feeds) -> list[np.ndarray]:
    """The plan's outputs (tensors) as arrays."""
    return [o.numpy() for o in _run_plan(plan, params, feeds)]


# -- numerics: all segments in order == the whole program ---------------------------------------
@pytest.mark.parametrize("which", ["seed", "hoisted", "nested"])
@pytest.mark.parametrize("max_len", PATTERNS, ids=lambda m: "x".join(map(str, m)))
def test_segments_in_order_equal_whole_program(which, max_len, seed, hoisted, nested):
    built = {"seed": seed, "hoisted": hoisted, "nested": nested}[which]
    plan = build_plan(built.program, IF, built.host_inputs)
    batch = P.make_batch(6, max_len, np.random.default_rng(sum(max_len)))
    feeds = P.feeds_for(built, batch)
    whole = run_program(built.program, built.params, feeds)
    pieces = run_plan(plan, built.params, feeds)
    assert len(pieces) == len(whole) == 2
    for a, b in zip(pieces, whole, strict=True):
        assert a.shape == b.shape
        assert float(np.abs(a - b).max()) == 0.0


@pytest.mark.parametrize("which", ["seed", "hoisted", "nested"])
def test_runner_drops_each_value_after_its_last_reader(which, seed, hoisted, nested):
    """With the plan's release schedule a step's environment ends holding the outputs and
    what branches yielded, nothing else; a value dropped too early would raise KeyError."""
    built = {"seed": seed, "hoisted": hoisted, "nested": nested}[which]
    plan = build_plan(built.program, IF, built.host_inputs)
    feeds = P.feeds_for(built, P.make_batch(6, [6, 6, 6], np.random.default_rng(3)))
    pool = RunnerPool(built.params)

    def run_one(seg, seg_feeds):
        return pool.get(seg.program).run(seg_feeds)

    left = {}
    for release in (None, plan.release_schedule()):
        env = _Env({k: as_tensor(v) for k, v in feeds.items()}, pool.params)
        execute_segments(plan.segments, env, run_one, release=release)
        left[release is None] = set(env)
    yielded = {k for s in plan.walk() for keys in s.yields.values() for k in keys}
    unread = set(feeds) - {k for s in plan.segments for k in reads(s)}
    assert left[False] - set(plan.outputs) <= yielded | unread
    assert "arg.0" not in left[False] and "arg.0" in left[True]
    assert len(left[True]) > len(left[False]) + 3


def test_branches_are_visibly_different(seed):
    """A wrong branch must be visible: the four host patterns give four different logits."""
    plan = build_plan(seed.program, IF, seed.host_inputs)
    rng = np.random.default_rng(0)
    batch = P.make_batch(4, [4, 4, 4], rng)
    logits = []
    for m in PATTERNS:
        batch = P.make_batch(4, m, rng, batch.meta)
        batch.args = (P.paddle.to_tensor(np.ones((4, P.HIDDEN), "float32")),)
        logits.append(run_plan(plan, seed.params, P.feeds_for(seed, batch))[0])
    for i in range(len(logits)):
        for j in range(i + 1, len(logits)):
            assert float(np.abs(logits[i] - logits[j]).max()) > 1e-3


# -- negative cases and options -----------------------------------------------------------------
def test_negative_no_control_flow_empty_blacklist():
    plain = P.build_plain_program()
    plan = build_plan(plain.program, [], [])
    assert len(plan.segments) == 1 and plan.segments[0].kind == CAPTURED
    assert plan.eager == []
    assert plan.coverage == 1.0
    assert plan.segments[0].live_in == ["arg.0", "meta.caches.0"]
    feeds = {"arg.0": np.ones((3, 8), "float32"), "meta.caches.0": np.ones((4, 8), "float32")}
    whole = run_program(plain.program, plain.params, feeds)
    assert all(np.array_equal(a, b) for a, b in
               zip(run_plan(plan, plain.params, feeds), whole, strict=True))


def test_empty_blacklist_captures_ifs_whole(seed):
    """Without a blacklist nothing is cut: the ifs are captured with their branches (the
    blacklist pass's job is to prevent that on a GPU)."""
    plan = build_plan(seed.program, [], seed.host_inputs)
    assert len(plan.segments) == 1 and plan.coverage == 1.0
    assert plan.segments[0].ops.count("pd_op.if") == 2


def test_no_recursion_runs_ifs_whole(seed):
    plan = build_plan(seed.program, IF, seed.host_inputs, recurse_into_branches=False)
    ifs = [s for s in plan.segments if s.ops == ["pd_op.if"]]
    assert len(ifs) == 2 and all(s.kind == EAGER and s.program is not None and not s.branches
                                 for s in ifs)
    assert plan.coverage == pytest.approx(16 / 22)
    feeds = P.feeds_for(seed, P.make_batch(5, [5, 5, 5], np.random.default_rng(1)))
    whole = run_program(seed.program, seed.params, feeds)
    assert all(np.array_equal(a, b) for a, b in
               zip(run_plan(plan, seed.params, feeds), whole, strict=True))


def test_min_segment_ops_reports_short_runs(seed):
    plan = build_plan(seed.program, IF, seed.host_inputs, min_segment_ops=3)
    assert [r["ops"] for r in plan.short_runs] == [["pd_op.matmul", "pd_op.relu"],
                                                   ["pd_op.matmul", "pd_op.tanh"]]
    short = plan.by_id(plan.short_runs[0]["id"])
    assert short.kind == EAGER and "min_segment_ops=3" in short.reason
    assert plan.coverage == pytest.approx(16 / 22)


def test_layers_give_two_eager_ifs_each():
    layers = 4
    built = P.build_cond_program(hoisted=True, layers=layers)
    plan = build_plan(built.program, IF, built.host_inputs)
    st = plan.stats()
    assert st["top_level_eager_control_flow"] == 2 * layers
    assert st["eager"] == 2 * layers
    assert st["compute_ops"] == 2 + layers * (2 + 2 + 2 + 2) + 4
    assert st["captured_ops"] == st["compute_ops"] - 2 * layers


# -- JSON and picture ---------------------------------------------------------------------------
def test_plan_json(seed):
    plan = build_plan(seed.program, IF, seed.host_inputs)
    data = json.loads(plan.dumps())
    assert data == plan.to_dict()
    # every segment names the user line that built it, whatever folder that is in
    assert all(s.location and s.location.startswith("tests/programs.py:") for s in plan.walk())
    assert [s["kind"] for s in data["segments"]] == [CAPTURED, EAGER, CAPTURED, EAGER, CAPTURED]
    first_if = data["segments"][1]
    assert first_if["ops"] == ["pd_op.if"] and first_if["cond"] == "pd_op.cast@10#0"
    assert first_if["branches"]["true"][0]["ops"] == ["pd_op.matmul", "pd_op.relu"]
    assert first_if["branches"]["false"] == []
    assert data["segments"][0]["live_out"] == ["pd_op.scale@6#0", "pd_op.cast@10#0"]
    assert data["stats"]["captured"] == 5


def test_plan_picture(tmp_path, nested):
    plan = build_plan(nested.program, IF, nested.host_inputs)
    png = draw_plan(plan, tmp_path / "plan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = draw_plan(plan, tmp_path / "plan.svg").read_text()
    assert "pd_op.if #1" in svg and "pd_op.if #3" in svg and "captured #4" in svg


def test_plan_picture_long_plan_is_elided_honestly(tmp_path):
    built = P.build_cond_program(hoisted=False, layers=12)
    plan = build_plan(built.program, IF, built.host_inputs)
    assert len(plan.segments) == 49
    svg = draw_plan(plan, tmp_path / "plan.svg", max_segments=12, tail=2).read_text()
    assert "37 top-level segments not drawn" in svg
    assert "4-segment group" in svg  # the per-layer pattern, detected exactly
    assert "captured #0 " in svg and f"captured #{plan.segments[-1].id} " in svg


def test_golden_text_of_a_branch_segment(seed):
    plan = build_plan(seed.program, IF, seed.host_inputs)
    first_if = plan.segments[1]
    (body,) = first_if.branches["true"]
    # the captured true branch of the first if, as a standalone program: its live-in is a feed,
    # the weight it reads is its own parameter, its live-out an output
    filecheck(program_text(body.program), f"""
        CHECK: ([[IN:%[0-9]+]]) = "pd_op.data" () {{{{.*}}}}name:"seg{body.id}.in0"
        CHECK: ([[W:%[0-9]+]]) = "builtin.parameter" () {{{{.*}}}}parameter_name:"w1"
        CHECK: ([[MM:%[0-9]+]]) = "pd_op.matmul" ([[IN]], [[W]])
        CHECK-NEXT: ([[R:%[0-9]+]]) = "pd_op.relu" ([[MM]])
        CHECK-NOT: "pd_op.if"
        CHECK: "builtin.shadow_output" ([[R]]) {{output_name:"seg{body.id}.out0"}}
    """)


# -- values that are not dense tensors: a tensor array around a loop ----------------------------
@pytest.fixture(scope="module")
def chunked():
    return P.build_chunked_loop_program()


def test_a_tensor_array_around_a_loop_stays_in_one_segment(chunked):
    """FastDeploy's chunked MoE: a list the loop appends to, concatenated after it. A cut
    between the array's creation and its last reader cannot feed a tensor array to the next
    segment, so the span from pd_op.create_array to pd_op.array_to_tensor runs as one eager
    segment; what comes before and after stays captured."""
    plan = build_plan(chunked.program, ["pd_op.while"], chunked.host_inputs)
    kinds = [(s.kind, s.ops[0], s.ops[-1]) for s in plan.segments]
    assert kinds == [(CAPTURED, "pd_op.full", "pd_op.concat"),
                     (EAGER, "pd_op.create_array", "pd_op.array_to_tensor"),
                     (CAPTURED, "pd_op.shape64", "pd_op.matmul")]
    assert "pd_op.while" in plan.segments[1].ops
    assert plan.segments[1].reason.startswith(
        "kept together: pd_op.create_array (pd_op.tensor_array<f32>) is used across a "
        "blacklisted op")


@pytest.mark.parametrize("tokens,chunks", [(1, 1), (4, 1), (10, 3), (16, 4)])
def test_the_loop_plan_equals_the_whole_program(chunked, tokens, chunks):
    plan = build_plan(chunked.program, ["pd_op.while"], chunked.host_inputs)
    x = np.random.default_rng(tokens).standard_normal((tokens, P.HIDDEN)).astype("float32")
    feeds = {"arg.0": x, "meta.num_chunks": np.array([chunks], dtype=np.int32)}
    whole = run_program(chunked.program, chunked.params, feeds)
    assert whole[0].shape == (tokens, P.HIDDEN)
    assert float(np.abs(run_plan(plan, chunked.params, feeds)[0] - whole[0]).max()) == 0.0


def test_a_list_not_split_by_a_blacklisted_op_is_captured_as_usual(chunked):
    """Negative case: with nothing blacklisted the array never meets a boundary."""
    plan = build_plan(chunked.program, [], chunked.host_inputs)
    assert [s.kind for s in plan.segments] == [CAPTURED]
