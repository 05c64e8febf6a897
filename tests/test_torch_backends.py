"""The PyTorch backends without a GPU: ``torch_cpu`` runs whole steps of real plans against the
eager model as written, and ``torch_cuda``'s capture logic (static inputs, bound step buffers
and weights, graph outputs read in place, checked captures) runs on the CPU with a stand-in for
``torch.cuda.CUDAGraph`` that replays by rerunning the captured program into the same output
tensors. The capture itself is measured on a GPU (tools/bench_gpu.py, docs/gpu.md)."""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from graphopt.config import validate  # noqa: E402
from graphopt.driver import build_and_optimize  # noqa: E402
from graphopt.errors import CaptureCheckError, ConfigError  # noqa: E402
from graphopt.runtime.backend import backend_names, check_backend, get_backend  # noqa: E402
from graphopt.runtime.capture import CaptureCheck  # noqa: E402
from graphopt.runtime.executor import RunnerPool  # noqa: E402
from graphopt.runtime.step import StepExecutor, WholeProgramStep  # noqa: E402
from graphopt.runtime.torch_backends import TorchCudaBackend  # noqa: E402
from graphopt.runtime.variants import VariantStepExecutor  # noqa: E402
from graphopt.verification import max_abs_err  # noqa: E402
from tests.conftest import compose_cfg  # noqa: E402

SIZES = [1, 2, 4, 8, 16, 32, 64]
ARGS = ("model=dsv3", "model.num_hidden_layers=2")


class FakeGraph:
    def __init__(self, run, outs) -> None:
        self.run, self.outs, self.replays = run, outs, 0


class FakeGraphApi:
    """``torch.cuda.CUDAGraph`` on the CPU: a capture runs the program once; a replay reruns it
    on the static inputs and writes the results into the capture's output tensors, so a
    consumer reading those tensors sees each replay's values as it would on a GPU."""

    def __init__(self, torch_module) -> None:
        self.captures = 0

    def warmup(self, run) -> None:
        run()

    def capture(self, run, pool_key=None):
        self.captures += 1
        outs = run()
        return FakeGraph(run, outs), outs

    def replay(self, graph: FakeGraph) -> None:
        graph.replays += 1
        for out, new in zip(graph.outs, graph.run(), strict=True):
            out.copy_(new)


class CpuGraphBackend(TorchCudaBackend):
    """torch_cuda's buffer logic on the CPU (the stand-in graph API above)."""

    device_type = "cpu"
    graph_api = FakeGraphApi


def cpu_graphs(name, pool):
    return CpuGraphBackend(pool)


def _optimized(*overrides):
    cfg = compose_cfg(*ARGS, *overrides)
    mp, _, _ = build_and_optimize(cfg, validate(cfg), np.random.default_rng(0))
    mp.model.restore_patches(0)
    return mp


@pytest.fixture(scope="module")
def piecewise():
    return _optimized()


@pytest.fixture(scope="module")
def full_graph():
    return _optimized("pipeline=full_graph", "full_cuda_graph=true")


def _against_eager(ex, mp, steps: int, seed: int = 3) -> list[float]:
    rng = np.random.default_rng(seed)
    bundle = mp.model
    errs = []
    for i in range(steps):
        batch = bundle.random_batch(rng, ("decode", "prefill", "mixed")[i % 3])
        want = bundle.reference_step(batch)
        errs.append(max_abs_err(ex.run(batch), want))
        bundle.commit_state(want[1:])
    return errs


def test_backends_are_registered_with_one_line_each():
    assert {"none", "emulator", "cuda", "torch_cpu", "torch_cuda"} <= set(backend_names())
    assert get_backend("torch_cpu").captures is False
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"runtime.backend=torch_cuda: no CUDA device is "
                           r"visible to PyTorch here .*use runtime.backend=torch_cpu"):
            check_backend("torch_cuda")
        with pytest.raises(ConfigError, match=r"runtime\.backend=torch_cuda: no CUDA device"):
            validate(compose_cfg("model=tiny", "runtime=torch_cuda"))


