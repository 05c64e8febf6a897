"""The pass contract: what every graphopt pass declares and returns.

A pass is a small class (MLIR / torch.fx style)::

    @register_pass
    class MyPass(Pass):
        name = "my-pass"
        summary = "One line saying what it does."
        stage = Stage.PROGRAM
        Options = MyOptions            # a dataclass; unknown keys are errors
        requires = ("single-graph",)   # properties that must hold before it runs
        ensures = ("no-hazards",)      # properties it establishes
        must_run_after = ("other-pass",)  # ordering constraints, checked by the PassManager

        def run(self, mp: ModelProgram) -> PassResult:
            ...
            return PassResult(modified=True, stats={"rewritten": 3})

Passes read and write one object, the :class:`runtime.model_program.ModelProgram`, and nothing
else. A pass that raises is rolled back by the PassManager.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from graphopt.errors import ConfigError, PassError  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from graphopt.ir.model_program import ModelProgram


class Stage(str, enum.Enum):
    """Where a pass acts."""

    #: On the model's Python code (the dygraph Layer) before it is traced.
    SOURCE = "source"
    #: On the traced PIR program and its metadata.
    PROGRAM = "program"


@dataclass
class PassResult:
    """What a pass reports: whether it changed anything, and its counters."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoOptions:
    """Options of a pass that takes none."""


class Pass:
    """Base class of every graphopt pass. Subclasses set the class attributes and `run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.PROGRAM
    Options: ClassVar[type] = NoOptions
    #: Properties of the ModelProgram that must hold before this pass runs.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Properties this pass establishes (checked after it runs when verify-each is on).
    ensures: ClassVar[tuple[str, ...]] = ()
    #: Passes that, when present in the same pipeline, must come before / after this one.
    must_run_after: ClassVar[tuple[str, ...]] = ()
    must_run_before: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def run(self, mp: ModelProgram) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        """The typed options of this pass, in declaration order."""
        return list(dataclasses.fields(cls.Options))

    def __repr__(self) -> str:
        return f"<pass {self.name} {self.options}>"
