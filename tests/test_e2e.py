"""End to end: the README's command on the default dsv3, the baseline, the seed's bug, 16 and
61 layers."""

from __future__ import annotations

import json

import pytest

from tests.cli_runs import run_cli as _run
from tests.cli_runs import run_report as _report
from tests.conftest import compose_cfg
from tests.report_checks import assert_numerics_within


def _check_flagship(report, layers):
    assert report["model"] == "dsv3" and report["full_cuda_graph"] is False
    assert report["graph_breaks"]["before"] > 0 and report["graph_breaks"]["after"] == 0
    assert report["trace"]["graph_breaks"] == 0 and report["trace"]["subgraphs"] == 1
    # the marked step was built as one graph, not run, and not traced twice
    assert report["trace"]["placeholder_runs"] == 1 and report["trace"]["retraced"] is False
    # the unmodified model breaks: its optimistic attempt stopped, then it was traced normally
    assert report["traces"][0]["retraced"] is True
    assert report["hazards"]["before"] > 0 and report["hazards"]["after"] == 0
    assert report["blacklist"] == ["pd_op.if"]
    assert report["flags"]["FLAGS_cuda_graph_blacklist"].split(",").count("pd_op.if") == 1
    seg = report["segments"]
    assert seg["eager"] == 2 * layers  # one eager segment per `if`
    assert seg["coverage"] >= 0.99
    assert report["replay"]["steps"] >= 20 and report["replay"]["mismatches"] == 0
    assert report["replay"]["max_abs_err"] <= 1e-4
    assert report["verified"] is True


def test_readme_command_on_default_dsv3(tmp_path, paddle):
    report, stdout = _report(tmp_path, "model=dsv3", "full_cuda_graph=false")
    _check_flagship(report, layers=4)
    assert_numerics_within(report)
    assert_numerics_within(report, key="numerics_whole_program")
    assert [p["name"] for p in report["passes"]] == [
        "capture-control-flow", "hoist-host-branch-conditions",
        "cudagraph-blacklist-injection", "piecewise-split"]
    assert all({"name", "modified", "time_s", "stats"} <= set(p) for p in report["passes"])
    # the printed summary says the same in a few lines
    assert "graph breaks:" in stdout and "replay emulator: 20 steps, 0 mismatches" in stdout
    # artifacts: text + Paddle's own serialized program (loads back), plan, picture, flags
    art = report["artifacts"]
    for key in ("program_text", "program_paddle", "prologue_text", "segments",
                "segments_picture", "flags", "pipeline"):
        assert (tmp_path / art[key]).is_file(), key
    from paddle.base import core

    loaded = paddle.static.Program()
    core.deserialize_pir_program(str(tmp_path / art["program_paddle"]), loaded, -1)
    assert sum(op.name() == "pd_op.if" for op in loaded.global_block().ops) == 8
    plan = json.loads((tmp_path / art["segments"]).read_text())
    assert plan["segments"] and {s["kind"] for s in plan["segments"]} == {"captured", "eager"}
    assert "FLAGS_cuda_graph_blacklist=pd_op.if" in (tmp_path / art["flags"]).read_text()
    # ... and the compiled step it saved loads back and runs, equal to the model
    _assert_loaded_step_equals_eager(tmp_path, ifs=8)


def _assert_loaded_step_equals_eager(run_dir, ifs):
    """graphopt.serving.load(run_dir), as an engine serves it (captured graphs replayed by the
    emulator, eager ifs), on a prefill, a decode and a mixed step: within 1e-5 of the loaded
    bundle's own layer run eagerly."""
    import numpy as np

    from graphopt.serving import load

    step = load(run_dir)
    assert step.mp.sot_step is None  # nothing traced
    assert sum(op.name() == "pd_op.if" for op in step.mp.program.global_block().ops) == ifs
    bundle = step.mp.model
    assert bundle.patch_checkpoint() == 0  # its layer is the model as written, unpatched
    rng = np.random.default_rng(5)
    for kind in ("prefill", "decode", "mixed"):
        batch = bundle.random_batch(rng, kind)
        eager = bundle.step(batch, commit=False)
        got = step.run(batch)
        assert len(got) == len(eager) == 1 + len(bundle.state_fields), kind
        for g, e in zip(got, eager, strict=True):
            np.testing.assert_allclose(g.numpy(), e, rtol=0, atol=1e-5, err_msg=kind)
        bundle.commit_state(eager[1:])
    stats = step.stats()
    assert stats["steps"] == 3 and stats["graphs_captured"] > 0 and stats["replays"] > 0
    assert stats["branches_taken"]["true"] > 0 and stats["branches_taken"]["false"] > 0


def test_pipeline_none_is_the_baseline(tmp_path):
    report, stdout = _report(tmp_path, "model=dsv3", "pipeline=none")
    assert report["trace"]["graph_breaks"] > 0 and report["trace"]["subgraphs"] > 1
    assert report["passes"] == [] and report["segments"] is None
    assert_numerics_within(report)
    assert report["verified"] is True and "n/a" in stdout


@pytest.mark.parametrize("model", ["tiny", "dsv3"])
def test_without_hoist_the_emulator_reproduces_the_seed_bug(tmp_path, model):
    from graphopt.driver import optimize

    cfg = compose_cfg(f"model={model}", "pipeline=cudagraph_no_hoist",
                      "verify.fail_on_mismatch=false", "verify.steps=24")
    report = optimize(cfg, run_dir=tmp_path)
    assert report["replay"]["steps"] == 24
    assert report["replay"]["mismatches"] > 0  # a stale condition ran the wrong branch
    assert report["hazards"]["after"] > 0 and report["verified"] is False
    # ... and the uncaptured run of the same plan is exact: capture/replay is what breaks it
    assert_numerics_within(report)


def test_without_hoist_the_cli_fails_verification(tmp_path):
    r = _run("model=tiny", "pipeline=cudagraph_no_hoist", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 1
    assert "replayed steps differ from eager" in r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["replay"]["mismatches"] > 0


@pytest.mark.slow
def test_dsv3_16_layers(tmp_path):
    """Depth in the default run: every layer's two ifs found, hoisted and cut around."""
    report, _ = _report(tmp_path, "model=dsv3", "model.num_hidden_layers=16")
    _check_flagship(report, layers=16)
    assert report["hazards"]["before"] == 4 * 16  # slice + cast per condition per layer
    assert_numerics_within(report)


@pytest.mark.slow
def test_dsv3_61_layers(tmp_path):
    """The full depth (about 90 s and 2.6 GiB in its own process)."""
    report, _ = _report(tmp_path, "model=dsv3", "model.num_hidden_layers=61")
    _check_flagship(report, layers=61)
    assert_numerics_within(report)
