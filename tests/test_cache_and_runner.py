"""The run_program runner, the compile cache and ``graphopt.serving.load``.

* the runner equals Paddle's plain static Executor (the runner it replaced) bit for bit;
* the cache: miss then hit (no trace, same numerics), a corrupt or stale entry is rebuilt with
  one warning line, two writers of one key leave one valid entry;
* ``load(run_dir)`` / ``load(key)`` give a ready step without tracing.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
import paddle
import pytest

from graphopt.cache import CacheError, CompileCache, cache_key, load_entry, read_meta
from graphopt.config import validate
from graphopt.driver import build_and_optimize, optimize
from graphopt.ir.pir_utils import data_ops, output_values, static_mode
from graphopt.models import build_model
from graphopt.runtime.executor import ProgramRunner, RunnerPool, release_interpreters
from graphopt.runtime.step import StepInputs, WholeProgramStep
from graphopt.runtime.variants import VariantStepExecutor
from graphopt.serving import load, load_whole
from tests import programs as P
from tests.conftest import compose_cfg


def _executor_run(program, params, feeds):
    """The runner graphopt used before: Executor.run with numpy feeds in a private scope."""
    scope = paddle.static.Scope()
    place = paddle.CPUPlace()
    for op in program.global_block().ops:
        if op.name() == "builtin.parameter":
            name = op.attrs()["parameter_name"]
            value = params[name]
            value = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)
            scope.var(name).get_tensor().set(value, place)
    feed = {}
    for n in data_ops(program):
        v = feeds[n] if n in feeds else params[n]
        feed[n] = v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v)
    with static_mode(), paddle.static.scope_guard(scope):
        exe = paddle.static.Executor(place)
        return exe.run(program, feed=feed, fetch_list=output_values(program))


@pytest.fixture(scope="module")
def tiny_mp():
    cfg = compose_cfg("model=tiny")
    mp, _, _ = build_and_optimize(cfg, validate(cfg), np.random.default_rng(0))
    yield mp
    mp.model.restore_patches(0)


def test_runner_equals_the_static_executor_on_a_traced_model(tiny_mp):
    mp = tiny_mp
    rng = np.random.default_rng(1)
    step = WholeProgramStep(mp)
    for kind in ("prefill", "decode", "mixed"):
        batch = mp.model.random_batch(rng, kind)
        feeds = step.inputs(batch)
        got = step.run(batch)
        want = _executor_run(mp.program, mp.params, feeds)
        assert len(got) == len(want)
        assert all(isinstance(g, paddle.Tensor) for g in got)  # tensors out, no numpy
        assert all(np.array_equal(g.numpy(), w) for g, w in zip(got, want, strict=True))


def test_runner_outputs_are_not_overwritten_by_the_next_run():
    built = P.build_cond_program(hoisted=True)
    runner = ProgramRunner(built.program, built.params)
    rng = np.random.default_rng(0)
    first = runner.run(P.feeds_for(built, P.make_batch(3, [3, 3, 0], rng)))
    kept = [o.numpy().copy() for o in first]
    runner.run(P.feeds_for(built, P.make_batch(3, [3, 0, 3], rng)))
    assert all(np.array_equal(o.numpy(), k) for o, k in zip(first, kept, strict=True))


def test_runners_of_freed_programs_never_share_an_interpreter():
    """Paddle keys compiled interpreters by a program id; ids derived from id() of freed objects
    can repeat. Each runner takes a fresh id, so a new runner never runs an old program."""
    rng = np.random.default_rng(0)
    batch = P.make_batch(2, [2, 2, 2], rng)
    results = []
    for hoisted in (True, False, True, False):
        built = P.build_cond_program(hoisted=hoisted, seed=int(hoisted))
        runner = ProgramRunner(built.program, built.params)
        results.append(runner.run(P.feeds_for(built, batch))[0].numpy())
        want = _executor_run(built.program, built.params, P.feeds_for(built, batch))[0]
        assert np.array_equal(results[-1], want)
        del runner, built
    release_interpreters()


def test_pool_shares_one_runner_per_program_and_survives_a_release():
    built = P.build_cond_program(hoisted=True)
    pool = RunnerPool(built.params)
    assert pool.get(built.program) is pool.get(built.program) and len(pool) == 1
    feeds = P.feeds_for(built, P.make_batch(2, [2, 2, 0], np.random.default_rng(0)))
    before = pool.get(built.program).run(feeds)[0].numpy()
    release_interpreters()  # compiled programs dropped: the next run compiles again
    assert np.array_equal(pool.get(built.program).run(feeds)[0].numpy(), before)


# -- the compile cache --------------------------------------------------------------------------
def _opt(tmp_path, name, cache_dir, *extra):
    cfg = compose_cfg("model=tiny", "cache.enabled=true", f"cache.dir={cache_dir}", *extra)
    return optimize(cfg, run_dir=tmp_path / name)


def test_cache_miss_then_hit_skips_trace_and_passes(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    cold = _opt(tmp_path, "cold", cache_dir)
    assert cold["cache"]["status"] == "miss" and cold["cache"]["stored"] is True
    assert "trace_unmodified" in cold["timings"] and "passes" in cold["timings"]
    warm = _opt(tmp_path, "warm", cache_dir)
    assert warm["cache"]["status"] == "hit" and warm["cache"]["key"] == cold["cache"]["key"]
    assert not {"trace_unmodified", "trace_optimized", "passes"} & set(warm["timings"])
    # still verified, and the same numbers: the "before" side is the run that made the entry
    assert warm["verified"] and warm["numerics"] == cold["numerics"]
    # the replay check is the cold run's, recorded for these settings, and says so
    assert warm["replay"]["recorded"].endswith(f"({tmp_path / 'cold'})")
    recorded = {k: v for k, v in warm["replay"].items() if k != "recorded"}
    assert recorded == json.loads(json.dumps(cold["replay"]))  # as report.json has it
    assert warm["capture_plan"] == cold["capture_plan"]
    assert warm["replay"]["mismatches"] == 0 and warm["replay"]["steps"] == 20
    assert "replay" not in warm["timings"]
    assert warm["traces"] == cold["traces"] and warm["passes"] == cold["passes"]
    assert warm["segments"] == cold["segments"] and warm["flags"] == cold["flags"]
    assert "cache: hit" in capsys.readouterr().out
    # another pipeline option is another key
    other = _opt(tmp_path, "other", cache_dir, "verify.seed=1")
    assert other["cache"]["status"] == "miss" and other["cache"]["key"] != cold["cache"]["key"]


def test_a_hit_replays_again_unless_the_same_check_passed_before(tmp_path):
    """A recorded replay result stands in for the check only for identical settings and only
    when it passed; anything else replays, and a replay that ran is recorded for later hits."""
    cache_dir = tmp_path / "cache"
    cold = _opt(tmp_path, "cold", cache_dir, "verify.steps=4")
    entry = cache_dir / cold["cache"]["key"]
    again = _opt(tmp_path, "again", cache_dir, "verify.steps=4", "cache.replay_on_hit=true")
    assert "recorded" not in again["replay"] and "replay" in again["timings"]
    other = _opt(tmp_path, "other", cache_dir, "verify.steps=3")  # other settings: replayed
    assert "recorded" not in other["replay"] and other["replay"]["steps"] == 3
    assert "recorded" in _opt(tmp_path, "other2", cache_dir, "verify.steps=3")["replay"]
    records = sorted(entry.glob("replay-*.json"))
    assert len(records) == 2
    for damage in ("mismatch", "{ truncated"):
        for f in records:
            if damage == "mismatch":
                data = json.loads(f.read_text())
                data["replay"]["mismatches"] = 1
                f.write_text(json.dumps(data))
            else:
                f.write_text(damage)
        redo = _opt(tmp_path, f"redo-{damage[:4]}", cache_dir, "verify.steps=4")
        assert "recorded" not in redo["replay"] and redo["verified"]
        assert redo["replay"]["steps"] == 4 and redo["replay"]["mismatches"] == 0


def test_cache_hit_of_a_full_graph_run_runs_its_variants(tmp_path):
    """A hit restores the if-free variants and dispatches to them, as the cold run did."""
    cache_dir = tmp_path / "cache"
    extra = ("pipeline=full_graph", "full_cuda_graph=true")
    cold = _opt(tmp_path, "cold", cache_dir, *extra)
    warm = _opt(tmp_path, "warm", cache_dir, *extra)
    assert warm["cache"]["status"] == "hit" and warm["verified"]
    assert len(warm["variants"]) == 3
    assert warm["variants"] == cold["variants"]
    assert warm["specialization"] == cold["specialization"]
    assert warm["numerics_dispatched"] == cold["numerics_dispatched"]
    assert {d["target"] for d in warm["replay"]["stats"]["dispatch"]} == {
        v["name"] for v in cold["variants"]}
    # and serving it runs the variants, equal to eager on every kind
    step = load(tmp_path / "warm", backend="none")
    assert isinstance(step, VariantStepExecutor)
    _assert_every_kind_equals_eager(step)


@pytest.mark.parametrize("damage", ["program", "checksum", "version", "json", "keys"])
def test_corrupt_or_stale_entry_is_rebuilt_with_one_warning(tmp_path, capsys, damage):
    cache_dir = tmp_path / "cache"
    key = _opt(tmp_path, "cold", cache_dir)["cache"]["key"]
    entry = cache_dir / key
    meta = json.loads((entry / "entry.json").read_text())
    if damage == "program":
        (entry / "program.pir").write_bytes(b"not a program")
    elif damage == "checksum":
        meta["sha256"]["program"] = "0" * 64
        (entry / "entry.json").write_text(json.dumps(meta))
    elif damage == "version":
        meta["paddle"] = "0.0.0"
        (entry / "entry.json").write_text(json.dumps(meta))
    elif damage == "keys":  # valid JSON of the wrong shape
        del meta["host_inputs"]
        (entry / "entry.json").write_text(json.dumps(meta))
    else:
        (entry / "entry.json").write_text("{ truncated")
    capsys.readouterr()
    again = _opt(tmp_path, "again", cache_dir)
    err = capsys.readouterr().err
    assert again["cache"]["status"] == "rebuilt" and again["verified"]
    warnings = [ln for ln in err.splitlines() if "cache entry" in ln]
    assert len(warnings) == 1 and "rebuilding" in warnings[0]
    third = _opt(tmp_path, "third", cache_dir)
    assert third["cache"]["status"] == "hit"


def test_two_writers_of_one_key_leave_one_valid_entry(tmp_path, tiny_mp):
    cache = CompileCache(tmp_path / "cache")
    material = {"test": 1}
    k1 = cache_key(material)
    assert cache.store(k1, material, tiny_mp, [], None) is True
    assert cache.store(k1, material, tiny_mp, [], None) is False  # the first rename won
    assert [p.name for p in cache.dir.iterdir()] == [k1]  # no temporary left behind
    bundle = build_model(compose_cfg("model=tiny").model)
    entry = load_entry(cache.path(k1), bundle, expect_key=k1)
    assert entry.mp.segments is not None
    assert read_meta(cache.path(k1))["key"] == k1


# -- serving ------------------------------------------------------------------------------------
def _assert_every_kind_equals_eager(step) -> None:
    """A loaded step, run on a prefill, a decode and a mixed batch, is bit-equal to eager."""
    bundle = step.mp.model
    rng = np.random.default_rng(5)
    for kind in ("prefill", "decode", "mixed"):
        batch = bundle.random_batch(rng, kind)
        eager = bundle.step(batch, commit=False)
        got = step.run(batch)
        assert all(np.array_equal(g.numpy(), e) for g, e in zip(got, eager, strict=True))
        bundle.commit_state(eager[1:])


def test_load_a_run_dir_or_a_key_without_tracing(tmp_path):
    cache_dir = tmp_path / "cache"
    report = _opt(tmp_path, "run", cache_dir)
    for source in (tmp_path / "run", report["cache"]["key"]):
        step = load(source, cache_dir=cache_dir, backend="none")
        assert step.mp.sot_step is None  # nothing traced
        _assert_every_kind_equals_eager(step)
    whole = load_whole(tmp_path / "run")
    assert isinstance(whole.inputs, StepInputs)
    bundle = whole.inputs.mp.model
    batch = bundle.random_batch(np.random.default_rng(6), "mixed")
    eager = bundle.step(batch, commit=False)
    assert all(np.array_equal(g.numpy(), e)
               for g, e in zip(whole.run(batch), eager, strict=True))


def test_load_names_what_it_cannot_find(tmp_path):
    with pytest.raises(CacheError, match="not an entry"):
        load(tmp_path / "nothing", cache_dir=tmp_path)


# -- the key sees code outside graphopt ----------------------------------------------------------
PLUGIN_PASS = '''
from graphopt.passes.base import Pass, PassResult, Stage
from graphopt.passes.registry import register_pass


@register_pass
class EditedPlugin(Pass):
    name = "edited-plugin"
    summary = "does nothing (a plug-in pass whose source the test edits)"
    stage = Stage.PROGRAM

    def run(self, mp):
        return PassResult(modified=False, stats={})
'''

PLUGIN_MODEL = '''
from graphopt.models.tiny import build as tiny_build


def build(**keys):
    return tiny_build(**keys)
'''


@pytest.mark.parametrize("what", ["pass", "model"])
def test_editing_a_plugin_pass_or_a_target_model_misses_the_cache(tmp_path, monkeypatch, what):
    import importlib
    import sys

    from graphopt.passes import registry

    mod = f"edited_plugin_{what}"
    src = tmp_path / f"{mod}.py"
    src.write_text(PLUGIN_PASS if what == "pass" else PLUGIN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(mod)
    cache_dir = tmp_path / "cache"
    extra = (["pipeline.passes=[capture-control-flow,hoist-host-branch-conditions,"
              "cudagraph-blacklist-injection,edited-plugin,piecewise-split]"]
             if what == "pass" else [])

    def run(name):
        cfg = compose_cfg("model=tiny", "cache.enabled=true", f"cache.dir={cache_dir}",
                          "verify.steps=2", *extra)
        if what == "model":
            cfg.model._target_ = f"{mod}.build"
        return optimize(cfg, run_dir=tmp_path / name)["cache"]

    try:
        first, second = run("a"), run("b")
        assert (first["status"], second["status"]) == ("miss", "hit")
        src.write_text(src.read_text() + "\n# edited\n")
        registry._REGISTRY.pop("edited-plugin", None)
        importlib.reload(sys.modules[mod])
        third = run("c")
        assert third["status"] == "miss" and third["key"] != first["key"]
    finally:
        registry._REGISTRY.pop("edited-plugin", None)
        sys.modules.pop(mod, None)
