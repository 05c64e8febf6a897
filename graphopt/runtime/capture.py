"""CUDA-graph capture orchestration: one code path for every capturing backend.

What the orchestration does (FastDeploy / vLLM style): one graph per (segment id, capture
size); the first time a segment runs at a size it is warmed up (``num_warmups`` plain runs),
then captured, then replayed; every later run at that size is a replay. Inputs go through
*static input buffers*: a graph is bound to the buffers it was captured with, so each replay
copies the new inputs into them (same shapes: the batch was padded to the capture size by the
caller). Checked captures (:class:`CaptureCheck`) compare replays with an uncaptured run of the
segment. The capture primitive itself is the backend's (:mod:`graphopt.runtime.backend`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.errors import CaptureCheckError, ConfigError
from graphopt.ir.segment_plan import Segment
from graphopt.runtime.backend import Backend

log = logging.getLogger(__name__)

#: batch token counts that get a graph by default: 1, 2, 4, then steps of 8, as vLLM and
#: FastDeploy default to (a step of 8 pads a batch by 7 tokens at most; powers of two padded a
#: 46-token batch to 64, which on a CPU costs 39% more compute)
DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)


# -- orchestration ---------------------------------------------------------------------------------
#: what a checked capture does with a graph whose replay differs from the uncaptured run
CHECK_ACTIONS = ("drop", "fail")


@dataclass(frozen=True)
class CaptureCheck:
    """``runtime.check_captures``: replays compared with an uncaptured run of the segment.

    A CUDA graph goes wrong on *later* replays (a stale input buffer, a host value frozen at
    capture), so the first `replays` replays of every graph are checked, each on that replay's
    own inputs; ``replays=None`` checks every replay. A replay off by more than `atol` drops the
    graph (its segment and size run uncaptured from then on) or, with ``on_mismatch="fail"``,
    stops the run with :class:`CaptureCheckError`.
    """

    atol: float = 1e-4
    replays: int | None = 3
    on_mismatch: str = "drop"

    def __post_init__(self) -> None:
        if self.on_mismatch not in CHECK_ACTIONS:
            raise ValueError(f"on_mismatch must be one of {', '.join(CHECK_ACTIONS)}, got "
                             f"{self.on_mismatch!r}")
        if self.replays is not None and self.replays < 1:
            raise ValueError(f"replays must be >= 1 (or None: every replay), got {self.replays}")

    def wants(self, checked_so_far: int) -> bool:
        """Whether the next replay of a graph checked `checked_so_far` times is checked."""
        return self.replays is None or checked_so_far < self.replays


@dataclass
class CaptureStats:
    """Counters of the capture orchestration."""

    graphs_captured: int = 0
    replays: int = 0
    warmup_runs: int = 0
    eager_fallbacks: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    #: checked captures: graphs whose replays were compared with an uncaptured run
    checked_graphs: int = 0
    #: replays compared with an uncaptured run (several per graph)
    checked_replays: int = 0
    #: graphs that differed: ``{"segment", "size", "replay", "max_abs_err"}``; they run
    #: uncaptured now
    dropped_graphs: list[dict[str, Any]] = field(default_factory=list)
    #: runs of a segment whose graph was dropped
    uncaptured_runs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs_captured": self.graphs_captured,
            "replays": self.replays,
            "warmup_runs": self.warmup_runs,
            "eager_fallbacks": self.eager_fallbacks,
            "fallback_reasons": dict(self.fallback_reasons),
            "checked_graphs": self.checked_graphs,
            "checked_replays": self.checked_replays,
            "dropped_graphs": [dict(d) for d in self.dropped_graphs],
            "uncaptured_runs": self.uncaptured_runs,
        }


def capture_size_for(sizes: list[int], num_tokens: int) -> int | None:
    """The smallest of the (sorted) capture `sizes` that holds `num_tokens`; None if none."""
    for s in sizes:
        if s >= num_tokens:
            return s
    return None


def check_capture_sizes(capture_sizes: list[int]) -> list[int]:
    """The capture sizes, sorted and unique; ConfigError unless all are positive integers."""
    sizes = sorted({int(s) for s in capture_sizes})
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"cudagraph_capture_sizes must be positive integers, got {capture_sizes}")
    return sizes


class CaptureManager:
    """One graph per (segment id, capture size): warm up, capture, replay; and the choice of a
    capture size for a batch (the smallest that fits; none fits -> eager fallback).

    With `check` (``runtime.check_captures``, a :class:`CaptureCheck`), replays are compared with
    an uncaptured run of the original segment program on the same inputs (see CaptureCheck).
    A graph that differs is dropped, and its (segment, size) runs uncaptured from then on, or
    the run stops. Dropped graphs are in ``stats.dropped_graphs``.
    """

    def __init__(self, backend: Backend, capture_sizes: list[int], num_warmups: int,
                 *, check: CaptureCheck | None = None) -> None:
        self.backend = backend
        self.sizes = check_capture_sizes(capture_sizes)
        self.num_warmups = max(0, int(num_warmups))
        self.check = check
        self.graphs: dict[tuple[int, int], Any] = {}
        #: (segment id, size) -> max abs error of a dropped graph
        self.dropped: dict[tuple[int, int], float] = {}
        #: (segment id, size) -> bytes of the inputs copied into the graph's static buffers
        self.input_bytes: dict[tuple[int, int], int] = {}
        #: (segment id, size) -> replays of that graph so far / of them checked
        self._replays: dict[tuple[int, int], int] = {}
        self._checked: dict[tuple[int, int], int] = {}
        self.stats = CaptureStats()

    def size_for(self, num_tokens: int) -> int | None:
        """The capture size a batch of `num_tokens` is padded to; None if it is too big."""
        return capture_size_for(self.sizes, num_tokens)

    def static_input_bytes(self) -> dict[int, int]:
        """Capture size -> bytes of static input buffers held by the graphs of that size."""
        out: dict[int, int] = {}
        for (_, size), n in sorted(self.input_bytes.items()):
            out[size] = out.get(size, 0) + n
        return out

    def note_fallback(self, reason: str) -> None:
        """Count (and log) a step that runs eagerly instead of replaying graphs."""
        first = reason not in self.stats.fallback_reasons
        self.stats.eager_fallbacks += 1
        self.stats.fallback_reasons[reason] = self.stats.fallback_reasons.get(reason, 0) + 1
        # like PyTorch's "skipping cudagraphs due to ...": loud once per reason, quiet after
        (log.warning if first else log.info)("skipping cuda graphs due to %s", reason)

    def run(self, seg: Segment, size: int, feeds: Mapping[str, Any]) -> list[Any]:
        """Run captured segment `seg` at capture size `size` (capturing it the first time)."""
        key = (seg.id, size)
        if key in self.dropped:
            self.stats.uncaptured_runs += 1
            return self.backend.run_uncaptured(seg, feeds)
        graph = self.graphs.get(key)
        if graph is None:
            for _ in range(self.num_warmups):
                self.backend.warmup(seg, feeds)
                self.stats.warmup_runs += 1
            graph = self.graphs[key] = self.backend.capture(seg, size, feeds)
            self.stats.graphs_captured += 1
            self.input_bytes[key] = self.backend.static_bytes(graph, seg, feeds)
            log.debug("captured segment %d at size %d", seg.id, size)
        # on a GPU a captured graph has not run yet: every result comes from a replay
        outs = self.backend.replay(graph, feeds)
        self.stats.replays += 1
        n = self._replays[key] = self._replays.get(key, 0) + 1
        checked = self._checked.get(key, 0)
        if self.check is not None and self.check.wants(checked):
            return self._checked_replay(seg, size, n, outs, feeds)
        return outs

    def _checked_replay(self, seg: Segment, size: int, replay: int, outs: list[Any],
                        feeds: Mapping[str, Any]) -> list[Any]:
        """Compare replay number `replay` with an uncaptured run on the same inputs; keep the
        graph if they agree, else drop it (or fail); return outputs that can be trusted."""
        assert self.check is not None
        key = (seg.id, size)
        if not self._checked.get(key):
            self.stats.checked_graphs += 1
        self._checked[key] = self._checked.get(key, 0) + 1
        self.stats.checked_replays += 1
        # the original segment program on this replay's own inputs: never the capture's
        # program nor its frozen values, so a stale graph cannot agree with itself
        want = self.backend.run_uncaptured(seg, feeds)
        host = self.backend.to_numpy
        err = _max_abs_err([None if o is None else host(o) for o in outs],
                           [None if o is None else host(o) for o in want])
        if err <= self.check.atol:
            return outs
        where = f" ({seg.location})" if seg.location else ""
        line = (f"captured graph of segment {seg.id}{where} at capture size {size} differs "
                f"from an uncaptured run of its segment on replay {replay} (max abs err "
                f"{err:.3g} > runtime.check_captures_atol={self.check.atol:g})")
        if self.check.on_mismatch == "fail":
            raise CaptureCheckError(
                line + "; runtime.check_captures_on_mismatch=drop runs it uncaptured instead")
        del self.graphs[key]
        self.dropped[key] = err
        self.stats.dropped_graphs.append(
            {"segment": seg.id, "size": size, "replay": replay, "max_abs_err": err})
        log.warning("%s: dropped, it runs uncaptured from now on", line)
        return want


def _max_abs_err(got: list[Any], want: list[Any]) -> float:
    """Largest absolute difference over paired outputs; inf for a missing or reshaped output or
    a NaN where the other run has none (a check must never pass a graph it cannot compare)."""
    if len(got) != len(want):
        return float("inf")
    err = 0.0
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            return float("inf")
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return float("inf")
        if not a.size or np.array_equal(a, b, equal_nan=True):
            continue
        diff = np.abs(a - b)
        if np.isnan(diff).any():
            return float("inf")
        err = max(err, float(diff.max()))
    return err
