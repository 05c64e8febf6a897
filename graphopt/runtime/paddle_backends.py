"""The backends that run programs through Paddle: ``none``, ``emulator`` and ``cuda``.

* ``none``: every segment through Paddle's ``run_program`` op, uncaptured.
* ``emulator`` (CPU). A CUDA graph replays device kernels on new data but does NOT redo host
  work done while capturing. Capture = run the segment program and record the values of its
  HOST_RUNTIME ops (placement analysis); replay = run a variant of the program in which those
  values are ``pd_op.data`` ops fed the recorded values. Stale host values flow on exactly as on
  a GPU, so the seed's bug (a frozen ``cast(slice(max_len_tensor_cpu))`` makes the ``if`` take
  the capture-time branch) is reproducible in a CPU test.
* ``cuda``: ``paddle.device.cuda.graphs.CUDAGraph`` around one executor run. It needs a CUDA
  build of Paddle, which no registry this project reaches carries for 3.x, so it has never run;
  on a GPU, graphopt's measured path is ``torch_cuda`` (:mod:`graphopt.runtime.torch_backends`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle

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
from graphopt.runtime.backend import Backend, nbytes, register_backend
from graphopt.runtime.executor import ProgramRunner, RunnerPool, as_tensor


@register_backend
class PaddleBackend(Backend):
    """Every program through Paddle's ``run_program`` op, uncaptured (``runtime.backend=none``)."""

    name = "none"
    summary = "Paddle run_program, nothing captured (segments run one by one)"
    captures = False


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


@register_backend
class EmulatorBackend(PaddleBackend):
    """CPU stand-in for CUDA graphs: replays reuse the host values recorded at capture."""

    name = "emulator"
    summary = "Paddle run_program; capture is the CPU replay emulator (host values frozen)"
    captures = True

    def __init__(self, pool: RunnerPool) -> None:
        super().__init__(pool)
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
        return sum(nbytes(feeds[n]) for n in seg.feed_names if n not in graph.bound)

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

    # run_uncaptured is Backend's: the original segment program, not the capture program, so
    # a checked capture compares the graph with code that shares nothing of the capture's


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


def _desc(t: paddle.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('paddle.')}{list(t.shape)}"


# -- GPU backend (thin; needs paddlepaddle-gpu) --------------------------------------------------
@register_backend
class CudaGraphBackend(PaddleBackend):
    """Real CUDA graphs: ``CUDAGraph.capture_begin()``, one executor run, ``capture_end()``.

    Static input buffers are the feed variables of a per-segment scope on the GPU; a replay
    writes new inputs into them (same shape, so the allocation is reused) and replays. Untested
    here: no CUDA build of Paddle 3.x on the public registry.
    """

    name = "cuda"
    summary = "Paddle's own CUDAGraph (paddlepaddle-gpu builds only; never run by this project)"
    captures = True

    @classmethod
    def unavailable(cls) -> str | None:
        if not paddle.is_compiled_with_cuda():
            return ("needs a CUDA build of Paddle (paddlepaddle-gpu 3.3); this Paddle is "
                    "CPU-only: use runtime=cpu (the replay emulator), or runtime=torch_cuda on "
                    "a machine with PyTorch and CUDA")
        return None

    def __init__(self, pool: RunnerPool) -> None:
        super().__init__(pool)
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


