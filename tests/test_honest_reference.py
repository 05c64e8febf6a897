""""Equal to eager" means equal to the model as its authors wrote it.

graphopt rewrites a marked function in memory (define-before-branch) and keeps the rewrite
patched in while it verifies. Every reference step undoes the patches, so a bug planted in the
rewrite (placeholders of ones instead of zeros) must fail verification, be named by bisect, and
show in the report as what the step was compared with.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
import pytest

import graphopt.passes.branch_normalizer as bn
from graphopt.driver import optimize
from graphopt.errors import VerificationError
from graphopt.models import build_model
from tests.conftest import compose_cfg

ARGS = ("model=dsv3", "model.num_hidden_layers=2", "full_cuda_graph=false", "verify.steps=6")


@pytest.fixture
def planted_fill(monkeypatch):
    """The rewrite defines its placeholders as ones, not zeros: a decode-only step then adds
    the decode output into ones instead of zeros."""
    compile_ = bn._compile

    def ones(src, before, after, *args, **kwargs):
        before = {n: [line.replace(".zeros(", ".ones(") for line in lines]
                  for n, lines in before.items()}
        return compile_(src, before, after, *args, **kwargs)

    monkeypatch.setattr(bn, "_compile", ones)


def test_a_planted_rewrite_bug_fails_verification(planted_fill, tmp_path):
    with pytest.raises(VerificationError) as info:
        optimize(compose_cfg(*ARGS), tmp_path)
    msg = str(info.value)
    assert "differs from eager (the model as written) uncaptured, on decode" in msg
    assert "prefill" not in msg.split("; ")[0]  # only the kind whose path reads a placeholder
    assert "rewrote graphopt.models.deepseek_v3.modeling.FastDeploy2025MLAAttention.forward" \
        in msg


def test_bisect_points_at_the_rewrite_not_at_a_program_pass(planted_fill, tmp_path):
    report = optimize(compose_cfg(*ARGS, "verify.bisect=true", "verify.fail_on_mismatch=false"),
                      tmp_path)
    assert not report["verified"]
    assert report["bisect"]["culprit"] == "trace"
    assert report["bisect"]["source_passes"] == ["capture-control-flow"]
    assert report["numerics"]["decode"] > 1.0 and report["numerics"]["prefill"] == 0.0


def test_without_the_bug_it_verifies_and_the_report_names_the_reference(tmp_path):
    report = optimize(compose_cfg(*ARGS), tmp_path)
    assert report["verified"]
    assert set(report["numerics"]) == {"prefill", "decode", "mixed"}
    assert max(report["numerics"].values()) == 0.0
    ref = report["numerics_reference"]
    assert ref.startswith("the model as written") and "FastDeploy2025MLAAttention.forward" in ref
    assert report["replay"]["reference"] == ref
    # every segment is located in the model's code: an op SOT traced carries no model frame in
    # its real call stack, and the trace's caller (this test) must never stand in for it
    plan = json.loads((tmp_path / "segments.json").read_text())
    locations = [s.get("location") for s in _walk(plan["segments"])]
    assert locations and all(loc.startswith("graphopt/models/deepseek_v3/modeling.py:")
                             for loc in locations), locations


def _walk(segments):
    for s in segments:
        yield s
        for branch in (s.get("branches") or {}).values():
            yield from _walk(branch)


def test_as_written_undoes_every_patch_and_puts_them_back():
    bundle = build_model(compose_cfg(*ARGS).model)
    cls = type(bundle.layer)
    original = cls.forward
    assert bundle.reference_description().endswith("no function of it was patched)")

    def patched(self, *args, **kwargs):
        raise AssertionError("the patched forward ran inside as_written()")

    bundle.patch(cls, "forward", patched)
    try:
        assert "1 source patch(es) undone" in bundle.reference_description()
        batch = bundle.random_batch(np.random.default_rng(0), "decode")
        with bundle.as_written():
            assert cls.forward is original
        out = bundle.reference_step(batch)  # runs the original: no AssertionError
        assert np.isfinite(out[0]).all()
        assert cls.forward is patched  # put back
        with pytest.raises(AssertionError, match="patched forward ran"):
            bundle.step(batch, commit=False)
    finally:
        bundle.restore_patches(0)
    assert cls.forward is original
