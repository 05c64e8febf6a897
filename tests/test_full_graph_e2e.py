"""End to end with specialize-branches: pipeline=full_graph with full_cuda_graph=true, and the
hybrid pipeline=full_and_piecewise, on tiny (in process) and the default dsv3 (the CLI)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("GLOG_minloglevel", "2")


from graphopt.config import validate
from graphopt.driver import build_and_optimize, optimize
from graphopt.models.base import BATCH_KINDS
from graphopt.runtime.capture import DEFAULT_CAPTURE_SIZES
from graphopt.runtime.executor import ProgramRunner, RunnerPool, _ChunkedRunner
from graphopt.runtime.step import WholeProgramStep
from graphopt.runtime.variants import VariantStepExecutor
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



def test_long_programs_run_as_pieces_bit_for_bit():
    """A program over the pool's max_interpreter_ops runs as consecutive interpreters (how a
    61-layer variant is compiled in seconds, not minutes and GBs): every variant and the
    general program (its ifs whole inside a piece), on every batch kind, bit for bit as one
    interpreter."""
    cfg = compose_cfg("model=tiny", "pipeline=full_graph", "full_cuda_graph=true")
    mp, _, _ = build_and_optimize(cfg, validate(cfg), np.random.default_rng(0))
    try:
        whole = RunnerPool(mp.params, max_interpreter_ops=None)
        pieces = RunnerPool(mp.params, max_interpreter_ops=40)
        programs = [mp.program, *(v.segments.segments[0].program for v in mp.variants)]
        assert all(isinstance(whole.get(p), ProgramRunner) for p in programs)
        assert all(isinstance(pieces.get(p), _ChunkedRunner) and len(pieces.get(p).pieces) >= 3
                   for p in programs)
        assert isinstance(RunnerPool(mp.params).get(mp.program), ProgramRunner)  # under 2048
        rng = np.random.default_rng(5)
        for kind in BATCH_KINDS:
            batch = mp.model.random_batch(rng, kind)
            for make in (lambda pool: VariantStepExecutor(mp, "none", [1], 0, pool,
                                                          capture=False),
                         lambda pool: WholeProgramStep(mp, pool)):
                want, got = make(whole).run(batch), make(pieces).run(batch)
                assert len(got) == len(want)
                assert all(np.array_equal(g.numpy(), w.numpy())
                           for g, w in zip(got, want, strict=True))
    finally:
        mp.model.restore_patches(0)


@pytest.mark.slow
def test_full_graph_on_dsv3_61_layers_decode_mixed_prefill(tmp_path):
    """The default run's check of the 61-layer full graphs: the three if-free variants, each
    run on a batch of its kind against eager, then 6 replayed steps (2 per kind) through the
    emulator, each dispatched to its kind's variant. A 12-13k-op variant compiles as pieces of
    at most 2048 ops (RunnerPool): measured 1.6 GB peak and 92 s on 2 cores, against 5.7 GB and
    170 s with one interpreter per variant. The peak is held under 3 GB here."""
    report, _ = _report(tmp_path, "model=dsv3", "model.num_hidden_layers=61",
                        "pipeline=full_graph", "full_cuda_graph=true", "verify.steps=6")
    assert report["verified"] is True
    _check_variants(report, tmp_path, layers=61)  # each kind vs eager, on its own variant
    assert report["numerics_ran"].startswith("variants (uncaptured")
    rp = report["replay"]
    assert rp["steps"] == 6 and rp["mismatches"] == 0 and rp["max_abs_err"] <= 1e-4
    assert rp["kinds"] == {"prefill": 2, "decode": 2, "mixed": 2}
    kind_of = {v["name"]: v["kinds"][0] for v in report["variants"]}
    steps = dict.fromkeys(kind_of, 0)
    for d in rp["stats"]["dispatch"]:
        steps[d["target"]] += d["steps"]
    assert {kind_of[t]: n for t, n in steps.items()} == rp["kinds"]  # every step its variant
    st = rp["stats"]
    assert st["graphs_captured"] > 0 and st["replays"] > 0
    # a step runs uncaptured only above the largest capture size
    assert st["eager_segment_runs"] == st["eager_fallbacks"]
    assert report["memory_mb"]["peak_rss"] < 3000, report["memory_mb"]


@pytest.mark.heavy
def test_full_graph_on_dsv3_61_layers(tmp_path):
    """At 61 layers: three if-free variants, each one captured graph, equal to eager.

    Heavy, and so not in the default run: it was ~5.8 GB at the peak with one interpreter per
    12k-op variant; with the pool's pieces it peaks at ~1.6 GB (94 s). The default run has its
    6-step counterpart (test_full_graph_on_dsv3_61_layers_decode_mixed_prefill)."""
    report, _ = _report(tmp_path, "model=dsv3", "model.num_hidden_layers=61",
                        "pipeline=full_graph", "full_cuda_graph=true", "verify.steps=9")
    assert report["verified"] is True
    _check_variants(report, tmp_path, layers=61)
    assert report["replay"]["steps"] == 9 and report["replay"]["mismatches"] == 0
