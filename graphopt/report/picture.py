"""The segment picture: a plan drawn top to bottom in execution order (SVG or PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from graphopt.ir.segment_plan import BRANCH_LABELS, CAPTURED, Segment, SegmentPlan

# -- picture ----------------------------------------------------------------------------------
_GREEN, _GREEN_EDGE = "#a6dba0", "#1b7837"
_RED, _RED_EDGE = "#f4a6a6", "#b2182b"
_GREY, _GREY_EDGE = "#dddddd", "#555555"
_BOX_H, _GAP, _HEADER_H, _LANE_LABEL_H, _PAD = 1.0, 0.3, 0.9, 0.6, 0.25


def _short_op(name: str) -> str:
    return name.split(".", 1)[-1]


def _ops_summary(ops: Sequence[str], limit: int = 3) -> str:
    names = [_short_op(o) for o in ops]
    if len(names) <= limit:
        return ", ".join(names)
    return f"{names[0]}, {names[1]} … {names[-1]}"


def _signature(seg: Segment) -> tuple:
    return (seg.kind, tuple(seg.ops), tuple(
        (label, tuple(_signature(s) for s in segs)) for label, segs in seg.branches.items()))


def _describe_elided(segs: list[Segment]) -> str:
    captured = sum(1 for s in segs if s.kind == CAPTURED)
    ifs = sum(1 for s in segs if s.is_branching)
    other = len(segs) - captured - ifs
    ops = sum(x.compute_ops for s in segs for x in s.walk() if x.kind == CAPTURED)
    text = (f"… {len(segs)} top-level segments not drawn: {captured} captured "
            f"({ops} captured ops, branches included), {ifs} eager pd_op.if")
    if other:
        text += f", {other} other eager"
    sigs = [_signature(s) for s in segs]
    for p in range(1, len(sigs) // 2 + 1):
        if all(sigs[i] == sigs[i + p] for i in range(len(sigs) - p)):
            kinds = ", ".join("pd_op.if" if s.is_branching else f"{s.kind} {s.compute_ops} ops"
                              for s in segs[:p])
            full, extra = divmod(len(sigs), p)
            more = f" + its first {extra}" if extra else ""
            text += f"\nthey repeat one {p}-segment group {full}×{more}: [{kinds}]"
            break
    return text


class _Drawer:
    def __init__(self, ax: Any | None) -> None:
        self.ax = ax

    def _box(self, x: float, y: float, w: float, h: float, face: str, edge: str,
             text: str, size: float, dashed: bool = False, va: str = "center") -> None:
        if self.ax is None:
            return

        self.ax.add_patch(FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=face,
            edgecolor=edge, linewidth=1.0, linestyle="--" if dashed else "-"))
        ty = y + h / 2 if va == "center" else y + 0.45
        self.ax.text(x + w / 2, ty, text, ha="center", va="center", fontsize=size,
                     clip_on=False)

    def segments(self, segs: Sequence[Segment], x: float, y: float, w: float,
                 depth: int = 0) -> float:
        """Draw `segs` stacked from `y` downwards in a lane of width `w`; return the height."""
        size = max(4.5, 9.0 - 1.5 * depth)
        y0 = y
        for seg in segs:
            if seg.is_branching:
                y += self._if(seg, x, y, w, depth) + _GAP
            elif seg.kind == CAPTURED:
                label = f"captured #{seg.id} · {seg.compute_ops} ops"
                if w > 4:
                    label += f"\n{_ops_summary(seg.ops)}"
                self._box(x, y, w, _BOX_H, _GREEN, _GREEN_EDGE, label, size)
                y += _BOX_H + _GAP
            else:
                label = f"eager #{seg.id} · {_ops_summary(seg.ops, 2)}"
                if w > 4 and seg.reason:
                    label += f"\n{seg.reason}"
                self._box(x, y, w, _BOX_H, _GREY, _GREY_EDGE, label, size)
                y += _BOX_H + _GAP
        return max(0.0, y - y0 - _GAP)

    def _if(self, seg: Segment, x: float, y: float, w: float, depth: int) -> float:
        lane_w = (w - 3 * _PAD) / 2
        inner = []
        for label in BRANCH_LABELS:
            segs = seg.branches.get(label, [])
            inner.append(_Drawer(None).segments(segs, 0, 0, lane_w, depth + 1) if segs
                         else _BOX_H * 0.7)
        h = _HEADER_H + _LANE_LABEL_H + max(inner) + _PAD
        size = max(4.5, 9.0 - 1.5 * depth)
        self._box(x, y, w, h, _RED, _RED_EDGE, f"{seg.ops[0]} #{seg.id}   (cond: {seg.cond})",
                  size, va="top")
        for i, label in enumerate(BRANCH_LABELS):
            lx = x + _PAD + i * (lane_w + _PAD)
            ly = y + _HEADER_H
            if self.ax is not None:
                self.ax.text(lx + lane_w / 2, ly + _LANE_LABEL_H / 2, label, ha="center",
                             va="center", fontsize=size - 1, style="italic")
            segs = seg.branches.get(label, [])
            if segs:
                self.segments(segs, lx, ly + _LANE_LABEL_H, lane_w, depth + 1)
            else:
                self._box(lx, ly + _LANE_LABEL_H, lane_w, _BOX_H * 0.7, "#ffffff", _GREY_EDGE,
                          "no ops (yield only)", size - 1, dashed=True)
        return h


def draw_plan(plan: SegmentPlan, path: Path, max_segments: int = 24, tail: int = 3) -> Path:
    """Draw `plan` to `path` (see :meth:`SegmentPlan.draw`)."""

    top = list(plan.segments)
    elided: list[Segment] = []
    if len(top) > max_segments:
        tail = max(0, min(tail, max_segments - 1))
        head_n = max_segments - tail
        elided = top[head_n: len(top) - tail]
        head, rest = top[:head_n], top[len(top) - tail:] if tail else []
    else:
        head, rest = top, []
    width = 10.0
    measure = _Drawer(None)
    h_head = measure.segments(head, 0, 0, width)
    h_rest = measure.segments(rest, 0, 0, width) if rest else 0.0
    elide_h = 1.6 if elided else 0.0
    total = h_head + (elide_h + 2 * _GAP if elided else 0.0) + h_rest + 1.5
    fig = Figure(figsize=(8.0, max(3.0, 0.42 * total)))
    ax = fig.add_axes((0.02, 0.01, 0.96, 0.98))
    drawer = _Drawer(ax)
    st = plan.stats()
    ax.text(width / 2, 0.2, f"{st['segments']} segments: {st['captured']} captured, "
            f"{st['eager']} eager ({st['eager_control_flow']} control flow) — coverage "
            f"{100 * plan.coverage:.2f}% of {st['compute_ops']} compute ops",
            ha="center", va="center", fontsize=9, weight="bold")
    y = 1.0
    y += drawer.segments(head, 0, y, width) + _GAP
    if elided:
        drawer._box(0, y, width, elide_h, "#ffffff", _GREY_EDGE, _describe_elided(elided), 8,
                    dashed=True)
        y += elide_h + _GAP
    if rest:
        y += drawer.segments(rest, 0, y, width)
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(max(y, total) + 0.2, -0.2)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)

    # keep SVG text as text (searchable, diffable) instead of glyph outlines
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(path, format=path.suffix.lstrip(".").lower() or "svg", dpi=110)
    return path
