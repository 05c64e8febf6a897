"""DeepSeek-V3 (MLA + noaux_tc MoE), graphopt's flagship model family.

``build(cfg)`` turns the Hydra ``model`` node (``conf/model/dsv3.yaml``) into a
:class:`models.base.ModelBundle`: config (:mod:`.config`), dygraph Layer (:mod:`.modeling`),
weights (:mod:`.weights`), forward meta and batch builders (:mod:`.batch`).
"""

from __future__ import annotations

from typing import Any

from models.base import ModelBundle
from models.deepseek_v3.batch import ForwardMeta, SlotBatcher, new_caches
from models.deepseek_v3.config import DeepseekV3Config, resolve_config
from models.deepseek_v3.modeling import DeepseekV3ForCausalLM, DeepseekV3MLAAttention
from models.deepseek_v3.weights import init_random_weights, load_hf_safetensors

__all__ = ["DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3MLAAttention", "build"]


def build(cfg: Any) -> ModelBundle:
    """Build the DeepSeek-V3 bundle described by the Hydra ``model`` node."""
    config = resolve_config(cfg)
    seed = cfg.get("seed", 0)
    layer = DeepseekV3ForCausalLM(config)
    if cfg.get("weights"):
        load_hf_safetensors(layer, cfg.get("weights"))
    else:
        init_random_weights(layer, seed if seed is not None else 0)
    layer.eval()
    meta = ForwardMeta(
        new_caches(
            config.num_hidden_layers, config.max_num_seqs, config.max_seq_len, config.latent_dim
        )
    )
    batcher = SlotBatcher(meta, config.vocab_size, config.max_num_seqs, config.max_seq_len)
    return ModelBundle(
        name=cfg.get("name") or "dsv3",
        layer=layer,
        meta=meta,
        host_inputs=("max_len_tensor_cpu",),
        state_fields=tuple(f"caches.{i}" for i in range(config.num_hidden_layers)),
        make_batch=batcher.make_batch,
        random_batch=batcher.random_batch,
        reset_state=batcher.reset_state,
        pad_batch=batcher.pad_batch,
        config=config,
    )
