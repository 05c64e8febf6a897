"""FastDeploy-style DeepSeek-V3 models written outside graphopt, in the branch shapes FastDeploy's
own MLA code has had. graphopt must take each one unedited.

Only the public model contract is used (``graphopt.models.slots``). The attention forms:

* ``fd2025``: ``fmha_out = None``; ``if forward_meta.max_len_tensor_cpu[1]:`` assigns it; ``if
  forward_meta.max_len_tensor_cpu[2]:`` assigns it when still ``None`` and adds to it otherwise
  (FastDeploy before the seed change);
* ``fd2026``: ``need_do_prefill = forward_meta.max_len_tensor_cpu[1] > 0`` (and decode) computed
  once, ``attn_out`` assigned only inside the branches, a nested ``if need_do_prefill:`` in the
  decode branch merging both results (FastDeploy today);
* ``seed``: the flags stored on ``forward_meta`` by the caller (the engine's runner, before
  the step), a separately marked
  ``prefill_or_decode`` returning the attention output, both branch outputs reshaped alike
  (the seed change's hand-fixed form);
* ``mask_both``: a meta tensor (the per-token decode mask) read outside and inside the Tensor
  ifs of the attention function;
* ``token_shape``: branch-defined tensors whose token dimension is not the first one;
* ``unsupported``: a pattern graphopt cannot make exact (``is None`` used for a concat), which
  must fail as one line naming this file's line and Paddle's reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from graphopt.models.slots import slot_model_bundle, step_attention_inputs, write_cache

HEADS, NOPE, ROPE, V, RANK = 2, 8, 4, 8, 8
LATENT = RANK + ROPE


class RMSNorm(nn.Layer):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * paddle.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * self.weight


def merge_prefill_decode_output(attn_out, fmqa_out, prefill_mask, decode_mask):
    """FastDeploy merges the decode tokens' rows into the prefill output with one op."""
    return attn_out * prefill_mask + fmqa_out * decode_mask


class MLABase(nn.Layer):
    """Projections, cache write and the two attention paths; subclasses pick the branch form."""

    def __init__(self, hidden: int, max_seq_len: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.q_proj = nn.Linear(hidden, HEADS * (NOPE + ROPE), bias_attr=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, RANK + ROPE, bias_attr=False)
        self.kv_a_layernorm = RMSNorm(RANK)
        self.kv_b_proj = nn.Linear(RANK, HEADS * (NOPE + V), bias_attr=False)
        self.o_proj = nn.Linear(HEADS * V, hidden, bias_attr=False)
        self.scale = (NOPE + ROPE) ** -0.5

    def project(self, hidden_states, cache, write_index, slot_ids, prefill_mask, decode_mask):
        q = self.q_proj(hidden_states).reshape([-1, HEADS, NOPE + ROPE])
        query_nope, query_pe = paddle.split(q, [NOPE, ROPE], axis=-1)
        c_kv, k_pe = paddle.split(self.kv_a_proj_with_mqa(hidden_states), [RANK, ROPE], axis=-1)
        compressed_kv = self.kv_a_layernorm(c_kv)
        new_cache = write_cache(cache, write_index, paddle.concat([compressed_kv, k_pe], -1),
                                prefill_mask + decode_mask, self.max_seq_len, LATENT)
        return query_nope, query_pe, paddle.gather(new_cache, slot_ids), new_cache

    def prefill(self, query_nope, query_pe, kv_ctx, attn_bias):
        """Expanded MLA: k_nope | v from kv_b_proj per cached row, then plain attention."""
        c_ctx, kpe_ctx = paddle.split(kv_ctx, [RANK, ROPE], axis=-1)
        kv = self.kv_b_proj(c_ctx).reshape([-1, self.max_seq_len, HEADS, NOPE + V])
        key_nope, value = paddle.split(kv, [NOPE, V], axis=-1)
        scores = paddle.matmul(query_nope.unsqueeze(2), key_nope.transpose([0, 2, 3, 1])).squeeze(2)
        scores = scores + paddle.matmul(query_pe, kpe_ctx, transpose_y=True)
        probs = F.softmax(scores * self.scale + attn_bias, axis=-1)
        out = paddle.matmul(probs.unsqueeze(2), value.transpose([0, 2, 1, 3])).squeeze(2)
        return out.reshape([-1, HEADS * V])

    def decode(self, query_nope, query_pe, kv_ctx, attn_bias):
        """Absorbed MLA: attends over the latent cache rows only."""
        w = self.kv_b_proj.weight.reshape([RANK, HEADS, NOPE + V])
        w_uk, w_uv = paddle.split(w, [NOPE, V], axis=-1)
        q_latent = paddle.matmul(query_nope.transpose([1, 0, 2]), w_uk.transpose([1, 2, 0]))
        q_input = paddle.concat([q_latent.transpose([1, 0, 2]), query_pe], axis=-1)
        probs = F.softmax(paddle.matmul(q_input, kv_ctx, transpose_y=True) * self.scale
                          + attn_bias, axis=-1)
        o_latent = paddle.matmul(probs, kv_ctx[:, :, :RANK])
        out = paddle.matmul(o_latent.transpose([1, 0, 2]), w_uv.transpose([1, 0, 2]))
        return out.transpose([1, 0, 2]).reshape([-1, HEADS * V])


class MLA2025(MLABase):
    def forward(self, hidden_states, cache, write_index, slot_ids, attn_bias, prefill_mask,
                decode_mask, forward_meta):
        query_nope, query_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, write_index, slot_ids, prefill_mask, decode_mask)
        fmha_out = None
        if forward_meta.max_len_tensor_cpu[1]:  # max_enc_len_this_time
            fmha_out = self.prefill(query_nope, query_pe, kv_ctx, attn_bias) * prefill_mask
        if forward_meta.max_len_tensor_cpu[2]:  # max_dec_len_this_time
            fmqa_out = self.decode(query_nope, query_pe, kv_ctx, attn_bias) * decode_mask
            if fmha_out is None:
                fmha_out = fmqa_out
            else:
                fmha_out = fmha_out + fmqa_out
        return self.o_proj(fmha_out), new_cache


