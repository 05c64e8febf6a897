"""The piecewise runner and the CUDA-graph replay emulator (see docs/design.md, "What runs where").

The emulator freezes, at capture, the host values a captured segment computes; replays reuse
them. So the seed's bug is reproducible on CPU: without hoisting, ``cast(slice(max_len))`` sits
in a captured run and the ``if`` follows the capture-time condition -> wrong branch. With the
conditions hoisted into the host prologue, replays are exact. Host values CHANGE between steps
on one plan (a check with one step per capture cannot see the bug).
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

import logging

import numpy as np
import pytest

from graphopt.errors import ConfigError
from graphopt.ir.segment_plan import CAPTURED
from graphopt.passes.registry import get_pass
from graphopt.runtime.capture import CaptureManager
from graphopt.runtime.executor import RunnerPool
from graphopt.runtime.paddle_backends import EmulatorBackend
from graphopt.runtime.step import NO_PLAN, StepExecutor
from tests import programs as P

SIZES = [1, 2, 4, 8]


def _mp(built, blacklist=("pd_op.if",)):
    mp = P.model_program(built, list(blacklist))
    get_pass("piecewise-split")().run(mp)
    return mp


def _np(outs) -> list[np.ndarray]:
    """Step outputs (tensors) as arrays."""
    return [o.numpy() for o in outs]


def _random_steps(ex: StepExecutor, steps: int, seed: int) -> tuple[int, int]:
    """Random steps on ONE shared meta (host values updated in place, as a server does);
    returns (mismatching steps, steps)."""
    rng = np.random.default_rng(seed)
    meta = P.make_meta([1, 1, 0], rng)
    mismatches = 0
    for _ in range(steps):
        t = int(rng.integers(1, SIZES[-1] + 1))
        prefill, decode = (int(b) for b in rng.integers(0, 2, 2))
        batch = P.make_batch(t, [t, prefill * t, decode * t], rng, meta)
        got = _np(ex.run(batch))
        want = _np(ex.run_whole(batch))
        assert got[0].shape == want[0].shape == (t, P.HIDDEN)  # logits cut back to T rows
        assert got[1].shape == want[1].shape  # state: full size
        err = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))
        mismatches += err > 0.0
    return mismatches, steps


def test_step_executor_refuses_a_program_without_a_plan():
    mp = P.model_program(P.build_cond_program(hoisted=True))
    with pytest.raises(ConfigError) as info:
        StepExecutor(mp, "none", SIZES, 0)
    assert str(info.value) == NO_PLAN and mp.segments is None  # nothing built behind our back


def test_hoisted_program_replays_exactly():
    ex = StepExecutor(_mp(P.build_cond_program(hoisted=True)), "emulator", SIZES, 1)
    mismatches, steps = _random_steps(ex, 24, seed=7)
    assert steps >= 20 and mismatches == 0
    st = ex.stats()
    assert st["graphs_captured"] > 0 and st["replays"] > st["graphs_captured"]
    assert st["warmup_runs"] == st["graphs_captured"]  # num_warmups=1 per graph
    assert st["eager_fallbacks"] == 0
    assert st["branches_taken"]["true"] > 0 and st["branches_taken"]["false"] > 0


def test_unhoisted_program_replays_stale_host_values():
    """The seed's bug, reproduced: slice+cast of max_len_tensor_cpu are frozen at capture."""
    mp = _mp(P.build_cond_program(hoisted=False))
    ex = StepExecutor(mp, "emulator", SIZES, 1)
    mismatches, _ = _random_steps(ex, 24, seed=7)
    assert mismatches > 0, "the emulator must reproduce stale-condition replays"
    # ...and it is the capture that does it: the same plan run uncaptured is exact
    plain = StepExecutor(mp, "none", SIZES, 1)
    assert _random_steps(plain, 24, seed=7)[0] == 0


