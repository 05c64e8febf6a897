"""Sweeps that scale out: two jobs at a time with Hydra's joblib launcher, sharing one compile
cache; the sweep report's time / peak-RSS columns and plots; the cluster launcher config."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.cli_runs import run_cli as _run
from tests.conftest import REPO


def test_parallel_sweep_two_jobs_share_one_cache_entry(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    # verify.steps is not part of the cache key: both jobs want the same entry at once
    r = _run("-m", "hydra/launcher=local2", "model=tiny", "verify.steps=20,21",
             "cache.enabled=true", f"cache.dir={cache}", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    reports = [json.loads((sweep / j / "report.json").read_text()) for j in ("0", "1")]
    assert all(rep["verified"] for rep in reports)
    assert {rep["replay"]["steps"] for rep in reports} == {20, 21}
    keys = {rep["cache"]["key"] for rep in reports}
    assert len(keys) == 1
    assert [p.name for p in cache.iterdir()] == [keys.pop()]  # one entry, no temporaries
    # the entry the two writers left is valid: a third run loads it
    third = _run("model=tiny", "cache.enabled=true", f"cache.dir={cache}",
                 f"hydra.run.dir={tmp_path / 'third'}")
    assert third.returncode == 0, third.stderr[-2000:]
    assert json.loads((tmp_path / "third" / "report.json").read_text())["cache"]["status"] == "hit"

    out = subprocess.run([sys.executable, str(REPO / "tools" / "sweep_report.py"), str(sweep)],
                         capture_output=True, text=True, check=True).stdout
    header = out.splitlines()[0]
    assert "time (s)" in header and "peak RSS (MB)" in header and "cache" in header
    rows = [ln.split("|") for ln in out.splitlines() if ln.startswith("| ")][1:]
    assert len(rows) == 2
    cols = [c.strip() for c in header.split("|")]
    for row in rows:
        cells = dict(zip(cols, (c.strip() for c in row), strict=True))
        assert float(cells["time (s)"]) > 0 and float(cells["peak RSS (MB)"]) > 0
        assert cells["result"] == "verified"
    assert (sweep / "sweep_verify.steps.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher not installed (the `cluster` extra)")
def test_cluster_launcher_config_composes():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from graphopt.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="graphopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_.lower() and launcher.cpus_per_task == 2


def test_parallel_sweep_with_a_failed_job_exits_nonzero_and_reports_variants(tmp_path):
    """joblib runs the jobs in worker processes: the failed job still fails the sweep (a Hydra
    callback reads the job directories in the launching process)."""
    sweep = tmp_path / "sweep"
    r = _run("-m", "hydra/launcher=local2", "model=tiny", "pipeline=cudagraph,full_graph",
             "full_cuda_graph=true", "verify.steps=4", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "1 sweep job(s) failed" in r.stderr and str(sweep / "0") in r.stderr
    assert "full_cuda_graph=true" in (sweep / "0" / "error.txt").read_text()
    out = subprocess.run([sys.executable, str(REPO / "tools" / "sweep_report.py"), str(sweep)],
                         capture_output=True, text=True, check=True).stdout
    cols = [c.strip() for c in out.splitlines()[0].split("|")]
    rows = [dict(zip(cols, (c.strip() for c in ln.split("|")), strict=True))
            for ln in out.splitlines()[2:] if ln.startswith("| ")]
    assert not rows[0]["full-graph variants"] and "full_cuda_graph=true" in rows[0]["result"]
    assert rows[1]["full-graph variants"].startswith("3 (decode ") and rows[1]["result"] == "verified"