class MLA2026(MLABase):
    def forward(self, hidden_states, cache, write_index, slot_ids, attn_bias, prefill_mask,
                decode_mask, forward_meta):
        query_nope, query_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, write_index, slot_ids, prefill_mask, decode_mask)
        need_do_prefill = forward_meta.max_len_tensor_cpu[1] > 0
        need_do_decode = forward_meta.max_len_tensor_cpu[2] > 0
        if need_do_prefill:  # max_enc_len_this_time
            fmha_out = self.prefill(query_nope, query_pe, kv_ctx, attn_bias)
            attn_out = fmha_out
        if need_do_decode:  # max_dec_len_this_time
            fmqa_out = self.decode(query_nope, query_pe, kv_ctx, attn_bias)
            if need_do_prefill:
                attn_out = merge_prefill_decode_output(attn_out, fmqa_out, prefill_mask,
                                                       decode_mask)
            else:
                attn_out = fmqa_out
        return self.o_proj(attn_out), new_cache


class MLASeed(MLABase):
    """The seed change: flags on forward_meta (set by the caller), a marked branch function."""

    @paddle.jit.marker.capture_control_flow
    def prefill_or_decode(self, query_nope, query_pe, kv_ctx, attn_bias, prefill_mask,
                          decode_mask, forward_meta):
        fmha_out = paddle.zeros_like(prefill_mask).tile([1, HEADS * V])
        if forward_meta.needs_prefill:
            fmha_out_prefill = self.prefill(query_nope, query_pe, kv_ctx, attn_bias)
            fmha_out_prefill = fmha_out_prefill.reshape([-1, HEADS * V])
            fmha_out = fmha_out + fmha_out_prefill * prefill_mask
        if forward_meta.needs_decode:
            fmqa_out = self.decode(query_nope, query_pe, kv_ctx, attn_bias)
            fmqa_out = fmqa_out.reshape([-1, HEADS * V])
            fmha_out = fmha_out + fmqa_out * decode_mask
        return fmha_out

    def forward(self, hidden_states, cache, write_index, slot_ids, attn_bias, prefill_mask,
                decode_mask, forward_meta):
        query_nope, query_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, write_index, slot_ids, prefill_mask, decode_mask)
        fmha_out = self.prefill_or_decode(query_nope, query_pe, kv_ctx, attn_bias, prefill_mask,
                                          decode_mask, forward_meta)
        return self.o_proj(fmha_out), new_cache


