"""Randomized verification (hypothesis): random small PIR programs, random batch sequences.

Programs: random nests of ``if`` on host conditions (``max_len_tensor_cpu[i]``, compared or
combined on the host) and on device conditions (a reduction of the hidden state), host-derived
values flowing into device ops, device ops on both sides of every branch. Properties:

* the piecewise-split segments, run in order, equal the whole program;
* hoisting leaves no hazard the placement analysis reports, and never changes results (for
  host work computed in the global block, as in DeepSeek-V3; host work inside a branch is not
  hoisted, and the pass then fails instead: see
  ``test_host_work_inside_a_branch_is_refused_not_miscompiled``);
* after the flagship program passes, replaying through the CPU emulator over random steps
  (host values changing every step) equals running the original program.

Batch sequences: random kinds, sizes and cache fill through the tiny model's optimized step on
the emulator, compared with eager.

CI cost is bounded by ``max_examples`` (counts in :data:`EXAMPLES`); no example database is
written (``database=None``), so every CI run draws the same seeded examples.
"""

from __future__ import annotations

import os

os.environ.setdefault("GLOG_minloglevel", "2")

from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphopt.errors import PassError
from graphopt.ir.pir_utils import add_output, static_mode
from graphopt.passes.analysis.placement import hazards_of
from graphopt.passes.manager import PassManager
from graphopt.runtime.step import StepExecutor
from tests import programs as P

#: hypothesis examples per property (what CI runs)
EXAMPLES = {"piecewise": 30, "hoist": 30, "replay": 20, "batches": 10}