def test_torch_cpu_runs_the_whole_program_and_the_plan_like_eager(piecewise):
    pool = RunnerPool(piecewise.params)
    whole = WholeProgramStep(piecewise, pool, "torch_cpu")
    plan = StepExecutor(piecewise, "torch_cpu", SIZES, 0, pool)
    assert plan.capture is None  # torch_cpu captures nothing
    assert max(_against_eager(whole, piecewise, 6)) < 1e-4
    assert max(_against_eager(plan, piecewise, 6, seed=4)) < 1e-4
    out = plan.run(piecewise.model.random_batch(np.random.default_rng(0), "decode"))
    assert all(isinstance(t, torch.Tensor) for t in out)  # the backend's tensors, not numpy


def test_graph_logic_replays_real_plans_like_eager(piecewise, full_graph):
    for mp, executor in ((piecewise, StepExecutor), (full_graph, VariantStepExecutor)):
        ex = executor(mp, "torch_cuda", SIZES, 1, RunnerPool(mp.params),
                      check_captures=CaptureCheck(atol=1e-4), backend_factory=cpu_graphs)
        errs = _against_eager(ex, mp, 12)
        assert max(errs) < 1e-4, errs
        st = ex.stats()
        assert st["graphs_captured"] > 0 and st["replays"] >= st["graphs_captured"]
        assert st["dropped_graphs"] == [] and st["checked_replays"] > st["graphs_captured"]


def test_step_inputs_and_graph_outputs_are_read_in_place_not_copied(piecewise):
    """KV caches and token inputs are staged once per step into buffers that graphs bind,
    and one graph's outputs are the next graph's inputs where they are: a steady-state replay
    copies nothing, as in a serving engine (copies cost a kernel launch each)."""
    ex = StepExecutor(piecewise, "torch_cuda", [8], 0, RunnerPool(piecewise.params),
                      backend_factory=cpu_graphs)
    bundle = piecewise.model
    for cached in ([5, 9, 13, 2], [6, 10, 14, 3], [7, 11, 15, 4]):
        ex.run(bundle.make_batch("decode", [1] * 4, cached))
    # a prefill, then a mixed step at the same size: the ifs' results now come from the other
    # branch's graphs, read through static buffers (never a fallback to an uncaptured run)
    ex.run(bundle.make_batch("prefill", [3, 5], [0, 0]))
    ex.run(bundle.make_batch("mixed", [1, 7], [4, 0]))
    ex.run(bundle.make_batch("decode", [1] * 4, [5, 9, 13, 2]))
    backend = ex.capture.backend
    graphs = list(ex.capture.graphs.values())
    assert graphs and backend.unbound_replays == 0
    # only the ifs' results are copied (into static buffers), nothing else
    varying = {k for s in piecewise.segments.walk() if s.is_branching for k in s.results}
    seg_of = {s.id: s for s in piecewise.segments.walk()}
    copied = {dict(zip(seg_of[g.segment_id].feed_names, seg_of[g.segment_id].live_in,
                       strict=True))[n] for g in graphs for n, _ in g.copies}
    assert copied and copied <= varying
    assert all(g.bound or g.weights for g in graphs)
    caches = [n for g in graphs for n, key in zip(
        next(s for s in piecewise.segments.walk() if s.id == g.segment_id).feed_names,
        next(s for s in piecewise.segments.walk() if s.id == g.segment_id).live_in,
        strict=True) if key.startswith("meta.caches")]
    assert caches  # the latent caches reach captured segments, bound


def test_a_graph_that_goes_stale_is_caught_by_checked_captures(piecewise):
    class StaleBackend(CpuGraphBackend):
        """Replays never rerun: the graph's outputs stay those of its capture."""

        graph_api = type("StaleApi", (FakeGraphApi,), {"replay": lambda self, g: None})

    def stale(name, pool):
        return StaleBackend(pool)

    mp = piecewise
    unchecked = StepExecutor(mp, "torch_cuda", SIZES, 0, RunnerPool(mp.params),
                             backend_factory=stale)
    assert max(_against_eager(unchecked, mp, 6)) > 1e-2
    checked = StepExecutor(mp, "torch_cuda", SIZES, 0, RunnerPool(mp.params),
                           check_captures=CaptureCheck(atol=1e-4, replays=None),
                           backend_factory=stale)
    assert max(_against_eager(checked, mp, 6)) < 1e-4
    assert checked.stats()["dropped_graphs"]
    failing = StepExecutor(mp, "torch_cuda", SIZES, 0, RunnerPool(mp.params),
                           check_captures=CaptureCheck(atol=1e-4, on_mismatch="fail"),
                           backend_factory=stale)
    with pytest.raises(CaptureCheckError, match=r"differs from an uncaptured run of its segment "
                       r"on replay \d"):
        _against_eager(failing, mp, 6)


