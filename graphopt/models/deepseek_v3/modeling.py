"""DeepSeek-V3 in Paddle dygraph. Its MLA attention picks the prefill and decode paths from the
host tensor ``forward_meta.max_len_tensor_cpu``, written in one of the forms FastDeploy's own
code has had (``model.attention_form``, see :data:`ATTENTION_FORMS`). "The seed change" below is
the FastDeploy pull request graphopt grew from: it made the whole DeepSeek-V3 decoder step one
CUDA graph by hand, computing the branch flags on the host before the step and marking the
attention for ``pd_op.if``.

* ``fastdeploy_2025`` (default): ``fmha_out = None``, ``if forward_meta.max_len_tensor_cpu[1]:``
  runs prefill and assigns it, ``if forward_meta.max_len_tensor_cpu[2]:`` runs decode and
  assigns it when still ``None``, adds to it otherwise (FastDeploy before the seed change);
* ``fastdeploy_2026``: ``need_do_prefill = forward_meta.max_len_tensor_cpu[1] > 0`` (and
  decode) computed once, ``attn_out`` assigned only inside the branches, a nested
  ``if need_do_prefill:`` in the decode branch merging both (FastDeploy today);
* ``seed``: the seed change's hand-fixed form: the engine's runner stores ``needs_prefill`` /
  ``needs_decode`` on ``forward_meta`` before the step, a separately marked
  ``prefill_or_decode`` returns the attention output, both branches reshaped alike;
* ``graphopt``: both branches add into a zero tensor defined before them (a test form).

Every form computes the same function. Making them traceable into one program is graphopt's job
(capture-control-flow, hoist-host-branch-conditions, ...), not the model's.

Sublayer and parameter names follow HF's DeepSeek-V3 checkpoint (``model.layers.0.self_attn.
q_a_proj.weight``, ...) so :mod:`models.deepseek_v3.weights` maps names one to one; Linear weights
are Paddle-style ``[in, out]`` (HF's transposed), routed experts are stacked per layer.

Rules that keep the step traceable by SOT into one program for any token count T: no host syncs
(``.numpy()``, ``.item()``, ``int(tensor)``) and no Python control flow on tensor values except the
two branch ``if``s; reshapes use ``-1`` for the token dimension; loops only over layers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from graphopt.models.deepseek_v3.config import DeepseekV3Config, yarn_get_mscale
from graphopt.models.slots import step_attention_inputs, write_cache


def _linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias_attr=False)


class RMSNorm(nn.Layer):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter(
            [dim], dtype="float32", default_initializer=nn.initializer.Constant(1.0)
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        variance = x.pow(2).mean(axis=-1, keepdim=True)
        return x * paddle.rsqrt(variance + self.eps) * self.weight


# -- rotary embedding (YaRN) -------------------------------------------------------------------


def yarn_inv_freq(config: DeepseekV3Config) -> np.ndarray:
    """RoPE inverse frequencies, YaRN-blended when ``rope_scaling`` is set (as HF DeepSeek-V3)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freq_extra = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = config.rope_scaling
    if not rs:
        return freq_extra
    factor = float(rs["factor"])
    original = float(rs["original_max_position_embeddings"])

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(float(rs["beta_fast"]))), 0)
    high = min(math.ceil(correction_dim(float(rs["beta_slow"]))), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency; 0: interpolate by `factor`
    return freq_extra / factor * (1.0 - extrapolate) + freq_extra * extrapolate


def rope_tables(config: DeepseekV3Config) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin tables [max_seq_len, qk_rope_head_dim / 2], with YaRN's cos/sin mscale."""
    t = np.arange(config.max_seq_len, dtype=np.float64)
    freqs = np.outer(t, yarn_inv_freq(config))
    mscale = 1.0
    rs = config.rope_scaling
    if rs:
        factor = float(rs["factor"])
        mscale = yarn_get_mscale(factor, float(rs.get("mscale", 1.0))) / yarn_get_mscale(
            factor, float(rs.get("mscale_all_dim", 0.0))
        )
    return (np.cos(freqs) * mscale).astype(np.float32), (np.sin(freqs) * mscale).astype(np.float32)


def apply_rope(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Rotate the interleaved pairs ``(x[2i], x[2i+1])`` of the last axis by the position angle.

    The result is laid out de-interleaved (all first, then all second components), as HF's
    DeepSeek code does before ``rotate_half``: q_pe and k_pe use the same layout, so their dot
    products — all attention needs — are those of the interleaved rotation. ``cos``/``sin`` must
    broadcast against ``x[..., ::2]``.
    """
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return paddle.concat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


# -- attention ---------------------------------------------------------------------------------


class DeepseekV3MLAAttention(nn.Layer):
    """Multi-head latent attention over a per-slot latent cache ``[c_kv | k_pe]``.

    The prefill branch expands ``k_nope | v`` from the cached latents with ``kv_b_proj``; the
    decode branch absorbs ``W_UK`` into the query and ``W_UV`` into the output and attends over
    the latents directly. Both read the cache *after* this step's rows were written, so they
    compute the same function (a decode step equals the prefill output at that position); each
    contributes only for its own tokens (device masks), and a skipped branch leaves zeros.
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.max_seq_len = config.max_seq_len
        self.latent_dim = config.latent_dim
        self.softmax_scale = config.softmax_scale
        hidden, heads = config.hidden_size, config.num_attention_heads
        if config.q_lora_rank is None:
            self.q_proj = _linear(hidden, heads * self.qk_head_dim)
        else:
            self.q_a_proj = _linear(hidden, config.q_lora_rank)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = _linear(config.q_lora_rank, heads * self.qk_head_dim)
        self.kv_a_proj_with_mqa = _linear(hidden, config.kv_lora_rank + config.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = _linear(
            config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim)
        )
        self.o_proj = _linear(heads * config.v_head_dim, hidden)

    def forward(
        self,
        hidden_states: paddle.Tensor,
        cache: paddle.Tensor,
        rope_cos: paddle.Tensor,
        rope_sin: paddle.Tensor,
        write_index: paddle.Tensor,
        slot_ids: paddle.Tensor,
        attn_bias: paddle.Tensor,
        prefill_mask: paddle.Tensor,
        decode_mask: paddle.Tensor,
        forward_meta: Any,
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """One layer's attention for T tokens; returns ``(output [T, hidden], new cache)``."""
        q_nope, q_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, rope_cos, rope_sin, write_index, slot_ids, prefill_mask,
            decode_mask)
        fmha_out = paddle.zeros_like(prefill_mask).tile([1, self.num_heads * self.v_head_dim])
        if forward_meta.max_len_tensor_cpu[1]:  # prefill tokens present
            prefill_out = self.forward_prefill(q_nope, q_pe, kv_ctx, attn_bias)
            fmha_out = fmha_out + prefill_out * prefill_mask
        if forward_meta.max_len_tensor_cpu[2]:  # decode tokens present
            decode_out = self.forward_decode(q_nope, q_pe, kv_ctx, attn_bias)
            fmha_out = fmha_out + decode_out * decode_mask
        return self.o_proj(fmha_out), new_cache

    def project(
        self,
        hidden_states: paddle.Tensor,
        cache: paddle.Tensor,
        rope_cos: paddle.Tensor,
        rope_sin: paddle.Tensor,
        write_index: paddle.Tensor,
        slot_ids: paddle.Tensor,
        prefill_mask: paddle.Tensor,
        decode_mask: paddle.Tensor,
    ) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Query and latent projections, RoPE, this step's cache rows written; returns
        ``(q_nope, q_pe, kv_ctx [T, S, latent], new cache)``."""
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.reshape([-1, self.num_heads, self.qk_head_dim])
        q_nope, q_pe = paddle.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], axis=-1)
        q_pe = apply_rope(q_pe, rope_cos.unsqueeze(1), rope_sin.unsqueeze(1))

        compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
        c_kv, k_pe = paddle.split(
            compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], axis=-1
        )
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe, rope_cos, rope_sin)

        # Write this step's latents first, outside the branches: both branches then read the
        # cache including the current tokens (token at position p sees rows 0..p of its slot).
        new_cache = write_cache(
            cache,
            write_index,
            paddle.concat([c_kv, k_pe], axis=-1),
            prefill_mask + decode_mask,
            self.max_seq_len,
            self.latent_dim,
        )
        kv_ctx = paddle.gather(new_cache, slot_ids)  # [T, S, kv_lora_rank + qk_rope_head_dim]
        return q_nope, q_pe, kv_ctx, new_cache

    def forward_prefill(
        self,
        q_nope: paddle.Tensor,
        q_pe: paddle.Tensor,
        kv_ctx: paddle.Tensor,
        attn_bias: paddle.Tensor,
    ) -> paddle.Tensor:
        """Expanded MLA: ``k_nope | v = kv_b_proj(c_kv)`` per cached row, then plain attention."""
        c_ctx, kpe_ctx = paddle.split(kv_ctx, [self.kv_lora_rank, self.qk_rope_head_dim], axis=-1)
        kv = self.kv_b_proj(c_ctx).reshape(
            [-1, self.max_seq_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim]
        )
        k_nope, v = paddle.split(kv, [self.qk_nope_head_dim, self.v_head_dim], axis=-1)
        # [T, H, 1, dn] @ [T, H, dn, S] -> [T, H, S]; k_pe is shared by all heads.
        scores = paddle.matmul(q_nope.unsqueeze(2), k_nope.transpose([0, 2, 3, 1])).squeeze(2)
        scores = scores + paddle.matmul(q_pe, kpe_ctx, transpose_y=True)
        probs = F.softmax(scores * self.softmax_scale + attn_bias, axis=-1)
        out = paddle.matmul(probs.unsqueeze(2), v.transpose([0, 2, 1, 3])).squeeze(2)  # [T, H, dv]
        return out.reshape([-1, self.num_heads * self.v_head_dim])

    def forward_decode(
        self,
        q_nope: paddle.Tensor,
        q_pe: paddle.Tensor,
        kv_ctx: paddle.Tensor,
        attn_bias: paddle.Tensor,
    ) -> paddle.Tensor:
        """Absorbed MLA: ``q_nope·W_UK`` and ``(probs·c_kv)·W_UV``; attends over latents only."""
        w = self.kv_b_proj.weight.reshape(
            [self.kv_lora_rank, self.num_heads, self.qk_nope_head_dim + self.v_head_dim]
        )
        w_uk, w_uv = paddle.split(w, [self.qk_nope_head_dim, self.v_head_dim], axis=-1)
        # [H, T, dn] @ [H, dn, r] -> [H, T, r] -> [T, H, r]
        q_latent = paddle.matmul(q_nope.transpose([1, 0, 2]), w_uk.transpose([1, 2, 0]))
        q_full = paddle.concat([q_latent.transpose([1, 0, 2]), q_pe], axis=-1)
        scores = paddle.matmul(q_full, kv_ctx, transpose_y=True)  # [T, H, S]
        probs = F.softmax(scores * self.softmax_scale + attn_bias, axis=-1)
        o_latent = paddle.matmul(probs, kv_ctx[:, :, : self.kv_lora_rank])  # [T, H, r]
        # [H, T, r] @ [H, r, dv] -> [H, T, dv] -> [T, H, dv]
        out = paddle.matmul(o_latent.transpose([1, 0, 2]), w_uv.transpose([1, 0, 2]))
        return out.transpose([1, 0, 2]).reshape([-1, self.num_heads * self.v_head_dim])


def merge_prefill_decode_output(
    attn_out: paddle.Tensor,
    fmqa_out: paddle.Tensor,
    prefill_mask: paddle.Tensor,
    decode_mask: paddle.Tensor,
) -> paddle.Tensor:
    """FastDeploy merges the decode tokens' rows into the prefill output with one op."""
    return attn_out * prefill_mask + fmqa_out * decode_mask


class FastDeploy2025MLAAttention(DeepseekV3MLAAttention):
    """FastDeploy's MLA before the seed change: accumulate-with-None."""

    def forward(self, hidden_states, cache, rope_cos, rope_sin, write_index, slot_ids, attn_bias,
                prefill_mask, decode_mask, forward_meta):
        q_nope, q_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, rope_cos, rope_sin, write_index, slot_ids, prefill_mask,
            decode_mask)
        fmha_out = None
        if forward_meta.max_len_tensor_cpu[1]:  # max_enc_len_this_time
            fmha_out = self.forward_prefill(q_nope, q_pe, kv_ctx, attn_bias) * prefill_mask
        if forward_meta.max_len_tensor_cpu[2]:  # max_dec_len_this_time
            fmqa_out = self.forward_decode(q_nope, q_pe, kv_ctx, attn_bias) * decode_mask
            if fmha_out is None:
                fmha_out = fmqa_out
            else:
                fmha_out = fmha_out + fmqa_out
        return self.o_proj(fmha_out), new_cache


class FastDeploy2026MLAAttention(DeepseekV3MLAAttention):
    """FastDeploy's MLA today: flags computed once, outputs assigned only in the branches."""

    def forward(self, hidden_states, cache, rope_cos, rope_sin, write_index, slot_ids, attn_bias,
                prefill_mask, decode_mask, forward_meta):
        q_nope, q_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, rope_cos, rope_sin, write_index, slot_ids, prefill_mask,
            decode_mask)
        need_do_prefill = forward_meta.max_len_tensor_cpu[1] > 0
        need_do_decode = forward_meta.max_len_tensor_cpu[2] > 0
        if need_do_prefill:  # max_enc_len_this_time
            fmha_out = self.forward_prefill(q_nope, q_pe, kv_ctx, attn_bias)
            attn_out = fmha_out
        if need_do_decode:  # max_dec_len_this_time
            fmqa_out = self.forward_decode(q_nope, q_pe, kv_ctx, attn_bias)
            if need_do_prefill:
                attn_out = merge_prefill_decode_output(attn_out, fmqa_out, prefill_mask,
                                                       decode_mask)
            else:
                attn_out = fmqa_out
        return self.o_proj(attn_out), new_cache


