"""A FastDeploy-style model written outside graphopt whose MLP runs in chunks the way
FastDeploy's ``forward_chunked_moe`` does: the chunk count from a host tensor holding the step's
token count, a ``while`` loop appending each chunk's output to a Python list, ``paddle.concat``
after it. The attention is one of tests/fastdeploy_models.py's forms."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from graphopt.models.slots import slot_model_bundle
from tests import fastdeploy_models as fm

CHUNK = 4


class ChunkedMLP(nn.Layer):
    def __init__(self, hidden):
        super().__init__()
        self.up = nn.Linear(hidden, 2 * hidden, bias_attr=False)
        self.down = nn.Linear(2 * hidden, hidden, bias_attr=False)

    def forward(self, x, forward_meta):
        token_num = forward_meta.token_num_cpu[0]
        num_chunks = (token_num + CHUNK - 1) // CHUNK
        # equal chunks (Paddle concatenates a list only of equal shapes): pad, cut off after
        x_pad = paddle.concat([x, paddle.zeros([CHUNK, x.shape[1]], dtype=x.dtype)])
        outs = []
        i = 0
        while i < num_chunks:
            chunk = x_pad[i * CHUNK:(i + 1) * CHUNK]
            outs.append(self.down(F.silu(self.up(chunk))))
            i += 1
        return paddle.concat(outs)[:paddle.shape(x)[0]]


class Block(fm.Block):
    def __init__(self, attn_cls, hidden, max_seq_len):
        super().__init__(attn_cls, hidden, max_seq_len)
        self.mlp = ChunkedMLP(hidden)

    def forward(self, hidden_states, cache, *attn_inputs):
        attn_out, new_cache = self.self_attn(self.input_layernorm(hidden_states), cache,
                                             *attn_inputs)
        hidden_states = hidden_states + attn_out
        forward_meta = attn_inputs[-1]
        mlp = self.mlp(self.post_attention_layernorm(hidden_states), forward_meta)
        return hidden_states + mlp, new_cache


class Model(fm.FDDeepseek):
    def __init__(self, form, num_layers, hidden, vocab, max_seq_len):
        super().__init__(form, num_layers, hidden, vocab, max_seq_len)
        self.layers = nn.LayerList([Block(fm.FORMS[form], hidden, max_seq_len)
                                    for _ in range(num_layers)])


def token_count(forward_meta):
    """The engine's runner: the step's token count on the host, updated in place."""
    count = np.array([forward_meta.slot_ids.shape[0]], dtype=np.int32)
    if getattr(forward_meta, "token_num_cpu", None) is None:
        forward_meta.token_num_cpu = paddle.to_tensor(count, place=paddle.CPUPlace())
    else:
        forward_meta.token_num_cpu.set_value(count)


def seed_runner(forward_meta):
    """The seed form's runner: the token count and the branch flags, before each step."""
    token_count(forward_meta)
    fm.set_branch_flags(forward_meta)


def build(name="chunked", form="fd2026", declare_host=True, seed=0, num_layers=2, hidden=32,
          vocab=64, max_num_seqs=4, max_seq_len=16):
    """The glue a user writes. `declare_host=False` leaves ``token_num_cpu`` out of the host
    inputs, as a user may forget to list it."""
    layer = Model(form, num_layers, hidden, vocab, max_seq_len)
    rng = np.random.default_rng(seed)
    for pname, p in layer.named_parameters():
        if not pname.endswith("weight") or "norm" not in pname:
            p.set_value(rng.normal(0.0, 0.3, size=p.shape).astype(np.float32))
    layer.eval()
    host = ["max_len_tensor_cpu"] + (["token_num_cpu"] if declare_host else [])
    if form == "seed":
        host += ["needs_prefill", "needs_decode"]
    return slot_model_bundle(name, layer, num_layers=num_layers, cache_width=fm.LATENT,
                             max_num_seqs=max_num_seqs, max_seq_len=max_seq_len, vocab_size=vocab,
                             max_prefill_len=4, host_inputs=tuple(host),
                             prepare_meta=seed_runner if form == "seed" else token_count)
