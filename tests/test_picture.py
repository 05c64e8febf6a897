"""The segment picture: legend, one row per layer with identical layers folded, and each `if`'s
hoisted condition as source-like text."""

from __future__ import annotations

from graphopt.ir.segment_plan import CAPTURED, EAGER, Segment, SegmentPlan
from graphopt.report.picture import condition_texts, draw_plan, layer_rows
from tests import programs as P


def _captured(i: int, ops: list[str]) -> Segment:
    return Segment(i, CAPTURED, ops, [], [], [], compute_ops=len(ops))


def _if(i: int, cond: str, body: list[str]) -> Segment:
    return Segment(i, EAGER, ["pd_op.if"], [], [], [], cond=cond,
                   branches={"true": [_captured(i + 1, body)], "false": []})


def plan_like_dsv3(layers: int) -> SegmentPlan:
    """A plan shaped like DeepSeek-V3's: per layer a captured run then two ifs (prefill,
    decode); layer 0 leads in from the embedding, layer 1 from the dense MLP."""
    segs: list[Segment] = []
    k = 0
    for layer in range(layers):
        lead = (["pd_op.embedding", "pd_op.rms_norm"] if layer == 0 else
                ["pd_op.matmul", "pd_op.silu"] if layer == 1 else ["pd_op.topk", "pd_op.matmul"])
        segs.append(_captured(len(segs) * 3, lead))
        for which in (0, 1):
            segs.append(_if(len(segs) * 3, f"hoisted.{k}", ["pd_op.matmul", "pd_op.softmax"]))
            k += 1
            del which
    segs.append(_captured(len(segs) * 3, ["pd_op.rms_norm", "pd_op.matmul"]))
    return SegmentPlan(segs, [], [], [], ["pd_op.if"], total_compute_ops=100,
                       captured_compute_ops=99)


def test_61_layers_fold_into_three_rows(tmp_path):
    plan = plan_like_dsv3(61)
    rows = layer_rows(plan.segments, 61)
    # a row: the layer's ifs and the run after them (mostly its MLP); the first also holds the
    # embedding, the last the model's tail
    assert [label.split("\n")[0] for label, _ in rows] == ["layer 0", "layers 1–59", "layer 60"]
    assert "59× identical" in rows[1][0]
    first_ops = [s.ops[0] for s in rows[0][1]]
    assert first_ops == ["pd_op.embedding", "pd_op.if", "pd_op.if", "pd_op.matmul"]
    assert rows[1][1][0].is_branching and rows[2][1][-1].ops[0] == "pd_op.rms_norm"
    # each label names the segment numbers it stands for: the folded row covers the jump
    numbers = [label.rsplit("\n", 1)[1] for label, _ in rows]
    assert numbers[0] == "#0–#9" and numbers[1].startswith("#12–") and \
        numbers[2].endswith(f"#{max(s.id for s in plan.walk())}")
    assert layer_rows(plan.segments, 7) == []  # 122 ifs are not 7 layers' worth: no rows
    png = draw_plan(plan, tmp_path / "s.png", num_layers=61)
    svg = draw_plan(plan, tmp_path / "s.svg", num_layers=61)
    assert png.stat().st_size > 10_000
    text = svg.read_text()
    for needle in ("layer 0", "layers 1–59", "captured: one CUDA graph per capture size",
                   "pd_op.if: the host picks the branch", "empty branch"):
        assert needle in text, needle
    assert "eager: runs uncaptured" not in text  # no eager segment but the ifs: not in legend
    assert text.count("pd_op.if #") == 6  # 3 rows of 2 ifs drawn, not 122


def test_hoisted_conditions_read_as_source_text(tmp_path):
    prologue = P.build_prologue()
    texts = condition_texts(prologue)
    assert texts["hoisted.0"].startswith("max_len_tensor_cpu[1:2] != 0")
    assert texts["hoisted.1"].startswith("max_len_tensor_cpu[2:] != 0")
    assert "programs.py:" in texts["hoisted.0"]  # where the model code built it
    plan = plan_like_dsv3(1)
    svg = draw_plan(plan, tmp_path / "s.svg", prologue=prologue, num_layers=1).read_text()
    assert "if max_len_tensor_cpu[1:2] != 0" in svg
