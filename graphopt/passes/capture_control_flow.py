"""capture-control-flow: mark the functions whose Tensor ``if`` breaks the SOT graph.

SOT cannot trace a Python ``if`` on a Tensor value: the graph breaks and the step falls back to
Python. ``paddle.jit.marker.capture_control_flow`` makes SOT convert a function through the AST
path instead, which turns such an ``if`` into a ``pd_op.if`` op inside one graph. This is what the
seed change did by hand for DeepSeek-V3 in FastDeploy; here it is done for any model:

* ``mode=explicit``: the qualified names in ``targets`` are marked, then the model is traced
  once (no trace of the unmodified model: the report has no "before" numbers);
* ``mode=auto``: trace, read SOT's break reasons, mark the function each break points at,
  retrace; repeat until no break is left or no progress is made. What could not be removed is
  reported with the reason.

The model's source is never edited: the class attribute is replaced by the marked function and
the original is kept, so a failing pipeline restores it.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import paddle

from graphopt.errors import ConfigError
from graphopt.ir.trace import trace_step
from graphopt.passes.base import Pass, PassResult, Stage
from graphopt.passes.registry import register_pass

_MARK_ATTR = "__graphopt_marked__"


class Mode(str, enum.Enum):
    """How capture-control-flow finds the functions to mark."""

    auto = "auto"
    explicit = "explicit"


@dataclass
class CaptureControlFlowOptions:
    #: auto: find the functions from SOT's break reasons; explicit: mark `targets`.
    mode: Mode = Mode.auto
    #: qualified names, e.g. graphopt.models.deepseek_v3.modeling.DeepseekV3MLAAttention.forward
    targets: list[str] = field(default_factory=list)
    #: auto mode gives up after this many trace-mark rounds.
    max_rounds: int = 8

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.mode is Mode.explicit and not self.targets:
            raise ValueError("mode=explicit needs targets (qualified function names)")


@register_pass
class CaptureControlFlow(Pass):
    name = "capture-control-flow"
    summary = "Mark functions whose Tensor `if` breaks the SOT graph so it becomes pd_op.if."
    stage = Stage.SOURCE
    Options = CaptureControlFlowOptions

    def run(self, mp) -> PassResult:
        batch = mp.trace_batch
        if batch is None:
            raise ConfigError("capture-control-flow needs a trace batch (mp.trace_batch)")
        top = type(mp.model.layer).forward
        marked: list[str] = []
        unresolved: list[dict[str, Any]] = []
        rounds = 0
        before: int | None = None

        if self.options.mode == "explicit":
            # The targets are known: no trace of the unmodified model is needed to find them, so
            # none is made (the report then has no "before" numbers rather than made-up ones).
            for qualname in self.options.targets:
                owner, attr, fn = _resolve_qualname(qualname)
                if fn is top:
                    raise ConfigError(_top_level_message(qualname))
                if _mark(mp, owner, attr, fn):
                    marked.append(qualname)
            trace_step(mp, batch)
            rounds = 1
        else:
            trace_step(mp, batch)
            before = len(mp.trace.graph_breaks)
            while mp.trace.graph_breaks and rounds < self.options.max_rounds:
                rounds += 1
                progress = False
                unresolved = []
                for site in mp.trace.break_sites():
                    found = _find_function(mp.model.layer, site)
                    where = f"{site['file']}:{site['line']} ({site['function']})"
                    if found is None:
                        unresolved.append({"site": where, "why": "no model function found there"})
                        continue
                    owner, attr, fn = found
                    qualname = f"{fn.__module__}.{fn.__qualname__}"
                    if fn is top:
                        unresolved.append({"site": where, "why": _top_level_message(qualname)})
                        continue
                    if getattr(fn, _MARK_ATTR, False):
                        unresolved.append(
                            {"site": where, "why": f"{qualname} is marked but still breaks: "
                             f"{site['message']}"}
                        )
                        continue
                    if _mark(mp, owner, attr, fn):
                        marked.append(qualname)
                        progress = True
                if not progress:
                    break
                trace_step(mp, batch)
            if not mp.trace.graph_breaks:
                unresolved = []
            elif not unresolved:
                unresolved.append({"site": "-", "why": f"gave up after {rounds} rounds"})

        after = len(mp.trace.graph_breaks)
        return PassResult(
            modified=bool(marked),
            stats={
                "mode": self.options.mode.value,
                "marked": marked,
                "rounds": rounds,
                "graph_breaks_before": before,
                "graph_breaks_after": after,
                "subgraphs_after": mp.trace.subgraphs,
                "unresolved": unresolved,
            },
        )


def _top_level_message(qualname: str) -> str:
    return (
        f"{qualname} is the traced top-level function; Paddle cannot mark it with "
        "capture_control_flow. Move the Tensor `if` into a method it calls."
    )


def _mark(mp, owner: Any, attr: str, fn: Any) -> bool:
    if getattr(fn, _MARK_ATTR, False):
        return False
    # Paddle's marker tags the function object itself; tag a copy, so undoing the patch
    # (rollback, or the end of the run) leaves the model's own function untouched.
    marked = paddle.jit.marker.capture_control_flow(_copy_function(fn))
    setattr(marked, _MARK_ATTR, True)
    mp.model.patch(owner, attr, marked)
    return True


def _copy_function(fn: Any) -> Any:
    """A new function object with the same code, globals, defaults and closure."""
    raw = getattr(fn, "__func__", fn)
    new = types.FunctionType(
        raw.__code__, raw.__globals__, raw.__name__, raw.__defaults__, raw.__closure__
    )
    new.__kwdefaults__ = raw.__kwdefaults__
    new.__qualname__ = raw.__qualname__
    new.__module__ = raw.__module__
    new.__doc__ = raw.__doc__
    new.__dict__.update({k: v for k, v in raw.__dict__.items() if k != _MARK_ATTR})
    return new


def _resolve_qualname(qualname: str) -> tuple[Any, str, Any]:
    """``pkg.module.Class.method`` -> (owner, attribute, function)."""
    parts = qualname.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        owner = obj
        try:
            for p in parts[cut:]:
                owner, obj = obj, getattr(obj, p)
        except AttributeError:
            break
        if callable(obj):
            return owner, parts[-1], obj
    raise ConfigError(
        f"capture-control-flow: cannot find '{qualname}'; give module.Class.method "
        "(e.g. graphopt.models.deepseek_v3.modeling.DeepseekV3MLAAttention.forward)"
    )


def _find_function(layer: paddle.nn.Layer, site: dict[str, Any]) -> tuple[Any, str, Any] | None:
    """The (owner, attr, function) whose code contains the break site, among the model's code."""
    file, line, func = site["file"], site["line"], site["function"]
    if not file:
        return None
    owners: list[Any] = []
    for sub in layer.sublayers(include_self=True):
        for cls in type(sub).__mro__:
            if cls not in owners and cls.__module__ != "builtins":
                owners.append(cls)
    modules = {sys.modules.get(c.__module__) for c in owners} - {None}
    candidates: list[tuple[Any, str, Any]] = []
    for owner in owners + list(modules):
        for attr, value in list(vars(owner).items()):
            fn = inspect.unwrap(value) if callable(value) else None
            code = getattr(fn, "__code__", None)
            if code is None or code.co_filename != file:
                continue
            if func and code.co_name != func:
                continue
            try:
                lines, start = inspect.getsourcelines(fn)
            except (OSError, TypeError):
                continue
            if start <= line < start + len(lines):
                candidates.append((owner, attr, value))
    # prefer the class that defines it (not a module alias of the same function)
    for c in candidates:
        if isinstance(c[0], type):
            return c
    return candidates[0] if candidates else None
