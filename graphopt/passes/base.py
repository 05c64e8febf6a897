"""The pass contract: what every graphopt pass declares and returns.

A pass is a small class (MLIR / torch.fx style)::

    @dataclass
    class MyOptions:
        rounds: int = 2                      # typed; OmegaConf checks every value

        def __post_init__(self) -> None:     # range checks: a ValueError names the option
            if self.rounds < 1:
                raise ValueError("rounds must be >= 1")

    @register_pass
    class MyPass(Pass):
        name = "my-pass"
        summary = "One line saying what it does."
        stage = Stage.PROGRAM
        Options = MyOptions
        requires = ("single-graph",)   # properties that must hold before it runs
        ensures = ("no-hazards",)      # properties it establishes; each has a checker
        preserves = ("program",)       # it never changes the PIR program (see below)
        must_run_after = ("other-pass",)

        def run(self, mp: ModelProgram) -> PassResult:
            ...
            return PassResult(modified=True, stats={"rewritten": 3})

Passes read and write one object, the :class:`graphopt.ir.model_program.ModelProgram`, and
nothing else. A pass that raises is rolled back by the PassManager.

``preserves``: ``("program",)`` declares that the pass never changes the PIR program (it only
reads it and writes metadata: blacklist, segments, flags). The PassManager then makes no copy of
the program for rollback, and every cached analysis stays valid. Any other pass that reports
``modified`` invalidates the analyses of the program.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from graphopt.ir.model_program import ModelProgram

#: the value of ``Pass.preserves`` for passes that never change the PIR program
PRESERVES_PROGRAM = "program"


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
class PassRecord:
    """What one pass did in a run: changed anything?, how long, its counters."""

    name: str
    modified: bool
    time_s: float
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for report.json."""
        return {
            "name": self.name,
            "modified": self.modified,
            "time_s": round(self.time_s, 6),
            "stats": dict(self.stats),
        }


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
    #: What stays valid after the pass: ``("program",)`` if it never changes the PIR program.
    preserves: ClassVar[tuple[str, ...]] = ()
    #: Passes that, when present in the same pipeline, must come before / after this one.
    must_run_after: ClassVar[tuple[str, ...]] = ()
    must_run_before: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def run(self, mp: ModelProgram) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def changes_program(cls) -> bool:
        """Whether the pass may change the PIR program (see ``preserves``)."""
        return cls.stage is Stage.PROGRAM and PRESERVES_PROGRAM not in cls.preserves

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        """The typed options of this pass, in declaration order."""
        return list(dataclasses.fields(cls.Options))

    def __repr__(self) -> str:
        return f"<pass {self.name} {self.options}>"