class SeedMLAAttention(DeepseekV3MLAAttention):
    """The seed change: flags on forward_meta (set by the engine's runner, see
    :func:`set_branch_flags`), the branches in a separately marked function."""

    @paddle.jit.marker.capture_control_flow
    def prefill_or_decode(self, q_nope, q_pe, kv_ctx, attn_bias, prefill_mask, decode_mask,
                          forward_meta):
        fmha_out = paddle.zeros_like(prefill_mask).tile([1, self.num_heads * self.v_head_dim])
        if forward_meta.needs_prefill:
            fmha_out_prefill = self.forward_prefill(q_nope, q_pe, kv_ctx, attn_bias)
            fmha_out_prefill = fmha_out_prefill.reshape([-1, self.num_heads * self.v_head_dim])
            fmha_out = fmha_out + fmha_out_prefill * prefill_mask
        if forward_meta.needs_decode:
            fmqa_out = self.forward_decode(q_nope, q_pe, kv_ctx, attn_bias)
            fmqa_out = fmqa_out.reshape([-1, self.num_heads * self.v_head_dim])
            fmha_out = fmha_out + fmqa_out * decode_mask
        return fmha_out

    def forward(self, hidden_states, cache, rope_cos, rope_sin, write_index, slot_ids, attn_bias,
                prefill_mask, decode_mask, forward_meta):
        q_nope, q_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, rope_cos, rope_sin, write_index, slot_ids, prefill_mask,
            decode_mask)
        fmha_out = self.prefill_or_decode(q_nope, q_pe, kv_ctx, attn_bias, prefill_mask,
                                          decode_mask, forward_meta)
        return self.o_proj(fmha_out), new_cache


