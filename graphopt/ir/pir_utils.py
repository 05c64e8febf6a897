"""Small, shared helpers over Paddle's PIR Python API (Paddle 3.3).

Every pass and runtime piece that touches a program uses these, so the quirks of the API
(static mode must be on to build ops, insertion points, where names live) are handled once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import paddle
from paddle.base import core

from graphopt.ir.sources import FRAME, format_location, is_library_file, original_location

#: control-flow ops: they hold blocks and decide on the host which one runs.
CONTROL_FLOW_OPS = frozenset({"pd_op.if", "pd_op.while", "pd_op.pylayer"})
#: a program's inputs, outputs and block terminators: no kernel, never captured, never dead.
INTERFACE_OPS = frozenset({"pd_op.data", "builtin.parameter", "builtin.shadow_output", "cf.yield"})
#: ops that only pack or unpack values: no kernel of their own.
PACKING_OPS = frozenset({"builtin.combine", "builtin.split", "builtin.slice"})
#: bookkeeping, not computation (excluded from op counts and capture coverage).
NON_COMPUTE_OPS = INTERFACE_OPS | PACKING_OPS


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


def release_native_memory() -> None:
    """Drop every interpreter Paddle has compiled in this process and hand freed heap back to
    the OS.

    Paddle caches one interpreter per program it ran (SOT's graphs, run_program calls) for the
    life of the process; for a 14k-op program that is hundreds of MB. A program run again later
    simply compiles again. glibc keeps freed memory for reuse; trimming returns it, so the
    resident size says what is really in use.
    """
    core.clear_executor_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def clone_program(program: paddle.pir.Program) -> paddle.pir.Program:
    """A deep copy of `program` (new ops and values)."""
    return program.clone(paddle.pir.IrMapping())


def clone_program_with_mapping(
    program: paddle.pir.Program,
) -> tuple[paddle.pir.Program, paddle.pir.IrMapping]:
    """A deep copy plus the old-value -> new-value mapping (``mapping.look_up(v)``)."""
    mapping = paddle.pir.IrMapping()
    return program.clone(mapping), mapping


def block_args(block: paddle.pir.Block) -> list[paddle.pir.Value]:
    """The arguments of a block (``while`` bodies have some; ``if`` blocks none)."""
    args = list(block.args())
    kwargs = block.kwargs()
    args.extend(kwargs.values() if isinstance(kwargs, dict) else kwargs)
    return args


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
) -> paddle.pir.Value:
    """Create a ``pd_op.data`` named `name` after the program's other data ops (where
    ``paddle.static.data`` puts it)."""
    return add_data_ops(program, [(name, shape, dtype)])[0]


def add_data_ops(
    program: paddle.pir.Program,
    specs: Sequence[tuple[str, list[int], paddle.dtype | str]],
) -> list[paddle.pir.Value]:
    """Create one ``pd_op.data`` per ``(name, shape, dtype)``, in order, after the program's
    other data ops: the program ``paddle.static.data`` would build, but the block's ops are
    listed once for all of them (``paddle.static.data`` lists them per call: 17 ms each at 61
    layers)."""
    block = program.global_block()
    anchor = next((op for op in block.ops if op.name() != "pd_op.data"), None)
    values = []
    with static_mode(), paddle.static.program_guard(program):
        if anchor is not None:
            paddle.pir.set_insertion_point(anchor)
        else:
            paddle.pir.set_insertion_point_to_block_end(block)
        try:
            for name, shape, dtype in specs:
                if not isinstance(dtype, paddle.dtype):
                    dtype = paddle.pir.core.convert_np_dtype_to_dtype_(dtype)
                values.append(paddle._pir_ops.data(name, list(shape), dtype, core.Place()))
        finally:
            paddle.pir.reset_insertion_point_to_end()
    return values


#: ops with no operands and no side effects that create a constant tensor from attributes
CONSTANT_OPS = frozenset({"pd_op.full", "pd_op.full_int_array"})


@dataclasses.dataclass(frozen=True)
class ConstantSpec:
    """A constant op replaced by a program input: the op's name and attributes (``shape``,
    ``value``, ``dtype``, ``place``), enough to make the same tensor once outside the program."""

    feed_name: str
    op_name: str
    attrs: dict[str, Any]


def hoist_constants(program: paddle.pir.Program, prefix: str) -> list[ConstantSpec]:
    """Replace the constant ops of `program`'s global block (:data:`CONSTANT_OPS`) with
    ``pd_op.data`` inputs named ``<prefix><k>``; return what each input must be fed.

    Each constant op allocates and fills a fresh tensor on every run; fed as an input it is
    shared into the run by reference. A segment cut from a big program holds its own copies of
    constants the whole program shares (hundreds per step at 61 layers), so this is most of
    what a piecewise step costs more than the whole program. A constant is left in place when
    something could write into it or hand it out: an in-place op (``pd_op.*_``), a program
    output or block terminator, or an op in a nested block (whose own in-place rules are not
    the global block's). The data op keeps the constant's place (shape arguments stay on the
    host), and its type, so no type downstream changes.
    """
    block = program.global_block()
    ops = block.ops  # one listing: each builds a Python object per op
    candidates = []
    for op in ops:
        if op.name() not in CONSTANT_OPS or op.num_results() != 1:
            continue
        users = op.result(0).all_used_ops()
        if users and all(_reads_only(u, block) for u in users):
            candidates.append(op)
    if not candidates:
        return []
    specs = []
    with static_mode(), paddle.static.program_guard(program):
        paddle.pir.set_insertion_point(ops[0])
        try:
            for k, op in enumerate(candidates):
                attrs = {a: v for a, v in op.attrs().items() if a in ("shape", "value", "dtype",
                                                                        "place")}
                result = op.result(0)
                name = f"{prefix}{k}"
                new = paddle._pir_ops.data(name, list(result.shape), result.dtype,
                                           attrs["place"])
                new.stop_gradient = True
                result.replace_all_uses_with(new)
                specs.append(ConstantSpec(name, op.name(), attrs))
        finally:
            paddle.pir.reset_insertion_point_to_end()
    for op in candidates:
        block.remove_op(op)
    return specs


def _reads_only(user: paddle.pir.Operation, block: paddle.pir.Block) -> bool:
    name = user.name()
    return (name not in INTERFACE_OPS and not name.endswith("_")
            and user.get_parent_block() == block)


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


def source_frame(op: paddle.pir.Operation) -> tuple[str, int, str] | None:
    """``(file, line, function)`` of the innermost user frame that built `op`, or None.

    Paddle records the Python call stack of every op it builds (``op_callstack``); frames in
    Paddle, other libraries and graphopt's own machinery are skipped, rewritten functions are
    translated back to the user's file. Control-flow ops keep no stack: the first located op of
    their body stands in.
    """
    try:
        stack = op.attrs().get("op_callstack") or []
    except Exception:
        stack = []
    if not stack:
        for sub in op.blocks():
            for inner in sub.ops:
                where = source_frame(inner)
                if where:
                    return where
        return None
    frames = [m for m in (FRAME.search(f) for f in stack) if m]
    # An op traced by SOT is built while SOT *simulates* the model's frames: the real stack
    # runs from whoever called the trace into Paddle's jit machinery, and no model frame is in
    # it. User frames before that entry are the trace's caller (a script, a test), never the
    # code that built the op, so only frames after it count.
    entry = next((i for i, m in enumerate(frames) if _TRACE_ENTRY in m.group("file")), -1)
    best = None
    for m in frames[entry + 1:]:
        file, line = original_location(m.group("file"), int(m.group("line")))
        if not is_library_file(file):
            best = (file, line, m.group("func"))
    return best


#: where a frame enters Paddle's tracing (SOT, dy2static); see source_frame
_TRACE_ENTRY = f"{os.sep}paddle{os.sep}jit{os.sep}"


def source_location(op: paddle.pir.Operation) -> str | None:
    """``file:line (function)`` of the innermost user frame that built `op` (see
    :func:`source_frame`), or None."""
    frame = source_frame(op)
    return format_location(*frame) if frame else None


def output_producers(program: paddle.pir.Program) -> dict[str, paddle.pir.Operation]:
    """Output name -> the op computing it, for each ``builtin.shadow_output`` of `program`."""
    return {
        op.attrs()["output_name"]: op.operand_source(0).get_defining_op()
        for op in program.global_block().ops if op.name() == "builtin.shadow_output"
    }


def branch_location(op: paddle.pir.Operation, prologue: paddle.pir.Program | None) -> str | None:
    """Where the user's code tests the condition of a control-flow `op`, else where it is built.

    An ``if`` keeps no call stack of its own, and its body's first op is somewhere inside a
    branch; the condition's producer is the line with the ``if``. A condition hoisted into the
    host `prologue` is found there through its ``hoisted.<k>`` feed.
    """
    if op.name() == "pd_op.if":
        src = op.operand_source(0).get_defining_op()
        if src is not None and src.name() == "pd_op.data" and prologue is not None:
            src = output_producers(prologue).get(data_name(src))
        where = source_location(src) if src is not None else None
        if where:
            return where
    return source_location(op)


def program_text(program: paddle.pir.Program) -> str:
    """Paddle's own textual form of the program (the golden-IR format). An ``op_callstack``
    attribute is stripped should a printer include one; Paddle 3.3's does not."""
    return strip_callstacks(str(program))


_CALLSTACK_ATTR = re.compile(r",?op_callstack:\[[^\]]*\]")


def strip_callstacks(text: str) -> str:
    return _CALLSTACK_ATTR.sub("", text)


def has_uses(value: paddle.pir.Value) -> bool:
    return len(value.all_used_ops()) > 0


def _written_outer_values(op: paddle.pir.Operation) -> list[paddle.pir.Value] | None:
    """The values defined outside `op` that it writes in place (an in-place op's operands; for
    control flow, those of the in-place ops in its blocks), or None when `op` may act in a way
    that is not a write into a value (an op without results)."""
    inner: list[paddle.pir.Operation] = []
    if op.num_regions() > 0:
        for block in op.blocks():
            for o in walk_ops(block):
                inner.append(o)
    own = {o.id() for o in inner}
    written: list[paddle.pir.Value] = []
    for o in [op, *inner]:
        if o.name() == "cf.yield":  # a block's terminator: hands values to `op`, no effect
            continue
        if o.num_results() == 0:
            return None
        if o.name().endswith("_"):
            for v in o.operands_source():
                d = v.get_defining_op() if v.initialized() else None
                if d is None or d.id() not in own:
                    written.append(v)
    return written


def _read_elsewhere(v: paddle.pir.Value, op: paddle.pir.Operation) -> bool:
    """Whether `v` is a program input, or is used by an op that is neither `op` nor inside it:
    then a write into it can be seen."""
    d = v.get_defining_op() if v.initialized() else None
    if d is None or d.name() in ("pd_op.data", "builtin.parameter"):
        return True
    own = {op.id()} | ({o.id() for b in op.blocks() for o in walk_ops(b)}
                       if op.num_regions() > 0 else set())
    return any(u.id() not in own for u in v.all_used_ops())


def remove_dead_ops(block: paddle.pir.Block, keep_inputs: bool = True) -> int:
    """Remove ops of `block` whose results nobody uses (repeat until stable). Returns how many.

    Feeds (pd_op.data) and parameters are kept when `keep_inputs` (the runtime feeds by name);
    outputs and yields are always kept, and so is every op that may act through something other
    than its results: an op without results, and an op that writes in place (itself, or
    in-place ops in its blocks) into a value that can be seen: a program input (a model's cache
    write whose result nobody reads) or a value some other op reads. A loop appending to a
    list (``pd_op.array_write_``) whose list nobody reads any more is dead like any other op.
    """
    roots = INTERFACE_OPS if keep_inputs else frozenset({"builtin.shadow_output", "cf.yield"})
    removed = 0
    changed = True
    while changed:
        changed = False
        for op in reversed(list(block.ops)):
            if op.name() in roots:
                continue
            if any(has_uses(r) for r in op.results()):
                continue
            written = _written_outer_values(op)
            if written is None or any(_read_elsewhere(v, op) for v in written):
                continue
            block.remove_op(op)
            removed += 1
            changed = True
    return removed


def remove_dead_code(program: paddle.pir.Program) -> int:
    """:func:`remove_dead_ops` in every block of `program`, nested blocks too, until nothing
    more goes (a value read only by dead ops in a branch is dead in the block around it).
    Returns how many ops went. Inputs, outputs and terminators stay."""
    removed = 0
    while True:
        blocks = [op_block for op in walk_ops(program.global_block()) if op.num_regions()
                  for op_block in op.blocks()]
        n = sum(remove_dead_ops(b) for b in reversed(blocks))
        n += remove_dead_ops(program.global_block())
        removed += n
        if not n:
            return removed


def remove_outputs(program: paddle.pir.Program) -> None:
    """Drop every builtin.shadow_output (before giving a program new outputs)."""
    block = program.global_block()
    for op in list(block.ops):
        if op.name() == "builtin.shadow_output":
            block.remove_op(op)



def fold_if(if_op: paddle.pir.Operation, branch: int) -> None:
    """Replace `if_op` by the ops of one branch (0 = true, 1 = false), in place: the branch's ops
    move before the ``if``, its results become the values the branch yields."""
    block = list(if_op.blocks())[branch]
    inner = list(block.ops)
    yield_op = inner[-1]
    for op in inner[:-1]:
        op.move_before(if_op)
    for res, src in zip(if_op.results(), yield_op.operands_source(), strict=True):
        res.replace_all_uses_with(src)
    if_op.get_parent_block().remove_op(if_op)


def fold_decided_ifs(
    block: paddle.pir.Block, decide: Callable[[paddle.pir.Operation], int | None]
) -> int:
    """Fold, in place, every ``pd_op.if`` of `block` (nested blocks included) for which
    ``decide(if_op)`` names a branch (0 = true, 1 = false); returns how many were folded.

    One walk in program order: the ops of a taken branch are visited right after they moved
    out, so an ``if`` nested in it is decided too; an untaken branch is dropped with its ``if``
    and never visited. An ``if`` that `decide` leaves open (None) keeps both branches, whose
    ops are still visited.
    """
    return _fold_ops(list(block.ops), decide)


def _fold_ops(ops: list[paddle.pir.Operation],
              decide: Callable[[paddle.pir.Operation], int | None]) -> int:
    folded = 0
    for op in ops:
        branch = decide(op) if op.name() == "pd_op.if" else None
        if branch is None:
            for sub in op.blocks():
                folded += _fold_ops(list(sub.ops), decide)
            continue
        moved = list(list(op.blocks())[branch].ops)[:-1]  # all but the final cf.yield
        fold_if(op, branch)
        folded += 1 + _fold_ops(moved, decide)
    return folded


#: Paddle skips, silently, a pass whose own opt level exceeds the PassManager's (pass.cc:
#: ``if (opt_level < pass->pass_info().opt_level) return true;``). A pass asked for by name must
#: run, so the PassManager gets the highest level.
PADDLE_PASS_OPT_LEVEL = 255


def run_paddle_passes(program: paddle.pir.Program, names: Sequence[str]) -> None:
    """Run Paddle's own C++ PIR passes `names` (e.g. ``dead_code_elimination_pass``), in
    order, on `program`, in place, through one ``paddle.pir.PassManager``."""
    pm = paddle.pir.PassManager(opt_level=PADDLE_PASS_OPT_LEVEL)
    for name in names:
        pm.add_pass(name, {})
    pm.run(program)