def test_graphs_that_run_in_one_step_never_share_a_memory_pool(piecewise, full_graph):
    """A replay writes wherever its capture put its temporaries; a later capture into the same
    pool may have been given that memory (on the H200, one pool for all graphs made 12 of 143
    graphs wrong on their second replay). So graphs share a pool only when no step runs both:
    one pool per segment, shared by its capture sizes."""
    replayed: list[tuple[int, object]] = []

    class Recording(FakeGraphApi):
        def capture(self, run, pool_key=None):
            graph, outs = super().capture(run, pool_key)
            graph.pool_key = pool_key
            return graph, outs

        def replay(self, graph):
            replayed.append(graph.pool_key)
            super().replay(graph)

    class RecordingBackend(CpuGraphBackend):
        graph_api = Recording

    for mp, executor in ((piecewise, StepExecutor), (full_graph, VariantStepExecutor)):
        ex = executor(mp, "torch_cuda", SIZES, 0, RunnerPool(mp.params),
                      backend_factory=lambda name, pool: RecordingBackend(pool))
        rng = np.random.default_rng(5)
        sizes_by_key: dict[object, set] = {}
        for i in range(9):
            replayed.clear()
            batch = mp.model.random_batch(rng, ("decode", "prefill", "mixed")[i % 3])
            prepared = ex.prepare(batch)
            ex.execute(prepared)
            assert replayed and len(set(replayed)) == len(replayed), replayed
            for key in replayed:
                sizes_by_key.setdefault(key, set()).add(prepared.size)
        # and sizes do share: a pool per segment, not one per graph
        assert max(len(sizes) for sizes in sizes_by_key.values()) > 1


def test_the_cuda_graph_api_captures_each_pool_key_into_its_own_pool():
    """CudaGraphApi against a stand-in torch.cuda: one pool handle per key, reused."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from graphopt.runtime.torch_backends import CudaGraphApi

    handles, used = iter(range(100)), []

    @contextmanager
    def graph(g, pool=None):
        used.append(pool)
        yield

    fake = SimpleNamespace(cuda=SimpleNamespace(
        graph_pool_handle=lambda: next(handles), CUDAGraph=object, graph=graph))
    api = CudaGraphApi(fake)
    for key in (3, 3, 7, 3, 7, 9):
        api.capture(lambda: [], key)
    assert used == [0, 0, 1, 0, 1, 2]


def test_a_capture_that_fails_is_one_line_naming_the_segment(piecewise):
    class Boom(FakeGraphApi):
        def capture(self, run, pool_key=None):
            raise RuntimeError("operation not permitted when stream is capturing\nmore text")

    class BoomBackend(CpuGraphBackend):
        graph_api = Boom

    ex = StepExecutor(piecewise, "torch_cuda", SIZES, 0, RunnerPool(piecewise.params),
                      backend_factory=lambda name, pool: BoomBackend(pool))
    from graphopt.errors import CaptureError

    with pytest.raises(CaptureError) as info:
        ex.run(piecewise.model.random_batch(np.random.default_rng(0), "decode"))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("capturing segment 0 (")
    assert "on torch_cuda failed: operation not permitted when stream is capturing" in msg


def test_an_op_without_lowering_is_refused_before_anything_runs(piecewise, monkeypatch):
    from graphopt.errors import LoweringError
    from graphopt.runtime.lowering import OPS

    monkeypatch.delitem(OPS, "pd_op.silu")
    for backend in ("torch_cpu", "torch_cuda"):
        factory = cpu_graphs if backend == "torch_cuda" else None
        kwargs = {"backend_factory": factory} if factory else {}
        with pytest.raises(LoweringError) as info:  # at construction: no step, no capture
            StepExecutor(piecewise, backend, SIZES, 0, RunnerPool(piecewise.params), **kwargs)
        msg = str(info.value)
        assert "\n" not in msg
        # SOT traced the MLP's silu: its real call stack holds no model frame to name
        assert msg.startswith("no PyTorch lowering for pd_op.silu at an unknown location: ")
        assert f"backend {backend if factory is None else 'torch_cuda'} cannot run" in msg
