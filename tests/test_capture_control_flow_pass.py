"""capture-control-flow on real SOT traces: auto/explicit modes, rollback, negative cases."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from graphopt.errors import ConfigError, PassError
from graphopt.ir.model_program import ModelProgram
from graphopt.ir.pir_utils import op_sequence
from graphopt.models.base import ModelBundle, StepBatch
from graphopt.passes.manager import PassManager
from tests.conftest import compose_cfg
from tests.programs import run_program


def _tiny():
    from graphopt.models import build_model

    bundle = build_model(compose_cfg("model=tiny").model)
    mp = ModelProgram(model=bundle)
    mp.trace_batch = bundle.random_batch(np.random.default_rng(0), "mixed")
    return bundle, mp


def _step_feeds(mp, batch):
    from graphopt.runtime.step import StepInputs

    return StepInputs(mp)(batch)


def _run(mp, **opts):
    pm = PassManager.from_config(["capture-control-flow"],
                                 {"capture-control-flow": opts} if opts else {})
    (record,) = pm.run(mp)
    return record


def test_auto_mode_removes_every_break_and_yields_pd_op_if():
    from graphopt.models.tiny import TinyAttention

    original = TinyAttention.forward
    bundle, mp = _tiny()
    try:
        record = _run(mp)
        assert record.modified
        assert record.stats["graph_breaks_before"] > 0
        assert record.stats["graph_breaks_after"] == 0
        assert record.stats["marked"] == ["graphopt.models.tiny.TinyAttention.forward"]
        assert mp.trace.subgraphs == 1 and mp.program is not None
        layers = bundle.config.num_hidden_layers
        assert op_sequence(mp.program).count("pd_op.if") == 2 * layers
    finally:
        bundle.restore_patches(0)
    # the model's own function is untouched after the patches are undone
    assert TinyAttention.forward is original
    assert not hasattr(original, "__graphopt_marked__")


def test_explicit_mode_and_numerics_against_eager():
    bundle, mp = _tiny()
    try:
        record = _run(mp, mode="explicit", targets=["graphopt.models.tiny.TinyAttention.forward"])
        assert record.stats["graph_breaks_after"] == 0 and mp.program is not None
        rng = np.random.default_rng(3)
        for kind in ("prefill", "decode", "mixed"):  # host values change between steps
            batch = bundle.random_batch(rng, kind)
            want = bundle.step(batch, commit=False)
            got = run_program(mp.program, mp.params, _step_feeds(mp, batch))
            for w, g in zip(want, got, strict=True):
                np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    finally:
        bundle.restore_patches(0)


def test_explicit_unknown_target_is_a_config_error():
    bundle, mp = _tiny()
    with pytest.raises(ConfigError) as e:
        _run(mp, mode="explicit", targets=["graphopt.models.tiny.NoSuchLayer.forward"])
    assert "NoSuchLayer" in str(e.value)
    assert bundle.patch_checkpoint() == 0


class _Meta:
    pass


class _Plain(paddle.nn.Layer):
    """No control flow at all."""

    def __init__(self):
        super().__init__()
        self.l = paddle.nn.Linear(8, 8)

    def forward(self, x, forward_meta):
        return (paddle.tanh(self.l(x)),)


class _TopLevelIf(paddle.nn.Layer):
    """The Tensor `if` sits in the traced function itself: Paddle cannot mark that one."""

    def __init__(self):
        super().__init__()
        self.l = paddle.nn.Linear(8, 8)

    def forward(self, x, forward_meta):
        y = self.l(x)
        if forward_meta.max_len_tensor_cpu[1]:
            y = y * 2.0
        return (y,)


def _bundle(layer):
    meta = _Meta()
    meta.max_len_tensor_cpu = paddle.to_tensor([4, 4, 0], dtype="int32", place=paddle.CPUPlace())
    batch = StepBatch("prefill", (paddle.randn([4, 8]),), meta, [4], [0])
    b = ModelBundle("t", layer, meta, ("max_len_tensor_cpu",), (), None, None, None, None)
    mp = ModelProgram(model=b)
    mp.trace_batch = batch
    return b, mp


def test_negative_no_control_flow_nothing_marked():
    _, mp = _bundle(_Plain())
    record = _run(mp)
    assert not record.modified and record.stats["marked"] == []
    assert record.stats["graph_breaks_before"] == 0 and mp.trace.subgraphs == 1
    assert "pd_op.if" not in op_sequence(mp.program)


def test_top_level_if_fails_with_the_reason_and_marks_nothing():
    bundle, mp = _bundle(_TopLevelIf())
    original = _TopLevelIf.forward
    with pytest.raises(PassError) as info:
        _run(mp)
    msg = str(info.value)
    assert "\n" not in msg and "test_capture_control_flow_pass.py:" in msg
    assert "traced top-level function" in msg and "_TopLevelIf.forward" in msg
    assert bundle.patch_checkpoint() == 0 and _TopLevelIf.forward is original
