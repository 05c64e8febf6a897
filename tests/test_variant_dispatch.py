"""Variant dispatch at run time: one graph per (variant, size), random steps of mixed kinds, the
unbuilt-combination error, the hybrid's general program, the eager fallback above the largest
size, and checked captures catching graphs that go wrong on later replays."""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

import logging

import numpy as np
import paddle
import pytest
from hydra.errors import ConfigCompositionException

from graphopt.config import capture_check, validate
from graphopt.errors import CaptureCheckError, ConfigError, DispatchError
from graphopt.passes.manager import PassManager
from graphopt.runtime.backend import make_backend
from graphopt.runtime.capture import CaptureCheck
from graphopt.runtime.paddle_backends import EmulatorBackend
from graphopt.runtime.step import StepExecutor
from graphopt.runtime.variants import GENERAL, NO_VARIANTS, VariantStepExecutor
from tests import programs as P
from tests.conftest import compose_cfg

SIZES = [1, 2, 4, 8]
PIPELINE = ["hoist-host-branch-conditions", "specialize-branches",
            "cudagraph-blacklist-injection", "piecewise-split"]
KIND_FLAGS = {"prefill": (1, 0), "decode": (0, 1), "mixed": (1, 1)}


@pytest.fixture(autouse=True)
def _no_process_flags(monkeypatch):
    monkeypatch.setattr(paddle, "set_flags", lambda flags: None)


def _mp(full_cuda_graph=True, layers=2, **spec_opts):
    mp = P.model_program(P.build_cond_program(hoisted=False, layers=layers), blacklist=[])
    mp.full_cuda_graph = full_cuda_graph
    PassManager.from_config(PIPELINE, {"specialize-branches": spec_opts}).run(mp)
    return mp


def _step(rng, meta, kind, t):
    p, d = KIND_FLAGS[kind]
    return P.make_batch(t, [t, p * t, d * t], rng, meta)


def _np(outs) -> list[np.ndarray]:
    return [np.asarray(o) for o in outs]


def _compare(ex, batch) -> float:
    got, want = _np(ex.run(batch)), _np(ex.run_whole(batch))
    assert got[0].shape == want[0].shape == (batch.num_tokens, P.HIDDEN)
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))


def test_random_steps_of_mixed_kinds_replay_exactly():
    mp = _mp()
    ex = VariantStepExecutor(mp, "emulator", SIZES, 1)
    rng = np.random.default_rng(5)
    meta = P.make_meta([1, 1, 0], rng)
    kinds = [k for k in KIND_FLAGS for _ in range(12)]
    rng.shuffle(kinds)
    errs = [_compare(ex, _step(rng, meta, k, int(rng.integers(1, SIZES[-1] + 1))))
            for k in kinds]
    assert len(errs) == 36 and max(errs) == 0.0
    st = ex.stats()
    assert st["steps"] == 36 and st["eager_fallbacks"] == 0 and st["eager_segment_runs"] == 0
    # the dispatch key is (variant, padded size): one graph per key, every step a replay
    keys = {(d["target"], d["size"]) for d in st["dispatch"]}
    assert sum(d["steps"] for d in st["dispatch"]) == 36
    assert st["graphs_captured"] == len(keys) and st["replays"] == 36
    assert {name for name, _ in keys} == {v.name for v in mp.variants}
    assert {size for _, size in keys} <= set(SIZES)
    for name, t in st["targets"].items():
        assert t["captured_graphs"] == len({s for n, s in keys if n == name})
        assert set(t["static_input_bytes"]) == set(t["graph_sizes"])
    # a full graph per (variant, size) pins its padded tokens + the cache, float32 [4, 8]
    decode = st["targets"]["hoisted.0=0,hoisted.1=1"]
    assert decode["graph_sizes"]
    for size in decode["graph_sizes"]:
        assert decode["static_input_bytes"][size] == (size + P.CACHE_ROWS) * P.HIDDEN * 4


def test_a_combination_no_variant_serves_is_refused():
    mp = _mp()
    ex = VariantStepExecutor(mp, "emulator", SIZES, 1)
    batch = P.make_batch(3, [3, 0, 0], np.random.default_rng(0))  # neither prefill nor decode
    with pytest.raises(DispatchError) as info:
        ex.run(batch)
    msg = str(info.value)
    assert "branch conditions hoisted.0=0,hoisted.1=0" in msg
    assert "no built variant serves" in msg and "unreachable: hoisted.0=0,hoisted.1=0" in msg
    assert "pipeline=full_and_piecewise" in msg
    assert ex.steps == 0 and ex.stats()["graphs_captured"] == 0  # nothing ran
    # uncaptured too: the check is the dispatch, not the capture
    with pytest.raises(DispatchError):
        VariantStepExecutor(mp, "none").run(batch)


