"""DeepSeek-V3 model numerics: MLA paths agree, MoE routing, mixed and padded batches, tracing."""

from __future__ import annotations

import os
import types

os.environ.setdefault("GLOG_minloglevel", "2")


import numpy as np
import paddle
import pytest
from omegaconf import OmegaConf

from graphopt.models import build_model
from graphopt.models.deepseek_v3.config import resolve_config
from graphopt.models.deepseek_v3.modeling import DeepseekV3MLAAttention, MoEGate
from tests.conftest import compose_cfg

ATOL = 2e-5


def dsv3_cfg(**overrides):
    """The default dsv3 model node as the builder gets it, with keys replaced."""
    cfg = OmegaConf.to_container(compose_cfg("model=dsv3").model)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def bundle():
    return build_model(dsv3_cfg())


def caches(b) -> list[np.ndarray]:
    return [c.numpy().copy() for c in b.meta.caches]


def test_bundle_contract(bundle):
    cfg = bundle.config
    assert bundle.host_inputs == ("max_len_tensor_cpu",)
    assert bundle.state_fields == tuple(f"caches.{i}" for i in range(cfg.num_hidden_layers))
    assert not bundle.layer.training
    assert bundle.meta.max_len_tensor_cpu.place.is_cpu_place()
    assert bundle.meta.max_len_tensor_cpu.dtype == paddle.int32
    assert bundle.meta.caches[0].shape == [cfg.max_num_seqs + 1, cfg.max_seq_len, cfg.latent_dim]
    batch = bundle.make_batch("mixed", [3, 1], [0, 5])
    assert bundle.meta.max_len_tensor_cpu.numpy().tolist() == [6, 3, 6]
    outs = bundle.step(batch, commit=False)
    assert outs[0].shape == (4, cfg.vocab_size)
    assert len(outs) == 1 + cfg.num_hidden_layers


def test_decode_step_equals_prefill_output(bundle):
    """Absorbed MLA (decode) at position t == expanded MLA (prefill) at position t."""
    n, slot = 9, 3
    bundle.reset_state()
    full = bundle.step(bundle.make_batch("prefill", [n], [0], slots=[slot]))
    full_cache = caches(bundle)
    bundle.reset_state()
    bundle.step(bundle.make_batch("prefill", [4], [0], slots=[slot]))
    for t in range(4, n):
        logits = bundle.step(bundle.make_batch("decode", [1], [t], slots=[slot]))[0]
        np.testing.assert_allclose(logits[0], full[0][t], atol=ATOL, rtol=0)
    for got, want in zip(caches(bundle), full_cache, strict=True):
        np.testing.assert_allclose(got[slot, :n], want[slot, :n], atol=ATOL, rtol=0)


def test_skipped_branch_is_visible(bundle):
    """A decode step with the decode branch switched off must change the output (no silent
    agreement between 'branch ran' and 'branch skipped')."""
    bundle.reset_state()
    bundle.step(bundle.make_batch("prefill", [5], [0], slots=[0]))
    batch = bundle.make_batch("decode", [1], [5], slots=[0])
    right = bundle.step(batch, commit=False)[0]
    bundle.meta.max_len_tensor_cpu.set_value(np.array([6, 6, 0], dtype=np.int32))  # wrong branch
    wrong = bundle.step(batch, commit=False)[0]
    assert np.abs(right - wrong).max() > 1e-2


