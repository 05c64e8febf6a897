"""The PassManager: validate a pipeline from config, then run it transactionally with instruments.

    pm = PassManager.from_config(cfg.pipeline.passes, cfg.pipeline.options,
                                 verify_each=True, instruments=[IRDumpInstrument(run_dir)])
    print(pm.describe())                 # the resolved pipeline, every option shown
    records = pm.run(mp, Stage.SOURCE)   # source passes, then trace, then
    records += pm.run(mp, Stage.PROGRAM)

Everything that can be checked without running is checked by :meth:`PassManager.from_config`
(unknown pass or option, option types, duplicates, ordering constraints, stage order), so a bad
config fails in a second, not after a trace.

Running is transactional (torch.fx / MLIR style): a pass that raises — or whose result fails
verification — leaves the ModelProgram exactly as it was, and the error names the pass and the
passes that ran before it. Program-stage passes run on ``mp.clone()`` which replaces ``mp``'s state
only on success (a pass that preserves the program gets a copy of the metadata only);
source-stage passes are undone through the model's patch checkpoints.

Consequence for pass authors: a program-stage pass may work on a fresh copy of the program, so
a PIR ``Value``/``Operation`` held in metadata (segments) across passes points into a program
that is gone. Refer to values by name (feed/parameter/output names, op paths), never by object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from graphopt.errors import ConfigError, PassError, one_line
from graphopt.ir.model_program import ModelProgram
from graphopt.passes.base import Pass, PassRecord, PassResult, Stage
from graphopt.passes.instruments import PassInstrument, VerifyEachInstrument
from graphopt.passes.options import build_options, options_to_dict
from graphopt.passes.registry import all_passes, get_pass
from graphopt.passes.verify import PassVerificationError, check_program, release_program


class PassManager:
    """An ordered, validated list of configured passes plus the instruments that observe them."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify_each: bool = True,
        instruments: Iterable[PassInstrument] = (),
    ) -> None:
        """Take already-configured pass instances; the pipeline is validated here too."""
        self.passes: list[Pass] = list(passes)
        validate_pipeline(self.passes)
        self.verify_each = bool(verify_each)
        #: user instruments, in the order their hooks are called (verify-each always runs first).
        self.instruments: list[PassInstrument] = list(instruments)
        #: every record of every run of this manager, in order.
        self.records: list[PassRecord] = []
        #: passes whose config options were not used because they are not in the pipeline.
        self.ignored_options: list[str] = []
        # Names of the passes that already ran on each ModelProgram (for error messages), keyed
        # by id() with a weak reference to tell a recycled id from the same object.
        self._history: dict[int, tuple[weakref.ref, list[str]]] = {}

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        names: Sequence[str] | None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        verify_each: bool = True,
        instruments: Iterable[PassInstrument] = (),
    ) -> PassManager:
        """Build from config: ordered pass names + options keyed by pass name (OmegaConf ok).

        Everything is validated before anything runs; any problem is a :class:`ConfigError`
        that names the culprit and lists the valid choices.
        """
        names = _container(names) if names is not None else []
        options = _container(options) if options is not None else {}
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise ConfigError(f"pipeline passes must be a list of pass names, got {names!r}")
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"pipeline options must be a mapping of pass name -> options, got {options!r}"
            )
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise ConfigError(f"pipeline entry {i + 1} must be a pass name, got {name!r}")
        pass_classes = [get_pass(name) for name in names]

        seen: dict[str, int] = {}
        for i, name in enumerate(names, 1):
            if name in seen:
                raise ConfigError(
                    f"pass '{name}' is listed twice in the pipeline (positions {seen[name]} and "
                    f"{i}): {_pipeline_str(names)}"
                )
            seen[name] = i

        #: options of registered passes left out of the pipeline (a pipeline's options survive
        #: a `pipeline.passes=[...]` override): kept out, and said so by describe()
        ignored = []
        for key in options:
            if key in seen:
                continue
            registered = all_passes()
            if key in registered:
                ignored.append(key)
                continue
            close = difflib.get_close_matches(
                str(key), list(names), n=1
            ) or difflib.get_close_matches(str(key), list(registered), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"options given for unknown pass '{key}'.{hint} The pipeline is "
                f"{_pipeline_str(names)}; registered passes: {', '.join(registered)}"
            )

        passes = [pc(build_options(pc, options.get(pc.name))) for pc in pass_classes]
        pm = cls(passes, verify_each=verify_each, instruments=instruments)
        pm.ignored_options = ignored
        return pm

    # -- introspection --------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The pass names, in pipeline order."""
        return [p.name for p in self.passes]

    def resolved(self) -> list[dict[str, Any]]:
        """The pipeline as plain data: ``[{name, stage, options: {...every option...}}]``."""
        return [
            {"name": p.name, "stage": p.stage.value, "options": options_to_dict(p.options)}
            for p in self.passes
        ]

    def describe(self) -> str:
        """The resolved pipeline, one pass a line with every option value (defaults included)."""
        verify = "on" if self.verify_each else "off"
        if not self.passes:
            return f"pipeline: no passes (verify_each={verify})"
        n = len(self.passes)
        lines = [f"pipeline: {n} pass{'' if n == 1 else 'es'} (verify_each={verify})"]
        width = max(len(p.name) for p in self.passes)
        for i, entry in enumerate(self.resolved(), 1):
            opts = ", ".join(f"{k}={v!r}" for k, v in entry["options"].items()) or "-"
            lines.append(f"  {i}. {entry['name']:<{width}}  [{entry['stage']}]  {opts}")
        if self.ignored_options:
            lines.append("  (options of " + ", ".join(self.ignored_options)
                         + " not used: not in the pipeline)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PassManager({self.names}, verify_each={self.verify_each})"

    # -- running --------------------------------------------------------------------------------

    def run(self, mp: ModelProgram, stage: Stage | str | None = None) -> list[PassRecord]:
        """Run the passes of `stage` (all when None) in pipeline order on `mp`; one record each.

        Raises :class:`PassError` (chained to the original exception) when a pass fails; `mp` is
        then as it was before that pass, and the passes before it keep their effect.
        """
        stage = Stage(stage) if stage is not None else None
        instruments: list[PassInstrument] = []
        if self.verify_each:
            instruments.append(VerifyEachInstrument())
        instruments.extend(self.instruments)
        records = []
        input_checked = False
        for index, pass_ in enumerate(self.passes, 1):
            if stage is not None and pass_.stage is not stage:
                continue
            if self.verify_each and pass_.stage is Stage.PROGRAM and not input_checked:
                # Blame a broken input on its producer (the trace), not on the first pass.
                input_checked = True
                problems = check_program(mp.program) if mp.program is not None else []
                if problems:
                    raise PassVerificationError(
                        [f"the input program is broken before pass '{pass_.name}'", *problems]
                    )
            record = self._run_one(pass_, mp, index, instruments)
            records.append(record)
            self.records.append(record)
        return records

    def _ran_before(self, mp: ModelProgram) -> list[str]:
        entry = self._history.get(id(mp))
        if entry is None or entry[0]() is not mp:
            entry = (weakref.ref(mp), [])
            self._history[id(mp)] = entry
        return entry[1]

    def _run_one(
        self, pass_: Pass, mp: ModelProgram, index: int, instruments: list[PassInstrument]
    ) -> PassRecord:
        history = self._ran_before(mp)
        _check_preconditions(pass_, mp)

        program_stage = pass_.stage is Stage.PROGRAM
        changes_program = pass_.changes_program()
        if program_stage:
            try:
                work = mp.clone(program=changes_program)
            except Exception as e:
                raise PassError(
                    f"pass '{pass_.name}' failed: cannot copy the program for rollback: "
                    f"{type(e).__name__}: {one_line(e)}{_before(history)}"
                ) from e
            cloned = _programs_of(work) if changes_program else []
            snapshot = None
            checkpoint = None
        else:
            # Source passes act on the live model: remember what to undo.
            work = mp
            cloned = []
            snapshot = mp.clone(program=False)
            checkpoint = mp.patch_checkpoint()

        elapsed = 0.0
        try:
            for inst in instruments:
                inst.before_pass(pass_, work, index)
            t0 = time.perf_counter()
            result = pass_.run(work)
            elapsed = time.perf_counter() - t0
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}, expected a PassResult")
            for inst in instruments:
                inst.after_pass(pass_, work, index, result)
        except BaseException as e:
            for inst in instruments:
                # An observer that fails must not hide the pass's own error.
                with contextlib.suppress(Exception):
                    inst.on_error(pass_, work, index, e)
            rollback_note = ""
            if program_stage:
                # The work copy may be structurally broken; Paddle aborts the process when it
                # frees such a program, so cut its use-def edges first. `mp` was never touched.
                keep = {id(p) for p in _programs_of(mp)}
                for prog in {id(p): p for p in [*cloned, *_programs_of(work)]}.values():
                    if id(prog) not in keep:
                        release_program(prog)
            else:
                rollback_note = _restore(mp, snapshot, checkpoint)
            if not isinstance(e, Exception):  # KeyboardInterrupt & co: rolled back, not wrapped
                raise
            if isinstance(e, ConfigError):  # the user's input, not the pass, is at fault
                raise ConfigError(f"pass '{pass_.name}': {e}{_before(history)}") from e
            raise PassError(
                f"pass '{pass_.name}' failed: {type(e).__name__}: {one_line(e)}"
                f"{_before(history)}{rollback_note}"
            ) from e

        if program_stage:
            if changes_program and result.modified and work.version == mp.version:
                work.invalidate()  # (a pass that invalidated itself keeps what it cached since)
            for f in dataclasses.fields(mp):
                setattr(mp, f.name, getattr(work, f.name))
        mp.properties.update(pass_.ensures)
        history.append(pass_.name)
        return PassRecord(pass_.name, bool(result.modified), elapsed, dict(result.stats))


