"""The segment picture: a plan drawn top to bottom in execution order (SVG or PNG).

What it shows: a legend; each ``if`` with the condition it tests as source-like text
(``max_len_tensor_cpu[1] != 0``), derived from the ops of the host prologue that compute its
``hoisted.<k>`` input, with the model's file:line of the ``if``; and, when the model's layer
count is known, one row per layer, with runs of identical layers folded into one row
(``layers 2-60, 59x identical``), so a 61-layer plan stays readable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

from graphopt.ir.model_program import HostPrologue
from graphopt.ir.segment_plan import BRANCH_LABELS, CAPTURED, Segment, SegmentPlan
from graphopt.ir.sources import display_path, user_frames

# -- picture ----------------------------------------------------------------------------------
_GREEN, _GREEN_EDGE = "#a6dba0", "#1b7837"
_RED, _RED_EDGE = "#f4a6a6", "#b2182b"
_GREY, _GREY_EDGE = "#dddddd", "#555555"
_BOX_H, _GAP, _HEADER_H, _LANE_LABEL_H, _PAD = 1.0, 0.3, 0.9, 0.6, 0.25


# -- the condition an `if` tests, as text ------------------------------------------------------

_BINARY = {
    "pd_op.greater_than": ">", "pd_op.less_than": "<", "pd_op.greater_equal": ">=",
    "pd_op.less_equal": "<=", "pd_op.equal": "==", "pd_op.not_equal": "!=",
    "pd_op.add": "+", "pd_op.subtract": "-", "pd_op.multiply": "*", "pd_op.divide": "/",
    "pd_op.logical_and": "and", "pd_op.logical_or": "or", "pd_op.bitwise_and": "&",
    "pd_op.bitwise_or": "|", "pd_op.maximum": "max", "pd_op.minimum": "min",
}


_INT_MAX = 2**31 - 1


def _number(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _const(op: Any) -> list[Any] | None:
    """The value of a constant op (full, full_int_array), or None."""
    if op.name() == "pd_op.full_int_array":
        return list(op.attrs().get("value", []))
    if op.name() == "pd_op.full":
        return [op.attrs().get("value")]
    return None


def _is_bool(dtype: Any) -> bool:
    return "bool" in f"{dtype!s} {dtype!r}".lower()


def _paren(text: str) -> str:
    return f"({text})" if " " in text and not text.startswith("(") else text


def value_text(value: Any, depth: int = 0) -> str:
    """A PIR value as Python-like source text, following its producer ops (bounded depth)."""
    op = value.get_defining_op()
    if op is None or depth > 12:
        return "?"
    name = op.name()
    attrs = op.attrs()
    args = list(op.operands_source())
    if name == "pd_op.data":
        return str(attrs.get("name", "?")).removeprefix("meta.")
    const = _const(op)
    if const is not None:
        return _number(const[0]) if len(const) == 1 else str([_number(c) for c in const])
    if name == "pd_op.slice" and len(args) == 3:
        starts, ends = (_const(a.get_defining_op()) for a in args[1:])
        if starts is None or ends is None:
            return f"{value_text(args[0], depth + 1)}[...]"
        decrease = set(attrs.get("decrease_axis", []))
        index = [":"] * (max(attrs.get("axes", [0])) + 1)
        for axis, s0, e0 in zip(attrs.get("axes", []), starts, ends, strict=False):
            end = "" if e0 >= _INT_MAX else e0  # Paddle writes an open end as INT_MAX
            index[axis] = str(s0) if axis in decrease and e0 == s0 + 1 else f"{s0}:{end}"
        return f"{_paren(value_text(args[0], depth + 1))}[{', '.join(index)}]"
    if name == "pd_op.cast" and args:
        inner = value_text(args[0], depth + 1)
        return f"{_paren(inner)} != 0" if _is_bool(attrs.get("dtype")) else inner
    if name in ("pd_op.logical_not", "pd_op.bitwise_not") and args:
        return f"not {_paren(value_text(args[0], depth + 1))}"
    if name in _BINARY and len(args) == 2:
        a, b = (_paren(value_text(x, depth + 1)) for x in args)
        sym = _BINARY[name]
        return f"{sym}({a}, {b})" if sym in ("max", "min") else f"{a} {sym} {b}"
    if name == "pd_op.scale" and args:
        factor = _const(args[1].get_defining_op()) if len(args) > 1 else [attrs.get("scale")]
        bias = attrs.get("bias", 0.0)
        text = f"{_paren(value_text(args[0], depth + 1))} * {_number((factor or ['?'])[0])}"
        return text + (f" + {_number(bias)}" if bias else "")
    short = name.split(".", 1)[-1]
    return f"{short}({', '.join(value_text(a, depth + 1) for a in args)})"


def _source_of(op: Any) -> str:
    """``file:line`` of the user code that made `op` (from Paddle's op callstack), or ''."""
    stack = op.attrs().get("op_callstack") if "op_callstack" in op.attrs() else None
    if not stack:
        return ""
    frames = user_frames("\n".join(stack))
    if not frames:
        return ""
    file, line, _ = frames[-1]
    return f"{Path(display_path(file)).name}:{line}"


def condition_texts(prologue: HostPrologue | None) -> dict[str, str]:
    """``hoisted.<k>`` -> the condition as text, e.g. ``max_len_tensor_cpu[1] != 0
    (modeling.py:183)``, from the ops of the host prologue that compute it."""
    out: dict[str, str] = {}
    if prologue is None:
        return out
    for op in prologue.program.global_block().ops:
        if op.name() != "builtin.shadow_output":
            continue
        name = str(op.attrs().get("output_name", ""))
        with contextlib.suppress(Exception):
            value = op.operand_source(0)
            text = value_text(value)
            where = _source_of(value.get_defining_op())
            out[name] = f"{text}   ({where})" if where else text
    return out


# -- drawing ------------------------------------------------------------------------------------


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
    def __init__(self, ax: Any | None, conditions: dict[str, str] | None = None) -> None:
        self.ax = ax
        self.conditions = conditions or {}

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
        text = self.conditions.get(str(seg.cond))
        title = (f"{seg.ops[0]} #{seg.id}:  if {text}   [{seg.cond}]" if text else
                 f"{seg.ops[0]} #{seg.id}   (cond: {seg.cond})")
        self._box(x, y, w, h, _RED, _RED_EDGE, title, size, va="top")
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


def _ids(segs: Sequence[Segment]) -> list[int]:
    """The ids of `segs` and of every segment nested in their branches."""
    out: list[int] = []
    for s in segs:
        out.append(s.id)
        for branch in s.branches.values():
            out.extend(_ids(branch))
    return out


def layer_rows(top: Sequence[Segment], num_layers: int | None) -> list[tuple[str, list[Segment]]]:
    """The top-level segments cut into one row per layer, identical neighbours folded.

    A layer's row holds its ``if``s and the captured run after its last one: that run is
    mostly the layer's own MLP (it also starts the next layer, up to that layer's first
    ``if``: a captured segment cannot be cut in two); the first row also holds the lead-in
    (embedding), the last the model's tail (norm, head). Each label gives the segment numbers
    the row stands for, so a folded row explains the jump to the next row's numbers. Empty
    when the ``if`` count is not a multiple of `num_layers` (no layer structure).
    """
    ifs = [i for i, s in enumerate(top) if s.is_branching]
    if not num_layers or not ifs or len(ifs) % num_layers:
        return []
    per = len(ifs) // num_layers
    rows: list[tuple[int, list[Segment]]] = []
    start = 0
    for layer in range(num_layers):
        end = ifs[(layer + 1) * per - 1] + 1
        if layer == num_layers - 1:
            end = len(top)
        elif end < len(top) and not top[end].is_branching:
            end += 1  # the run after the layer's last if: its MLP (and the next one's start)
        rows.append((layer, list(top[start:end])))
        start = end
    folded: list[tuple[str, list[Segment]]] = []
    i = 0
    while i < len(rows):
        j = i
        sig = [_signature(s) for s in rows[i][1]]
        while j + 1 < len(rows) and [_signature(s) for s in rows[j + 1][1]] == sig:
            j += 1
        ids = _ids([s for _, segs in rows[i:j + 1] for s in segs])
        numbers = f"#{min(ids)}–#{max(ids)}" if ids else ""
        first, last = rows[i][0], rows[j][0]
        label = (f"layer {first}\n{numbers}" if i == j else
                 f"layers {first}–{last}\n{j - i + 1}× identical\n(drawn once)\n{numbers}")
        folded.append((label, rows[i][1]))
        i = j + 1
    return folded


_LEGEND = (
    (_GREEN, _GREEN_EDGE, False, "captured: one CUDA graph per capture size"),
    (_GREY, _GREY_EDGE, False, "eager: runs uncaptured"),
    (_RED, _RED_EDGE, False, "pd_op.if: the host picks the branch (hoisted condition)"),
    ("#ffffff", _GREY_EDGE, True, "empty branch"),
)


def _used(segs: Sequence[Segment], out: set[int] | None = None) -> set[int]:
    """Which legend entries (indices into _LEGEND) the drawing of `segs` uses."""
    out = set() if out is None else out
    for s in segs:
        if s.is_branching:
            out.add(2)
            for branch in s.branches.values():
                if branch:
                    _used(branch, out)
                else:
                    out.add(3)
        else:
            out.add(0 if s.kind == CAPTURED else 1)
    return out


def _legend(ax: Any, x: float, y: float, width: float, used: set[int] | None = None) -> float:
    """Draw the legend entries the picture uses (all when `used` is None) in one or two lines
    from `y`; return its height."""
    entries = [e for k, e in enumerate(_LEGEND) if used is None or k in used]
    col = width / 2
    for i, (face, edge, dashed, text) in enumerate(entries):
        lx, ly = x + (i % 2) * col, y + (i // 2) * 0.45
        ax.add_patch(FancyBboxPatch((lx, ly), 0.35, 0.3, boxstyle="round,pad=0.01",
                                    facecolor=face, edgecolor=edge,
                                    linestyle="--" if dashed else "-"))
        ax.text(lx + 0.45, ly + 0.15, text, va="center", fontsize=7)
    return 0.5 + 0.45 * ((len(entries) - 1) // 2)


def draw_plan(plan: SegmentPlan, path: Path, max_segments: int = 24, tail: int = 3,
              prologue: HostPrologue | None = None, num_layers: int | None = None) -> Path:
    """Draw `plan` to `path` (SVG or PNG by suffix; see the module doc).

    With `num_layers`, one row per layer (identical layers folded); otherwise, or when the plan
    has no layer structure, the first `max_segments` top-level segments and the last `tail`.
    `prologue` turns each ``if``'s ``hoisted.<k>`` condition into source-like text.
    """
    conditions = condition_texts(prologue)
    rows = layer_rows(plan.segments, num_layers)
    if rows:
        return _draw_rows(plan, rows, path, conditions)
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
    total = h_head + (elide_h + 2 * _GAP if elided else 0.0) + h_rest + 2.5
    fig = Figure(figsize=(8.0, max(3.0, 0.42 * total)))
    ax = fig.add_axes((0.02, 0.01, 0.96, 0.98))
    drawer = _Drawer(ax, conditions)
    _title(ax, plan, width / 2)
    y = 0.6
    y += _legend(ax, 0, y, width, _used([*head, *rest]))
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


def _title(ax: Any, plan: SegmentPlan, x: float) -> None:
    st = plan.stats()
    ax.text(x, 0.2, f"{st['segments']} segments: {st['captured']} captured, "
            f"{st['eager']} eager ({st['eager_control_flow']} control flow) — coverage "
            f"{100 * plan.coverage:.2f}% of {st['compute_ops']} compute ops",
            ha="center", va="center", fontsize=9, weight="bold")


_GUTTER = 1.9


def _draw_rows(plan: SegmentPlan, rows: list[tuple[str, list[Segment]]], path: Path,
               conditions: dict[str, str]) -> Path:
    """One row per layer (see :func:`layer_rows`), a label for each in a left gutter."""
    width = 10.0
    measure = _Drawer(None)
    heights = [measure.segments(segs, 0, 0, width) for _, segs in rows]
    total = sum(heights) + 2 * _GAP * len(rows) + 2.5
    fig = Figure(figsize=(9.6, max(3.0, 0.42 * total)))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98))
    drawer = _Drawer(ax, conditions)
    _title(ax, plan, (width - _GUTTER) / 2)
    y = 0.6
    y += _legend(ax, -_GUTTER, y, width + _GUTTER, _used([s for _, segs in rows for s in segs]))
    for i, ((label, segs), h) in enumerate(zip(rows, heights, strict=True)):
        band = "#f3f3f3" if i % 2 == 0 else "#ffffff"
        ax.add_patch(Rectangle((-_GUTTER, y - _GAP / 2), width + _GUTTER + 0.1, h + _GAP,
                               facecolor=band, edgecolor="none", zorder=0))
        folded = "identical" in label
        ax.text(-_GUTTER + 0.1, y + h / 2, label, ha="left", va="center", fontsize=8,
                weight="bold", color="#7a0177" if folded else "#333333")
        drawer.segments(segs, 0, y, width)
        y += h + 2 * _GAP
    ax.set_xlim(-_GUTTER - 0.1, width + 0.2)
    ax.set_ylim(max(y, total) + 0.2, -0.2)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(path, format=path.suffix.lstrip(".").lower() or "svg", dpi=110)
    return path
