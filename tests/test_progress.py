"""Progress lines (terminal only, always logged) and the command line's pipe-safe stdout."""

from __future__ import annotations

import io
import logging
import os
import re

from graphopt import cli
from graphopt.report import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_phase_lines_on_a_terminal_and_in_the_log(caplog):
    out = _Tty()
    progress.enable(file=out)
    try:
        with caplog.at_level(logging.INFO, logger="graphopt"), \
                progress.phase("trace", "(SOT -> PIR)"):
            assert progress.current_phase() == "trace"
            with progress.phase("pass 1 x"):
                pass
        assert progress.current_phase() is None
    finally:
        progress.disable()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # colours, cursor moves
    assert "✓ trace (SOT -> PIR)" in text and "✓ pass 1 x" in text
    assert "phase trace (SOT -> PIR) done in" in caplog.text


def test_no_progress_when_not_a_terminal():
    out = io.StringIO()
    progress.enable(file=out)
    try:
        with progress.phase("build"):
            pass
    finally:
        progress.disable()
    assert out.getvalue() == ""


def test_stdout_into_a_closed_pipe_is_quiet():
    r, w = os.pipe()
    os.close(r)
    raw = os.fdopen(w, "w", buffering=1)
    stream = cli._Stream(raw)
    try:
        stream.write("a line\n")  # EPIPE: swallowed, the descriptor now points at /dev/null
        stream.flush()
        stream.write("more\n")
        stream.flush()
        # the descriptor was pointed at /dev/null, not left broken
        assert os.path.samestat(os.fstat(raw.fileno()), os.stat(os.devnull))
    finally:
        raw.close()