def test_hybrid_runs_the_general_program_for_the_rest():
    mp = _mp(full_cuda_graph=False, variant_kinds=["decode"])
    ex = VariantStepExecutor(mp, "emulator", SIZES, 1)
    rng = np.random.default_rng(2)
    meta = P.make_meta([1, 1, 0], rng)
    for kind in ["decode", "prefill", "mixed", "decode", "prefill"]:
        assert _compare(ex, _step(rng, meta, kind, 3)) == 0.0
    # a combination the sampling never saw is still right: the general program branches
    assert _compare(ex, P.make_batch(2, [2, 0, 0], rng, meta)) == 0.0
    st = ex.stats()
    steps = {d["target"]: 0 for d in st["dispatch"]}
    for d in st["dispatch"]:
        steps[d["target"]] += d["steps"]
    assert steps == {"hoisted.0=0,hoisted.1=1": 2, GENERAL: 4}
    assert st["unseen_combinations"] == {"hoisted.0=0,hoisted.1=0": 1}
    assert st["targets"][GENERAL]["captured_graphs"] > 1  # piecewise: several segments
    assert st["targets"]["hoisted.0=0,hoisted.1=1"]["captured_graphs"] == 1  # one full graph


def test_above_the_largest_size_runs_uncaptured_and_counts_why(caplog):
    mp = _mp()
    ex = VariantStepExecutor(mp, "emulator", SIZES, 1)
    rng = np.random.default_rng(3)
    with caplog.at_level(logging.INFO, logger="graphopt.runtime.capture"):
        assert _compare(ex, P.make_batch(11, [11, 0, 11], rng)) == 0.0
        assert _compare(ex, P.make_batch(12, [12, 12, 0], rng)) == 0.0
    st = ex.stats()
    assert st["graphs_captured"] == 0 and st["replays"] == 0 and st["eager_fallbacks"] == 2
    assert st["fallback_reasons"] == {
        "batch of 11 tokens exceeds the largest capture size 8": 1,
        "batch of 12 tokens exceeds the largest capture size 8": 1}
    assert {(d["target"], d["size"]) for d in st["dispatch"]} == {
        ("hoisted.0=0,hoisted.1=1", None), ("hoisted.0=1,hoisted.1=0", None)}
    assert any("skipping cuda graphs" in r.getMessage() for r in caplog.records)
    assert mp.model.pad_calls == []


def test_uncaptured_variants_without_plans_run_whole():
    mp = P.model_program(P.build_cond_program(hoisted=True), blacklist=[])
    PassManager.from_config(["specialize-branches"], {}).run(mp)
    assert all(v.segments is None for v in mp.variants)
    ex = VariantStepExecutor(mp, "none")
    rng = np.random.default_rng(4)
    for kind in KIND_FLAGS:
        assert _compare(ex, _step(rng, None, kind, 5)) == 0.0
    with pytest.raises(ConfigError, match="no segment plan"):
        VariantStepExecutor(mp, "emulator", SIZES, 1)


def test_no_variants_is_a_config_error():
    mp = P.model_program(P.build_cond_program(hoisted=True))
    with pytest.raises(ConfigError) as info:
        VariantStepExecutor(mp, "none")
    assert str(info.value) == NO_VARIANTS


# -- checked captures ---------------------------------------------------------------------------
# A CUDA graph goes wrong on LATER replays (a stale input buffer, a frozen host value): the
# test backends below break the 2nd/3rd/5th replay or an input copy, never the first replay.
class CorruptingBackend(EmulatorBackend):
    """The emulator, except that replays number `bad` (counted per graph, from 1) of graphs
    captured at `bad_size` add `delta` to their first output: a silently wrong graph."""

    def __init__(self, pool, bad_size: int, bad=(2,), delta: float = 0.5) -> None:
        super().__init__(pool)
        self.bad_size, self.bad, self.delta = bad_size, set(bad), delta
        self.replays: dict[tuple[int, int], int] = {}

    def replay(self, graph, feeds):
        outs = super().replay(graph, feeds)
        key = (graph.segment_id, graph.size)
        n = self.replays[key] = self.replays.get(key, 0) + 1
        if graph.size == self.bad_size and n in self.bad:
            outs[0] = outs[0] + self.delta
        return outs


