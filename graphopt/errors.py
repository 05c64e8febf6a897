"""The error classes every layer of graphopt raises (the bottom of the import graph).

What the command line does with them: :class:`ConfigError` (bad user input) is one line and
exit 2; :class:`PassError` and :class:`TraceError` (a pass or the trace could not do its job)
are one line and exit 1, or exit 2 when caused by a ConfigError; :class:`VerificationError`
(the optimized step computes something else than the eager model) and :class:`DispatchError`
(a step no specialised variant serves) and :class:`CaptureCheckError` (a replayed graph differs
from its segment run uncaptured) are one line and exit 1.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of graphopt's own errors; the message is shown to users as one line."""


class ConfigError(GraphoptError):
    """Bad user input: unknown pass, bad option, bad model config, impossible combination."""


class PassError(GraphoptError):
    """A pass could not do its job."""


class TraceError(GraphoptError):
    """Tracing the model failed or produced something graphopt cannot use."""


class LoweringError(GraphoptError):
    """A program cannot be lowered to PyTorch: an op has no lowering (the message names the op,
    where the model builds it, and the backend that needed it)."""


class VerificationError(GraphoptError):
    """The optimized program does not compute what the eager model computes."""


class DispatchError(GraphoptError):
    """The runtime has no program for a step: no specialised variant serves its branch
    conditions (refused rather than run with a wrong branch)."""


class CaptureCheckError(GraphoptError):
    """A checked capture found a replayed graph that differs from an uncaptured run of its
    segment, and ``runtime.check_captures_on_mismatch=fail`` asked to stop rather than drop it."""


class CaptureError(GraphoptError):
    """A segment could not be captured as a graph (e.g. it syncs with the host while
    capturing): names the segment, its source location and the backend."""


def one_line(error: BaseException, limit: int = 0) -> str:
    """`error`'s message as one line: its non-empty lines joined, Paddle's C++ frame lists cut.

    Paddle appends ``[Hint: ...]`` blocks and C++ stacks below the message that matters; those
    are dropped. With `limit`, the text is cut to that many characters.
    """
    keep: list[str] = []
    for raw in str(error).splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith(("C++ Traceback", "----------", "Error Message Summary")):
            break
        keep.append(line)
    text = " ".join(keep) or type(error).__name__
    if limit and len(text) > limit:
        text = text[: limit - 3] + "..." if limit > 3 else text[:limit]
    return text
