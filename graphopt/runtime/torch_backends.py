"""The backends that run plans through PyTorch: ``torch_cpu`` and ``torch_cuda``.

No CUDA build of Paddle 3.x is reachable, so on a GPU Paddle traces and plans on the CPU and
PyTorch executes: every program of the plan (segments, eager segments, the prologue, variants,
the whole program) is lowered op by op (:mod:`graphopt.runtime.lowering`) and run there.

* ``torch_cpu``: the lowering on the CPU, nothing captured. What CI runs: it tests the lowering
  against Paddle without a GPU.
* ``torch_cuda``: the lowering on CUDA; captured segments become ``torch.cuda.CUDAGraph``s, one
  per (segment, capture size); a segment's graphs share one memory pool. Device values stay on the GPU between
  segments; host values (host meta fields, hoisted conditions, shapes) stay CPU tensors. A host
  op left inside a captured segment runs once, at capture, and its result is frozen into the
  graph: exactly the replay hazard the hoist pass removes.

Capture follows PyTorch's recipe: warm-up runs on a side stream, then ``torch.cuda.graph``;
a replay copies new inputs into the graph's static input tensors
(weights are bound, never copied) and hands back the graph's static outputs, which the next
replay of that graph overwrites.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import paddle

from graphopt.errors import CaptureError, one_line
from graphopt.ir.segment_plan import Segment
from graphopt.runtime.backend import Backend, nbytes, register_backend
from graphopt.runtime.executor import RunnerPool


def _torch_missing() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return ("needs PyTorch (pip install torch; the CPU build is enough for torch_cpu): "
                "graphopt lowers the plan to PyTorch ops")
    return None


class TorchBackend(Backend):
    """Shared by ``torch_cpu`` and ``torch_cuda``: programs lowered to PyTorch, run on
    :attr:`device_type`; tensors between segments stay there."""

    device_type: ClassVar[str] = "cpu"
    engine = "torch"

    def __init__(self, pool: RunnerPool) -> None:
        super().__init__(pool)
        import torch

        from graphopt.runtime import lowering

        self._torch = torch
        self._lowering = lowering
        self.device = torch.device(self.device_type)
        device = self.device
        self._params: dict[str, Any] = pool.memo(
            ("torch", str(device)),
            lambda: {n: lowering.to_torch(t, device) for n, t in pool.params.items()})
        #: id(program) -> (program, lowered): the program is held so its id is not reused
        self._lowered: dict[int, tuple[paddle.pir.Program, Any]] = pool.memo(
            ("torch-lowered", str(device)), dict)
        #: ids of tensors that stay where they are from step to step (staged step inputs,
        #: graph outputs): a graph binds them instead of copying them at every replay
        self._stable: set[int] = pool.memo(("torch-stable", str(device)), set)

    @property
    def params(self) -> Mapping[str, Any]:
        return self._params

    def from_step(self, value: paddle.Tensor, host: bool, reuse: Any | None) -> Any:
        device = self._torch.device("cpu") if host else self.device
        if reuse is not None and reuse.device.type == device.type:  # (cuda == cuda:0)
            # in place: a graph captured on `reuse` reads the new value where it is
            reuse.copy_(self._lowering.to_torch(value, "cpu"))
            return reuse
        staged = self._lowering.to_torch(value, device)
        if device.type == "cpu":  # a view of the batch's own tensor: never write into it
            staged = staged.clone()
        self._stable.add(id(staged))
        return staged

    def to_numpy(self, value: Any) -> np.ndarray:
        if isinstance(value, self._torch.Tensor):
            return value.detach().cpu().numpy()
        return super().to_numpy(value)

    def check_programs(self, programs: list[paddle.pir.Program]) -> None:
        # every op of the plan against the op table before the first step, not at the first
        # run of the program that holds it (after other graphs were captured)
        for program in programs:
            error = self._lowering.lowering_error(program, self.name)
            if error is not None:
                raise error

    def lowered(self, program: paddle.pir.Program, feeds: Mapping[str, Any]) -> Any:
        """The lowered `program` (lowered on first use; host inputs are the feeds that live on
        the CPU while the backend's device is not)."""
        hit = self._lowered.get(id(program))
        if hit is not None and hit[0] is program:
            return hit[1]
        host = ([n for n, t in feeds.items()
                 if isinstance(t, self._torch.Tensor) and t.device.type == "cpu"]
                if self.device.type != "cpu" else [])
        lp = self._lowering.lower_program(program, self._params, device=self.device,
                                          host_inputs=host, backend=self.name)
        self._lowered[id(program)] = (program, lp)
        return lp

    def run_program(self, program: paddle.pir.Program, feeds: Mapping[str, Any]) -> list[Any]:
        return self.lowered(program, feeds).run(feeds)


@register_backend
class TorchCpuBackend(TorchBackend):
    """The PIR-to-PyTorch lowering on the CPU, uncaptured (what CI tests the lowering with)."""

    name = "torch_cpu"
    summary = "PyTorch lowering of the plan on the CPU, nothing captured (tests the lowering)"
    captures = False
    device_type = "cpu"

    @classmethod
    def unavailable(cls) -> str | None:
        return _torch_missing()


@dataclass
class TorchGraph:
    """One captured (segment, size): the graph, its static inputs and outputs."""

    segment_id: int
    size: int
    graph: Any
    #: feed name -> the tensor the graph reads (a static buffer, or a bound tensor)
    static_inputs: dict[str, Any]
    #: the graph's outputs: the same tensors every replay, overwritten by the next one
    outputs: list[Any]
    #: weights and constant buffers, read where they live: never copied into
    weights: frozenset[str] = frozenset()
    #: staged step inputs and other graphs' outputs, read where they live: a replay that gets
    #: another tensor for one of them runs the segment uncaptured instead (writing into a
    #: tensor that may still be live elsewhere in the step would be wrong)
    bound: frozenset[str] = frozenset()
    #: (feed name, static buffer) of the feeds each replay copies into
    copies: list[tuple[str, Any]] = field(default_factory=list)
    #: the segment, for a replay that cannot use the graph
    segment: Segment | None = None
    capture_s: float = 0.0


class CudaGraphApi:
    """The capture primitive torch_cuda uses: ``torch.cuda.CUDAGraph``, with one memory pool
    per segment, shared by that segment's graphs of every capture size. Tests replace it (a CPU
    stand-in) to run the backend's buffer logic without a GPU.

    Why a pool per segment: graphs that share a pool must never run in the same step. A
    replay writes wherever its capture put its temporaries, and a later capture into the same
    pool may have been given that memory for its outputs. PyTorch's recipe (one pool, replays
    in capture order) does not hold for a plan whose steps take different branches: a prefill
    step first captures the prefill branch's segments after every decode graph of that size,
    then replays them between those graphs. On the H200, with one pool for every graph, 12 of
    the 143 graphs of the 4-layer piecewise plan differed from an uncaptured run of their
    segment on their second replay (max abs err up to 4.8; the checked captures dropped them).
    One step runs one capture size, so a segment's graphs never meet in a step: 0 of 728
    checked replays differed, for 1,284 MiB of graph memory against 1,208 (a pool per graph:
    0 wrong too, but 26 GB at 61 layers, 2,024 graphs, against 2.5 GB).
    """

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.pools: dict[Any, Any] = {}

    def warmup(self, run: Any) -> None:
        """Run `run()` on a side stream, as PyTorch's recipe does before a capture."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, run: Any, pool_key: Any) -> tuple[Any, list[Any]]:
        """Capture `run()` into the pool of `pool_key` (graphs never run in the same step);
        return the graph and the outputs the capture made."""
        pool = self.pools.get(pool_key)
        if pool is None:
            pool = self.pools[pool_key] = self.torch.cuda.graph_pool_handle()
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, pool=pool):
            outs = run()
        return graph, outs

    def replay(self, graph: Any) -> None:
        graph.replay()


@register_backend
class TorchCudaBackend(TorchBackend):
    """The PIR-to-PyTorch lowering on a GPU, captured segments as ``torch.cuda.CUDAGraph``s."""

    name = "torch_cuda"
    summary = "PyTorch lowering of the plan on a GPU, captured with torch.cuda.CUDAGraph"
    captures = True
    device_type = "cuda"
    #: the capture primitive (a class taking the torch module); tests swap it
    graph_api: ClassVar[type] = CudaGraphApi

    @classmethod
    def unavailable(cls) -> str | None:
        missing = _torch_missing()
        if missing:
            return missing
        import torch

        if not torch.cuda.is_available():
            return ("no CUDA device is visible to PyTorch here (torch "
                    f"{torch.__version__}): run it on a GPU machine, or use "
                    "runtime.backend=torch_cpu to run the same lowering on the CPU")
        return None

    def __init__(self, pool: RunnerPool) -> None:
        super().__init__(pool)
        self.api = pool.memo(("torch-graph-api", self.graph_api), lambda: self.graph_api(
            self._torch))
        self._param_ids = {id(t) for t in self._params.values()}
        #: replays that ran uncaptured because a bound input came as another tensor
        self.unbound_replays = 0
        #: value keys whose tensor depends on the branch an eager if took (its results): a
        #: graph reading one gets a static buffer, never the tensor it saw at capture
        self._varying: set[str] = set()
        #: seconds spent in captures (warm-ups excluded)
        self.capture_s = 0.0

    def note_plan(self, plan: Any) -> None:
        self._varying.update(k for s in plan.walk() if s.is_branching for k in s.results)

    def warmup(self, seg: Segment, feeds: Mapping[str, Any]) -> None:
        lp = self.lowered(seg.program, feeds)
        self.api.warmup(lambda: lp.run(feeds))

    def capture(self, seg: Segment, size: int, feeds: Mapping[str, Any]) -> TorchGraph:
        lp = self.lowered(seg.program, feeds)
        static: dict[str, Any] = {}
        weights: set[str] = set()
        bound: set[str] = set()
        copies: list[tuple[str, Any]] = []
        for name, key in zip(seg.feed_names, seg.live_in, strict=True):
            t = feeds[name]
            static[name] = t
            if id(t) in self._param_ids:
                weights.add(name)
            elif id(t) in self._stable and key not in self._varying:
                bound.add(name)
            else:
                static[name] = t.clone()
                copies.append((name, static[name]))
        t0 = time.perf_counter()
        try:
            graph, outs = self.api.capture(lambda: lp.run(static), seg.id)
        except Exception as e:
            where = f" ({seg.location})" if seg.location else ""
            raise CaptureError(
                f"capturing segment {seg.id}{where} at size {size} on {self.name} failed: "
                f"{one_line(e, 400)}") from None
        took = time.perf_counter() - t0
        self.capture_s += took
        outs = list(outs)
        self._stable.update(id(o) for o in outs)
        return TorchGraph(seg.id, size, graph, static, outs, frozenset(weights),
                          frozenset(bound), copies, seg, took)

    def static_bytes(self, graph: TorchGraph, seg: Segment, feeds: Mapping[str, Any]) -> int:
        return sum(nbytes(buf) for _, buf in graph.copies)

    def replay(self, graph: TorchGraph, feeds: Mapping[str, Any]) -> list[Any]:
        for name in graph.weights:
            if feeds[name] is not graph.static_inputs[name]:
                raise ValueError(f"segment {graph.segment_id}: input {name} was captured bound "
                                 "to a model weight and is now another tensor")
        for name in graph.bound:
            if feeds[name] is not graph.static_inputs[name]:
                self.unbound_replays += 1
                assert graph.segment is not None
                return self.run_uncaptured(graph.segment, feeds)
        for name, buf in graph.copies:
            new = feeds[name]
            if new.shape != buf.shape or new.dtype != buf.dtype:
                raise ValueError(
                    f"segment {graph.segment_id}: input {name} is {new.dtype}{list(new.shape)} "
                    f"but its graph was captured with {buf.dtype}{list(buf.shape)} (batch not "
                    "padded to the capture size?)")
            buf.copy_(new)
        self.api.replay(graph.graph)
        return list(graph.outputs)
