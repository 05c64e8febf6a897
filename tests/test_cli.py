"""The command line as users type it: config groups compose, bad input is one line + exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cli_runs import run_cli as _run
from tests.conftest import REPO, compose_cfg

CONF = REPO / "graphopt" / "conf"


@pytest.mark.parametrize(
    "group,option",
    [(g.name, f.stem) for g in sorted(CONF.iterdir()) if g.is_dir() and not g.name.startswith("_")
     for f in sorted(g.glob("*.yaml"))],
)
def test_every_config_group_option_composes(group, option):
    cfg = compose_cfg(f"{group}={option}")
    assert cfg[group] is not None
    if group == "pipeline":
        from graphopt.passes.manager import PassManager

        PassManager.from_config(list(cfg.pipeline.passes), cfg.pipeline.options)  # validates


def test_defaults_are_the_flagship():
    cfg = compose_cfg()
    assert cfg.model.name == "dsv3" and cfg.pipeline.name == "cudagraph"
    assert cfg.full_cuda_graph is False and cfg.runtime.backend == "emulator"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model=nope", "unknown model 'nope'"),
        ("pipeline=nope", "unknown pipeline 'nope'"),
        ("no_such_key=1", "no_such_key"),
        ("full_cuda_graph=maybe", "full_cuda_graph"),
        ("pipeline.passes=[capture-control-flow,no-such-pass]", "unknown pass 'no-such-pass'"),
        ("+pipeline.options.piecewise-split.bogus=1", "bogus"),
        ("model=tiny,dsv3", "needs -m"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(override, needle, tmp_path):
    r = _run(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.hidden_size=-8", "model.hidden_size"),
        ("model.num_experts_per_tok=64", "num_experts_per_tok"),
        ("+model.not_a_hf_field=3", "not_a_hf_field"),
        ("model.weights=/nonexistent/ckpt.safetensors", "no such file"),
        ("model.config_json=BAD_JSON", "config_json"),
    ],
)
def test_bad_model_input_is_one_line_and_exit_2(override, needle, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 12,')  # malformed JSON
    r = _run(override.replace("BAD_JSON", str(bad)), "model=dsv3",
             f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "run" / "report.json").exists()


def test_cfg_job_prints_config():
    r = _run("--cfg", "job", "model=tiny")
    assert r.returncode == 0, r.stderr
    assert "_target_: graphopt.models.tiny.build" in r.stdout
    assert "full_cuda_graph: false" in r.stdout


def test_list_passes(tmp_path):
    """Lists every pass and touches no run directory, not even a finished one."""
    (tmp_path / "report.json").write_text("{}\n")
    r = _run("list_passes=true", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    for name in ("capture-control-flow", "hoist-host-branch-conditions",
                 "cudagraph-blacklist-injection", "piecewise-split", "paddle-native"):
        assert name in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_full_cuda_graph_with_control_flow_is_one_line_exit_2(tmp_path):
    r = _run("model=tiny", "full_cuda_graph=true", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pd_op.if" in lines[0] and "full_cuda_graph=false" in lines[0]
    assert not (tmp_path / "report.json").exists()


def test_cli_end_to_end_tiny_writes_report(tmp_path):
    r = _run("model=tiny", f"hydra.run.dir={tmp_path}", "dump_ir=true")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema_version"] == 2 and report["model"] == "tiny"
    assert [p["name"] for p in report["passes"]] == [
        "capture-control-flow", "hoist-host-branch-conditions",
        "cudagraph-blacklist-injection", "piecewise-split"]
    assert report["verified"] is True
    assert (tmp_path / "ir").is_dir() and any((tmp_path / "ir").iterdir())
    # the last line says where and how long; cli.log holds the run's log; modes are 0644
    assert r.stdout.strip().splitlines()[-1].startswith(f"graphopt: run directory {tmp_path}")
    log = (tmp_path / "cli.log").read_text()
    assert "graphopt: model=tiny" in log and "phase replay" in log and "verified" in log
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tmp_path.rglob("*") if p.is_file())
    assert not (tmp_path / ".graphopt.lock").exists()
    assert "⠋" not in r.stdout and "✓" not in r.stdout  # no progress when not a terminal


def test_sweep_runs_every_job_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    r = _run("-m", "model=tiny", "full_cuda_graph=true,false", f"hydra.sweep.dir={sweep}")
    # the impossible job fails with its one line; the other still runs; the sweep exits 2
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "1 sweep job(s) failed" in r.stderr
    assert "full_cuda_graph=true" in (sweep / "0" / "error.txt").read_text()
    assert not (sweep / "0" / "report.json").exists()
    assert json.loads((sweep / "1" / "report.json").read_text())["verified"] is True
    out = subprocess.run([sys.executable, str(REPO / "tools" / "sweep_report.py"), str(sweep)],
                         capture_output=True, text=True, check=True).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("| model=tiny")]
    assert len(rows) == 2 and "verified" in rows[1] and "pd_op.if" in rows[0]


def test_overwrite_replaces_the_whole_run_and_leaves_the_users_files_alone(tmp_path):
    """overwrite=true keeps nothing of the old run (its variants, its compiled step) and a run
    directory that is the user's own folder keeps its files' modes."""
    script = tmp_path / "notes.sh"
    script.write_text("echo mine\n")
    script.chmod(0o755)
    first = _run("model=tiny", "pipeline=full_graph", f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "variants").is_dir()
    again = _run("model=tiny", f"hydra.run.dir={tmp_path}", "overwrite=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (tmp_path / "variants").exists()  # the new run has no variants
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["variants"]
    assert oct(script.stat().st_mode & 0o777) == oct(0o755)
    assert oct((tmp_path / "report.json").stat().st_mode & 0o777) == oct(0o644)
