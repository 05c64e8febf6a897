"""Bring your own model: a FastDeploy-style model defined only in examples/byo_model, found
through hydra.searchpath and `_target_`, run through the flagship pipeline with no graphopt file
edited; and the graphopt.models entry-point group."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import graphopt.models as models
from graphopt.errors import ConfigError
from tests.cli_runs import run_cli as _run
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "byo_model"


def test_example_runs_through_searchpath_and_target(tmp_path):
    r = _run("hydra.searchpath=[file://conf]", "model=my_deepseek", f"hydra.run.dir={tmp_path}",
             cwd=EXAMPLE)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "my_deepseek"
    assert report["graph_breaks"]["before"] > 0 and report["graph_breaks"]["after"] == 0
    assert report["hazards"]["before"] > 0 and report["hazards"]["after"] == 0
    assert report["replay"]["mismatches"] == 0 and report["verified"] is True
    (marked,) = report["marked"]
    assert marked["function"] == "my_deepseek.DeepseekV3MLAAttention.forward"
    assert marked["location"].startswith("my_deepseek.py:") and marked["rewrites"]


def test_without_the_searchpath_the_model_is_unknown(tmp_path):
    r = _run("model=my_deepseek", f"hydra.run.dir={tmp_path}", cwd=EXAMPLE)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "graphopt: error: unknown model 'my_deepseek': choose one of dsv3, tiny"]


def test_a_target_that_does_not_import_is_one_line(tmp_path):
    r = _run("model=tiny", "model._target_=nowhere.build", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "model._target_='nowhere.build': cannot import it" in r.stderr


def test_entry_point_family(monkeypatch):
    ep = SimpleNamespace(name="tiny_plugin", value="graphopt.models.tiny:build")
    monkeypatch.setattr(models, "entry_points",
                        lambda group: [ep] if group == "graphopt.models" else [])
    assert models.families()["tiny_plugin"] == "graphopt.models.tiny:build"
    bundle = models.build_model({"family": "tiny_plugin", "name": "plugged", "seed": 1})
    assert bundle.name == "plugged" and len(bundle.state_fields) == 2
    with pytest.raises(ConfigError, match="Did you mean 'tiny_plugin'"):
        models.build_model({"family": "tiny_plugn"})