class StaleInputBackend(EmulatorBackend):
    """The emulator, except that a replay never copies `arg.0`-derived feeds (the first feed of
    each segment) into the graph's static buffer: the graph keeps reading its capture-time
    input, as a GPU graph does when the copy into its static buffer is forgotten."""

    def replay(self, graph, feeds):
        first = next(iter(graph.static_inputs))
        return super().replay(graph, {**feeds, first: graph.static_inputs[first]})


def _factory(cls, **kw):
    def factory(name, pool):
        return cls(pool, **kw) if name == "emulator" else make_backend(name, pool)
    return factory


def _decode_steps(ex, sizes=(3, 4, 2, 3, 4, 4, 4, 4), seed=8) -> list[float]:
    rng = np.random.default_rng(seed)
    meta = P.make_meta([1, 1, 0], rng)
    return [_compare(ex, _step(rng, meta, "decode", t)) for t in sizes]


@pytest.mark.parametrize("bad", [(2,), (3,)])
def test_checked_captures_catch_a_later_replay_gone_wrong(bad):
    """Replays 2 and 3 of the size-4 graph are wrong: unchecked they are wrong steps; checked
    (the default: the first 3 replays of each graph) the graph is dropped before any wrong
    answer comes out, and its size runs uncaptured from then on."""
    mp = _mp()
    size4 = [i for i, t in enumerate((3, 4, 2, 3, 4, 4, 4, 4)) if t in (3, 4)]
    unchecked = _decode_steps(VariantStepExecutor(
        mp, "emulator", SIZES, 0, backend_factory=_factory(CorruptingBackend, bad_size=4,
                                                           bad=bad)))
    assert unchecked[size4[bad[0] - 1]] == pytest.approx(0.5)  # the corrupted replay
    assert sum(e > 0 for e in unchecked) == 1
    ex = VariantStepExecutor(mp, "emulator", SIZES, 0, check_captures=CaptureCheck(atol=1e-6),
                             backend_factory=_factory(CorruptingBackend, bad_size=4, bad=bad))
    assert _decode_steps(ex) == [0.0] * 8
    st = ex.stats()
    (dropped,) = st["dropped_graphs"]
    assert dropped["target"] == "hoisted.0=0,hoisted.1=1" and dropped["size"] == 4
    assert dropped["replay"] == bad[0] and dropped["max_abs_err"] == pytest.approx(0.5)
    assert st["checked_graphs"] == 2  # sizes 4 (dropped) and 2 (kept)
    assert st["uncaptured_runs"] == len(size4) - bad[0]  # the size-4 steps after the drop
    t = st["targets"]["hoisted.0=0,hoisted.1=1"]
    assert t["graph_sizes"] == [2] and t["dropped_graphs"] == [dropped]


def test_checking_every_replay_catches_what_the_sample_misses():
    """Replay 5 goes wrong: the default sample (first 3 replays) lets it through, said so;
    ``replays=None`` checks every replay and drops the graph."""
    mp = _mp()
    sample = VariantStepExecutor(mp, "emulator", SIZES, 0,
                                 check_captures=CaptureCheck(atol=1e-6),
                                 backend_factory=_factory(CorruptingBackend, bad_size=4, bad=(5,)))
    errs = _decode_steps(sample)
    assert max(errs) == pytest.approx(0.5) and sample.stats()["dropped_graphs"] == []
    every = VariantStepExecutor(mp, "emulator", SIZES, 0,
                                check_captures=CaptureCheck(atol=1e-6, replays=None),
                                backend_factory=_factory(CorruptingBackend, bad_size=4, bad=(5,)))
    assert _decode_steps(every) == [0.0] * 8
    assert [d["replay"] for d in every.stats()["dropped_graphs"]] == [5]


def test_checked_captures_catch_an_input_not_copied_into_its_static_buffer():
    mp = _mp()
    unchecked = _decode_steps(VariantStepExecutor(mp, "emulator", SIZES, 0,
                                                  backend_factory=_factory(StaleInputBackend)))
    assert max(unchecked) > 0.1  # stale inputs: wrong steps
    ex = VariantStepExecutor(mp, "emulator", SIZES, 0, check_captures=CaptureCheck(atol=1e-6),
                             backend_factory=_factory(StaleInputBackend))
    assert _decode_steps(ex) == [0.0] * 8
    dropped = ex.stats()["dropped_graphs"]
    assert dropped and all(d["replay"] == 2 for d in dropped)  # the first replay with new input