class MLAMaskBoth(MLABase):
    """Reads forward_meta.is_decode outside the Tensor ifs and again inside one."""

    def forward(self, hidden_states, cache, write_index, slot_ids, attn_bias, prefill_mask,
                decode_mask, forward_meta):
        token_is_decode = forward_meta.is_decode.unsqueeze(-1)  # outside the branches
        query_nope, query_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, write_index, slot_ids, prefill_mask, token_is_decode)
        attn_out = paddle.zeros_like(prefill_mask).tile([1, HEADS * V])
        if forward_meta.max_len_tensor_cpu[1]:
            attn_out = attn_out + self.prefill(query_nope, query_pe, kv_ctx, attn_bias) \
                * prefill_mask
        if forward_meta.max_len_tensor_cpu[2]:
            attn_out = attn_out + self.decode(query_nope, query_pe, kv_ctx, attn_bias) \
                * forward_meta.is_decode.unsqueeze(-1)  # and inside one
        return self.o_proj(attn_out), new_cache


class MLATokenShape(MLABase):
    """Branch-only tensors whose token dimension is not the first one ([H, T, dv])."""

    def forward(self, hidden_states, cache, write_index, slot_ids, attn_bias, prefill_mask,
                decode_mask, forward_meta):
        query_nope, query_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, write_index, slot_ids, prefill_mask, decode_mask)
        need_do_prefill = forward_meta.max_len_tensor_cpu[1] > 0
        need_do_decode = forward_meta.max_len_tensor_cpu[2] > 0
        if need_do_prefill:
            heads_first = (self.prefill(query_nope, query_pe, kv_ctx, attn_bias) * prefill_mask)
            heads_first = heads_first.reshape([-1, HEADS, V]).transpose([1, 0, 2])
        if need_do_decode:
            dec = (self.decode(query_nope, query_pe, kv_ctx, attn_bias) * decode_mask)
            dec = dec.reshape([-1, HEADS, V]).transpose([1, 0, 2])
            if need_do_prefill:
                heads_first = heads_first + dec
            else:
                heads_first = dec
        out = heads_first.transpose([1, 0, 2]).reshape([-1, HEADS * V])
        return self.o_proj(out), new_cache


class MLAUnsupported(MLABase):
    """`is None` decides a concat: exactness cannot be kept by pre-defining the variable."""

    def forward(self, hidden_states, cache, write_index, slot_ids, attn_bias, prefill_mask,
                decode_mask, forward_meta):
        query_nope, query_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, write_index, slot_ids, prefill_mask, decode_mask)
        parts = None
        if forward_meta.max_len_tensor_cpu[1]:
            parts = self.prefill(query_nope, query_pe, kv_ctx, attn_bias) * prefill_mask
        if forward_meta.max_len_tensor_cpu[2]:
            dec = self.decode(query_nope, query_pe, kv_ctx, attn_bias) * decode_mask
            if parts is None:
                parts = paddle.concat([dec, dec], axis=-1)[:, : HEADS * V]
            else:
                parts = paddle.concat([parts, dec], axis=-1)[:, : HEADS * V]
        return self.o_proj(parts), new_cache


class MLAReturns(MLABase):
    """Both arms of an inline-condition Tensor ``if`` return (no variable outlives the if)."""

    def forward(self, hidden_states, cache, write_index, slot_ids, attn_bias, prefill_mask,
                decode_mask, forward_meta):
        query_nope, query_pe, kv_ctx, new_cache = self.project(
            hidden_states, cache, write_index, slot_ids, prefill_mask, decode_mask)
        if forward_meta.max_len_tensor_cpu[1] > 0:
            out = merge_prefill_decode_output(
                self.prefill(query_nope, query_pe, kv_ctx, attn_bias),
                self.decode(query_nope, query_pe, kv_ctx, attn_bias), prefill_mask, decode_mask)
            return self.o_proj(out), new_cache
        else:
            return self.o_proj(self.decode(query_nope, query_pe, kv_ctx, attn_bias)), new_cache


