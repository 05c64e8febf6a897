"""What the trace feeds each step: every tensor a user's forward meta reaches, however nested,
and a loud warning for a tensor it cannot place (it would be frozen at its trace-time value)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle

from graphopt.ir.model_program import ModelProgram
from graphopt.ir.trace import trace_step
from graphopt.models.base import ModelBundle, StepBatch
from graphopt.runtime.step import WholeProgramStep

#: a tensor the model reads from a module global (not through the meta): SOT sees an input
_GLOBAL_SCALE = paddle.to_tensor([3.0])


@dataclass(slots=True)
class SlottedMeta:
    """A forward meta as some engines write it: slotted, per-layer (k, v) pairs, a dict."""

    kv: list
    extra: dict
    max_len_tensor_cpu: paddle.Tensor


class Nested(paddle.nn.Layer):
    def __init__(self, scale_global: bool = False):
        super().__init__()
        self.l = paddle.nn.Linear(4, 4)
        self.scale_global = scale_global

    def forward(self, x, forward_meta):
        k, v = forward_meta.kv[0]
        y = self.l(x) + k + v * forward_meta.extra["bias"]
        if self.scale_global:
            y = y * _GLOBAL_SCALE
        return (y,)


def _traced(layer):
    meta = SlottedMeta(kv=[(paddle.ones([4]), paddle.ones([4]))],
                       extra={"bias": paddle.to_tensor([0.5])},
                       max_len_tensor_cpu=paddle.to_tensor([2, 2, 0], dtype="int32"))
    batch = StepBatch("prefill", (paddle.randn([2, 4]),), meta, [2], [0])
    bundle = ModelBundle("nested", layer, meta, (), (), None, None, None, None)
    mp = ModelProgram(model=bundle)
    with paddle.no_grad():
        trace_step(mp, batch)
    return mp, batch


def test_nested_and_slotted_meta_tensors_become_feeds():
    mp, batch = _traced(Nested())
    feeds = {op.attrs()["name"] for op in mp.program.global_block().ops
             if op.name() == "pd_op.data"}
    assert {"meta.kv.0.0", "meta.kv.0.1", "meta.extra.bias"} <= feeds
    assert mp.trace.frozen_inputs == []
    # a new value in the nested meta is seen by the next step (fed, not frozen)
    step = WholeProgramStep(mp)
    batch.meta.extra["bias"] = paddle.to_tensor([2.0])
    batch.meta.kv[0] = (paddle.full([4], 5.0), paddle.ones([4]))
    with paddle.no_grad():
        want = mp.model.layer(*batch.args, batch.meta)[0].numpy()
    got = step.run(batch)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_a_tensor_reached_outside_the_meta_is_reported_as_frozen():
    mp, _ = _traced(Nested(scale_global=True))
    assert len(mp.trace.frozen_inputs) == 1
    assert mp.trace.frozen_inputs[0].endswith("[1] float32")
