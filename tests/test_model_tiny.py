"""The tiny test model: same contract as DeepSeek-V3, built and run in milliseconds."""

from __future__ import annotations

import os
import types

os.environ.setdefault("GLOG_minloglevel", "2")


import numpy as np
import paddle
import pytest
from omegaconf import OmegaConf

from graphopt.errors import ConfigError
from graphopt.models import build_model
from graphopt.models.tiny import TinyAttention
from tests.conftest import compose_cfg


@pytest.fixture
def tiny():
    return build_model(compose_cfg("model=tiny").model)


def test_contract(tiny):
    assert tiny.name == "tiny"
    assert tiny.host_inputs == ("max_len_tensor_cpu",)
    assert tiny.state_fields == ("caches.0", "caches.1")
    assert not tiny.layer.training
    for kind, seq_lens, cached in (
        ("prefill", [3, 2], [0, 0]),
        ("decode", [1, 1], [3, 2]),
        ("mixed", [2, 1], [0, 5]),
    ):
        batch = tiny.make_batch(kind, seq_lens, cached)
        outs = tiny.step(batch)
        assert outs[0].shape == (batch.num_tokens, tiny.config.vocab_size)
        assert [o.shape for o in outs[1:]] == [tuple(c.shape) for c in tiny.meta.caches]
        assert np.isfinite(outs[0]).all()


def test_seeded(tiny):
    other = build_model(OmegaConf.create({"name": "tiny", "family": "tiny", "seed": 0}))
    batch = tiny.make_batch("prefill", [3], [0])
    a = tiny.step(batch, commit=False)[0]
    b = other.step(other.make_batch("prefill", [3], [0]), commit=False)[0]
    np.testing.assert_array_equal(a, b)


def test_step_commits_state_in_place(tiny):
    cache = tiny.meta.caches[0]
    tiny.step(tiny.make_batch("prefill", [3], [0], slots=[1]))
    assert tiny.meta.caches[0] is cache
    assert np.abs(cache.numpy()[1, :3]).sum() > 0 and np.abs(cache.numpy()[1, 3:]).sum() == 0
    tiny.reset_state()
    assert tiny.meta.caches[0] is cache and not cache.numpy().any()


@pytest.mark.parametrize(("kind", "wrong_host"), [("decode", [3, 3, 0]), ("prefill", [3, 0, 3])])
def test_wrong_branch_is_visible(tiny, kind, wrong_host):
    if kind == "decode":
        tiny.step(tiny.make_batch("prefill", [2], [0]))
        batch = tiny.make_batch("decode", [1], [2])
    else:
        batch = tiny.make_batch("prefill", [3], [0])
    right = tiny.step(batch, commit=False)[0]
    tiny.meta.max_len_tensor_cpu.set_value(np.array(wrong_host, dtype=np.int32))
    wrong = tiny.step(batch, commit=False)[0]
    assert np.abs(right - wrong).max() > 1e-2


def test_pad_batch(tiny):
    batch = tiny.random_batch(np.random.default_rng(1), "mixed")
    host = tiny.meta.max_len_tensor_cpu.numpy().copy()
    real = tiny.step(batch, commit=False)
    padded = tiny.pad_batch(batch, batch.num_tokens + 3)
    out = tiny.step(padded, commit=False)
    np.testing.assert_array_equal(tiny.meta.max_len_tensor_cpu.numpy(), host)
    np.testing.assert_allclose(out[0][: batch.num_tokens], real[0], atol=1e-6, rtol=0)
    for got, want in zip(out[1:], real[1:], strict=True):  # scratch slot included
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.hiden_size"):
        build_model(OmegaConf.create({"family": "tiny", "hiden_size": 8}))


def test_traces_into_one_graph_when_marked(tiny):
    from paddle.jit.sot.symbolic.compile_cache import CompileSIRCache

    # Paddle's marker tags the function object it gets: mark a copy, not the class's own
    fn = TinyAttention.forward
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    tiny.patch(TinyAttention, "forward", paddle.jit.marker.capture_control_flow(copy))
    try:
        batch = tiny.make_batch("mixed", [2, 1], [0, 3])
        want = tiny.step(batch, commit=False)
        before = set(CompileSIRCache().cache)
        with paddle.no_grad():
            got = paddle.jit.to_static(tiny.layer.forward, full_graph=False)(*batch.args, tiny.meta)
        new = [w for k, w in CompileSIRCache().cache.items() if k not in before]
    finally:
        tiny.restore_patches()
    assert len(new) == 1
    ops = [op.name() for op in new[0].concrete_program.main_program.global_block().ops]
    assert ops.count("pd_op.if") == 4
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, atol=1e-6, rtol=0)


def test_older_batch_rebinds_the_shared_meta(tiny):
    """Building (or padding) another batch must not change what an older batch computes."""
    a = tiny.make_batch("prefill", [3, 2], [0, 0], slots=[0, 1])
    want = tiny.step(a, commit=False)[0]
    b = tiny.make_batch("decode", [1], [4], slots=[2])
    tiny.pad_batch(b, 4)
    got = tiny.step(a, commit=False)[0]
    np.testing.assert_array_equal(got, want)
    assert tiny.meta.max_len_tensor_cpu.numpy().tolist() == [3, 3, 0]
    assert tiny.meta.slot_ids.numpy().tolist() == [0, 0, 0, 1, 1]
