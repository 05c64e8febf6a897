"""Small, shared helpers over Paddle's PIR Python API (Paddle 3.3).

Every pass and runtime piece that touches a program uses these, so the quirks of the API
(static mode must be on to build ops, insertion points, where names live) are handled once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import paddle

#: ops that are bookkeeping, not computation (excluded from op counts and coverage).
NON_COMPUTE_OPS = frozenset(
    {"pd_op.data", "builtin.parameter", "builtin.shadow_output", "cf.yield", "builtin.combine",
     "builtin.split", "builtin.slice"}
)
#: control-flow ops: they hold blocks and decide on the host which one runs.
CONTROL_FLOW_OPS = frozenset({"pd_op.if", "pd_op.while", "pd_op.pylayer"})


@contextlib.contextmanager
def static_mode() -> Iterator[None]:
    """Enter Paddle static mode (needed to create ops or run the Executor); restore after."""
    was_dynamic = paddle.in_dynamic_mode()
    if was_dynamic:
        paddle.enable_static()
    try:
        yield
    finally:
        if was_dynamic:
            paddle.disable_static()


def clone_program(program: paddle.pir.Program) -> paddle.pir.Program:
    """A deep copy of `program` (new ops and values)."""
    return program.clone(paddle.pir.IrMapping())


def clone_program_with_mapping(
    program: paddle.pir.Program,
) -> tuple[paddle.pir.Program, paddle.pir.IrMapping]:
    """A deep copy plus the old-value -> new-value mapping (``mapping.look_up(v)``)."""
    mapping = paddle.pir.IrMapping()
    return program.clone(mapping), mapping


def walk_ops(block: paddle.pir.Block) -> Iterator[paddle.pir.Operation]:
    """Every op of `block` and, depth first, of the blocks nested in its ops."""
    for op in block.ops:
        yield op
        for sub in op.blocks():
            yield from walk_ops(sub)


def data_name(op: paddle.pir.Operation) -> str:
    """The feed name of a pd_op.data op."""
    return op.attrs()["name"]


def parameter_name(op: paddle.pir.Operation) -> str:
    """The name of a builtin.parameter op."""
    return op.attrs()["parameter_name"]


def data_ops(program: paddle.pir.Program) -> dict[str, paddle.pir.Operation]:
    """Feed name -> pd_op.data op, in program order."""
    return {
        data_name(op): op for op in program.global_block().ops if op.name() == "pd_op.data"
    }


def output_values(program: paddle.pir.Program) -> list[paddle.pir.Value]:
    """The values the program outputs (operands of its builtin.shadow_output ops), in order."""
    return [
        op.operand_source(0)
        for op in program.global_block().ops
        if op.name() == "builtin.shadow_output"
    ]


def output_names(program: paddle.pir.Program) -> list[str]:
    return [
        op.attrs()["output_name"]
        for op in program.global_block().ops
        if op.name() == "builtin.shadow_output"
    ]


def add_data_op(
    program: paddle.pir.Program,
    name: str,
    shape: list[int],
    dtype: paddle.dtype | str,
    before: paddle.pir.Operation | None = None,
) -> paddle.pir.Value:
    """Create a ``pd_op.data`` named `name` at the start of the program (or before `before`)."""
    block = program.global_block()
    anchor = before if before is not None else (block.ops[0] if block.ops else None)
    with static_mode(), paddle.static.program_guard(program):
        if anchor is not None:
            paddle.pir.set_insertion_point(anchor)
        try:
            value = paddle.static.data(name, shape, dtype)
        finally:
            paddle.pir.reset_insertion_point_to_end()
    return value


def add_output(program: paddle.pir.Program, value: paddle.pir.Value, name: str) -> None:
    """Append a ``builtin.shadow_output`` of `value` named `name`."""
    block = program.global_block()
    with static_mode(), paddle.static.program_guard(program):
        paddle.pir.set_insertion_point_to_block_end(block)
        paddle._pir_ops.set_persistable_value(value, name)


def op_count(program: paddle.pir.Program, compute_only: bool = True) -> int:
    """Number of ops, nested blocks included; bookkeeping ops excluded when `compute_only`."""
    return sum(
        1
        for op in walk_ops(program.global_block())
        if not compute_only or op.name() not in NON_COMPUTE_OPS
    )


def op_sequence(block_or_program, nested: bool = False) -> list[str]:
    """Op names in order (for golden tests). With `nested`, sub-blocks are walked too."""
    block = (
        block_or_program.global_block()
        if isinstance(block_or_program, paddle.pir.Program)
        else block_or_program
    )
    return [op.name() for op in (walk_ops(block) if nested else block.ops)]


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


def source_location(op: paddle.pir.Operation, roots: tuple[str, ...] = ("models",)) -> str | None:
    """``file:line (function)`` of the innermost frame of `op`'s call stack inside the model code.

    Paddle records the Python call stack of every op it builds (``op_callstack``); frames in
    Paddle itself are skipped, so this points at the model line that produced the op.
    """
    try:
        stack = op.attrs().get("op_callstack") or []
    except Exception:
        stack = []
    if not stack:
        # control-flow ops keep no call stack: report where their first located body op is
        for sub in op.blocks():
            for inner in sub.ops:
                where = source_location(inner, roots)
                if where:
                    return where
        return None
    best = None
    for frame in stack:
        m = _FRAME.search(frame)
        if not m:
            continue
        f = m.group("file")
        if "site-packages/paddle" in f or ("/paddle/" in f and "site-packages" in f):
            continue
        if any(f"/{r}/" in f for r in roots):
            best = f"{_short(f)}:{m.group('line')} ({m.group('func')})"
    return best


def _short(path: str) -> str:
    for marker in ("/models/", "/tests/", "/passes/", "/runtime/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1 :]
    return path


def program_text(program: paddle.pir.Program) -> str:
    """Paddle's own textual form of the program, without the (huge) op_callstack attributes."""
    return strip_callstacks(str(program))


_CALLSTACK_ATTR = re.compile(r",?op_callstack:\[[^\]]*\]")


def strip_callstacks(text: str) -> str:
    return _CALLSTACK_ATTR.sub("", text)


#: ops that are kept by dead-op pruning even when nothing uses their results.
_ROOT_OPS = frozenset({"builtin.shadow_output", "pd_op.data", "builtin.parameter", "cf.yield"})


def has_uses(value: paddle.pir.Value) -> bool:
    return len(value.all_used_ops()) > 0


def remove_dead_ops(block: paddle.pir.Block, keep_inputs: bool = True) -> int:
    """Remove ops of `block` whose results nobody uses (repeat until stable). Returns how many.

    Feeds (pd_op.data) and parameters are kept when `keep_inputs` (the runtime feeds by name);
    outputs and yields are always kept.
    """
    roots = _ROOT_OPS if keep_inputs else frozenset({"builtin.shadow_output", "cf.yield"})
    removed = 0
    changed = True
    while changed:
        changed = False
        for op in reversed(list(block.ops)):
            if op.name() in roots:
                continue
            if any(has_uses(r) for r in op.results()):
                continue
            block.remove_op(op)
            removed += 1
            changed = True
    return removed


def remove_outputs(program: paddle.pir.Program) -> None:
    """Drop every builtin.shadow_output (before giving a program new outputs)."""
    block = program.global_block()
    for op in list(block.ops):
        if op.name() == "builtin.shadow_output":
            block.remove_op(op)

