"""Define-before-branch: rewrite a function in memory so Paddle can turn its Tensor ifs into
``pd_op.if``.

Paddle converts ``if <tensor>:`` into ``pd_op.if`` only when every variable live after the
``if`` is a tensor defined on both paths. Model code often is not written that way:

* FastDeploy's MLA before the seed change: ``fmha_out = None``; the prefill ``if`` assigns it;
  the decode ``if`` assigns it when still ``None`` and adds to it otherwise;
* FastDeploy's MLA today: ``attn_out`` assigned only inside ``if need_do_prefill:`` and
  ``if need_do_decode:``, a nested ``if need_do_prefill:`` merging both.

Paddle 3.3 fails on both (``full(): argument (position 2) must be double, but got
UndefinedVar``). The rewrite inserts, before such an ``if``, ``v = zeros(shape, dtype)`` for each
variable ``v`` the ``if`` assigns, that is read after it, and that is undefined or ``None``
before it. Shape and dtype come from running the model eagerly (:func:`observe`); a dimension
that differs between two runs (the token count) is read at run time, ``paddle.shape(x)[i]`` of
a tensor in scope whose size matched it in every run, so the placeholder has the shape the
branch would have had; when no such tensor exists the rewrite is refused.

Exactness: the placeholder is only ever *read* where the original would have used the
variable undefined (an error) or ``None``. ``v is None`` tests on a placeholder variable are
allowed in one form only, accumulate-with-None (``if v is None: v = x`` ``else: v = v + x``),
where ``0 + x == x`` exactly in floating point; any other ``is None`` use is refused with the
line to change. The rewritten function gets a made-up file name whose lines map back to the
user's file (:func:`graphopt.ir.sources.register_rewrite`); the user's file is never touched.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import textwrap
from dataclasses import dataclass, field
from typing import Any

import paddle

from graphopt.errors import PassError
from graphopt.ir.sources import format_location, register_rewrite

#: names the rewritten code binds as closure variables (no clash with model code)
_PADDLE = "_graphopt_paddle"
_OBSERVE = "_graphopt_observe"


class NormalizeError(PassError):
    """A branch pattern the rewrite cannot make exact; the message names the user's line."""


@dataclass
class Site:
    """One ``if`` that needs variables defined before it."""

    index: int
    node: ast.If
    names: list[str]
    #: the if's first line in the user's file
    line: int


@dataclass
class Definition:
    """One variable defined as zeros before one ``if``."""

    name: str
    line: int
    #: source expressions of the dimensions (``"16"``, ``"paddle.shape(hidden_states)[0]"``)
    shape: list[str]
    dtype: str

    def describe(self) -> str:
        dims = ", ".join(d.replace(f"{_PADDLE}.", "paddle.") for d in self.shape)
        return f"`{self.name}` defined as zeros([{dims}], {self.dtype}) before the if at line " \
               f"{self.line}"


@dataclass
class Source:
    """A function's source, parsed."""

    fn: Any
    file: str
    #: line of the ``def`` in the user's file
    def_line: int
    #: the dedented source lines, from the ``def`` (decorators dropped) to the end
    lines: list[str]
    tree: ast.FunctionDef
    sites: list[Site] = field(default_factory=list)


def read_source(fn: Any) -> Source:
    """Parse `fn` (a function or method); raises OSError/TypeError when it has no source."""
    raw = getattr(fn, "__func__", fn)
    lines, start = inspect.getsourcelines(raw)
    file = inspect.getsourcefile(raw) or raw.__code__.co_filename
    tree = ast.parse(textwrap.dedent("".join(lines))).body[0]
    if not isinstance(tree, ast.FunctionDef):
        raise TypeError(f"{raw.__qualname__} is not a plain function")
    first = tree.lineno  # 1-based, after decorators
    body = textwrap.dedent("".join(lines)).splitlines(keepends=True)[first - 1:]
    # re-parse from the def so line numbers count from it
    tree = ast.parse("".join(body)).body[0]
    src = Source(raw, file, start + first - 1, body, tree)  # type: ignore[arg-type]
    src.sites = _find_sites(src)
    return src


# -- analysis ---------------------------------------------------------------------------------
def _stored(node: ast.AST) -> set[str]:
    """Names bound anywhere in `node`, nested functions and classes excluded."""
    out: set[str] = set()

    def visit(n: ast.AST) -> None:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        for c in ast.iter_child_nodes(n):
            visit(c)

    visit(node)
    return out


def _definitely_assigned(stmts: list[ast.stmt]) -> set[str]:
    """Names bound on every path through `stmts` (conservative)."""
    out: set[str] = set()
    for s in stmts:
        if isinstance(s, ast.If):
            out |= _definitely_assigned(s.body) & _definitely_assigned(s.orelse)
        elif isinstance(s, ast.With):  # its `as` names, and what its body binds on every path
            for item in s.items:
                if item.optional_vars is not None:
                    out |= _stored(item.optional_vars)
            out |= _definitely_assigned(s.body)
        elif isinstance(s, (ast.Assign, ast.AugAssign)) or (
            isinstance(s, ast.AnnAssign) and s.value is not None
        ):
            out |= _stored(s)
    return out