def test_mixed_batch_equals_separate_batches(bundle):
    bundle.reset_state()
    bundle.step(bundle.make_batch("prefill", [6, 3], [0, 0], slots=[1, 4]))
    start = caches(bundle)
    mixed = bundle.step(
        bundle.make_batch("mixed", [1, 5, 1], [6, 0, 3], slots=[1, 2, 4]), commit=False
    )
    prefill = bundle.step(bundle.make_batch("prefill", [5], [0], slots=[2]), commit=False)
    decode = bundle.step(bundle.make_batch("decode", [1, 1], [6, 3], slots=[1, 4]), commit=False)
    logits = mixed[0]
    np.testing.assert_allclose(logits[1:6], prefill[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[[0, 6]], decode[0], atol=ATOL, rtol=0)
    for layer, cache in enumerate(mixed[1:]):
        np.testing.assert_allclose(cache[2, :5], prefill[1 + layer][2, :5], atol=ATOL, rtol=0)
        np.testing.assert_allclose(cache[1, 6], decode[1 + layer][1, 6], atol=ATOL, rtol=0)
        # rows no sequence wrote are untouched
        np.testing.assert_array_equal(cache[5:], start[layer][5:])


@pytest.mark.parametrize("kind", ["prefill", "decode", "mixed"])
def test_padded_batch_keeps_real_outputs_and_cache_rows(bundle, kind):
    rng = np.random.default_rng(7)
    bundle.reset_state()
    bundle.step(bundle.make_batch("prefill", [8] * 4, [0] * 4, slots=[0, 1, 2, 3]))
    batch = bundle.random_batch(rng, kind)
    host = bundle.meta.max_len_tensor_cpu.numpy().copy()
    real = bundle.step(batch, commit=False)
    t = batch.num_tokens
    padded = bundle.pad_batch(batch, t + 5)
    assert padded.num_tokens == t + 5 and padded.num_real_tokens == t
    assert padded.args[0].shape == [t + 5]
    np.testing.assert_array_equal(bundle.meta.max_len_tensor_cpu.numpy(), host)
    out = bundle.step(padded, commit=False)
    # Not bit-equal: BLAS blocks a T-row matmul differently from a (T+5)-row one.
    np.testing.assert_allclose(out[0][:t], real[0], atol=ATOL, rtol=0)
    # Whole caches, scratch slot included: padding writes its rows back unchanged.
    for got, want in zip(out[1:], real[1:], strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    scratch = bundle.config.max_num_seqs
    np.testing.assert_array_equal(out[1][scratch], bundle.meta.caches[0].numpy()[scratch])


def test_random_batches_are_valid(bundle):
    rng = np.random.default_rng(0)
    for kind in ("prefill", "decode", "mixed"):
        for _ in range(5):
            batch = bundle.random_batch(rng, kind)
            host = bundle.meta.max_len_tensor_cpu.numpy()
            assert bool(host[1]) == (kind != "decode")
            assert bool(host[2]) == (kind != "prefill")
            assert batch.args[0].shape == [batch.num_tokens]


def test_bad_batches_raise(bundle):
    with pytest.raises(ValueError, match="decode sequences"):
        bundle.make_batch("decode", [3], [0])
    with pytest.raises(ValueError, match="max_seq_len"):
        bundle.make_batch("prefill", [bundle.config.max_seq_len + 1], [0])
    with pytest.raises(ValueError, match="distinct"):
        bundle.make_batch("prefill", [1, 1], [0, 0], slots=[2, 2])


# -- MoE routing against numpy --------------------------------------------------------------


def np_route(x, w, bias, n_group, topk_group, top_k, norm, scale):
    """DeepSeek-V3 noaux_tc routing, written plainly in numpy (per token)."""
    t, e = x.shape[0], w.shape[1]
    scores = 1.0 / (1.0 + np.exp(-(x @ w)))
    choice = scores + bias
    per = e // n_group
    out = np.zeros([t, e], dtype=np.float64)
    for i in range(t):
        groups = choice[i].reshape(n_group, per)
        gscore = np.sort(groups, axis=-1)[:, ::-1][:, : min(2, per)].sum(-1)
        keep = np.argsort(-gscore, kind="stable")[:topk_group]
        cand = np.full(e, -np.inf)
        for g in keep:
            cand[g * per : (g + 1) * per] = choice[i, g * per : (g + 1) * per]
        idx = np.argsort(-cand, kind="stable")[:top_k]
        wts = scores[i, idx]
        if norm:
            wts = wts / wts.sum()
        out[i, idx] = wts * scale
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_moe_routing_matches_numpy(norm):
    config = resolve_config(
        dsv3_cfg(
            hidden_size=16,
            n_routed_experts=8,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=3,
            norm_topk_prob=norm,
        )
    )
    gate = MoEGate(config)
    rng = np.random.default_rng(3)
    x = rng.normal(size=[32, 16]).astype(np.float32)
    w = rng.normal(size=[16, 8]).astype(np.float32)
    bias = rng.normal(scale=0.5, size=[8]).astype(np.float32)
    gate.weight.set_value(w)
    gate.e_score_correction_bias.set_value(bias)
    got = gate(paddle.to_tensor(x)).numpy()
    want = np_route(x, w, bias, 4, 2, 3, norm, config.routed_scaling_factor)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert ((got > 0).sum(-1) == 3).all()
    # The bias changes which experts are picked (so the test exercises it) ...
    unbiased = np_route(x, w, np.zeros(8, np.float32), 4, 2, 3, norm, config.routed_scaling_factor)
    assert ((want > 0) != (unbiased > 0)).any()
    # ... but never the weights: chosen weights come from the unbiased sigmoid scores.
    scores = 1.0 / (1.0 + np.exp(-(x @ w)))
    if not norm:
        sel = got > 0
        np.testing.assert_allclose(got[sel], scores[sel] * config.routed_scaling_factor, rtol=1e-5)


# -- tracing ------------------------------------------------------------------------------


def test_marked_attention_traces_into_one_graph():
    """With the attention forward marked, SOT gives one graph with two pd_op.if per layer."""
    from paddle.jit.sot.symbolic.compile_cache import CompileSIRCache

    b = build_model(dsv3_cfg(num_hidden_layers=2, attention_form="graphopt"))
    fn = DeepseekV3MLAAttention.forward
    # Paddle's marker tags the function object it gets: mark a copy, not the class's own
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    b.patch(DeepseekV3MLAAttention, "forward", paddle.jit.marker.capture_control_flow(copy))
    try:
        batch = b.make_batch("mixed", [3, 1], [0, 4])
        want = b.step(batch, commit=False)
        before = set(CompileSIRCache().cache)
        with paddle.no_grad():
            got = paddle.jit.to_static(b.layer.forward, full_graph=False)(*batch.args, b.meta)
        new = [w for k, w in CompileSIRCache().cache.items() if k not in before]
    finally:
        b.restore_patches()
    assert len(new) == 1
    ops = [op.name() for op in new[0].concrete_program.main_program.global_block().ops]
    assert ops.count("pd_op.if") == 4
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, atol=1e-5, rtol=0)
