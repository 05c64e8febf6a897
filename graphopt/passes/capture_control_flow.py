"""capture-control-flow: mark the functions whose Tensor ``if`` breaks the SOT graph.

SOT cannot trace a Python ``if`` on a Tensor value: the graph breaks and the step falls back to
Python. ``paddle.jit.marker.capture_control_flow`` makes SOT convert a function through the AST
path instead, which turns such an ``if`` into a ``pd_op.if`` op inside one graph. This is what the
seed change did by hand for DeepSeek-V3 in FastDeploy; here it is done for any model:

* ``mode=explicit``: the qualified names in ``targets`` are marked, then the model is traced
  once (no trace of the unmodified model: the report has no "before" numbers);
* ``mode=auto``: trace, read SOT's break reasons, mark the user function each break points at,
  retrace; repeat until no break is left or no progress is made.

Model code is taken as written. Where a Tensor ``if`` leaves a variable undefined (or ``None``)
on one path -- FastDeploy's own MLA shapes -- the function is first rewritten in memory by
:mod:`graphopt.passes.branch_normalizer` (define-before-branch, shapes from an eager run). The
user's source file is never edited, only functions in user code are touched (never Paddle's
or another library's), and every patch is undone when the run ends or the pass fails.

When breaks remain, the pass fails with one line: the user's file:line, Paddle's own reason
(from converting the failing function on its own), and what to change.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle
from paddle.jit.sot.utils import need_capture_control_flow

from graphopt.errors import ConfigError, PassError, one_line
from graphopt.ir.model_program import MarkedFunction, ModelProgram
from graphopt.ir.sources import add_user_code, format_location, is_library_file, user_frames
from graphopt.ir.trace import trace_step
from graphopt.models.base import BATCH_KINDS
from graphopt.passes import branch_normalizer as bn
from graphopt.passes.base import Pass, PassResult, Stage
from graphopt.passes.registry import register_pass

#: set on the functions this pass marked (never on the user's own function objects)
_MARK_ATTR = "__graphopt_marked__"


class Mode(str, enum.Enum):
    """How capture-control-flow finds the functions to mark."""

    auto = "auto"
    explicit = "explicit"


@dataclass
class CaptureControlFlowOptions:
    """Options of capture-control-flow (``pipeline.options.capture-control-flow``)."""

    #: auto: find the functions from SOT's break reasons; explicit: mark `targets`.
    mode: Mode = Mode.auto
    #: qualified names, e.g. graphopt.models.deepseek_v3.modeling.DeepseekV3MLAAttention.forward
    targets: list[str] = field(default_factory=list)
    #: auto mode gives up after this many trace-mark rounds.
    max_rounds: int = 8
    #: rewrite Tensor ifs that leave variables undefined on one path (define-before-branch).
    normalize_branches: bool = True

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.mode is Mode.explicit and not self.targets:
            raise ValueError("mode=explicit needs targets (qualified function names)")


@dataclass
class _Target:
    """A function found on an owner (a class or module of the model's code)."""

    owner: Any
    attr: str
    #: what ``owner.__dict__[attr]`` holds (a function, staticmethod or classmethod)
    raw: Any

    @property
    def fn(self) -> Any:
        return getattr(self.raw, "__func__", self.raw)

    @property
    def qualname(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    @property
    def location(self) -> str:
        code = self.fn.__code__
        return format_location(code.co_filename, code.co_firstlineno, self.fn.__name__)

    def wrap(self, fn: Any) -> Any:
        """`fn` in the same descriptor as the original (staticmethod stays staticmethod)."""
        return type(self.raw)(fn) if isinstance(self.raw, (staticmethod, classmethod)) else fn


@register_pass
class CaptureControlFlow(Pass):
    """Source pass: mark (and where needed rewrite in memory) the model functions whose Tensor
    ``if`` breaks the SOT graph, until the step traces as one graph (see the module doc)."""

    name = "capture-control-flow"
    summary = "Mark functions whose Tensor `if` breaks the SOT graph so it becomes pd_op.if."
    stage = Stage.SOURCE
    Options = CaptureControlFlowOptions
    ensures = ("single-graph",)

    def run(self, mp: ModelProgram) -> PassResult:
        #: qualname -> why the define-before-branch rewrite was not applied
        self._not_rewritten: dict[str, str] = {}
        batch = mp.trace_batch
        if batch is None:
            raise ConfigError("capture-control-flow needs a trace batch (mp.trace_batch)")
        _add_model_package(mp.model.layer)
        marked_before = len(mp.marked)
        rounds = 0
        before: int | None = None
        if self.options.mode is Mode.explicit:
            # The targets are known: no trace of the unmodified model is needed to find them,
            # so none is made (the report then has no "before" numbers rather than made-up ones).
            targets = [_resolve_qualname(q) for q in self.options.targets]
            for t in targets:
                self._check_markable(mp, t)
            self._mark(mp, targets)
            trace_step(mp, batch)
            rounds = 1
        else:
            trace_step(mp, batch)
            before = len(mp.trace.graph_breaks)
            while mp.trace.graph_breaks and rounds < self.options.max_rounds:
                targets = self._targets_from_breaks(mp)
                if not targets:
                    break
                rounds += 1
                self._mark(mp, targets)
                trace_step(mp, batch)
                # A marked function Paddle cannot convert breaks the graph at its call site;
                # say why now rather than mark its callers next round.
                for t in targets if mp.trace.graph_breaks else ():
                    reason = _convert_alone(mp, _current(t))
                    if reason:
                        raise PassError(self._with_note(t, reason))
        if mp.trace.graph_breaks or mp.program is None:
            raise PassError(self._diagnose(mp))
        new = mp.marked[marked_before:]
        return PassResult(
            modified=bool(new),
            stats={
                "mode": self.options.mode.value,
                "marked": [m.qualname for m in new],
                "rewrites": sum(len(m.rewrites) for m in new),
                "rounds": rounds,
                "graph_breaks_before": before,
                "graph_breaks_after": len(mp.trace.graph_breaks),
                "subgraphs_after": mp.trace.subgraphs,
            },
        )

    # -- which functions -------------------------------------------------------------------
    def _check_markable(self, mp: ModelProgram, t: _Target) -> None:
        if is_library_file(t.fn.__code__.co_filename):
            raise ConfigError(f"capture-control-flow: {t.qualname} is library code; graphopt only "
                              "marks the model's own functions")
        if t.fn is _top_level(mp):
            raise ConfigError(_top_level_message(t.qualname))

    def _targets_from_breaks(self, mp: ModelProgram) -> list[_Target]:
        top = _top_level(mp)
        found: dict[int, _Target] = {}
        for site in mp.trace.break_sites():
            t = _find_function(mp.model.layer, site)
            if t is None or t.fn is top or getattr(t.fn, _MARK_ATTR, False) \
                    or need_capture_control_flow(t.fn):
                continue  # explained by _diagnose if the break stays
            found.setdefault(id(t.fn), t)
        return list(found.values())

    # -- marking ---------------------------------------------------------------------------
    def _mark(self, mp: ModelProgram, targets: list[_Target]) -> None:
        sources: dict[int, bn.Source] = {}
        if self.options.normalize_branches:
            for t in targets:
                try:
                    src = bn.read_source(t.fn)
                except (OSError, TypeError, SyntaxError):
                    continue  # no source to rewrite: marked as it is
                if src.sites:
                    sources[id(t.fn)] = src
        observations = _observe(mp, [t for t in targets if id(t.fn) in sources], sources)
        for t in targets:
            src = sources.get(id(t.fn))
            definitions: list[bn.Definition] = []
            fn = None
            if src is not None:
                try:
                    fn, definitions = bn.rewrite(src, observations[id(t.fn)])
                except bn.NormalizeError as e:
                    # marked as written: Paddle's own error then says what fails, and this why
                    self._not_rewritten[t.qualname] = str(e)
            if fn is None:
                fn = _copy_function(t.fn)
            # Paddle's marker tags the function object it gets: always a copy, never the user's
            marked = paddle.jit.marker.capture_control_flow(fn)
            setattr(marked, _MARK_ATTR, True)
            mp.model.patch(t.owner, t.attr, t.wrap(marked))
            mp.marked.append(MarkedFunction(t.qualname, t.location,
                                            [d.describe() for d in definitions]))

    # -- when breaks remain ----------------------------------------------------------------
    def _with_note(self, t: _Target, reason: str) -> str:
        note = self._not_rewritten.get(t.qualname)
        return f"{reason}. graphopt could not rewrite it: {note}" if note else reason

    def _diagnose(self, mp: ModelProgram) -> str:
        """One line: where, Paddle's reason, what to change."""
        for t in _marked_functions(mp):
            reason = _convert_alone(mp, t)
            if reason:
                return self._with_note(t, reason)
        sites = mp.trace.break_sites()
        if not sites:
            return "SOT traced the step into several graphs without recording why"
        site = sites[0]
        t = _find_function(mp.model.layer, site)
        if t is not None and t.fn is _top_level(mp):
            why = _top_level_message(t.qualname)
        elif site["file"] and is_library_file(site["file"]):
            why = "the break is inside library code, which graphopt never patches"
        else:
            why = (f"SOT's reason: {site['reason']}: {site['message']}; capture-control-flow "
                   "found no function of the model's own to mark there")
        return (f"{site['location']}: the step still breaks the SOT graph "
                f"({len(mp.trace.graph_breaks)} break(s)): {why}")


def _current(t: _Target) -> _Target:
    """`t` as its owner holds it now (after marking)."""
    return _Target(t.owner, t.attr, inspect.getattr_static(t.owner, t.attr))


def _top_level(mp: ModelProgram) -> Any:
    return type(mp.model.layer).forward


def _top_level_message(qualname: str) -> str:
    return (
        f"{qualname} is the traced top-level function; Paddle cannot mark it with "
        "capture_control_flow. Move the Tensor `if` into a method it calls."
    )


def _observation_batches(mp: ModelProgram) -> list[Any]:
    """The trace batch, one batch of each kind, and a mixed batch of another token count
    (dimensions that differ between runs become dynamic in the placeholders)."""
    rng = np.random.default_rng(20251103)
    batches = [mp.trace_batch] + [mp.model.random_batch(rng, k) for k in BATCH_KINDS]
    for _ in range(16):
        other = mp.model.random_batch(rng, "mixed")
        if other.num_tokens != mp.trace_batch.num_tokens:
            batches.append(other)
            break
    return batches


def _observe(mp: ModelProgram, targets: list[_Target],
             sources: dict[int, bn.Source]) -> dict[int, bn.Observations]:
    """Run the model eagerly with observer versions of `targets` patched in (then undone)."""
    observations = {id(t.fn): bn.Observations() for t in targets}
    if not targets:
        return observations
    checkpoint = mp.patch_checkpoint()
    try:
        for t in targets:
            obs = bn.observer(sources[id(t.fn)], observations[id(t.fn)])
            mp.model.patch(t.owner, t.attr, t.wrap(obs))
        for batch in _observation_batches(mp):
            mp.model.step(batch, commit=False)
    finally:
        mp.model.restore_patches(checkpoint)
    return observations


def _marked_functions(mp: ModelProgram) -> list[_Target]:
    """Functions of the model's own code that are marked (by this pass or by the user)."""
    out = []
    for owner in _user_owners(mp.model.layer):
        for attr, raw in list(vars(owner).items()):
            fn = getattr(raw, "__func__", raw)
            if isinstance(fn, types.FunctionType) and need_capture_control_flow(fn):
                out.append(_Target(owner, attr, raw))
    return out


def _convert_alone(mp: ModelProgram, t: _Target) -> str | None:
    """Convert a marked function through Paddle's AST path on the arguments of its first call
    in an eager step; Paddle's error as one line at the user's file:line, or None if it
    converts."""
    calls: list[tuple[tuple, dict]] = []
    fn = t.fn

    def recorder(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append((args, kwargs))
        return fn(*args, **kwargs)

    checkpoint = mp.patch_checkpoint()
    try:
        mp.model.patch(t.owner, t.attr, t.wrap(recorder))
        mp.model.step(mp.trace_batch, commit=False)
    finally:
        mp.model.restore_patches(checkpoint)
    if not calls:
        return None  # not called by this step
    args, kwargs = calls[0]
    if args and isinstance(args[0], paddle.nn.Layer) and not isinstance(t.raw, staticmethod):
        target, args = types.MethodType(fn, args[0]), args[1:]
    else:
        target = fn
    try:
        with paddle.no_grad():
            paddle.jit.to_static(target, full_graph=True)(*args, **kwargs)
    except Exception as e:
        text = str(e)
        frames = user_frames(text)
        where = format_location(*frames[-1]) if frames else t.location
        reason = _paddle_reason(text) or one_line(e)
        hint = ("assign every variable the Tensor `if` sets on both of its paths, as a tensor "
                "of one type (e.g. zeros before the `if`)") if "UndefinedVar" in reason else \
               "write the Tensor `if` so both paths leave the same variables, with one type each"
        return (f"{where}: {t.qualname} cannot become pd_op.if; Paddle: {reason.rstrip('.')}. "
                f"To fix: {hint}")
    return None


def _paddle_reason(text: str) -> str:
    """The error line Paddle puts last in a dy2static failure (its own words, whole)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or line.startswith("(") or "Error:" in line:
            return line
    return lines[-1] if lines else ""


def _copy_function(fn: Any) -> Any:
    """A new function object with the same code, globals, defaults and closure."""
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    new.__dict__.update({k: v for k, v in fn.__dict__.items() if k != _MARK_ATTR})
    return new


def _add_model_package(layer: Any) -> None:
    """The package defining the model's Layer class is the user's code even when installed
    (another installed library the model uses is not). When the top Layer is a wrapper from
    Paddle or graphopt, the packages of its sublayers' classes stand in."""
    roots = {add_user_code(c.__module__) for c in type(layer).__mro__} - {None}
    if not roots:
        for sub in layer.sublayers():
            add_user_code(type(sub).__module__)


def _resolve_qualname(qualname: str) -> _Target:
    """``pkg.module.Class.method`` -> the target (owner, attribute, raw descriptor)."""
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
            raw = inspect.getattr_static(owner, parts[-1])
            return _Target(owner, parts[-1], raw)
    raise ConfigError(
        f"capture-control-flow: cannot find '{qualname}'; give module.Class.method "
        "(e.g. graphopt.models.deepseek_v3.modeling.DeepseekV3MLAAttention.forward)"
    )


def _user_owners(layer: paddle.nn.Layer) -> list[Any]:
    """The classes of the model's layers, and their modules, that are user code."""
    owners: list[Any] = []
    for sub in layer.sublayers(include_self=True):
        for cls in type(sub).__mro__:
            module = sys.modules.get(cls.__module__)
            file = getattr(module, "__file__", None) or ""
            if cls not in owners and not is_library_file(file):
                owners.append(cls)
    modules = [sys.modules[c.__module__] for c in owners if c.__module__ in sys.modules]
    return owners + [m for m in dict.fromkeys(modules)]


def _find_function(layer: paddle.nn.Layer, site: dict[str, Any]) -> _Target | None:
    """The user function whose code holds the break site (library code is never returned)."""
    file, line, func = site["file"], site["line"], site["function"]
    if not file or is_library_file(file):
        return None
    candidates: list[_Target] = []
    for owner in _user_owners(layer):
        for attr, raw in list(vars(owner).items()):
            fn = getattr(raw, "__func__", raw)
            code = getattr(fn, "__code__", None)
            if code is None or code.co_filename != file or (func and code.co_name != func):
                continue
            try:
                lines, start = inspect.getsourcelines(fn)
            except (OSError, TypeError):
                continue
            if start <= line < start + len(lines):
                candidates.append(_Target(owner, attr, raw))
    # prefer the class that defines it (not a module alias of the same function)
    for c in candidates:
        if isinstance(c.owner, type):
            return c
    return candidates[0] if candidates else None