def test_one_graph_per_segment_and_size():
    mp = _mp(P.build_cond_program(hoisted=True))
    ex = StepExecutor(mp, "emulator", SIZES, 2)
    rng = np.random.default_rng(0)
    meta = P.make_meta([1, 1, 1], rng)
    for t in (1, 2, 3, 4, 1, 3):  # sizes 1, 2, 4, 4, 1, 4
        ex.run(P.make_batch(t, [t, t, t], rng, meta))
    keys = set(ex.capture.graphs)
    captured_ids = {s.id for s in mp.segments.captured}
    assert {sid for sid, _ in keys} == captured_ids  # all branches taken: every segment
    assert {size for _, size in keys} == {1, 2, 4}
    assert len(keys) == len(captured_ids) * 3
    st = ex.stats()
    assert st["graphs_captured"] == len(keys)
    assert st["warmup_runs"] == 2 * len(keys)
    assert st["replays"] == 6 * len(captured_ids)


def test_padding_to_capture_size():
    mp = _mp(P.build_cond_program(hoisted=True))
    ex = StepExecutor(mp, "emulator", SIZES, 0)
    rng = np.random.default_rng(1)
    batch = P.make_batch(3, [3, 3, 0], rng)
    got = _np(ex.run(batch))
    assert mp.model.pad_calls == [(3, 4)]
    decode_if = [s for s in mp.segments.segments if s.is_branching][1]
    not_taken = {s.id for s in decode_if.branches["true"]}  # max_len[2] == 0: no decode
    assert set(ex.capture.graphs) == {(s.id, 4) for s in mp.segments.captured
                                      if s.id not in not_taken}
    want = _np(ex.run_whole(batch))
    assert got[0].shape == (3, P.HIDDEN)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_eager_fallback_for_batches_above_largest_size(caplog):
    mp = _mp(P.build_cond_program(hoisted=True))
    ex = StepExecutor(mp, "emulator", SIZES, 1)
    rng = np.random.default_rng(2)
    batch = P.make_batch(11, [11, 11, 11], rng)
    with caplog.at_level(logging.INFO, logger="graphopt.runtime.capture"):
        got = _np(ex.run(batch))
        ex.run(batch)
    st = ex.stats()
    assert st["eager_fallbacks"] == 2 and st["graphs_captured"] == 0 and st["replays"] == 0
    reason = "batch of 11 tokens exceeds the largest capture size 8"
    assert st["fallback_reasons"] == {reason: 2}
    assert [r.levelno for r in caplog.records if reason in r.getMessage()] == [
        logging.WARNING, logging.INFO]  # loud once, quiet after
    assert mp.model.pad_calls == []
    want = _np(ex.run_whole(batch))
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_inputs_are_read_every_step_never_bound():
    """A step reads the tensors the batch holds when it runs: a meta tensor REPLACED between
    steps (what Paddle's by-reference binding misses) is seen, and the prologue follows it."""
    mp = _mp(P.build_cond_program(hoisted=True))
    ex = StepExecutor(mp, "none", SIZES, 0)
    batch = P.make_batch(2, [2, 2, 0], np.random.default_rng(3))
    feeds = ex.feeds(batch)
    assert sorted(feeds) == ["arg.0", "hoisted.0", "hoisted.1", "meta.caches.0",
                             "meta.max_len_tensor_cpu"]
    assert feeds["hoisted.0"].tolist() == [True] and feeds["hoisted.1"].tolist() == [False]
    first = _np(ex.run(batch))
    batch.meta.max_len_tensor_cpu = P.paddle.to_tensor(np.asarray([2, 0, 2], dtype="int32"))
    feeds = ex.feeds(batch)
    assert feeds["hoisted.0"].tolist() == [False] and feeds["hoisted.1"].tolist() == [True]
    second = _np(ex.run(batch))
    assert not np.array_equal(first[0], second[0])
    assert all(np.array_equal(a, b) for a, b in
               zip(second, _np(ex.run_whole(batch)), strict=True))