# -- validation ---------------------------------------------------------------------------------


def validate_pipeline(passes: Sequence[Pass]) -> None:
    """Duplicates, stage order (every source pass before every program pass) and the
    ``must_run_after`` / ``must_run_before`` constraints among the passes present."""
    names = [p.name for p in passes]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"pass '{dup}' is listed twice in the pipeline {_pipeline_str(names)}")

    first_program = next((i for i, p in enumerate(passes) if p.stage is Stage.PROGRAM), None)
    if first_program is not None:
        for i in range(first_program + 1, len(passes)):
            if passes[i].stage is Stage.SOURCE:
                raise ConfigError(
                    f"source-stage pass '{passes[i].name}' (position {i + 1}) comes after "
                    f"program-stage pass '{passes[first_program].name}' (position "
                    f"{first_program + 1}): every source-stage pass must come before every "
                    f"program-stage pass. Pipeline: {_pipeline_str(names)}"
                )

    pos = {n: i for i, n in enumerate(names)}
    for i, p in enumerate(passes):
        for other in p.must_run_after:
            if other in pos and pos[other] > i:
                raise ConfigError(
                    f"pass '{p.name}' must run after '{other}', but the pipeline has "
                    f"'{p.name}' at position {i + 1} and '{other}' at {pos[other] + 1}. "
                    f"{_suggest_order(passes)}"
                )
        for other in p.must_run_before:
            if other in pos and pos[other] < i:
                raise ConfigError(
                    f"pass '{p.name}' must run before '{other}', but the pipeline has "
                    f"'{other}' at position {pos[other] + 1} and '{p.name}' at {i + 1}. "
                    f"{_suggest_order(passes)}"
                )


