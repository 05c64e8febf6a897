"""End to end with specialize-branches: pipeline=full_graph with full_cuda_graph=true, and the
hybrid pipeline=full_and_piecewise, on tiny (in process) and the default dsv3 (the CLI)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GLOG_minloglevel", "2")


from graphopt.driver import optimize
from graphopt.models.base import BATCH_KINDS
from graphopt.runtime.capture import DEFAULT_CAPTURE_SIZES
from tests.cli_runs import run_report as _report
from tests.conftest import compose_cfg


def _check_variants(report, tmp_path, layers):
    """Each variant: if-free, dispatched for its own batch kind, equal to eager there."""
    variants = report["variants"]
    assert sorted(k for v in variants for k in v["kinds"]) == sorted(BATCH_KINDS)
    assert report["specialization"]["unreachable"] == ["hoisted.0=0,hoisted.1=0"]
    by_name = {v["name"]: v for v in variants}
    for kind in BATCH_KINDS:
        assert report["numerics"][kind] <= 1e-5
        if layers <= 16:  # the unsplit 61-layer program is not compiled (whole_program_max_ops)
            assert report["numerics_whole_program"][kind] <= 1e-5
        assert kind in by_name[report["numerics_dispatched"][kind]]["kinds"]
    for i, v in enumerate(variants):
        text = (tmp_path / report["artifacts"]["variant_programs"] / f"{i}.txt").read_text()
        assert text.startswith(f"// variant {v['name']}")
        assert "pd_op.if" not in text and '"cf.' not in text
        assert v["segments"] == {"captured": 1, "eager": 0}  # one full graph per size
        assert v["ops"] < report["passes"][2]["stats"]["ops_before"]
    conds = report["specialization"]["conditions"]
    assert [len(c["feeds"]) for c in conds] == [layers, layers]  # one re-read per layer
    assert [c["label"] for c in conds] == ["forward_meta.max_len_tensor_cpu[1]",
                                          "forward_meta.max_len_tensor_cpu[2]"]


def test_full_graph_on_tiny_30_random_steps_checked(tmp_path):
    cfg = compose_cfg("model=tiny", "pipeline=full_graph", "full_cuda_graph=true",
                      "verify.steps=30", "runtime.check_captures=true")
    report = optimize(cfg, run_dir=tmp_path)
    assert report["verified"] is True and report["blacklist"] == []
    _check_variants(report, tmp_path, layers=2)
    rp = report["replay"]
    assert rp["steps"] == 30 and rp["mismatches"] == 0 and rp["max_abs_err"] <= 1e-4
    assert rp["kinds"] == {"prefill": 10, "decode": 10, "mixed": 10}
    st = rp["stats"]
    assert sum(d["steps"] for d in st["dispatch"]) == 30
    assert {d["target"] for d in st["dispatch"]} == {v["name"] for v in report["variants"]}
    assert st["checked_graphs"] == st["graphs_captured"] > 0 and st["dropped_graphs"] == []
    assert sum(v["captured_graphs"] for v in report["variants"]) == st["graphs_captured"]
    plan = report["capture_plan"]
    assert plan["graphs_to_capture"] == 3 * len(DEFAULT_CAPTURE_SIZES) < plan["graphs_to_capture_piecewise"]
    assert plan["static_input_bytes"] and all(b > 0 for b in plan["static_input_bytes"].values())


def test_full_and_piecewise_on_tiny(tmp_path):
    cfg = compose_cfg("model=tiny", "pipeline=full_and_piecewise", "verify.steps=12")
    report = optimize(cfg, run_dir=tmp_path)
    assert report["verified"] is True and report["blacklist"] == ["pd_op.if"]
    (variant,) = report["variants"]
    assert variant["kinds"] == ["decode"] and variant["segments"]["captured"] == 1
    assert report["specialization"]["general"] == ["hoisted.0=1,hoisted.1=1",
                                                   "hoisted.0=1,hoisted.1=0"]
    assert report["numerics_dispatched"] == {"prefill": "general", "decode": variant["name"],
                                             "mixed": "general"}
    rp = report["replay"]
    assert rp["mismatches"] == 0
    assert {d["target"] for d in rp["stats"]["dispatch"]} == {"general", variant["name"]}


def test_full_graph_on_default_dsv3(tmp_path):
    report, stdout = _report(tmp_path, "model=dsv3", "pipeline=full_graph",
                             "full_cuda_graph=true")
    assert report["verified"] is True and report["full_cuda_graph"] is True
    _check_variants(report, tmp_path, layers=4)
    assert report["replay"]["steps"] >= 20 and report["replay"]["mismatches"] == 0
    assert "variants: 3 if-free" in stdout
    assert f"graphs to capture: {3 * len(DEFAULT_CAPTURE_SIZES)}" in stdout



@pytest.mark.heavy
def test_full_graph_on_dsv3_61_layers(tmp_path):
    """At 61 layers: three if-free variants, each one captured graph, equal to eager.

    Heavy: checking three 12k-op programs compiles an interpreter for each (~1.5 GB apiece on
    CPU), about 6 GB at the peak, so it is not part of the default run."""
    report, _ = _report(tmp_path, "model=dsv3", "model.num_hidden_layers=61",
                        "pipeline=full_graph", "full_cuda_graph=true", "verify.steps=9")
    assert report["verified"] is True
    _check_variants(report, tmp_path, layers=61)
    assert report["replay"]["steps"] == 9 and report["replay"]["mismatches"] == 0
