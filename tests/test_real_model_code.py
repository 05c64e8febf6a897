"""FastDeploy's own MLA branch shapes, in a model defined outside graphopt (tests/
fastdeploy_models.py), through the flagship pipeline unedited: 0 breaks, 0 hazards, verified
replay, every batch kind equal to eager."""

from __future__ import annotations

import hashlib
import inspect
import linecache
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from omegaconf import OmegaConf

from graphopt.driver import optimize
from graphopt.errors import PassError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import program_text
from graphopt.passes.manager import PassManager
from tests import fastdeploy_models as fm
from tests.conftest import compose_cfg
from tests.filecheck import filecheck
from tests.report_checks import assert_numerics_within

MODEL_FILE = fm.__file__


def _cfg(form: str, **model):
    cfg = compose_cfg("pipeline=cudagraph")
    cfg.model = OmegaConf.create({"_target_": "tests.fastdeploy_models.build",
                                  "name": f"fd-{form}", "form": form, **model})
    return cfg


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("form", ["fd2025", "fd2026", "seed", "mask_both", "token_shape",
                                  "returns"])
def test_fastdeploy_shapes_through_the_flagship_pipeline(form, tmp_path):
    source_before = _sha(MODEL_FILE)
    originals = {name: cls.forward for name, cls in fm.FORMS.items()}
    report = optimize(_cfg(form), run_dir=tmp_path)
    assert report["graph_breaks"]["after"] == 0 and report["trace"]["subgraphs"] == 1
    # the step is built as one graph without running it, at the first attempt (the seed's code
    # is one graph unmarked: its only trace)
    assert report["trace"]["placeholder_runs"] == 1 and report["trace"]["retraced"] is False
    assert report["hazards"]["after"] == 0
    assert report["replay"]["steps"] >= 20 and report["replay"]["mismatches"] == 0
    assert_numerics_within(report)
    assert report["verified"] is True
    if form == "seed":  # hand-fixed: already one graph, conditions are host inputs
        assert report["graph_breaks"]["before"] == 0 and report["marked"] == []
    else:
        assert report["graph_breaks"]["before"] > 0 and report["hazards"]["before"] > 0
        (marked,) = report["marked"]
        assert marked["function"] == f"tests.fastdeploy_models.{fm.FORMS[form].__name__}.forward"
        assert marked["location"].startswith("tests/fastdeploy_models.py:")
        # hazards point at the user's lines, whatever the folder (every hazard counted has one)
        details = report["hazards"]["details_before"]
        assert len(details) == report["hazards"]["before"]
        assert all(h["location"].startswith("tests/fastdeploy_models.py:") for h in details)
    if form in ("fd2025", "fd2026", "token_shape"):
        assert marked["rewrites"] and "paddle.shape(" in marked["rewrites"][0]
    # nothing edited on disk, nothing left patched in memory
    assert _sha(MODEL_FILE) == source_before
    assert {name: cls.forward for name, cls in fm.FORMS.items()} == originals


def test_host_tensor_replaced_between_steps_is_still_correct(tmp_path):
    report = optimize(_cfg("fd2026", replace_host_tensor=True), run_dir=tmp_path)
    # SOT binds max_len_tensor_cpu by reference inside the marked function; graphopt feeds it
    # by value every step, so a new tensor per step is seen
    assert "meta.max_len_tensor_cpu" in report["trace"]["host_bound_by_reference"]
    assert report["replay"]["mismatches"] == 0 and report["verified"] is True


