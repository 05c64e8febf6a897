"""tools/export.py: a model config (and weights) written as a HF checkpoint reads back as the
same model; a user's own config.json then wins over graphopt's scaled-down defaults."""

from __future__ import annotations

import importlib.util
import json

import numpy as np

from graphopt.models import build_model
from tests.conftest import REPO, compose_cfg


def _tool():
    spec = importlib.util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _logits(bundle) -> np.ndarray:
    bundle.reset_state()
    return bundle.step(bundle.make_batch("mixed", [3, 1], [0, 2]), commit=False)[0]


def test_export_round_trip_and_own_config_wins(tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "ckpt"
    sizes = ["model.num_hidden_layers=2", "model.hidden_size=384", "model.seed=5"]
    assert tool.main([f"out={out}", *sizes]) == 0
    assert "model.config_json=" in capsys.readouterr().out
    hf = json.loads((out / "config.json").read_text())
    assert hf["num_hidden_layers"] == 2 and hf["hidden_size"] == 384
    original = build_model(compose_cfg("model=dsv3", *sizes).model)
    # the user's config.json is used as written: no shipped (4-layer, hidden-256) overrides
    again = build_model(compose_cfg("model=dsv3", f"model.config_json={out / 'config.json'}",
                                    f"model.weights={out}").model)
    assert again.config.num_hidden_layers == 2 and again.config.hidden_size == 384
    np.testing.assert_array_equal(_logits(again), _logits(original))
    assert again.provenance["weights"]["path"] == str(out.resolve())
    # a second export into the same directory is refused, one line, exit 2
    assert tool.main([f"out={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "overwrite=true" in err[0]
    assert tool.main([f"out={out}", "model=tiny", "overwrite=true"]) == 2
    assert "no checkpoint format" in capsys.readouterr().err
