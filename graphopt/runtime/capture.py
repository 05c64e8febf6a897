"""CUDA-graph capture orchestration, shared by the CPU replay emulator and the GPU backend.

What the orchestration does (FastDeploy / vLLM style): one graph per
(segment id, capture size); the first time a segment runs at a size it is warmed up
(``num_warmups`` plain runs), then captured, then replayed; every later run at that size is a
replay. Inputs go through *static input buffers*: a graph is bound to the buffers it was
captured with, so each replay copies the new inputs into them (same shapes: the batch was
padded to the capture size by the caller). Only the capture primitive differs between backends:

* :class:`EmulatorBackend` (CPU). A CUDA graph replays device kernels on new data but does NOT
  redo host work done while capturing. Capture = run the segment program and record the values
  of its HOST_RUNTIME ops (placement analysis); replay = run a variant of the program in which
  those values are ``pd_op.data`` ops fed the recorded values. Stale host values flow on exactly
  as on a GPU, so the seed's bug (a frozen ``cast(slice(max_len_tensor_cpu))`` makes the ``if``
  take the capture-time branch) is reproducible in a CPU test.
* :class:`CudaGraphBackend` (GPU). ``paddle.device.cuda.graphs.CUDAGraph`` around one executor
  run. Thin on purpose: it needs a CUDA build of Paddle, which the public registry does not
  carry for 3.x, so it is not exercised here.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle

from graphopt.errors import ConfigError
from graphopt.ir.pir_utils import (
    add_data_ops,
    add_output,
    clone_program,
    data_ops,
    output_values,
    static_mode,
)
from graphopt.ir.program_index import ProgramIndex
from graphopt.ir.segment_plan import Segment
from graphopt.runtime.executor import ProgramRunner, RunnerPool, as_tensor

log = logging.getLogger(__name__)

BACKENDS = ("emulator", "cuda", "none")

#: batch token counts that get a graph by default: 1, 2, 4, then steps of 8, as vLLM and
#: FastDeploy default to (a step of 8 pads a batch by 7 tokens at most; powers of two padded a
#: 46-token batch to 64, which on a CPU costs 39% more compute)
DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)


class CaptureBackend(ABC):
    """The capture primitive: turn one segment run into a graph, and replay it."""

    name: str = ""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params
        self._uncaptured: dict[int, ProgramRunner] = {}

    @abstractmethod
    def warmup(self, seg: Segment, feeds: Mapping[str, paddle.Tensor]) -> None:
        """Run the segment once, uncaptured (allocator / autotuning warm-up)."""

    @abstractmethod
    def capture(self, seg: Segment, size: int, feeds: Mapping[str, paddle.Tensor]) -> Any:
        """Capture the segment at capture size `size` with these inputs; return the graph."""

    @abstractmethod
    def replay(self, graph: Any, feeds: Mapping[str, paddle.Tensor]) -> list[paddle.Tensor]:
        """Copy `feeds` into the graph's static inputs, replay, return the live-out values."""

    def static_bytes(self, graph: Any, seg: Segment, feeds: Mapping[str, Any]) -> int:
        """Bytes of the inputs a replay of `graph` copies into its static buffers."""
        return sum(_nbytes(feeds[n]) for n in seg.feed_names)

    def run_uncaptured(self, seg: Segment, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the segment as a plain program (no graph): the reference a checked capture is
        compared with, and how a dropped graph's segment runs from then on."""
        runner = self._uncaptured.get(seg.id)
        if runner is None:
            runner = self._uncaptured[seg.id] = ProgramRunner(seg.program, self.params)
        return runner.run(feeds)


# -- CPU replay emulator -----------------------------------------------------------------------
@dataclass
class EmulatedGraph:
    """What an emulated capture keeps: static input buffers and the frozen host values."""

    segment_id: int
    size: int
    static_inputs: dict[str, paddle.Tensor]
    #: data-op name in the replay program -> the HOST_RUNTIME value recorded at capture
    frozen: dict[str, paddle.Tensor] = field(default_factory=dict)
    #: what the capture run computed: the first replay's result (same inputs, frozen values
    #: just recorded), handed out once instead of running the segment a second time
    first_outputs: list[paddle.Tensor] | None = None
    #: inputs bound as they are, not copied: the model's weights and constant buffers (a GPU
    #: graph reads them where they live; cloning them per graph cost ~200 MB per capture size
    #: at 61 layers, where SOT passes the stacked expert weights as inputs)
    bound: frozenset[str] = frozenset()


class _EmulatedSegment:
    """The per-segment programs of the emulator: capture (extra outputs for the host values)
    and replay (host values replaced by data ops)."""

    def __init__(self, seg: Segment, pool: RunnerPool) -> None:
        assert seg.program is not None
        params = pool.params
        idx = ProgramIndex(seg.program)
        # only top-level dense values can be fetched at capture and fed back on replay; host
        # values nested in a captured (non-blacklisted) if are left as they are
        keys = [k for k in seg.host_runtime.values()
                if "/" not in k.split("@", 1)[-1] and idx.values[k].is_dense_tensor_type()]
        self.frozen_names = [f"seg{seg.id}.frozen{i}" for i in range(len(keys))]
        self.n_out = len(seg.live_out)
        self.outputs_from_frozen: dict[int, str] = {}
        if not keys:  # nothing to freeze: the segment's own (shared) runner does it all
            self.capture_runner = pool.get(seg.program)
            self.replay_runner = self.capture_runner
            return
        cap = clone_program(seg.program)
        cidx = ProgramIndex(cap)
        for i, k in enumerate(keys):
            add_output(cap, cidx.values[k], f"seg{seg.id}.record{i}")
        self.capture_runner = ProgramRunner(cap, params, fetch=output_values(cap))
        rep = _frozen_variant(seg.program, keys, self.frozen_names)
        self.replay_runner = ProgramRunner(rep, params)
        # a live-out that is itself a frozen value is now a data op: such outputs are filled
        # from the recorded values (on a GPU the output buffer still holds the capture-time
        # value)
        for i, v in enumerate(output_values(rep)):
            op = v.get_defining_op()
            if op.name() == "pd_op.data" and op.attrs()["name"] in self.frozen_names:
                self.outputs_from_frozen[i] = op.attrs()["name"]


def _frozen_variant(program: paddle.pir.Program, keys: list[str], names: list[str]
                    ) -> paddle.pir.Program:
    """`program` with each value in `keys` replaced by a data op `names[i]`; the host ops that
    computed them are removed (a replay does not run them)."""
    rep = clone_program(program)
    ridx = ProgramIndex(rep)
    producers = {ridx.ops[ridx.defs[k].path].id() for k in keys}
    values = [ridx.values[k] for k in keys]
    feeds = add_data_ops(rep, [(name, list(v.shape), v.dtype)
                               for name, v in zip(names, values, strict=True)])
    for value, feed in zip(values, feeds, strict=True):
        value.replace_all_uses_with(feed)
    block = rep.global_block()
    for op in reversed(list(block.ops)):
        if op.id() in producers and all(r.use_empty() for r in op.results()):
            block.remove_op(op)
    return rep


class EmulatorBackend(CaptureBackend):
    """CPU stand-in for CUDA graphs: replays reuse the host values recorded at capture."""

    name = "emulator"

    def __init__(self, pool: RunnerPool) -> None:
        super().__init__(pool.params)
        self.pool = pool
        self._segments: dict[int, _EmulatedSegment] = {}
        self._constants = {id(t) for t in pool.params.values()}

    def _seg(self, seg: Segment) -> _EmulatedSegment:
        em = self._segments.get(seg.id)
        if em is None:
            em = self._segments[seg.id] = _EmulatedSegment(seg, self.pool)
        return em

    def warmup(self, seg: Segment, feeds: Mapping[str, paddle.Tensor]) -> None:
        # A warm-up fills allocator pools and picks kernels on a GPU; on the CPU there is
        # nothing to emulate (its outputs are thrown away), so the run is counted, not made.
        self._seg(seg)

    def capture(self, seg: Segment, size: int, feeds: Mapping[str, paddle.Tensor]
                ) -> EmulatedGraph:
        em = self._seg(seg)
        outs = em.capture_runner.run(feeds)
        recorded = outs[em.n_out:]  # fresh tensors: no later run writes into them
        static, bound = {}, set()
        for n in seg.feed_names:
            t = as_tensor(feeds[n])
            if id(t) in self._constants:
                static[n] = t
                bound.add(n)
            else:
                static[n] = t.clone()
        frozen = dict(zip(em.frozen_names, recorded, strict=True))
        return EmulatedGraph(seg.id, size, static, frozen, bound=frozenset(bound),
                             first_outputs=outs[:em.n_out])

    def static_bytes(self, graph: Any, seg: Segment, feeds: Mapping[str, Any]) -> int:
        return sum(_nbytes(feeds[n]) for n in seg.feed_names if n not in graph.bound)

    def replay(self, graph: EmulatedGraph, feeds: Mapping[str, paddle.Tensor]
               ) -> list[paddle.Tensor]:
        _copy_into_static(graph.static_inputs, feeds, graph.segment_id, graph.bound)
        if graph.first_outputs is not None:
            # the replay right after the capture: same inputs, and the frozen host values are
            # the ones this very run computed, so the replay would compute exactly these
            outs, graph.first_outputs = graph.first_outputs, None
            return outs
        em = self._segments[graph.segment_id]
        outs = em.replay_runner.run({**graph.static_inputs, **graph.frozen})
        for i, name in em.outputs_from_frozen.items():
            outs[i] = graph.frozen[name].clone()
        return outs

    def run_uncaptured(self, seg: Segment, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        em = self._seg(seg)
        return em.capture_runner.run(feeds)[: em.n_out]


def _copy_into_static(static: dict[str, paddle.Tensor], feeds: Mapping[str, Any],
                      seg_id: int, bound: frozenset[str] = frozenset()) -> None:
    for name, buf in static.items():
        new = as_tensor(feeds[name])
        if name in bound:
            if new is not buf:  # never write into a weight: the graph must be captured anew
                raise ValueError(f"segment {seg_id}: input {name} was captured bound to a model "
                                 "constant and is now another tensor")
            continue
        if new.shape != buf.shape or new.dtype != buf.dtype:
            raise ValueError(
                f"segment {seg_id}: input {name} is {_desc(new)} but its graph was captured "
                f"with {_desc(buf)} (batch not padded to the capture size?)"
            )
        paddle.assign(new, output=buf)


def _nbytes(value: Any) -> int:
    """Size of a tensor or array in bytes, without copying it to numpy."""
    if isinstance(value, paddle.Tensor):
        return int(np.prod(value.shape, dtype=np.int64)) * value.element_size()
    return int(np.asarray(value).nbytes)


def _desc(t: paddle.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('paddle.')}{list(t.shape)}"


# -- GPU backend (thin; needs paddlepaddle-gpu) --------------------------------------------------
class CudaGraphBackend(CaptureBackend):
    """Real CUDA graphs: ``CUDAGraph.capture_begin()``, one executor run, ``capture_end()``.

    Static input buffers are the feed variables of a per-segment scope on the GPU; a replay
    writes new inputs into them (same shape, so the allocation is reused) and replays. Untested
    here: no CUDA build of Paddle 3.x on the public registry.
    """

    name = "cuda"

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__(params)
        if not paddle.is_compiled_with_cuda():
            raise ConfigError(
                "runtime.backend=cuda needs a CUDA build of Paddle (paddlepaddle-gpu 3.3); this "
                "Paddle is CPU-only: use runtime.backend=emulator (replay emulator) or none"
            )
        from paddle.device.cuda.graphs import CUDAGraph  # only importable on CUDA builds

        self._graph_cls = CUDAGraph
        self.place = paddle.CUDAPlace(0)
        self._scopes: dict[int, tuple[Any, Any]] = {}

    def _scope(self, seg: Segment) -> tuple[Any, Any]:
        got = self._scopes.get(seg.id)
        if got is None:
            scope = paddle.static.Scope()
            with static_mode():
                exe = paddle.static.Executor(self.place)
            for op in seg.program.global_block().ops:
                if op.name() == "builtin.parameter":
                    name = op.attrs()["parameter_name"]
                    scope.var(name).get_tensor().set(np.asarray(self.params[name]), self.place)
            got = self._scopes[seg.id] = (scope, exe)
        return got

    def _write_inputs(self, seg: Segment, feeds: Mapping[str, Any]) -> None:
        scope, _ = self._scope(seg)
        for name in data_ops(seg.program):
            scope.var(name).get_tensor().set(np.asarray(feeds[name]), self.place)

    def _run(self, seg: Segment) -> list[Any]:
        scope, exe = self._scope(seg)
        with static_mode(), paddle.static.scope_guard(scope):
            return exe.run(seg.program, feed={}, fetch_list=output_values(seg.program),
                           return_numpy=False)

    def warmup(self, seg: Segment, feeds: Mapping[str, Any]) -> None:
        self._write_inputs(seg, feeds)
        self._run(seg)

    def capture(self, seg: Segment, size: int, feeds: Mapping[str, Any]) -> Any:
        self._write_inputs(seg, feeds)
        graph = self._graph_cls(place=self.place, mode="thread_local")
        graph.capture_begin()
        outs = self._run(seg)
        graph.capture_end()
        return (seg, graph, outs)

    def replay(self, graph: Any, feeds: Mapping[str, Any]) -> list[paddle.Tensor]:
        seg, cuda_graph, outs = graph
        self._write_inputs(seg, feeds)
        cuda_graph.replay()
        return [as_tensor(np.array(o)) for o in outs]

    def run_uncaptured(self, seg: Segment, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self._write_inputs(seg, feeds)
        return [np.array(o) for o in self._run(seg)]


# -- orchestration ---------------------------------------------------------------------------------
def make_backend(name: str, pool: RunnerPool) -> CaptureBackend | None:
    """The capture backend called `name` (None for ``none``: segments run uncaptured)."""
    if name == "emulator":
        return EmulatorBackend(pool)
    if name == "cuda":
        return CudaGraphBackend(pool.params)
    if name == "none":
        return None
    raise ConfigError(f"unknown runtime backend {name!r}: choose one of {', '.join(BACKENDS)}")


@dataclass
class CaptureStats:
    """Counters of the capture orchestration."""

    graphs_captured: int = 0
    replays: int = 0
    warmup_runs: int = 0
    eager_fallbacks: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    #: checked captures: graphs compared with an uncaptured run right after capture
    checked_graphs: int = 0
    #: graphs that differed: ``{"segment", "size", "max_abs_err"}``; they run uncaptured now
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

    With `check` (``runtime.check_captures``), each new graph is replayed once on the batch it
    was captured with and compared with an uncaptured run of its segment. A graph off by more
    than `check_atol` is dropped, and that (segment, size) runs uncaptured from then on. Its
    error is in ``stats.dropped_graphs``.
    """

    def __init__(self, backend: CaptureBackend, capture_sizes: list[int], num_warmups: int,
                 *, check: bool = False, check_atol: float = 1e-4) -> None:
        self.backend = backend
        self.sizes = check_capture_sizes(capture_sizes)
        self.num_warmups = max(0, int(num_warmups))
        self.check = bool(check)
        self.check_atol = float(check_atol)
        self.graphs: dict[tuple[int, int], Any] = {}
        #: (segment id, size) -> max abs error of a dropped graph
        self.dropped: dict[tuple[int, int], float] = {}
        #: (segment id, size) -> bytes of the inputs copied into the graph's static buffers
        self.input_bytes: dict[tuple[int, int], int] = {}
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

    def run(self, seg: Segment, size: int, feeds: Mapping[str, Any]) -> list[paddle.Tensor]:
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
            graph = self.backend.capture(seg, size, feeds)
            self.stats.graphs_captured += 1
            self.input_bytes[key] = self.backend.static_bytes(graph, seg, feeds)
            log.debug("captured segment %d at size %d", seg.id, size)
            if self.check:
                return self._checked_first_replay(seg, size, graph, feeds)
            self.graphs[key] = graph
        # on a GPU a captured graph has not run yet: every result comes from a replay
        outs = self.backend.replay(graph, feeds)
        self.stats.replays += 1
        return outs

    def _checked_first_replay(self, seg: Segment, size: int, graph: Any,
                              feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Replay a new graph on its capture batch and keep it only if it equals the
        uncaptured run of its segment; return the (trusted) outputs."""
        outs = self.backend.replay(graph, feeds)
        self.stats.replays += 1
        want = self.backend.run_uncaptured(seg, feeds)
        self.stats.checked_graphs += 1
        err = _max_abs_err(outs, want)
        if err <= self.check_atol:
            self.graphs[(seg.id, size)] = graph
            return outs
        self.dropped[(seg.id, size)] = err
        self.stats.dropped_graphs.append({"segment": seg.id, "size": size, "max_abs_err": err})
        log.warning("captured graph of segment %d at size %d differs from its uncaptured run "
                    "(max abs err %.3g > %g): dropped, it runs uncaptured from now on",
                    seg.id, size, err, self.check_atol)
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
