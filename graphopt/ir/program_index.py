"""A walk over a PIR program: stable op paths and value keys, definitions and uses.

PIR hands out a fresh Python wrapper for a value each time it is asked for one, and those
wrappers neither hash nor compare by identity (``hash(v)`` differs between two wrappers of the
same value; ``==`` is a tensor op). What is stable is ``value.id`` (the address of the C++
value, a string) and ``op.id()`` (an int). :class:`ProgramIndex` walks a program once and gives
every op a *path* and every value a readable, stable *key*:

* op path: a tuple alternating op index and block index, e.g. ``(10,)`` is the 11th op of the
  global block, ``(10, 0, 1)`` the 2nd op of the true block of that op;
* value key: the feed name for a ``pd_op.data`` result (``arg.0``), ``param:<name>`` for a
  ``builtin.parameter`` result, ``<op name>@<path>#<result index>`` otherwise
  (``pd_op.cast@9#0``, ``pd_op.relu@10/0/1#0``), ``arg@<path>/<block>#<i>`` for block arguments.

Analyses (placement, liveness), the piecewise planner and the replay emulator all name values
by these keys, so a plan made on one program can be read against a structural copy of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import paddle

from graphopt.ir.pir_utils import block_args, data_name, parameter_name

#: an op's position: (op index, block index, op index, ...), outermost first
OpPath = tuple[int, ...]
#: a block's position: the path of the op holding it plus the block index; () = global block
BlockPath = tuple[int, ...]


@dataclass(frozen=True)
class ValueSite:
    """Where a value is defined: result `index` of the op at `path`, or argument `index` of the
    block at `path` (``is_arg``)."""

    path: tuple[int, ...]
    index: int
    is_arg: bool = False


def path_str(path: Sequence[int]) -> str:
    """``(10, 0, 1)`` -> ``"10/0/1"``."""
    return "/".join(str(i) for i in path)


def _value_id(value: paddle.pir.Value) -> str:
    return value.id


class ProgramIndex:
    """One walk over a program: op paths, stable value keys, definition and use sites.

    The index describes the program as it was when built; rebuild it after mutating the program.
    """

    def __init__(self, program: paddle.pir.Program) -> None:
        self.program = program
        #: op path -> op
        self.ops: dict[OpPath, paddle.pir.Operation] = {}
        #: op.id() -> op path
        self._path_of: dict[int, OpPath] = {}
        #: block path -> paths of the ops directly in that block, in order
        self.block_ops: dict[BlockPath, list[OpPath]] = {}
        #: value key -> definition site
        self.defs: dict[str, ValueSite] = {}
        #: value key -> paths of the ops that use it (one entry per operand slot)
        self.uses: dict[str, list[OpPath]] = {}
        #: value key -> a wrapper of the value (valid while the program lives)
        self.values: dict[str, paddle.pir.Value] = {}
        #: block path -> keys of the block's arguments (while bodies; if-blocks have none)
        self.block_args: dict[BlockPath, list[str]] = {}
        self._key_of_id: dict[str, str] = {}
        self._walk(program.global_block(), ())

    # -- construction -----------------------------------------------------------------------
    def _walk(self, block: paddle.pir.Block, bpath: BlockPath) -> None:
        paths: list[OpPath] = []
        self.block_ops[bpath] = paths
        self.block_args[bpath] = []
        for i, arg in enumerate(block_args(block)):
            key = f"arg@{path_str(bpath)}#{i}"
            self._define(arg, key, ValueSite(bpath, i, is_arg=True))
            self.block_args[bpath].append(key)
        for i, op in enumerate(block.ops):
            path = (*bpath, i)
            paths.append(path)
            self.ops[path] = op
            self._path_of[op.id()] = path
            # operands first: a value is always defined before it is used (dominance), so the
            # defining op has already been walked and the value has a key.
            for v in op.operands_source():
                key = self._key_of_id.get(_value_id(v))
                if key is None:  # defined outside this program (should not happen): name it
                    key = f"extern@{_value_id(v)}"
                    self._key_of_id[_value_id(v)] = key
                    self.values[key] = v
                self.uses.setdefault(key, []).append(path)
            name = op.name()
            for r, v in enumerate(op.results()):
                if name == "pd_op.data":
                    key = data_name(op)
                elif name == "builtin.parameter":
                    key = f"param:{parameter_name(op)}"
                else:
                    key = f"{name}@{path_str(path)}#{r}"
                self._define(v, key, ValueSite(path, r))
            for b, sub in enumerate(op.blocks()):
                self._walk(sub, (*path, b))

    def _define(self, value: paddle.pir.Value, key: str, site: ValueSite) -> None:
        self._key_of_id[_value_id(value)] = key
        self.defs[key] = site
        self.values[key] = value
        self.uses.setdefault(key, [])

    # -- queries ----------------------------------------------------------------------------
    def key(self, value: paddle.pir.Value) -> str:
        """The stable key of `value` (KeyError if it is not part of this program)."""
        return self._key_of_id[_value_id(value)]

    def path(self, op: paddle.pir.Operation) -> OpPath:
        """The path of `op` in this program."""
        return self._path_of[op.id()]

    def op(self, path: OpPath) -> paddle.pir.Operation:
        """The op at `path`."""
        return self.ops[path]

    def nested(self, path: OpPath) -> Iterator[OpPath]:
        """Paths of every op nested in the blocks of the op at `path` (depth first)."""
        # _walk registers every block, empty ones too, as (*path, b): no need to ask Paddle for
        # op.blocks() (a C++ call per op; most of a 61-layer plan's time went there)
        b = 0
        while (bpath := (*path, b)) in self.block_ops:
            for child in self.block_ops[bpath]:
                yield child
                yield from self.nested(child)
            b += 1

    def with_nested(self, paths: Iterable[OpPath]) -> list[OpPath]:
        """`paths` plus every op nested under them, in program order."""
        out: list[OpPath] = []
        for p in paths:
            out.append(p)
            out.extend(self.nested(p))
        return out

    def operand_keys(self, path: OpPath) -> list[str]:
        return [self.key(v) for v in self.ops[path].operands_source()]

    def result_keys(self, path: OpPath) -> list[str]:
        return [self.key(v) for v in self.ops[path].results()]

    def __len__(self) -> int:
        return len(self.ops)
