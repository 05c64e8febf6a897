"""Checkers run after passes (verify-each): the program's structure and the promised properties.

Checkers never mutate what they check. Two kinds:

* :func:`check_program` / :func:`verify_program`: structural invariants every PIR program must
  keep whatever pass ran — each operand is non-null and defined *before* its use, either earlier
  in the same block or earlier in an enclosing block (or is an argument of an enclosing block);
  ``pd_op.data`` feed names are unique; the program has at least one ``builtin.shadow_output``.
* :data:`PROPERTY_CHECKS`: ``property name -> checker(mp) -> violation message | None``. After a
  pass runs, the checkers of the properties it ``ensures`` are called; a returned string is a
  violation. Passes register checkers for their own properties with
  :func:`register_property_check`.

Paddle itself aborts the process (it does not raise) when it frees an op whose result is still
used by an op freed later — exactly what a use-before-def program does when it is garbage
collected. :func:`release_program` cuts every use-def edge of a program that is being thrown away
so it can be freed safely; the PassManager calls it on the work copy of a failed pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import paddle

from graphopt.errors import PassError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import CONTROL_FLOW_OPS, block_args, walk_ops

#: checker(mp) -> None if the property holds, else a one-line description of the violation.
PropertyCheck = Callable[["ModelProgram"], "str | None"]

#: property name -> checker. Extensible: see :func:`register_property_check`.
PROPERTY_CHECKS: dict[str, PropertyCheck] = {}

#: at most this many structural problems are reported (the first ones, in program order).
MAX_PROBLEMS = 20


class PassVerificationError(PassError):
    """The program or a promised property is broken after a pass."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = "; ".join(self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"verification failed: {shown}{more}")


def register_property_check(name: str) -> Callable[[PropertyCheck], PropertyCheck]:
    """Decorator: register `fn` as the checker of property `name` (replaces an older one)."""

    def deco(fn: PropertyCheck) -> PropertyCheck:
        PROPERTY_CHECKS[name] = fn
        return fn

    return deco


# -- structural verification ---------------------------------------------------------------------


def _definition_sites(program: paddle.pir.Program) -> dict[str, str]:
    """Value id -> where it is defined ("op 3 'pd_op.relu'"), for every value of the program."""
    sites: dict[str, str] = {}

    def visit(block: paddle.pir.Block, path: str) -> None:
        for j, v in enumerate(block_args(block)):
            sites[v.id] = f"{path}argument {j}"
        for i, op in enumerate(block.ops):
            where = f"{path}op {i} '{op.name()}'"
            for r in op.results():
                sites[r.id] = where
            for b, sub in enumerate(op.blocks()):
                visit(sub, f"{where} block {b}: ")

    visit(program.global_block(), "")
    return sites


def check_program(program: paddle.pir.Program) -> list[str]:
    """Structural problems of `program`, in program order (empty list: the program is sound)."""
    problems: list[str] = []
    sites = _definition_sites(program)
    # Values usable at the current point: defined earlier in this block or an enclosing one.
    # Keyed by Value.id (the C++ address): Python wrappers of one value differ, and Value's
    # `==` is overloaded to build an `equal` op.
    visible: set[str] = set()

    def visit(block: paddle.pir.Block, path: str) -> None:
        added = [v.id for v in block_args(block)]
        visible.update(added)
        for i, op in enumerate(block.ops):
            where = f"{path}op {i} '{op.name()}'"
            for k in range(op.num_operands()):
                v = op.operand_source(k)
                if not v.initialized():
                    problems.append(f"{where}: operand {k} is null")
                elif v.id not in visible:
                    site = sites.get(v.id)
                    origin = (
                        f"defined at {site}, which does not come before it in this or an "
                        "enclosing block"
                        if site
                        else "defined outside this program"
                    )
                    problems.append(
                        f"{where}: operand {k} is used before its definition ({origin})"
                    )
            for b, sub in enumerate(op.blocks()):
                visit(sub, f"{where} block {b}: ")
            for r in op.results():
                visible.add(r.id)
                added.append(r.id)
        # What a nested block defines is not visible after it.
        visible.difference_update(added)

    visit(program.global_block(), "")

    seen: dict[str, int] = {}
    for op in walk_ops(program.global_block()):
        if op.name() == "pd_op.data":
            name = op.attrs().get("name")
            seen[name] = seen.get(name, 0) + 1
    for name, n in seen.items():
        if n > 1:
            problems.append(
                f"pd_op.data name '{name}' is used by {n} ops (feed names must be unique)"
            )

    if not any(op.name() == "builtin.shadow_output" for op in program.global_block().ops):
        problems.append("the program has no builtin.shadow_output (no outputs: everything is dead)")
    return problems[:MAX_PROBLEMS]


def verify_program(program: paddle.pir.Program) -> None:
    """Raise :class:`PassVerificationError` listing the structural problems of `program`, if any."""
    problems = check_program(program)
    if problems:
        raise PassVerificationError(problems)


# -- properties ----------------------------------------------------------------------------------


def check_properties(mp: ModelProgram, properties: Iterable[str]) -> list[str]:
    """Violations of the given properties by `mp`. A property without a checker is a violation
    too: a promise nobody checks is not made."""
    problems = []
    for prop in properties:
        checker = PROPERTY_CHECKS.get(prop)
        if checker is None:
            problems.append(f"property '{prop}' has no checker (register_property_check)")
            continue
        try:
            message = checker(mp)
        except Exception as e:  # a crashing checker is a failed check, never a silent pass
            message = f"its checker raised {type(e).__name__}: {e}"
        if message:
            problems.append(f"property '{prop}' does not hold: {message}")
    return problems


@register_property_check("traced")
def _check_traced(mp: ModelProgram) -> str | None:
    return None if mp.program is not None else "the ModelProgram has no program"


@register_property_check("single-graph")
def _check_single_graph(mp: ModelProgram) -> str | None:
    if mp.program is None or mp.trace.subgraphs != 1 or mp.trace.graph_breaks:
        return (f"the step is {mp.trace.subgraphs} SOT graph(s) with "
                f"{len(mp.trace.graph_breaks)} break(s), not one program")
    return None


@register_property_check("no-control-flow")
def _check_no_control_flow(mp: ModelProgram) -> str | None:
    if mp.program is None:
        return "the ModelProgram has no program"
    left = sorted({op.name() for op in walk_ops(mp.program.global_block())} & CONTROL_FLOW_OPS)
    return f"control-flow ops left: {', '.join(left)}" if left else None


# -- disposal ------------------------------------------------------------------------------------


def release_program(program: paddle.pir.Program | None) -> None:
    """Make a program that is being discarded safe to free, whatever state a pass left it in.

    Every operand is pointed at a null value, so no op result is "still in use" when Paddle
    destroys the ops (back to front). The program is unusable afterwards.
    """
    if program is None:
        return
    null = paddle.pir.fake_value()
    for op in list(walk_ops(program.global_block())):
        for k in range(op.num_operands()):
            op.operand(k).set_source(null)