FORMS = {"fd2025": MLA2025, "fd2026": MLA2026, "seed": MLASeed, "mask_both": MLAMaskBoth,
         "token_shape": MLATokenShape, "unsupported": MLAUnsupported,
         "returns": MLAReturns}


class Block(nn.Layer):
    def __init__(self, attn_cls: type, hidden: int, max_seq_len: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = attn_cls(hidden, max_seq_len)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.up = nn.Linear(hidden, 2 * hidden, bias_attr=False)
        self.down = nn.Linear(2 * hidden, hidden, bias_attr=False)

    def forward(self, hidden_states, cache, *attn_inputs):
        attn_out, new_cache = self.self_attn(self.input_layernorm(hidden_states), cache,
                                             *attn_inputs)
        hidden_states = hidden_states + attn_out
        mlp = self.down(F.silu(self.up(self.post_attention_layernorm(hidden_states))))
        return hidden_states + mlp, new_cache


class FDDeepseek(nn.Layer):
    """``forward(input_ids, positions, forward_meta) -> (logits, *new_caches)``."""

    def __init__(self, form: str, num_layers: int, hidden: int, vocab: int, max_seq_len: int):
        super().__init__()
        self.form, self.max_seq_len = form, max_seq_len
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.LayerList([Block(FORMS[form], hidden, max_seq_len)
                                    for _ in range(num_layers)])
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias_attr=False)

    def forward(self, input_ids, positions, forward_meta):
        hidden_states = self.embed_tokens(input_ids)
        write_index, slot_ids, attn_bias, prefill_mask, decode_mask = step_attention_inputs(
            positions, forward_meta, self.max_seq_len)
        caches = []
        for i, layer in enumerate(self.layers):
            hidden_states, cache = layer(hidden_states, forward_meta.caches[i], write_index,
                                         slot_ids, attn_bias, prefill_mask, decode_mask,
                                         forward_meta)
            caches.append(cache)
        return (self.lm_head(self.norm(hidden_states)), *caches)


def build(name: str = "fd-deepseek", form: str = "fd2026", seed: int = 0, num_layers: int = 2,
          hidden: int = 32, vocab: int = 64, max_num_seqs: int = 4, max_seq_len: int = 16,
          replace_host_tensor: bool = False):
    """The glue a user writes: build the Layer, set weights, hand it to the contract.

    `replace_host_tensor`: the engine replaces ``max_len_tensor_cpu`` with a new tensor every
    step instead of updating it in place.
    """
    layer = FDDeepseek(form, num_layers, hidden, vocab, max_seq_len)
    rng = np.random.default_rng(seed)
    for pname, p in layer.named_parameters():
        if not pname.endswith("weight") or "norm" not in pname:
            p.set_value(rng.normal(0.0, 0.3, size=p.shape).astype(np.float32))
    layer.eval()
    extra: dict[str, Any] = {}
    if form == "seed":
        extra = {"host_inputs": ("max_len_tensor_cpu", "needs_prefill", "needs_decode"),
                 "prepare_meta": set_branch_flags}
    elif replace_host_tensor:
        extra = {"prepare_meta": replace_max_len}
    return slot_model_bundle(name, layer, num_layers=num_layers, cache_width=LATENT,
                             max_num_seqs=max_num_seqs, max_seq_len=max_seq_len,
                             vocab_size=vocab, max_prefill_len=4, **extra)


def replace_max_len(forward_meta: Any) -> None:
    """A runner that builds a new host tensor each step (Paddle alone misses this once the
    tensor is bound by reference in a marked function)."""
    forward_meta.max_len_tensor_cpu = paddle.to_tensor(
        forward_meta.max_len_tensor_cpu.numpy(), place=paddle.CPUPlace())


def set_branch_flags(forward_meta: Any) -> None:
    """The seed change's runner: the branch flags, computed on the host before the step."""
    forward_meta.needs_prefill = forward_meta.max_len_tensor_cpu[1] > 0
    forward_meta.needs_decode = forward_meta.max_len_tensor_cpu[2] > 0