def set_branch_flags(forward_meta: Any) -> None:
    """What the seed change's engine runner computes on the host before each step."""
    forward_meta.needs_prefill = forward_meta.max_len_tensor_cpu[1] > 0
    forward_meta.needs_decode = forward_meta.max_len_tensor_cpu[2] > 0


#: ``model.attention_form`` -> the attention Layer written in that form
ATTENTION_FORMS: dict[str, type[DeepseekV3MLAAttention]] = {
    "fastdeploy_2025": FastDeploy2025MLAAttention,
    "fastdeploy_2026": FastDeploy2026MLAAttention,
    "seed": SeedMLAAttention,
    "graphopt": DeepseekV3MLAAttention,
}


# -- feed-forward ------------------------------------------------------------------------------


class DeepseekV3MLP(nn.Layer):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = _linear(hidden_size, intermediate_size)
        self.up_proj = _linear(hidden_size, intermediate_size)
        self.down_proj = _linear(intermediate_size, hidden_size)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Layer):
    """noaux_tc router: sigmoid scores, bias-corrected group-limited top-k, normalised, scaled.

    Returns the dense combine matrix ``[T, n_routed_experts]`` (zero outside each token's top-k),
    built with topk / one_hot / take_along_axis: no host sync, no data-dependent Python control
    flow, so routing stays inside the traced program.
    """

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        # Paddle layout [hidden, experts] (HF's [experts, hidden] transposed on load).
        self.weight = self.create_parameter([config.hidden_size, self.n_experts], dtype="float32")
        self.e_score_correction_bias = self.create_parameter(
            [self.n_experts], dtype="float32", default_initializer=nn.initializer.Constant(0.0)
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        scores = F.sigmoid(paddle.matmul(x, self.weight))  # [T, E]
        # The correction bias steers which experts are chosen, never their weights.
        choice = scores + self.e_score_correction_bias
        per_group = self.n_experts // self.n_group
        grouped = choice.reshape([-1, self.n_group, per_group])
        # A group's score is the sum of its best two experts (one if the group has one expert).
        group_scores = paddle.topk(grouped, k=min(2, per_group), axis=-1)[0].sum(axis=-1)
        group_idx = paddle.topk(group_scores, k=self.topk_group, axis=-1)[1]  # [T, topk_group]
        group_mask = F.one_hot(group_idx, self.n_group).sum(axis=1)  # [T, n_group], 0/1
        expert_mask = group_mask.unsqueeze(-1).tile([1, 1, per_group]).reshape([-1, self.n_experts])
        masked = paddle.where(expert_mask > 0, choice, paddle.full_like(choice, float("-inf")))
        topk_idx = paddle.topk(masked, k=self.top_k, axis=-1)[1]  # [T, K]
        # Weights of the chosen experts, scattered into [T, E] via a 0/1 mask rather than
        # take_along_axis: in static mode that bakes the trace-time T into a broadcast.
        chosen = F.one_hot(topk_idx, self.n_experts).sum(axis=1)  # [T, E], 0/1
        weights = scores * chosen
        if self.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor


class DeepseekV3Experts(nn.Layer):
    """The routed experts' SwiGLU weights, stacked: ``gate_proj``/``up_proj`` [E, hidden, I],
    ``down_proj`` [E, I, hidden] (HF's ``experts.{i}.*_proj.weight``, transposed)."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = self.create_parameter([e, h, i], dtype="float32")
        self.up_proj = self.create_parameter([e, h, i], dtype="float32")
        self.down_proj = self.create_parameter([e, i, h], dtype="float32")

    def forward(self, x: paddle.Tensor, combine: paddle.Tensor) -> paddle.Tensor:
        """``sum_e combine[:, e] * expert_e(x)``.

        Every expert runs densely over all T tokens and the [T, E] combine matrix (zero for
        unselected experts) mixes them: E times the FLOPs of a grouped dispatch, but shapes are
        static and there is no gather/scatter by expert — fine for a small CPU model.
        """
        xe = x.unsqueeze(0)  # [1, T, hidden] broadcasts over experts
        h = F.silu(paddle.matmul(xe, self.gate_proj)) * paddle.matmul(xe, self.up_proj)
        y = paddle.matmul(h, self.down_proj)  # [E, T, hidden]
        return (y * combine.transpose([1, 0]).unsqueeze(-1)).sum(axis=0)


class DeepseekV3MoE(nn.Layer):
    """Routed experts (via :class:`MoEGate`) plus always-on shared experts."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.gate = MoEGate(config)
        self.experts = DeepseekV3Experts(config)
        self.shared_experts = (
            DeepseekV3MLP(
                config.hidden_size, config.moe_intermediate_size * config.n_shared_experts
            )
            if config.n_shared_experts
            else None
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


# -- decoder -----------------------------------------------------------------------------------


class DeepseekV3DecoderLayer(nn.Layer):
    """Pre-norm residual block: MLA attention, then a dense MLP or the MoE."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = ATTENTION_FORMS[config.attention_form](config, layer_idx)
        self.mlp = (
            DeepseekV3MoE(config)
            if config.is_moe_layer(layer_idx)
            else DeepseekV3MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden_states: paddle.Tensor, cache: paddle.Tensor, *attn_inputs: Any
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """``attn_inputs``: the attention's arguments after ``cache`` (forward_meta last)."""
        residual = hidden_states
        attn_out, new_cache = self.self_attn(
            self.input_layernorm(hidden_states), cache, *attn_inputs
        )
        hidden_states = residual + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, new_cache


class DeepseekV3Model(nn.Layer):
    """Embeddings, decoder layers, final norm; owns the RoPE tables."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList(
            [DeepseekV3DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        cos, sin = rope_tables(config)
        # Buffers, not parameters: derived from the config, never in a checkpoint.
        self.register_buffer("rope_cos", paddle.to_tensor(cos), persistable=False)
        self.register_buffer("rope_sin", paddle.to_tensor(sin), persistable=False)

    def forward(
        self, input_ids: paddle.Tensor, positions: paddle.Tensor, forward_meta: Any
    ) -> tuple[paddle.Tensor, list[paddle.Tensor]]:
        hidden_states = self.embed_tokens(input_ids)
        rope_cos = paddle.gather(self.rope_cos, positions)  # [T, rope/2]
        rope_sin = paddle.gather(self.rope_sin, positions)
        step_inputs = step_attention_inputs(positions, forward_meta, self.config.max_seq_len)
        new_caches = []
        for i, layer in enumerate(self.layers):
            hidden_states, cache = layer(
                hidden_states,
                forward_meta.caches[i],
                rope_cos,
                rope_sin,
                *step_inputs,
                forward_meta,
            )
            new_caches.append(cache)
        return self.norm(hidden_states), new_caches


class DeepseekV3ForCausalLM(nn.Layer):
    """The decoder step graphopt optimizes: ``forward(input_ids, positions, forward_meta)``."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config)
        self.lm_head = _linear(config.hidden_size, config.vocab_size)

    def forward(
        self, input_ids: paddle.Tensor, positions: paddle.Tensor, forward_meta: Any
    ) -> tuple[paddle.Tensor, ...]:
        """One step over T tokens: ``(logits [T, vocab], *new_caches)`` (caches not mutated)."""
        hidden_states, new_caches = self.model(input_ids, positions, forward_meta)
        return (self.lm_head(hidden_states), *new_caches)