def test_a_shape_graphopt_cannot_handle_is_one_line_and_patches_nothing(tmp_path):
    layer_call = paddle.nn.Layer.__call__
    original = fm.MLAUnsupported.forward
    with pytest.raises(PassError) as info:
        optimize(_cfg("unsupported"), run_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("pass 'capture-control-flow' failed:")
    assert "tests/fastdeploy_models.py:" in msg  # the user's file and line
    assert "Paddle: TypeError: The type of 'input[0]' in concat must be" in msg  # its reason
    assert "could not rewrite it" in msg and "`parts`" in msg  # and what to change
    # nothing patched afterwards, Paddle's and the model's functions are the originals
    assert paddle.nn.Layer.__call__ is layer_call
    assert fm.MLAUnsupported.forward is original
    assert not (tmp_path / "report.json").exists()


def test_golden_text_of_the_rewritten_branch():
    """fd2025, one layer: `fmha_out = None` became zeros shaped at run time, yielded by the
    prefill if's else-branch; the decode if then adds into it. Zeros, not just a placeholder: on
    a decode-only step the original's `fmha_out` is the decode output alone and the rewrite's is
    placeholder + decode output, so the rewritten function must equal the original there."""
    bundle = fm.build(form="fd2025", num_layers=1)
    mp = ModelProgram(model=bundle)
    mp.trace_batch = bundle.random_batch(np.random.default_rng(0), "mixed")

    def steps():  # the same three steps each time (commit=False: the caches stay as they are)
        return {kind: bundle.step(bundle.random_batch(np.random.default_rng(3), kind),
                                  commit=False) for kind in ("prefill", "decode", "mixed")}

    try:
        PassManager.from_config(["capture-control-flow"], {}).run(mp)
        rewritten_fn = inspect.getattr_static(fm.MLA2025, "forward")
        rewritten = steps()  # eagerly, through the rewritten (and marked) forward
    finally:
        bundle.restore_patches(0)
    # the generated source: zeros of the branch's shape and dtype, right before the Tensor if
    fake = rewritten_fn.__code__.co_filename
    assert fake.startswith("<graphopt rewrite of ") and fm.MLA2025.forward is not rewritten_fn
    source = "".join(linecache.getlines(fake))
    assert ("        fmha_out = None\n"
            "        fmha_out = _graphopt_paddle.zeros([_graphopt_paddle.shape(hidden_states)[0], "
            "16], dtype='float32')\n"
            "        if forward_meta.max_len_tensor_cpu[1]:  # max_enc_len_this_time\n") in source
    # numerically: the rewrite equals the original eagerly, on the decode-only step (`fmha_out`
    # defined by the decode path only: the placeholder is what it adds into) as on the others
    original = steps()
    for kind, outs in rewritten.items():
        for got, want in zip(outs, original[kind], strict=True):
            np.testing.assert_array_equal(got, want, err_msg=kind)
    filecheck(program_text(mp.program), """
        CHECK: "pd_op.shape64"
        CHECK: ([[F:%[0-9]+]]) = "pd_op.full" () {dtype:float32,{{.*}},value:0} : () -> tensor<1xf32>
        CHECK-NEXT: ([[Z:%[0-9]+]]) = "pd_op.full_with_tensor" ([[F]], {{.*}}) {dtype:float32
        CHECK: ([[P:%[0-9]+]]) = "pd_op.if" ({{.*}}) {{.*}} -> tensor<-1x16xf32> {
        CHECK: "pd_op.softmax"
        CHECK: } else {
        CHECK-NEXT: "cf.yield" ([[Z]])
        CHECK: "pd_op.if"
        CHECK: "pd_op.add" ([[P]],
        CHECK-NOT: "pd_op.if"
        CHECK: "builtin.shadow_output"
    """)


@pytest.mark.parametrize("form", ["fd2025", "fd2026", "seed"])
def test_fastdeploy_shapes_as_full_graphs(form, tmp_path):
    """The same shapes specialized into if-free variants: one full graph per batch kind, 30
    random replayed steps of mixed kinds with no mismatch."""
    cfg = _cfg(form)
    cfg.pipeline = compose_cfg("pipeline=full_graph").pipeline
    cfg.full_cuda_graph = True
    cfg.verify.steps = 30
    report = optimize(cfg, run_dir=tmp_path)
    assert sorted(sorted(v["kinds"]) for v in report["variants"]) == [
        ["decode"], ["mixed"], ["prefill"]]
    assert all(v["segments"]["eager"] == 0 for v in report["variants"])  # one graph each
    assert report["replay"]["steps"] == 30 and report["replay"]["mismatches"] == 0
    assert report["verified"] is True


def test_a_model_installed_as_a_package_is_still_the_users_code(tmp_path, monkeypatch):
    """A model pip-installed into site-packages (a FastDeploy install) is marked and blamed
    like code in the working directory; Paddle's and graphopt's own code never are."""
    pkg = tmp_path / "lib" / "site-packages" / "fd_installed"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(Path(MODEL_FILE).read_text())
    monkeypatch.syspath_prepend(str(pkg.parent))
    cfg = compose_cfg("pipeline=cudagraph")
    cfg.model = OmegaConf.create({"_target_": "fd_installed.models.build", "name": "fd-installed",
                                  "form": "fd2025"})
    try:
        report = optimize(cfg, run_dir=tmp_path / "run")
    finally:
        for name in [m for m in sys.modules if m.startswith("fd_installed")]:
            del sys.modules[name]
    assert report["verified"] is True and report["graph_breaks"]["after"] == 0
    (marked,) = report["marked"]
    assert marked["function"] == "fd_installed.models.MLA2025.forward"
    assert "site-packages/fd_installed/models.py:" in marked["location"]
