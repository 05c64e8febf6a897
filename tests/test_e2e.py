"""End to end: the README's command on the default dsv3, the baseline, the seed's bug, 16 and
61 layers."""

from __future__ import annotations

import json

import pytest

from tests.cli_runs import run_cli as _run
from tests.cli_runs import run_report as _report
from tests.conftest import compose_cfg


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
    for kind in ("prefill", "decode", "mixed"):
        assert report["numerics"][kind] <= 1e-5
        assert report["numerics_whole_program"][kind] <= 1e-5
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


def test_pipeline_none_is_the_baseline(tmp_path):
    report, stdout = _report(tmp_path, "model=dsv3", "pipeline=none")
    assert report["trace"]["graph_breaks"] > 0 and report["trace"]["subgraphs"] > 1
    assert report["passes"] == [] and report["segments"] is None
    assert all(v <= 1e-5 for v in report["numerics"].values())
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
    assert all(v <= 1e-5 for v in report["numerics"].values())


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
    assert all(v <= 1e-5 for v in report["numerics"].values())


@pytest.mark.slow
def test_dsv3_61_layers(tmp_path):
    """The full depth (about 90 s and 2.6 GiB in its own process)."""
    report, _ = _report(tmp_path, "model=dsv3", "model.num_hidden_layers=61")
    _check_flagship(report, layers=61)
    assert all(v <= 1e-5 for v in report["numerics"].values())
