"""Liveness: what flows into and out of a range of ops of a program.

Uses count at any nesting depth: an op inside an ``if`` branch that reads a value defined before
the ``if`` makes that value live into whichever range holds the ``if``; a value yielded by a
branch (``cf.yield``) is used outside any range in that branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from graphopt.ir.program_index import OpPath, ProgramIndex


@dataclass
class Liveness:
    """Values that flow into a range of ops (used inside, defined outside) and out of it
    (defined by an op of the range, used by an op outside it). Keys are in first-use /
    definition order. Weights (``param:*``) are never live-in: every segment keeps its own
    ``builtin.parameter`` ops, the way a CUDA graph keeps its weights' static addresses."""

    live_in: list[str] = field(default_factory=list)
    live_out: list[str] = field(default_factory=list)


def range_liveness(index: ProgramIndex, ops: Sequence[OpPath]) -> Liveness:
    """Live-in / live-out of the ops at `ops` (top-level of the range; nested ops included)."""
    inside = set(index.with_nested(ops))
    live_in: list[str] = []
    seen: set[str] = set()
    for path in index.with_nested(ops):
        for key in index.operand_keys(path):
            if key in seen or key.startswith("param:"):
                continue
            site = index.defs.get(key)
            defined_inside = site is not None and (
                site.path in inside if not site.is_arg else site.path[:-1] in inside
            )
            if not defined_inside:
                seen.add(key)
                live_in.append(key)
    live_out: list[str] = []
    for path in ops:
        for key in index.result_keys(path):
            if any(u not in inside for u in index.uses.get(key, ())):
                live_out.append(key)
    return Liveness(live_in, live_out)


def params_used(index: ProgramIndex, ops: Sequence[OpPath]) -> list[str]:
    """``param:*`` keys read by `ops` (nested included), in first-use order."""
    out: list[str] = []
    for path in index.with_nested(ops):
        for key in index.operand_keys(path):
            if key.startswith("param:") and key not in out:
                out.append(key)
    return out
