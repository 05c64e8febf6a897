"""Progress of one run: a line per phase (build, trace, passes, verify, replay, artifacts).

On a terminal a phase shows a spinner with its elapsed time while it runs and leaves one line
when it ends (``✓ trace  1.9 s``). When stdout is not a terminal (a pipe, a file, CI) nothing is
shown: the output stays what scripts parse. Either way each finished phase is logged to the
``graphopt`` logger (the run's ``cli.log``), and the current progress's ``phase`` tells an
interrupt handler where the run was.

Progress is off until :func:`enable` turns it on: the command line does; tests and library
callers of ``graphopt.driver.optimize`` see nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from rich.console import Console

from graphopt.ir.model_program import ModelProgram
from graphopt.passes.base import Pass, PassResult, Stage
from graphopt.passes.instruments import PassInstrument

log = logging.getLogger("graphopt")


def reset_peak_rss() -> bool:
    """Start this process's peak-RSS count afresh (Linux: ``5`` into ``/proc/self/clear_refs``),
    so the peak a run reports is its own, not an earlier run's in the same process (a sweep's
    jobs under Hydra's basic launcher). False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak, in MB (Linux; empty elsewhere)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "peak_rss" if line.startswith("VmHWM") else "rss"
                    out[key] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


class Progress:
    """Phase lines with elapsed times (see module doc)."""

    def __init__(self, file: IO[str] | None = None, enabled: bool | None = None) -> None:
        self.file = file if file is not None else sys.stdout
        is_tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.enabled = is_tty if enabled is None else enabled
        self.console = Console(file=self.file, force_terminal=self.enabled or None,
                               highlight=False) if self.enabled else None
        self._status: Any = None
        #: the phase running now, and (name, seconds) of those that finished, in order
        self.phase: str | None = None
        self._label: str | None = None
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since this progress began (the run's total time)."""
        return time.perf_counter() - self.t0

    @contextlib.contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[None]:
        """One phase: a spinner while it runs, one line when it ends (see module doc)."""
        outer, self.phase = self.phase, name
        label = f"{name} {detail}".strip()
        outer_label, self._label = self._label, label
        t = time.perf_counter()
        if self.console is not None and outer is None:
            self._status = self.console.status(f"{label} …", spinner="dots")
            self._status.start()
        elif self._status is not None:
            self._status.update(f"{outer_label} › {label} …")
        ok = False
        try:
            yield
            ok = True
        finally:
            dt = time.perf_counter() - t
            if outer is None:
                self.stop()
            elif self._status is not None:
                self._status.update(f"{outer_label} …")
            self.phase, self._label = outer, outer_label
            if ok:
                mem = memory_mb()
                log.info("phase %s done in %.2f s (rss %s MB, peak %s MB)", label, dt,
                         mem.get("rss", "?"), mem.get("peak_rss", "?"))
                if self.console is not None:
                    pad = "  " if outer is not None else ""
                    self.console.print(f"{pad}[green]✓[/green] {label:<28} {dt:6.1f} s")

    def stop(self) -> None:
        """Stop the spinner (idempotent; an interrupt handler calls it before exiting)."""
        if self._status is not None:
            with contextlib.suppress(Exception):
                self._status.stop()
            self._status = None


class _Off(Progress):
    """Progress that shows nothing (the default outside the command line)."""

    def __init__(self) -> None:
        super().__init__(file=sys.stdout, enabled=False)


_CURRENT: Progress = _Off()


def enable(file: IO[str] | None = None, enabled: bool | None = None) -> Progress:
    """Turn progress on for this process (shown only on a terminal unless `enabled`)."""
    global _CURRENT
    _CURRENT = Progress(file=file, enabled=enabled)
    return _CURRENT


def disable() -> None:
    """Back to no progress (and a fresh clock)."""
    global _CURRENT
    _CURRENT.stop()
    _CURRENT = _Off()


def current() -> Progress:
    """The process's progress (a silent one unless :func:`enable` ran)."""
    return _CURRENT


def phase(name: str, detail: str = "") -> contextlib.AbstractContextManager[None]:
    """``with phase("trace"): ...`` on the process's progress."""
    return _CURRENT.step(name, detail)


def current_phase() -> str | None:
    """The phase running now (None between phases)."""
    return _CURRENT.phase


class ProgressInstrument(PassInstrument):
    """A progress line per pass, nested under the ``passes`` phase."""

    def __init__(self) -> None:
        self._cm: contextlib.AbstractContextManager[None] | None = None

    def before_pass(self, pass_: Pass, mp: ModelProgram, index: int) -> None:
        stage = "source" if pass_.stage is Stage.SOURCE else "program"
        self._cm = phase(f"pass {index} {pass_.name}", f"[{stage}]")
        self._cm.__enter__()

    def after_pass(self, pass_: Pass, mp: ModelProgram, index: int, result: PassResult) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def on_error(self, pass_: Pass, mp: ModelProgram, index: int, error: BaseException) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(type(error), error, error.__traceback__)
