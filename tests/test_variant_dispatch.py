"""Variant dispatch at run time: one graph per (variant, size), random steps of mixed kinds, the
unbuilt-combination error, the hybrid's general program, the eager fallback above the largest
size, and checked captures dropping a corrupted graph."""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

import logging

import numpy as np
import paddle
import pytest
from hydra.errors import ConfigCompositionException

from graphopt.config import validate
from graphopt.errors import ConfigError, DispatchError
from graphopt.passes.manager import PassManager
from graphopt.runtime.capture import EmulatorBackend, make_backend
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
class CorruptingBackend(EmulatorBackend):
    """The emulator, except that the first replay of the graph captured at `bad_size` adds
    `delta` to its first output: a silently wrong captured graph."""

    def __init__(self, pool, bad_size: int, delta: float = 0.5) -> None:
        super().__init__(pool)
        self.bad_size, self.delta = bad_size, delta
        self.corrupted: set[tuple[int, int]] = set()

    def replay(self, graph, feeds):
        outs = super().replay(graph, feeds)
        key = (graph.segment_id, graph.size)
        if graph.size == self.bad_size and key not in self.corrupted:
            self.corrupted.add(key)
            outs[0] = outs[0] + self.delta
        return outs


def _corrupting(bad_size: int):
    def factory(name, pool):
        return CorruptingBackend(pool, bad_size) if name == "emulator" else make_backend(
            name, pool)
    return factory


@pytest.mark.parametrize("check", [True, False])
def test_checked_captures_drop_a_corrupted_graph(check):
    mp = _mp()
    ex = VariantStepExecutor(mp, "emulator", SIZES, 0, check_captures=check, check_atol=1e-6,
                             backend_factory=_corrupting(bad_size=4))
    rng = np.random.default_rng(8)
    meta = P.make_meta([1, 1, 0], rng)
    errs = [_compare(ex, _step(rng, meta, "decode", t)) for t in (3, 4, 2, 3, 4)]
    st = ex.stats()
    if not check:  # the corrupted graph's first replay is a silently wrong step
        assert errs[0] == pytest.approx(0.5) and st["dropped_graphs"] == []
        return
    assert errs == [0.0] * 5  # the bad graph never produced an answer
    (dropped,) = st["dropped_graphs"]
    assert dropped["target"] == "hoisted.0=0,hoisted.1=1" and dropped["size"] == 4
    assert dropped["max_abs_err"] == pytest.approx(0.5)
    assert st["checked_graphs"] == 2  # sizes 4 (dropped) and 2 (kept)
    assert st["uncaptured_runs"] == 3  # the later size-4 steps: uncaptured from then on
    t = st["targets"]["hoisted.0=0,hoisted.1=1"]
    assert t["graph_sizes"] == [2] and t["dropped_graphs"] == [dropped]


def test_checked_captures_in_the_piecewise_runner():
    mp = P.model_program(P.build_cond_program(hoisted=True))
    PassManager.from_config(["piecewise-split"], {}).run(mp)
    ex = StepExecutor(mp, "emulator", SIZES, 0, check_captures=True, check_atol=0.0)
    ex.capture.backend = CorruptingBackend(ex.pool, bad_size=8)
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
    with pytest.raises(ConfigError, match="check_captures_atol must be >= 0"):
        validate(compose_cfg("model=tiny", "runtime.check_captures_atol=-1"))
    with pytest.raises(ConfigCompositionException, match=r"runtime\.check_captures=maybe"):
        compose_cfg("model=tiny", "runtime.check_captures=maybe")