def _find_sites(src: Source) -> list[Site]:
    fn = src.tree
    args = fn.args
    params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
    loads = [(n.lineno, n.id) for n in ast.walk(fn)
             if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
    sites: list[Site] = []

    def block(stmts: list[ast.stmt], defined: set[str], none: set[str]) -> None:
        for s in stmts:
            if isinstance(s, ast.If):
                live = {name for ln, name in loads if ln > s.end_lineno}
                need = sorted(v for v in _stored(s) & live if v not in defined or v in none)
                if need:
                    sites.append(Site(len(sites), s, need, src.def_line + s.lineno - 1))
                    defined, none = defined | set(need), none - set(need)
                block(s.body, set(defined), set(none))
                block(s.orelse, set(defined), set(none))
                both = _definitely_assigned(s.body) & _definitely_assigned(s.orelse)
                defined, none = defined | both, none - both
            elif isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant) \
                    and s.value.value is None:
                names = _stored(s)
                defined, none = defined - names, none | names
            elif isinstance(s, (ast.For, ast.While, ast.With, ast.Try)):
                for part in ("body", "orelse", "finalbody"):
                    block(getattr(s, part, None) or [], set(defined), set(none))
                for handler in getattr(s, "handlers", []):
                    block(handler.body, set(defined), set(none))
                if isinstance(s, ast.With):
                    defined |= _definitely_assigned(s.body)
            else:
                names = _stored(s)
                defined, none = defined | names, none - names

    block(fn.body, params, set())
    return sites


def _check_none_tests(src: Source, names: set[str]) -> None:
    """Refuse ``is None`` tests on pre-defined variables, but for accumulate-with-None."""
    for node in ast.walk(src.tree):
        if not isinstance(node, ast.Compare) or len(node.ops) != 1:
            continue
        left, op, right = node.left, node.ops[0], node.comparators[0]
        if not (isinstance(left, ast.Name) and left.id in names
                and isinstance(op, (ast.Is, ast.IsNot))
                and isinstance(right, ast.Constant) and right.value is None):
            continue
        if_node = next((n for n in ast.walk(src.tree)
                        if isinstance(n, ast.If) and n.test is node), None)
        if if_node is None or not _is_accumulate(if_node, left.id, isinstance(op, ast.Is)):
            line = src.def_line + node.lineno - 1
            raise NormalizeError(
                f"{format_location(src.file, line)}: `{left.id}` may be undefined after a Tensor "
                f"if and is compared with None here; graphopt can make that exact only in the "
                f"form `if {left.id} is None: {left.id} = x` / `else: {left.id} = {left.id} + x`."
                f" Define `{left.id}` on both paths of the Tensor if (e.g. as zeros), or use "
                "that form"
            )


def _is_accumulate(node: ast.If, name: str, is_none: bool) -> bool:
    """``if v is None: v = x`` / ``else: v = v + x`` (or ``v += x``; branches swapped for
    ``is not None``)."""
    first, second = (node.body, node.orelse) if is_none else (node.orelse, node.body)
    if len(first) != 1 or len(second) != 1:
        return False
    init, acc = first[0], second[0]
    if not (isinstance(init, ast.Assign) and len(init.targets) == 1
            and isinstance(init.targets[0], ast.Name) and init.targets[0].id == name):
        return False
    if isinstance(acc, ast.AugAssign) and isinstance(acc.op, ast.Add):
        added = acc.value
    elif isinstance(acc, ast.Assign) and isinstance(acc.value, ast.BinOp) \
            and isinstance(acc.value.op, ast.Add):
        a, b = acc.value.left, acc.value.right
        added = b if isinstance(a, ast.Name) and a.id == name else \
            a if isinstance(b, ast.Name) and b.id == name else None
        if added is None:
            return False
    else:
        return False
    return ast.dump(added) == ast.dump(init.value)


# -- compiling rewritten source ---------------------------------------------------------------
def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _compile(src: Source, before: dict[int, list[str]], after: dict[int, list[str]],
             tag: str, free: dict[str, Any]) -> Any:
    """Compile `src` with lines inserted before/after given (def-relative, 1-based) lines.

    The function is defined inside a factory whose parameters are the extra names in `free`
    and the original's closure variables, so the rewritten code finds them as closure cells
    and the module's globals stay untouched.
    """
    raw = src.fn
    freevars = [*free, *raw.__code__.co_freevars]
    out: list[str] = []
    line_map: dict[int, int] = {}
    # put the def on its own line number when there is room, so most lines map to themselves
    out.extend("\n" for _ in range(max(0, src.def_line - 2)))
    out.append(f"def _graphopt_factory({', '.join(freevars)}):\n")
    for i, line in enumerate(src.lines, start=1):
        original = src.def_line + i - 1
        for new in before.get(i, []):
            out.append("    " + new)
            line_map[len(out)] = original
        out.append("    " + line if line.strip() else "\n")
        line_map[len(out)] = original
        for new in after.get(i, []):
            out.append("    " + new)
            line_map[len(out)] = original
    out.append(f"    return {src.tree.name}\n")
    text = "".join(out)
    fake = f"<graphopt {tag} of {src.file}:{src.def_line}>"
    namespace: dict[str, Any] = {}
    exec(compile(text, fake, "exec"), raw.__globals__, namespace)
    cells = [c.cell_contents for c in (raw.__closure__ or ())]
    fn = namespace["_graphopt_factory"](*free.values(), *cells)
    for attr in ("__qualname__", "__module__", "__defaults__", "__kwdefaults__", "__doc__"):
        setattr(fn, attr, getattr(raw, attr))
    fn.__dict__.update(raw.__dict__)
    # Paddle reads the source of what it converts: it must find the rewritten text
    linecache.cache[fake] = (len(text), None, text.splitlines(keepends=True), fake)
    register_rewrite(fake, src.file, line_map)
    return fn