def _settings(name: str) -> Any:
    return settings(max_examples=EXAMPLES[name], deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- random programs ---------------------------------------------------------------------------

DEVICE_OPS = ("relu", "tanh", "matmul_w1", "matmul_w2", "add_const", "scale")
HOST_CONDS = ("cast", "gt", "sum_gt")


@dataclass
class Stmt:
    """One statement of a random program: a device op, a host-derived scale, or an if."""

    kind: str  # "dev" | "hostval" | "if"
    arg: Any = None
    then: list[Stmt] | None = None
    orelse: list[Stmt] | None = None

    def __repr__(self) -> str:
        if self.kind == "if":
            return f"if[{self.arg}]({self.then}, {self.orelse})"
        return f"{self.kind}:{self.arg}"


def _cond() -> st.SearchStrategy:
    host = st.one_of(
        st.tuples(st.just("cast"), st.integers(0, 2)),
        st.tuples(st.just("gt"), st.integers(0, 2), st.integers(0, 4)),
        st.tuples(st.just("sum_gt"), st.integers(0, 2), st.integers(0, 2), st.integers(0, 6)),
    )
    return st.one_of(host, host, st.just(("device",)))  # host conditions twice as often


def stmts(depth: int = 2) -> st.SearchStrategy:
    leaf = st.one_of(
        st.builds(Stmt, st.just("dev"), st.sampled_from(DEVICE_OPS)),
        st.builds(Stmt, st.just("hostval"), st.integers(0, 2)),
    )
    if depth == 0:
        return st.lists(leaf, min_size=0, max_size=3)
    node = st.one_of(
        leaf, leaf,
        st.builds(Stmt, st.just("if"), _cond(), stmts(depth - 1), stmts(depth - 1)),
    )
    return st.lists(node, min_size=1, max_size=4)


def _host_cond(max_len: Any, spec: tuple, h: Any) -> Any:
    kind = spec[0]
    if kind == "device":  # a device condition: row 0 only, so padding rows never change it
        return paddle.reshape(paddle.sum(h[0:1]) > 0.0, [1])
    if kind == "cast":
        return paddle.cast(max_len[spec[1]: spec[1] + 1], "bool")
    if kind == "gt":
        return max_len[spec[1]: spec[1] + 1] > spec[2]
    a, b = max_len[spec[1]: spec[1] + 1], max_len[spec[2]: spec[2] + 1]
    return (a + b) > spec[3]


def _host_specs(body: list[Stmt]) -> list[tuple]:
    """Every host computation `body` needs (conditions and host-derived scales), in order."""
    out: list[tuple] = []
    for s in body:
        if s.kind == "hostval":
            out.append(("hostval", s.arg))
        elif s.kind == "if":
            if s.arg[0] != "device":
                out.append(s.arg)
            out += _host_specs(s.then or []) + _host_specs(s.orelse or [])
    return out


def _host_value(env: dict[str, Any], spec: tuple, h: Any) -> Any:
    """The host value `spec` asks for: computed where it is used, or read from the values
    computed once at the top level (``env["at_top"]``)."""
    if spec in env.get("at_top", {}):
        return env["at_top"][spec]
    if spec[0] == "hostval":
        return paddle.cast(env["max_len"][spec[1]: spec[1] + 1], "float32") * 0.125 + 1.0
    return _host_cond(env["max_len"], spec, h)


def _emit(body: list[Stmt], h: Any, env: dict[str, Any]) -> Any:
    for s in body:
        if s.kind == "dev":
            h = {
                "relu": lambda v: paddle.nn.functional.relu(v),
                "tanh": paddle.tanh,
                "matmul_w1": lambda v: paddle.matmul(v, env["w1"]) * 0.5,
                "matmul_w2": lambda v: paddle.matmul(v, env["w2"]) * 0.5,
                "add_const": lambda v: v + 0.25,
                "scale": lambda v: v * -1.5,
            }[s.arg](h)
        elif s.kind == "hostval":  # a value computed on the host, used by a device op
            h = h * _host_value(env, ("hostval", s.arg), h)
        else:
            cond = _host_value(env, s.arg, h)
            then, orelse = s.then or [], s.orelse or []
            h = paddle.static.nn.cond(cond, lambda h=h, b=then: _emit(b, h, env) + 0.0,
                                      lambda h=h, b=orelse: _emit(b, h, env) - 0.0)
    return h


def build_random(body: list[Stmt], seed: int = 0, host_at_top: bool = False) -> P.Built:
    """A program of the tests.programs conventions whose logits are `body` applied to 2x.

    With `host_at_top`, every host value is computed once in the global block and branches read
    it from there (the shape of DeepSeek-V3's step); otherwise host work sits where it is used,
    inside branches too.
    """
    with static_mode():
        main = paddle.static.Program()
        with paddle.static.program_guard(main, paddle.static.Program()):
            x = paddle.static.data("arg.0", [-1, P.HIDDEN], "float32")
            cache = paddle.static.data("meta.caches.0", [P.CACHE_ROWS, P.HIDDEN], "float32")
            max_len = paddle.static.data(P.HOST_INPUT, [3], "int32")
            env = {
                "max_len": max_len,
                "w1": paddle.static.create_parameter([P.HIDDEN, P.HIDDEN], "float32", name="w1"),
                "w2": paddle.static.create_parameter([P.HIDDEN, P.HIDDEN], "float32", name="w2"),
            }
            if host_at_top:
                env["at_top"] = {spec: _host_value(env, spec, None)
                                 for spec in dict.fromkeys(_host_specs(body))}
            logits = _emit(body, x * 2.0, env)
            new_cache = paddle.tanh(paddle.matmul(cache, env["w1"])) + 1.0
        add_output(main, logits, "logits")
        add_output(main, new_cache, "state.0")
    return P.Built(main, P._params(np.random.default_rng(seed)), [P.HOST_INPUT])


def _steps(seed: int, n: int) -> list[tuple[int, list[int]]]:
    """(tokens, max_len) of `n` random steps: every host pattern, sizes 1..8."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = int(rng.integers(1, 9))
        out.append((t, [t, int(rng.integers(0, 2)) * t, int(rng.integers(0, 3))]))
    return out


def _run_passes(built: P.Built, names: list[str]) -> Any:
    mp = P.model_program(built, blacklist=[])
    pm = PassManager.from_config(names, {})
    pm.run(mp)
    return mp


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


# -- properties --------------------------------------------------------------------------------


@_settings("piecewise")
@given(body=stmts(), seed=st.integers(0, 3))
def test_piecewise_segments_in_order_equal_the_program(body, seed):
    built = build_random(body, seed)
    mp = P.model_program(built, blacklist=["pd_op.if"])
    PassManager.from_config(["piecewise-split"], {}).run(mp)
    ex = StepExecutor(mp, backend="none", capture_sizes=[1], num_warmups=0)
    rng = np.random.default_rng(seed)
    meta = P.make_meta([1, 1, 0], rng)
    for t, max_len in _steps(seed, 4):
        batch = P.make_batch(t, max_len, rng, meta)
        want = P.run_program(built.program, built.params, P.feeds_for(built, batch))
        _close(ex.run(batch), want)


@_settings("hoist")
@given(body=stmts(), seed=st.integers(0, 3))
def test_hoisting_removes_every_hazard_and_keeps_results(body, seed):
    original = build_random(body, seed, host_at_top=True)
    mp = _run_passes(build_random(body, seed, host_at_top=True),
                     ["hoist-host-branch-conditions"])
    assert [h.to_dict() for h in hazards_of(mp)] == []
    rng = np.random.default_rng(seed)
    for t, max_len in _steps(seed + 7, 4):
        batch = P.make_batch(t, max_len, rng)
        feeds = P.feeds_for(original, batch)
        want = P.run_program(original.program, original.params, feeds)
        if mp.prologue is not None:
            hoisted = P.run_program(mp.prologue.program, {}, feeds)
            feeds = {**feeds, **dict(zip(mp.prologue.outputs, hoisted, strict=True))}
        _close(P.run_program(mp.program, mp.params, feeds), want)


@_settings("replay")
@given(body=stmts(), seed=st.integers(0, 3))
def test_replay_after_the_flagship_passes_equals_the_program(body, seed):
    original = build_random(body, seed, host_at_top=True)
    mp = _run_passes(build_random(body, seed, host_at_top=True), [
        "hoist-host-branch-conditions", "cudagraph-blacklist-injection", "piecewise-split"])
    ex = StepExecutor(mp, backend="emulator", capture_sizes=[1, 2, 4, 8], num_warmups=1)
    rng = np.random.default_rng(seed)
    meta = P.make_meta([1, 1, 0], rng)
    for t, max_len in _steps(seed + 11, 8):  # host values change every step, on one meta
        batch = P.make_batch(t, max_len, rng, meta)
        want = P.run_program(original.program, original.params, P.feeds_for(original, batch))
        _close(ex.run(batch), want)


def test_host_work_inside_a_branch_is_refused_not_miscompiled():
    """Found by the hoisting property: host work computed INSIDE a branch is not hoisted (the
    pass hoists top-level chains only). The pass must then fail loudly, rolled back, never
    leave a program that replays stale host values."""
    body = [Stmt("if", ("cast", 0), [Stmt("dev", "relu")], [Stmt("hostval", 0)])]
    built = build_random(body)
    mp = P.model_program(built, blacklist=[])
    before = [h.to_dict() for h in hazards_of(mp)]
    with pytest.raises(PassError, match=r"replay hazard\(s\) left"):
        PassManager.from_config(["hoist-host-branch-conditions"], {}).run(mp)
    assert mp.prologue is None and [h.to_dict() for h in hazards_of(mp)] == before


# -- random batch sequences through the optimized tiny model (emulator vs eager) ---------------


@pytest.fixture(scope="module")
def tiny_optimized():
    from graphopt.config import validate
    from graphopt.driver import build_and_optimize
    from tests.conftest import compose_cfg

    cfg = compose_cfg("model=tiny")
    mp, _, _ = build_and_optimize(cfg, validate(cfg), np.random.default_rng(0))
    yield mp
    mp.model.restore_patches(0)


@_settings("batches")
@given(data=st.data())
def test_random_batch_sequences_replay_equal_eager(tiny_optimized, data):
    mp = tiny_optimized
    bundle = mp.model
    bundle.reset_state()
    ex = StepExecutor(mp, backend="emulator", capture_sizes=[1, 2, 4, 8, 16, 32, 64],
                      num_warmups=1)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    kinds = data.draw(st.lists(st.sampled_from(["prefill", "decode", "mixed"]), min_size=3,
                               max_size=8), label="kinds")
    for kind in kinds:
        batch = bundle.random_batch(rng, kind)  # random sizes; the cache fills as steps commit
        eager = bundle.step(batch, commit=False)
        got = ex.run(batch)
        for a, b in zip(got, eager, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        bundle.commit_state(eager[1:])
