"""A tiny stand-in with DeepSeek-V3's step contract, for fast framework tests.

Two layers, hidden size 16. Its attention Layer has the same two inline branch ``if``s on the
host tensor ``forward_meta.max_len_tensor_cpu`` as :class:`graphopt.models.deepseek_v3.modeling.
DeepseekV3MLAAttention`, writes a per-slot cache (the model's state) before them, and gives the
branches *different* projections, so running the wrong branch (or skipping one) changes the
output visibly. Forward meta and batch API are DeepSeek-V3's (:mod:`graphopt.models.slots`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from graphopt.errors import ConfigError
from graphopt.models.base import FLOAT32_BYTES, MemoryEstimate, ModelBundle
from graphopt.models.slots import slot_model_bundle, step_attention_inputs, write_cache


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny model; every field can be set from its Hydra node."""

    num_hidden_layers: int = 2
    hidden_size: int = 16
    latent_dim: int = 8
    vocab_size: int = 32
    max_num_seqs: int = 4
    max_seq_len: int = 16




class TinyAttention(nn.Layer):
    """Single-head attention over a latent cache, with prefill / decode branch projections."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.max_seq_len = config.max_seq_len
        self.latent_dim = config.latent_dim
        self.scale = config.latent_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, config.latent_dim, bias_attr=False)
        self.kv_proj = nn.Linear(config.hidden_size, config.latent_dim, bias_attr=False)
        self.prefill_proj = nn.Linear(config.latent_dim, config.hidden_size, bias_attr=False)
        self.decode_proj = nn.Linear(config.latent_dim, config.hidden_size, bias_attr=False)

    def forward(
        self,
        hidden_states: paddle.Tensor,
        cache: paddle.Tensor,
        write_index: paddle.Tensor,
        slot_ids: paddle.Tensor,
        attn_bias: paddle.Tensor,
        prefill_mask: paddle.Tensor,
        decode_mask: paddle.Tensor,
        forward_meta: Any,
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Returns ``(output [T, hidden], new cache)``."""
        new_cache = write_cache(
            cache,
            write_index,
            self.kv_proj(hidden_states),
            prefill_mask + decode_mask,
            self.max_seq_len,
            self.latent_dim,
        )
        ctx = paddle.gather(new_cache, slot_ids)  # [T, S, latent]
        q = self.q_proj(hidden_states).unsqueeze(1)  # [T, 1, latent]
        probs = F.softmax(paddle.matmul(q, ctx, transpose_y=True) * self.scale + attn_bias, axis=-1)
        attn = paddle.matmul(probs, ctx).squeeze(1)  # [T, latent]
        out = paddle.zeros_like(hidden_states)
        if forward_meta.max_len_tensor_cpu[1]:  # prefill tokens present
            out = out + self.prefill_proj(attn) * prefill_mask
        if forward_meta.max_len_tensor_cpu[2]:  # decode tokens present
            out = out + self.decode_proj(attn) * decode_mask
        return out, new_cache


class TinyBlock(nn.Layer):
    """Residual attention, then a residual tanh MLP."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.self_attn = TinyAttention(config)
        self.mlp = nn.Linear(config.hidden_size, config.hidden_size, bias_attr=False)

    def forward(
        self, hidden_states: paddle.Tensor, cache: paddle.Tensor, *attn_inputs: Any
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        attn_out, new_cache = self.self_attn(hidden_states, cache, *attn_inputs)
        hidden_states = hidden_states + attn_out
        return hidden_states + paddle.tanh(self.mlp(hidden_states)), new_cache


class TinyModel(nn.Layer):
    """``forward(input_ids, positions, forward_meta) -> (logits, *new_caches)``."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList([TinyBlock(config) for _ in range(config.num_hidden_layers)])
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias_attr=False)

    def forward(
        self, input_ids: paddle.Tensor, positions: paddle.Tensor, forward_meta: Any
    ) -> tuple[paddle.Tensor, ...]:
        hidden_states = self.embed_tokens(input_ids)
        step_inputs = step_attention_inputs(positions, forward_meta, self.config.max_seq_len)
        new_caches = []
        for i, layer in enumerate(self.layers):
            hidden_states, cache = layer(
                hidden_states, forward_meta.caches[i], *step_inputs, forward_meta
            )
            new_caches.append(cache)
        return (self.lm_head(hidden_states), *new_caches)


@dataclass
class TinyNode:
    """Schema of the ``model`` node of the tiny family (Hydra checks every value)."""

    _target_: str = "graphopt.models.tiny.build"
    name: str = "tiny"
    seed: int = 0
    num_hidden_layers: int = 2
    hidden_size: int = 16
    latent_dim: int = 8
    vocab_size: int = 32
    max_num_seqs: int = 4
    max_seq_len: int = 16

    def __post_init__(self) -> None:
        for key in ("num_hidden_layers", "hidden_size", "latent_dim", "vocab_size",
                    "max_num_seqs", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key}={getattr(self, key)}: must be a positive integer")


def estimate_memory(name: str = "tiny", seed: int = 0, **sizes: Any) -> MemoryEstimate:
    """Parameters and caches of the model these keys build (see :class:`MemoryEstimate`)."""
    c = TinyConfig(**{k: v for k, v in sizes.items() if k in TinyConfig.__dataclass_fields__})
    h, lat = c.hidden_size, c.latent_dim
    per_layer = 4 * h * lat + h * h  # q, kv, prefill, decode projections; the MLP
    params = 2 * c.vocab_size * h + c.num_hidden_layers * per_layer  # + embedding, lm_head
    # one cache per layer, with the scratch slot padding tokens write to
    cache = c.num_hidden_layers * (c.max_num_seqs + 1) * c.max_seq_len * lat
    reduce = ({"num_hidden_layers": c.num_hidden_layers, "hidden_size": h} if params >= cache
              else {"max_num_seqs": c.max_num_seqs, "max_seq_len": c.max_seq_len})
    return MemoryEstimate(params * FLOAT32_BYTES, cache * FLOAT32_BYTES, reduce)


def build(name: str = "tiny", seed: int = 0, **sizes: Any) -> ModelBundle:
    """Build the tiny bundle (random weights from `seed`); runs in milliseconds."""
    fields = set(TinyConfig.__dataclass_fields__)
    unknown = sorted(set(sizes) - fields)
    if unknown:
        raise ConfigError(f"model.{unknown[0]}: not a tiny-model field (choose from "
                          f"{', '.join(sorted(fields))})")
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"model.{key}={value!r}: must be a positive integer")
    config = TinyConfig(**sizes)
    layer = TinyModel(config)
    rng = np.random.default_rng(seed)
    # std 0.3 on hidden 16 keeps activations O(1): branch outputs differ visibly.
    for _, param in layer.named_parameters():
        param.set_value(rng.normal(0.0, 0.3, size=param.shape).astype(np.float32))
    layer.eval()
    bundle = slot_model_bundle(name, layer, config, max_prefill_len=4)
    bundle.provenance = {"weights": {"random": True, "seed": seed}}
    return bundle
