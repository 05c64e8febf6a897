"""The reference way to cut a segment out of a program: clone it whole, fold the enclosing
``if``s, replace live-ins by feeds, delete every other op. O(program) per segment, so the
planner copies ops instead; tests check that both give the same ops and results."""

from __future__ import annotations

from collections.abc import Sequence

import paddle

from graphopt.ir.pir_utils import add_data_op, add_output, clone_program, fold_if
from graphopt.ir.program_index import OpPath, ProgramIndex


def extract_by_pruning(
    program: paddle.pir.Program,
    run: Sequence[OpPath],
    live_in: Sequence[str],
    live_out: Sequence[str],
    prefix: str,
) -> paddle.pir.Program:
    """The clone-fold-prune recipe, kept as the reference for :func:`extract_segment_program`: clone
    the whole program, fold the ``if``s enclosing the run to the run's branch, replace each
    live-in by a data op, add outputs for the live-outs, remove every other op (reverse order).
    O(program) per segment."""
    clone = clone_program(program)
    cidx = ProgramIndex(clone)
    run_ops = [cidx.ops[p] for p in run]
    ins = [cidx.values[k] for k in live_in]
    outs = [cidx.values[k] for k in live_out]
    bpath = tuple(run[0][:-1]) if run else ()
    enclosing = [(cidx.ops[bpath[: i + 1]], bpath[i + 1]) for i in range(0, len(bpath), 2)]
    for if_op, branch in enclosing:  # outermost first: it moves the inner ifs up a level
        fold_if(if_op, branch)
    keep = {op.id() for op in run_ops}
    for k, value in enumerate(ins):
        new = add_data_op(clone, f"{prefix}.in{k}", list(value.shape), value.dtype)
        value.replace_all_uses_with(new)
        keep.add(new.get_defining_op().id())
    block = clone.global_block()
    for k, value in enumerate(outs):
        add_output(clone, value, f"{prefix}.out{k}")
        keep.add(block.ops[-1].id())
    for op in reversed(list(block.ops)):
        if op.id() in keep:
            continue
        if op.name() == "builtin.parameter" and not op.result(0).use_empty():
            continue  # a weight the run reads
        block.remove_op(op)
    return clone
