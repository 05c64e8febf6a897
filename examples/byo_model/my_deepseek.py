"""A FastDeploy-style DeepSeek-V3 decoder, written the way FastDeploy's MLA attention is written
today (flags computed once, the output assigned only inside the branches, a nested ``if`` merging
prefill and decode), plus the glue graphopt needs: ``build()`` at the bottom.

Run it from this directory:

    python ../../tools/optimize.py 'hydra.searchpath=[file://conf]' model=my_deepseek
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from graphopt.models.slots import slot_model_bundle, step_attention_inputs, write_cache


class RMSNorm(nn.Layer):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        return x * paddle.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


def merge_prefill_decode_output(attn_out, fmqa_out, prefill_mask, decode_mask):
    return attn_out * prefill_mask + fmqa_out * decode_mask


class DeepseekV3MLAAttention(nn.Layer):
    def __init__(self, hidden, heads, nope, rope, v_dim, kv_rank, max_seq_len):
        super().__init__()
        self.heads, self.nope, self.rope, self.v_dim, self.kv_rank = heads, nope, rope, v_dim, kv_rank
        self.max_seq_len = max_seq_len
        self.q_proj = nn.Linear(hidden, heads * (nope + rope), bias_attr=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, kv_rank + rope, bias_attr=False)
        self.kv_a_layernorm = RMSNorm(kv_rank)
        self.kv_b_proj = nn.Linear(kv_rank, heads * (nope + v_dim), bias_attr=False)
        self.o_proj = nn.Linear(heads * v_dim, hidden, bias_attr=False)
        self.softmax_scale = (nope + rope) ** -0.5

    def forward(self, forward_meta, hidden_states, cache, write_index, slot_ids, attn_bias,
                prefill_mask, decode_mask):
        query = self.q_proj(hidden_states).reshape([-1, self.heads, self.nope + self.rope])
        query_nope, query_pe = query.split([self.nope, self.rope], axis=-1)
        compressed_kv, key_pe = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_rank, self.rope], axis=-1)
        compressed_kv = self.kv_a_layernorm(compressed_kv)
        new_cache = write_cache(cache, write_index, paddle.concat([compressed_kv, key_pe], -1),
                                prefill_mask + decode_mask, self.max_seq_len,
                                self.kv_rank + self.rope)
        kv_ctx = paddle.gather(new_cache, slot_ids)  # [T, S, kv_rank + rope]

        need_do_prefill = forward_meta.max_len_tensor_cpu[1] > 0
        need_do_decode = forward_meta.max_len_tensor_cpu[2] > 0

        if need_do_prefill:  # max_enc_len_this_time
            c_ctx, kpe_ctx = kv_ctx.split([self.kv_rank, self.rope], axis=-1)
            key_value = self.kv_b_proj(c_ctx).reshape(
                [-1, self.max_seq_len, self.heads, self.nope + self.v_dim])
            key_nope, value = key_value.split([self.nope, self.v_dim], axis=-1)
            scores = paddle.matmul(query_nope.unsqueeze(2), key_nope.transpose([0, 2, 3, 1]))
            scores = scores.squeeze(2) + paddle.matmul(query_pe, kpe_ctx, transpose_y=True)
            probs = F.softmax(scores * self.softmax_scale + attn_bias, axis=-1)
            fmha_out = paddle.matmul(probs.unsqueeze(2), value.transpose([0, 2, 1, 3])).squeeze(2)
            attn_out = fmha_out.reshape([-1, self.heads * self.v_dim])

        if need_do_decode:  # max_dec_len_this_time
            w = self.kv_b_proj.weight.reshape([self.kv_rank, self.heads, self.nope + self.v_dim])
            w_uk, w_uv = w.split([self.nope, self.v_dim], axis=-1)
            q_nope_out = paddle.matmul(query_nope.transpose([1, 0, 2]), w_uk.transpose([1, 2, 0]))
            q_input = paddle.concat([q_nope_out.transpose([1, 0, 2]), query_pe], axis=-1)
            probs = F.softmax(paddle.matmul(q_input, kv_ctx, transpose_y=True)
                              * self.softmax_scale + attn_bias, axis=-1)
            fmqa_out = paddle.matmul(probs, kv_ctx[:, :, : self.kv_rank]).transpose([1, 0, 2])
            fmqa_out = paddle.matmul(fmqa_out, w_uv.transpose([1, 0, 2])).transpose([1, 0, 2])
            fmqa_out = fmqa_out.reshape([-1, self.heads * self.v_dim])
            if need_do_prefill:
                attn_out = merge_prefill_decode_output(attn_out, fmqa_out, prefill_mask,
                                                       decode_mask)
            else:
                attn_out = fmqa_out
        return self.o_proj(attn_out), new_cache


class DecoderLayer(nn.Layer):
    def __init__(self, hidden, **attn):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = DeepseekV3MLAAttention(hidden, **attn)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, 2 * hidden, bias_attr=False)
        self.up_proj = nn.Linear(hidden, 2 * hidden, bias_attr=False)
        self.down_proj = nn.Linear(2 * hidden, hidden, bias_attr=False)

    def forward(self, forward_meta, hidden_states, cache, *attn_inputs):
        attn_out, new_cache = self.self_attn(forward_meta, self.input_layernorm(hidden_states),
                                             cache, *attn_inputs)
        hidden_states = hidden_states + attn_out
        x = self.post_attention_layernorm(hidden_states)
        return hidden_states + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), \
            new_cache


class DeepseekV3ForCausalLM(nn.Layer):
    """One decoder step: ``forward(input_ids, positions, forward_meta) -> (logits, *caches)``."""

    def __init__(self, vocab_size, hidden_size, num_layers, max_seq_len, **attn):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.LayerList([DecoderLayer(hidden_size, max_seq_len=max_seq_len, **attn)
                                    for _ in range(num_layers)])
        self.norm = RMSNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias_attr=False)

    def forward(self, input_ids, positions, forward_meta):
        hidden_states = self.embed_tokens(input_ids)
        step_inputs = step_attention_inputs(positions, forward_meta, self.max_seq_len)
        caches = []
        for i, layer in enumerate(self.layers):
            hidden_states, cache = layer(forward_meta, hidden_states, forward_meta.caches[i],
                                         *step_inputs)
            caches.append(cache)
        return (self.lm_head(self.norm(hidden_states)), *caches)


# -- the glue graphopt needs: a builder that returns a ModelBundle ------------------------------
def build(name="my_deepseek", seed=0, vocab_size=128, hidden_size=64, num_layers=2, heads=2,
          nope=16, rope=8, v_dim=16, kv_rank=16, max_num_seqs=4, max_seq_len=32):
    """Build the Layer with seeded random weights and hand it to graphopt's slot-cache contract."""
    layer = DeepseekV3ForCausalLM(vocab_size, hidden_size, num_layers, max_seq_len, heads=heads,
                                  nope=nope, rope=rope, v_dim=v_dim, kv_rank=kv_rank)
    rng = np.random.default_rng(seed)
    for pname, param in layer.named_parameters():
        if "norm" not in pname:
            param.set_value(rng.normal(0, 0.1, param.shape).astype("float32"))
    layer.eval()
    return slot_model_bundle(name, layer, num_layers=num_layers, cache_width=kv_rank + rope,
                             max_num_seqs=max_num_seqs, max_seq_len=max_seq_len,
                             vocab_size=vocab_size)