def _suggest_order(passes: Sequence[Pass]) -> str:
    """'A valid order: ...' (stable topological sort), or the cycle that makes none exist."""
    names = [p.name for p in passes]
    present = set(names)
    after: dict[str, set[str]] = {n: set() for n in names}  # n -> passes that must precede n
    for p in passes:
        after[p.name].update(o for o in p.must_run_after if o in present)
        for o in p.must_run_before:
            if o in present:
                after[o].add(p.name)
    sources = [p.name for p in passes if p.stage is Stage.SOURCE]
    for p in passes:
        if p.stage is Stage.PROGRAM:
            after[p.name].update(sources)
    order: list[str] = []
    remaining = list(names)
    while remaining:
        ready = next((n for n in remaining if after[n] <= set(order)), None)
        if ready is None:
            return "The ordering constraints form a cycle among: " + ", ".join(remaining)
        order.append(ready)
        remaining.remove(ready)
    return "A valid order: " + ", ".join(order)


def _check_preconditions(pass_: Pass, mp: ModelProgram) -> None:
    missing = [prop for prop in pass_.requires if prop not in mp.properties]
    if missing:
        prop = missing[0]
        providers = [n for n, pc in all_passes().items() if prop in pc.ensures]
        where = (
            f"it is ensured by: {', '.join(providers)}"
            if providers
            else "no registered pass ensures it (the runtime sets it, e.g. 'traced' by the trace step)"
        )
        holding = ", ".join(sorted(mp.properties)) or "none"
        raise PassError(
            f"pass '{pass_.name}' requires property '{prop}', which does not hold "
            f"(holding: {holding}); {where}"
        )
    if pass_.stage is Stage.PROGRAM and mp.program is None:
        raise PassError(
            f"pass '{pass_.name}' is a program-stage pass but there is no program yet "
            "(trace the model first)"
        )


def _programs_of(mp: ModelProgram) -> list[Any]:
    """The PIR programs a ModelProgram owns (main program, host prologue, variants)."""
    return mp.programs()


# -- source-stage rollback ----------------------------------------------------------------------


def _restore(mp: ModelProgram, snapshot: ModelProgram, checkpoint: int) -> str:
    """Undo a failed source pass; returns a note for the error message if undoing failed."""
    note = ""
    try:
        mp.model.restore_patches(checkpoint)
    except Exception as e:  # report, but still restore the fields
        note = f" [rollback of model patches failed: {type(e).__name__}: {one_line(e)}]"
    for f in dataclasses.fields(mp):
        setattr(mp, f.name, getattr(snapshot, f.name))
    return note


def _container(value: Any) -> Any:
    """OmegaConf nodes (at any depth) as plain containers; anything else as is."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


# -- messages -----------------------------------------------------------------------------------


def _before(history: Sequence[str]) -> str:
    return f" (passes run before it: {', '.join(history) if history else 'none'})"


def _pipeline_str(names: Sequence[str]) -> str:
    return "[" + ", ".join(names) + "]"