def test_backend_errors():
    mp = _mp(P.build_cond_program(hoisted=True))
    if not P.paddle.is_compiled_with_cuda():  # one clear line instead of a CUDA crash
        with pytest.raises(ConfigError, match="CUDA build of Paddle"):
            StepExecutor(mp, "cuda", SIZES, 1)
    with pytest.raises(ConfigError, match=r"runtime.backend=emulatr: unknown backend\. Did "
                       r"you mean 'emulator'\? Choose one of .*none.*torch_cpu, torch_cuda"):
        StepExecutor(mp, "emulatr", SIZES, 1)
    with pytest.raises(ConfigError, match="capture_sizes"):
        StepExecutor(mp, "emulator", [], 1)


def test_static_input_buffers_keep_their_shape():
    mp = _mp(P.build_cond_program(hoisted=True))
    seg = next(s for s in mp.segments.captured if s.kind == CAPTURED)
    mgr = CaptureManager(EmulatorBackend(RunnerPool(mp.params)), SIZES, 0)
    feeds = {n: np.ones((4, P.HIDDEN), "float32") for n in seg.feed_names}
    mgr.run(seg, 4, feeds)
    with pytest.raises(ValueError, match="captured with"):
        mgr.run(seg, 4, {n: np.ones((3, P.HIDDEN), "float32") for n in seg.feed_names})


def test_model_constants_are_bound_not_copied():
    """A weight or constant buffer fed to a segment is read where it lives, as a GPU graph
    would: not cloned per graph, not copied per replay, never overwritten."""
    mp = _mp(P.build_cond_program(hoisted=True))
    seg = next(s for s in mp.segments.captured if s.kind == CAPTURED)
    pool = RunnerPool({**mp.params, "const.x": np.ones((4, P.HIDDEN), "float32")})
    const = pool.params["const.x"]
    mgr = CaptureManager(EmulatorBackend(pool), SIZES, 0)
    first, *rest = seg.feed_names
    feeds = {first: const, **{n: np.ones((4, P.HIDDEN), "float32") for n in rest}}
    mgr.run(seg, 4, feeds)
    graph = mgr.graphs[(seg.id, 4)]
    assert graph.static_inputs[first] is const and graph.bound == {first}
    assert all(graph.static_inputs[n] is not feeds[n] for n in rest)
    assert mgr.input_bytes[(seg.id, 4)] == 4 * P.HIDDEN * 4 * len(rest)
    mgr.run(seg, 4, feeds)  # the same constant: no copy, no error
    with pytest.raises(ValueError, match="bound to a model constant"):
        mgr.run(seg, 4, {**feeds, first: np.zeros((4, P.HIDDEN), "float32")})
    assert float(const.numpy().min()) == 1.0


def test_a_backend_from_outside_plugs_in_by_name(monkeypatch):
    """A backend written outside graphopt registers itself; step executors, the preflight
    and the registry's listing then know it by name (no framework file edited)."""
    from graphopt.runtime import backend as registry
    from graphopt.runtime.backend import backend_names, get_backend, register_backend

    registry.backend_names()  # the built-ins first; the plug-in is gone after the test
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    from graphopt.runtime.paddle_backends import EmulatorBackend as Base

    @register_backend
    class CountingBackend(Base):
        name = "counting_emulator"
        summary = "the emulator, counting replays (a test plug-in)"
        replays = 0

        def replay(self, graph, feeds):
            type(self).replays += 1
            return super().replay(graph, feeds)

    assert "counting_emulator" in backend_names()
    assert get_backend("counting_emulator") is CountingBackend
    mp = _mp(P.build_cond_program(hoisted=True))
    ex = StepExecutor(mp, "counting_emulator", SIZES, 0)
    rng = np.random.default_rng(0)
    meta = P.make_meta([1, 1, 1], rng)
    for t in (3, 4, 3):
        batch = P.make_batch(t, [t, t, t], rng, meta)
        got, want = ex.run(batch), ex.run_whole(batch)
        assert all(np.array_equal(a, b) for a, b in zip(_np(got), _np(want), strict=True))
    assert CountingBackend.replays == ex.stats()["replays"] > 0
    with pytest.raises(ConfigError, match="Did you mean 'counting_emulator'"):
        get_backend("counting_emulatr")
