"""Pass instruments (TVM style): observers the PassManager calls around every pass.

Hooks, all optional (``index`` is the pass's 1-based position in the whole pipeline):

* ``before_pass(pass_, mp, index)``: before the pass runs;
* ``after_pass(pass_, mp, index, result)``: after it returned, before its result is committed —
  raising here fails the pass, which is rolled back (that is how verify-each works);
* ``on_error(pass_, mp, index, error)``: the pass (or an ``after_pass`` hook) failed; `mp` is the
  state the pass left behind, about to be discarded. Must not raise.

For program-stage passes `mp` is the work copy the pass runs on; for source-stage passes it is
the ModelProgram itself. Instruments observe: they never change `mp`.

Timing and statistics are recorded by the PassManager itself into
:class:`graphopt.passes.base.PassRecord` objects (``pm.records``); :func:`format_records` prints them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import program_text
from graphopt.passes.base import Pass, PassRecord, PassResult, Stage
from graphopt.passes.verify import PassVerificationError, check_program, check_properties


class PassInstrument:
    """Base class of instruments; every hook does nothing by default."""

    def before_pass(self, pass_: Pass, mp: ModelProgram, index: int) -> None:
        """Called before `pass_` (the `index`-th of the pipeline, 1-based) runs on `mp`."""

    def after_pass(self, pass_: Pass, mp: ModelProgram, index: int, result: PassResult) -> None:
        """Called after `pass_` returned `result`; raising fails (and rolls back) the pass."""

    def on_error(self, pass_: Pass, mp: ModelProgram, index: int, error: BaseException) -> None:
        """Called when `pass_` failed; `mp` is the state it left, about to be discarded."""


class VerifyEachInstrument(PassInstrument):
    """After every pass: checkers of its `ensures`, and for program-stage passes the structural
    verification of the program.

    The PassManager installs it first (so later instruments only see verified programs) unless
    ``verify_each=False``. A failure raises :class:`passes.verify.PassVerificationError`.
    """

    def after_pass(self, pass_: Pass, mp: ModelProgram, index: int, result: PassResult) -> None:
        problems = []
        if pass_.stage is Stage.PROGRAM and mp.program is not None:
            problems = check_program(mp.program)
        problems += check_properties(mp, pass_.ensures)
        if problems:
            raise PassVerificationError(problems)


def _qualname(obj: Any) -> str:
    """`module.Qualified.name` of a class, function or module; `<Type instance>` otherwise."""
    if hasattr(obj, "__qualname__"):
        module = getattr(obj, "__module__", None)
        return f"{module}.{obj.__qualname__}" if module else obj.__qualname__
    if hasattr(obj, "__name__"):  # a module
        return obj.__name__
    return f"<{type(obj).__module__}.{type(obj).__qualname__} instance>"


def _wraps(fn: Any, original: Any) -> bool:
    seen = 0
    while fn is not None and seen < 16:  # bounded: __wrapped__ chains can be cyclic
        fn = getattr(fn, "__wrapped__", None)
        if fn is original:
            return True
        seen += 1
    return False


def marked_text(mp: ModelProgram) -> str:
    """The functions capture-control-flow marked, in words, with file:line and any rewrite."""
    if not mp.marked:
        return "marked functions: none\n"
    lines = [f"marked functions ({len(mp.marked)}): each Tensor `if` in them becomes pd_op.if"]
    for m in mp.marked:
        lines.append(f"  {m.qualname} at {m.location}")
        lines.extend(f"    rewritten in memory: {r}" for r in m.rewrites)
    return "\n".join(lines) + "\n"


def patches_text(mp: ModelProgram) -> str:
    """One line per source patch applied to the model: ``owner.attr: original -> current``."""
    patches = getattr(mp.model, "_patches", None) or []
    if not patches:
        return "(no patches applied)\n"
    lines = []
    for owner, attr, original, _ in patches:
        current = getattr(owner, attr, None)
        # Decorators copy the qualname of what they wrap, so say so or both sides read the same.
        if current is original:  # e.g. paddle.jit.marker.* tag the function itself
            note = " (same object, marked in place)"
        else:
            note = " (a wrapper of the original)" if _wraps(current, original) else ""
        lines.append(
            f"{_qualname(owner)}.{attr}: {_qualname(original)} -> {_qualname(current)}{note}"
        )
    return "\n".join(lines) + "\n"


class IRDumpInstrument(PassInstrument):
    """Write the IR before the first program pass and after each pass: ``<run_dir>/ir/NNN_<pass>.txt``.

    * ``000_input.txt``: the program before the first program-stage pass;
    * ``NNN_<pass>.txt`` (NNN = the pass's 1-based pipeline index, 3 digits): a ``//`` header with
      the pass name, whether it changed anything and its stats, then the program text; for a
      source-stage pass, the functions it marked (file:line) and the patches applied instead;
    * with `only_on_change`, a pass whose result says ``modified=False`` writes only its header;
    * ``NNN_<pass>.failed.txt``: the state a failed pass left behind (before rollback) and the
      error, when `dump_on_error`.
    """

    def __init__(
        self, run_dir: str | Path, only_on_change: bool = True, dump_on_error: bool = True
    ) -> None:
        self.dir = Path(run_dir) / "ir"
        self.only_on_change = only_on_change
        self.dump_on_error = dump_on_error
        self._input_written = False
        #: paths written, in order (for reports and tests).
        self.written: list[Path] = []

    def _write(self, filename: str, header: list[str], body: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / filename
        text = "".join(f"// {h}\n" for h in header) + body
        # temp + rename: an interrupted run leaves no half-written dump (and the command line's
        # interrupt handler removes the `.*.tmp` file)
        tmp = self.dir / f".{filename}.tmp"
        tmp.write_text(text if text.endswith("\n") else text + "\n")
        tmp.chmod(0o644)
        os.replace(tmp, path)
        self.written.append(path)

    def _body(self, pass_: Pass, mp: ModelProgram) -> str:
        if pass_.stage is Stage.SOURCE:
            return marked_text(mp) + "\n" + patches_text(mp)
        if mp.program is None:
            return "(no program)\n"
        return program_text(mp.program)

    def before_pass(self, pass_: Pass, mp: ModelProgram, index: int) -> None:
        if self._input_written or pass_.stage is not Stage.PROGRAM or mp.program is None:
            return
        self._input_written = True
        self._write(
            "000_input.txt",
            [f"input program (before pass {index} '{pass_.name}')"],
            program_text(mp.program),
        )

    def after_pass(self, pass_: Pass, mp: ModelProgram, index: int, result: PassResult) -> None:
        header = [
            f"after pass {index} '{pass_.name}' (stage {pass_.stage.value})",
            f"modified: {str(result.modified).lower()}",
            f"stats: {json.dumps(result.stats, sort_keys=True, default=str)}",
        ]
        if self.only_on_change and not result.modified:
            self._write(f"{index:03d}_{pass_.name}.txt", header,
                        "(unchanged: the pass changed nothing; the program is the previous dump's)")
            return
        self._write(f"{index:03d}_{pass_.name}.txt", header, self._body(pass_, mp))

    def on_error(self, pass_: Pass, mp: ModelProgram, index: int, error: BaseException) -> None:
        if not self.dump_on_error:
            return
        header = [
            f"FAILED pass {index} '{pass_.name}' (stage {pass_.stage.value}); rolled back",
            f"error: {type(error).__name__}: {error}".replace("\n", " "),
        ]
        try:
            body = self._body(pass_, mp)
        except Exception as e:  # printing a badly broken program can fail; the error still counts
            body = f"(could not print the state: {type(e).__name__}: {e})\n"
        self._write(f"{index:03d}_{pass_.name}.failed.txt", header, body)


def format_records(records: Sequence[PassRecord]) -> str:
    """A table of pass records: name, modified, time, stats (MLIR's pass timing + statistics)."""
    if not records:
        return "(no passes ran)"
    width = max(len(r.name) for r in records)
    lines = [f"{'pass':<{width}}  modified  time_s   stats"]
    for r in records:
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
        lines.append(f"{r.name:<{width}}  {str(r.modified).lower():<8}  {r.time_s:7.4f}  {stats}")
    total = sum(r.time_s for r in records)
    lines.append(f"{'total':<{width}}            {total:7.4f}")
    return "\n".join(lines)
