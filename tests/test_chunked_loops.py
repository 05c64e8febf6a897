"""Loops with lists in serving code nobody wrote for graphopt: FastDeploy's chunked MoE
(tests/chunked_models.py: the chunk count from a host tensor, a ``while`` appending each chunk's
output to a list, ``paddle.concat`` after it), through the flagship pipeline unedited."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from graphopt.driver import optimize
from graphopt.errors import PassError
from tests.conftest import compose_cfg
from tests.report_checks import assert_numerics_within


def _cfg(form: str, *overrides: str, **model):
    cfg = compose_cfg(*overrides)
    cfg.model = OmegaConf.create({"_target_": "tests.chunked_models.build", "name": "chunked",
                                  "form": form, **model})
    return cfg


@pytest.mark.parametrize("form", ["fd2026", "seed"])
def test_a_chunked_moe_with_a_list_verifies_through_the_flagship_pipeline(tmp_path, form):
    """The loop (and the list it fills) is one eager segment; its trip count's first test is
    hoisted like an if condition; nothing of the loop rides along in the host prologue."""
    report = optimize(_cfg(form, "pipeline=cudagraph"), run_dir=tmp_path)
    assert report["graph_breaks"]["before"] > 0 and report["graph_breaks"]["after"] == 0
    assert report["hazards"]["before"] > 0 and report["hazards"]["after"] == 0
    assert report["replay"]["steps"] >= 20 and report["replay"]["mismatches"] == 0
    assert_numerics_within(report)
    assert report["verified"] is True
    marked = {m["function"] for m in report["marked"]}
    assert "tests.chunked_models.ChunkedMLP.forward" in marked
    # one uncaptured segment per layer holds the loop and its list (the other eager ones are
    # the attention ifs); everything else is captured
    seg = report["segments"]
    assert seg["eager"] - seg["eager_control_flow"] == 2  # num_layers=2
    assert seg["captured_host_runtime_values"] == 0 and seg["coverage"] > 0.8

def test_a_chunked_moe_as_one_full_graph_is_one_line_naming_the_loop():
    with pytest.raises(PassError) as info:
        optimize(_cfg("seed", "pipeline=full_graph", "full_cuda_graph=true"))
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 500
    assert "loop(s) run a number of times known only as they run (pd_op.while at " \
           "tests/chunked_models.py:" in msg
    assert "pipeline=cudagraph full_cuda_graph=false" in msg


def test_a_host_tensor_the_model_does_not_declare_is_still_a_host_input(tmp_path):
    """``token_num_cpu`` left out of the bundle's host_inputs: its name says host, so its host
    work on the captured path is a hazard (hoisted), and the report says it was inferred."""
    report = optimize(_cfg("seed", "pipeline=cudagraph", declare_host=False), run_dir=tmp_path)
    declared = optimize(_cfg("seed", "pipeline=cudagraph"), run_dir=tmp_path / "declared")
    assert report["hazards"]["before"] == declared["hazards"]["before"] > 0
    assert report["hazards"]["after"] == 0 and report["verified"] is True
    (warning,) = [w for w in report["warnings"] if "host_inputs" in w]
    assert warning.startswith("meta.token_num_cpu: host tensor(s) the model does not list")
    assert not [w for w in declared["warnings"] if "does not list" in w]