def test_checked_captures_can_fail_the_run_instead():
    mp = _mp()
    ex = VariantStepExecutor(mp, "emulator", SIZES, 0,
                             check_captures=CaptureCheck(atol=1e-6, on_mismatch="fail"),
                             backend_factory=_factory(CorruptingBackend, bad_size=4))
    with pytest.raises(CaptureCheckError, match=r"segment \d+ .*at capture size 4 differs from an "
                       r"uncaptured run of its segment on replay 2 \(max abs err 0\.5"):
        _decode_steps(ex)


def test_checked_captures_catch_the_seeds_frozen_host_value():
    """Without hoisting, the captured segment computes the if's condition on the host: the
    emulator freezes it, as a GPU graph would. Checked replays find every such graph (the
    condition differs from the uncaptured run once the host values change) and the steps come
    out right; unchecked, some take the wrong branch."""
    mp = P.model_program(P.build_cond_program(hoisted=False), blacklist=["pd_op.if"])
    PassManager.from_config(["piecewise-split"], {}).run(mp)
    meta = P.make_meta([1, 1, 1], np.random.default_rng(4))
    flags = [(1, 1), (0, 1), (1, 0), (1, 1), (0, 1), (1, 0)]

    def errors(check):
        ex = StepExecutor(mp, "emulator", SIZES, 0, check_captures=check)
        rng, out = np.random.default_rng(4), []
        for p, d in flags:  # the shared meta's host values change in place, step by step
            b = P.make_batch(4, [4, p * 4, d * 4], rng, meta)
            got, want = ex.run(b), ex.run_whole(b)
            out.append(max(float(np.abs(np.asarray(a) - np.asarray(w)).max())
                           for a, w in zip(got, want, strict=True)))
        return out, ex.stats()

    unchecked, _ = errors(None)
    assert max(unchecked) > 0.1
    checked, st = errors(CaptureCheck(atol=1e-6, replays=None))
    assert checked == [0.0] * len(flags) and st["dropped_graphs"]


def test_checked_captures_in_the_piecewise_runner():
    mp = P.model_program(P.build_cond_program(hoisted=True))
    PassManager.from_config(["piecewise-split"], {}).run(mp)
    ex = StepExecutor(mp, "emulator", SIZES, 0, check_captures=CaptureCheck(atol=0.0),
                      backend_factory=_factory(CorruptingBackend, bad_size=8, bad=(1, 2, 3)))
    rng = np.random.default_rng(9)
    meta = P.make_meta([1, 1, 1], rng)
    for t in (6, 7):
        batch = P.make_batch(t, [t, t, t], rng, meta)
        got, want = ex.run(batch), ex.run_whole(batch)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    st = ex.stats()
    assert [d["size"] for d in st["dropped_graphs"]] == [8] * len(st["dropped_graphs"])
    assert len(st["dropped_graphs"]) == st["checked_graphs"] == len(mp.segments.captured)


def test_check_captures_is_a_typed_runtime_key():
    cfg = compose_cfg("model=tiny", "runtime.check_captures=true")
    validate(cfg)
    assert cfg.runtime.check_captures is True and cfg.runtime.check_captures_atol == 1e-4
    assert capture_check(cfg.runtime) == CaptureCheck(1e-4, 3, "drop")
    assert capture_check(compose_cfg("model=tiny", "runtime.check_captures=true",
                                     "runtime.check_captures_replays=null",
                                     "runtime.check_captures_on_mismatch=fail").runtime
                         ) == CaptureCheck(1e-4, None, "fail")
    assert capture_check(compose_cfg("model=tiny").runtime) is None
    with pytest.raises(ConfigError, match="check_captures_atol must be >= 0"):
        validate(compose_cfg("model=tiny", "runtime.check_captures_atol=-1"))
    with pytest.raises(ConfigError, match="check_captures_replays must be >= 1"):
        validate(compose_cfg("model=tiny", "runtime.check_captures_replays=0"))
    with pytest.raises(ConfigCompositionException, match="check_captures_on_mismatch"):
        compose_cfg("model=tiny", "runtime.check_captures_on_mismatch=ignore")
    with pytest.raises(ConfigCompositionException, match=r"runtime\.check_captures=maybe"):
        compose_cfg("model=tiny", "runtime.check_captures=maybe")
