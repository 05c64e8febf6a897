"""The flagship dsv3 in FastDeploy's own attention forms (model.attention_form): every form is
the same function in eager mode, and every form goes through the flagship pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.driver import optimize
from graphopt.models import build_model
from graphopt.models.deepseek_v3.modeling import ATTENTION_FORMS
from tests.conftest import compose_cfg
from tests.report_checks import assert_numerics_within

FORMS = list(ATTENTION_FORMS)


def test_default_form_is_fastdeploys_pre_seed_code():
    assert compose_cfg().model.attention_form.value == "fastdeploy_2025"
    assert FORMS == ["fastdeploy_2025", "fastdeploy_2026", "seed", "graphopt"]


def test_every_form_computes_the_same_outputs_in_eager_mode():
    bundles = {f: build_model(compose_cfg("model.num_hidden_layers=2",
                                          f"model.attention_form={f}").model) for f in FORMS}
    for kind in ("prefill", "decode", "mixed"):
        want = None
        for form, bundle in bundles.items():
            # the same seed draws the same batch for every form
            got = bundle.step(bundle.random_batch(np.random.default_rng(7), kind), commit=False)
            if want is None:
                want = got
                continue
            err = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))
            assert err <= 2e-5, (form, kind, err)


@pytest.mark.parametrize("form", FORMS)
def test_every_form_through_the_flagship_pipeline(form, tmp_path):
    cfg = compose_cfg("model.num_hidden_layers=2", f"model.attention_form={form}")
    report = optimize(cfg, run_dir=tmp_path)
    assert report["graph_breaks"]["after"] == 0 and report["hazards"]["after"] == 0
    assert report["replay"]["steps"] >= 20 and report["replay"]["mismatches"] == 0
    assert_numerics_within(report)
    assert report["verified"] is True
    assert report["trace"]["placeholder_runs"] == 1 and report["trace"]["retraced"] is False
    if form == "seed":  # hand-fixed by the seed change: nothing left to mark
        assert report["graph_breaks"]["before"] == 0 and report["marked"] == []
    else:
        assert report["graph_breaks"]["before"] > 0 and report["hazards"]["before"] > 0