def observer(src: Source, observations: Observations) -> Any:
    """`src`'s function, recording into `observations` the tensors in scope before each site's
    ``if`` and, after it, each variable that needs a definition (when it is bound)."""
    before: dict[int, list[str]] = {}
    after: dict[int, list[str]] = {}
    for site in src.sites:
        ind = _indent(src.lines[site.node.lineno - 1])
        before.setdefault(site.node.lineno, []).append(
            f"{ind}{_OBSERVE}.scope({site.index}, locals())\n")
        lines = after.setdefault(site.node.end_lineno, [])
        for v in site.names:
            lines += [f"{ind}try:\n", f"{ind}    {_OBSERVE}.record({site.index}, {v!r}, {v})\n",
                      f"{ind}except NameError:\n", f"{ind}    pass\n"]
    return _compile(src, before, after, "observer", {_OBSERVE: observations})


@dataclass
class Observations:
    """What eager runs saw at each site: for each variable bound after the ``if``, its shape
    and dtype, with the shapes of the tensors that were in scope before the ``if`` in that run.
    """

    seen: dict[tuple[int, str], list[tuple[list[int], str, dict[str, list[int]]]]] = field(
        default_factory=dict)
    _scope: dict[int, dict[str, list[int]]] = field(default_factory=dict)

    def scope(self, index: int, local_vars: dict[str, Any]) -> None:
        self._scope[index] = {k: list(v.shape) for k, v in local_vars.items()
                              if isinstance(v, paddle.Tensor)}

    def record(self, index: int, name: str, value: Any) -> None:
        if isinstance(value, paddle.Tensor):
            self.seen.setdefault((index, name), []).append(
                (list(value.shape), str(value.dtype).rsplit(".", 1)[-1],
                 self._scope.get(index, {})))

    def placeholder(self, index: int, name: str) -> tuple[list[str], str] | None:
        """The placeholder's shape as source expressions and its dtype, None if unusable.

        A dimension equal in every run is a constant. One that differs (the token count) is
        read at run time from a tensor in scope whose dimension matched it in every run, so the
        placeholder has exactly the shape the branch would have given (a captured graph needs
        one input shape per capture size, whichever branch ran).
        """
        seen = self.seen.get((index, name))
        if not seen or len({(len(s), d) for s, d, _ in seen}) != 1:
            return None
        runs = [s for s, _, _ in seen]
        scopes = [sc for _, _, sc in seen]
        dims: list[str] = []
        for k, d in enumerate(runs[0]):
            if all(s[k] == d for s in runs):
                dims.append(str(d))
                continue
            source = _matching_dim(scopes, [s[k] for s in runs])
            if source is None:
                return None
            # paddle.shape is an op: the size is read when the program runs, not baked in from
            # the traced batch as `x.shape[0]` would be
            dims.append(f"{_PADDLE}.shape({source[0]})[{source[1]}]")
        return dims, seen[0][1]


def _matching_dim(scopes: list[dict[str, list[int]]], sizes: list[int]
                  ) -> tuple[str, int] | None:
    """A (tensor name, axis) whose size equalled `sizes[i]` in run i, for every run."""
    for name, shape in scopes[0].items():
        for axis in range(len(shape)):
            if all(name in sc and len(sc[name]) > axis and sc[name][axis] == size
                   for sc, size in zip(scopes, sizes, strict=True)):
                return name, axis
    return None


def rewrite(src: Source, observations: Observations) -> tuple[Any, list[Definition]]:
    """`src`'s function with the observed variables defined before their ``if``s."""
    before: dict[int, list[str]] = {}
    defined: list[Definition] = []
    for site in src.sites:
        ind = _indent(src.lines[site.node.lineno - 1])
        for v in site.names:
            got = observations.placeholder(site.index, v)
            if got is None:
                continue
            dims, dtype = got
            before.setdefault(site.node.lineno, []).append(
                f"{ind}{v} = {_PADDLE}.zeros([{', '.join(dims)}], dtype={dtype!r})\n")
            defined.append(Definition(v, site.line, dims, dtype))
    _check_none_tests(src, {d.name for d in defined})
    return _compile(src, before, {}, "rewrite", {_PADDLE: paddle}), defined
