"""Hand-built tiny PIR programs, a stub model and dummy passes for the pass-framework tests.

The dummy passes are NOT registered at import (they would show up in every pass listing);
:func:`registered_test_passes` registers them for the duration of a test module.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")

import paddle

from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import add_output, data_ops, static_mode
from graphopt.models.base import ModelBundle
from graphopt.passes.base import NoOptions, Pass, PassResult, Stage
from graphopt.passes.registry import _REGISTRY, register_pass
from graphopt.passes.verify import register_property_check

# -- programs ------------------------------------------------------------------------------------


def build_program(dead: bool = False, duplicate: bool = False) -> paddle.pir.Program:
    """x -> relu -> scale(2) -> out; `dead` adds an unused exp(x); `duplicate` adds a second
    scale(relu(x), 2) summed with the first (a CSE opportunity)."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main):
            x = paddle.static.data("x", [2, 3], "float32")
            y = paddle.nn.functional.relu(x)
            if dead:
                paddle.exp(x)
            z = y * 2.0
            if duplicate:
                z = z + y * 2.0
    add_output(main, z, "out")
    return main


def build_control_flow_program() -> paddle.pir.Program:
    """A program with a pd_op.while (block arguments) feeding a pd_op.if (two nested blocks)."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main):
            x = paddle.static.data("x", [2, 3], "float32")
            i = paddle.full([1], 0, "int64")
            n = paddle.full([1], 3, "int64")
            _, acc = paddle.static.nn.while_loop(
                lambda i, acc: i < n, lambda i, acc: [i + 1, acc + x], [i, x]
            )
            pred = paddle.mean(x) > 0
            out = paddle.static.nn.cond(pred, lambda: acc + 1.0, lambda: acc - x)
    add_output(main, out, "out")
    return main


def build_duplicate_feed_program() -> paddle.pir.Program:
    """Two pd_op.data ops with the same feed name (a structural error)."""
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main):
            a = paddle.static.data("x", [2, 3], "float32")
            b = paddle.static.data("x", [2, 3], "float32")
            out = a + b
    add_output(main, out, "out")
    return main


def ops_named(program: paddle.pir.Program, name: str) -> list[paddle.pir.Operation]:
    return [op for op in program.global_block().ops if op.name() == name]


def add_tanh(program: paddle.pir.Program) -> None:
    """Insert an (unused) pd_op.tanh of feed x before the outputs."""
    anchor = ops_named(program, "builtin.shadow_output")[0]
    x = data_ops(program)["x"].result(0)
    with static_mode(), paddle.static.program_guard(program):
        paddle.pir.set_insertion_point(anchor)
        try:
            paddle.tanh(x)
        finally:
            paddle.pir.reset_insertion_point_to_end()


def remove_unused(program: paddle.pir.Program, op_name: str) -> int:
    """Remove every `op_name` op of the global block whose results nobody uses."""
    block = program.global_block()
    removed = 0
    for op in ops_named(program, op_name):
        if all(r.use_empty() for r in op.results()):
            block.remove_op(op)
            removed += 1
    return removed


# -- model stub ----------------------------------------------------------------------------------


def _unused(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the stub model cannot run")


def stub_model() -> ModelBundle:
    """A ModelBundle with no layer: only the patch bookkeeping is real."""
    return ModelBundle(
        name="stub",
        layer=None,
        meta=SimpleNamespace(),
        host_inputs=(),
        state_fields=(),
        make_batch=_unused,
        random_batch=_unused,
        reset_state=_unused,
        pad_batch=_unused,
    )


_DEFAULT: Any = object()


def make_mp(program: paddle.pir.Program | None = _DEFAULT, **kwargs: Any) -> ModelProgram:
    """A ModelProgram over the stub model with `program` (default :func:`build_program`; None:
    not traced yet)."""
    if program is _DEFAULT:
        program = build_program()
    return ModelProgram(model=stub_model(), program=program, **kwargs)


class Target:
    """What the source-stage test pass patches."""

    def greet(self) -> str:
        return "hello"


# -- dummy passes --------------------------------------------------------------------------------


class AddOp(Pass):
    name = "test-add-op"
    summary = "Add an unused pd_op.tanh of x."
    stage = Stage.PROGRAM

    def run(self, mp: ModelProgram) -> PassResult:
        add_tanh(mp.program)
        return PassResult(modified=True, stats={"added": 1})


class NoOp(Pass):
    name = "test-noop"
    summary = "Change nothing."
    stage = Stage.PROGRAM

    def run(self, mp: ModelProgram) -> PassResult:
        return PassResult(modified=False, stats={"looked_at": 1})


class RemoveTanh(Pass):
    name = "test-remove-tanh"
    summary = "Remove unused pd_op.tanh ops."
    stage = Stage.PROGRAM

    def run(self, mp: ModelProgram) -> PassResult:
        n = remove_unused(mp.program, "pd_op.tanh")
        return PassResult(modified=n > 0, stats={"removed": n})


class Boom(Pass):
    """Changes the program and everything else it can reach, then fails."""

    name = "test-boom"
    summary = "Modify the program and metadata, then raise."
    stage = Stage.PROGRAM

    def run(self, mp: ModelProgram) -> PassResult:
        add_tanh(mp.program)
        remove_unused(mp.program, "pd_op.exp")
        mp.flags["boom"] = "1"
        mp.host_inputs.append("boom")
        mp.blacklist.append("pd_op.tanh")
        mp.properties.add("boomed")
        raise RuntimeError("kaboom")


class Misorder(Pass):
    """Moves pd_op.relu after its user: a use-before-def program (Paddle does not object)."""

    name = "test-misorder"
    summary = "Move relu after the op that uses it."
    stage = Stage.PROGRAM

    def run(self, mp: ModelProgram) -> PassResult:
        relu = ops_named(mp.program, "pd_op.relu")[0]
        relu.move_before(ops_named(mp.program, "builtin.shadow_output")[0])
        return PassResult(modified=True)


class DropOutputs(Pass):
    name = "test-drop-outputs"
    summary = "Remove every builtin.shadow_output."
    stage = Stage.PROGRAM

    def run(self, mp: ModelProgram) -> PassResult:
        for op in ops_named(mp.program, "builtin.shadow_output"):
            mp.program.global_block().remove_op(op)
        return PassResult(modified=True)


@dataclass
class SourcePatchOptions:
    #: raise after patching
    fail: bool = False


class SourcePatch(Pass):
    name = "test-source-patch"
    summary = "Patch Target.greet through the model's patch bookkeeping."
    stage = Stage.SOURCE
    Options = SourcePatchOptions

    def run(self, mp: ModelProgram) -> PassResult:
        mp.model.patch(Target, "greet", lambda self: "patched")
        mp.flags["patched"] = "1"
        mp.properties.add("patched")
        if self.options.fail:
            raise ValueError("patch went wrong")
        return PassResult(modified=True, stats={"patched": 1})


class SourceNoOp(Pass):
    name = "test-source-noop"
    summary = "A source-stage pass that does nothing."
    stage = Stage.SOURCE

    def run(self, mp: ModelProgram) -> PassResult:
        return PassResult(modified=False)


@dataclass
class EnsurePropOptions:
    #: whether the pass really establishes what it promises
    honest: bool = True


class EnsureProp(Pass):
    name = "test-ensure-prop"
    summary = "Establish property test-prop (checked by a property checker)."
    stage = Stage.PROGRAM
    Options = EnsurePropOptions
    ensures = ("test-prop",)

    def run(self, mp: ModelProgram) -> PassResult:
        mp.flags["test_prop_holds"] = "yes" if self.options.honest else ""
        return PassResult(modified=False)


class NeedsProp(Pass):
    name = "test-needs-prop"
    summary = "Require property test-prop."
    stage = Stage.PROGRAM
    requires = ("test-prop",)

    def run(self, mp: ModelProgram) -> PassResult:
        return PassResult(modified=False)


@register_property_check("test-prop")
def _check_test_prop(mp: ModelProgram) -> str | None:
    return None if mp.flags.get("test_prop_holds") else "flags['test_prop_holds'] is not set"


class First(Pass):
    name = "test-first"
    summary = "Ordering: no constraint of its own."
    stage = Stage.PROGRAM

    def run(self, mp: ModelProgram) -> PassResult:
        return PassResult(modified=False)


class Second(Pass):
    name = "test-second"
    summary = "Ordering: must run after test-first."
    stage = Stage.PROGRAM
    must_run_after = ("test-first", "not-in-any-pipeline")

    def run(self, mp: ModelProgram) -> PassResult:
        return PassResult(modified=False)


class Early(Pass):
    name = "test-early"
    summary = "Ordering: must run before test-first."
    stage = Stage.PROGRAM
    must_run_before = ("test-first",)

    def run(self, mp: ModelProgram) -> PassResult:
        return PassResult(modified=False)


class Choice(str, enum.Enum):
    auto = "auto"
    explicit = "explicit"


@dataclass
class EveryTypeOptions:
    mode: Choice = field(default=Choice.auto, metadata={"help": "how to choose"})
    count: int = 3
    ratio: float = 0.5
    flag: bool = False
    label: str = "x"
    items: list[str] = field(default_factory=list)
    table: dict[str, int] = field(default_factory=dict)
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


class EveryType(Pass):
    name = "test-options"
    summary = "Options of every supported type."
    stage = Stage.PROGRAM
    Options = EveryTypeOptions

    def run(self, mp: ModelProgram) -> PassResult:
        return PassResult(modified=False)


class NoOptionsPass(Pass):
    name = "test-no-options"
    summary = "Takes no options."
    stage = Stage.PROGRAM
    Options = NoOptions

    def run(self, mp: ModelProgram) -> PassResult:
        return PassResult(modified=False)


TEST_PASSES: tuple[type[Pass], ...] = (
    AddOp,
    NoOp,
    RemoveTanh,
    Boom,
    Misorder,
    DropOutputs,
    SourcePatch,
    SourceNoOp,
    EnsureProp,
    NeedsProp,
    First,
    Second,
    Early,
    EveryType,
    NoOptionsPass,
)


@contextlib.contextmanager
def registered_test_passes() -> Iterator[None]:
    """Register the dummy passes; unregister them afterwards (listings stay clean)."""
    for cls in TEST_PASSES:
        register_pass(cls)
    try:
        yield
    finally:
        for cls in TEST_PASSES:
            if _REGISTRY.get(cls.name) is cls:
                del _REGISTRY[cls.name]
